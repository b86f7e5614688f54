"""Google streaming synthesis: the real SDK client against a real gRPC fake, into the simulated call.

Real clock: gRPC and the reader threads run in real time, so the autojump clock would fire timeouts early.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import trio
import trio.testing

from tests.fakes.google_tts import GoogleTTSFake
from tests.fakes.vendor_faults import Fault, fake_fill_byte
from tests.vendor_support import (
    FAULTS,
    assert_threads_back,
    client_threads,
    finished,
    frames_of,
    say,
    short_thread_idle,
    vendor_call,
    wait_until,
)
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayFlush
from tts_streamer.adapters.google_tts import GoogleTTSEngine
from tts_streamer.adapters.voice import VoiceEngine, VoiceError, VoiceSpec

pytestmark = pytest.mark.realtime
LONG = " ".join(f"Sentence number {i} goes on for a while." for i in range(12))


@pytest.fixture
def fake() -> Iterator[GoogleTTSFake]:
    with GoogleTTSFake(
        seconds_per_char=0.02, chunk_bytes=400, chunk_interval=0.01, first_audio_delay=0.03
    ) as f:
        yield f


@pytest.fixture
async def engine(fake: GoogleTTSFake) -> AsyncIterator[GoogleTTSEngine]:
    eng = GoogleTTSEngine(
        channel=grpc.insecure_channel(fake.address), idle_half_close=0.4, response_timeout=0.6
    )
    yield eng
    await eng.aclose()


async def test_is_a_voice_engine(engine: GoogleTTSEngine) -> None:
    voice_engine: VoiceEngine = engine
    assert voice_engine.name == "gcp"


async def test_speaks_an_utterance_end_to_end(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Hello there.", "How are you today?")
        await finished(sink)
    assert frames_of(call, "Hello there.") >= 10 and frames_of(call, "How are you today?") >= 15
    rpc = fake.rpcs[0]
    assert (rpc.encoding, rpc.sample_rate, rpc.voice) == ("MULAW", 8000, "en-US-Chirp3-HD-Charon")
    assert rpc.texts == ["Hello there.", "How are you today?"] and rpc.outcome == "completed"
    assert engine.open_streams == 0 and not sink.of(ev.SessionError)


async def test_language_and_gender_pick_a_chirp3_voice(fake, engine):
    with trio.fail_after(3):
        async with engine.open_stream(VoiceSpec(language="ja_jp", gender="female")) as stream:
            await stream.send_text("Konnichiwa.")
            await stream.end_input()
            audio = b"".join([c async for c in stream.audio()])
    assert audio and (fake.rpcs[0].voice, fake.rpcs[0].language) == ("ja-JP-Chirp3-HD-Aoede", "ja-JP")


async def test_flush_cancels_the_rpc_and_the_next_utterance_speaks(fake, engine, nursery, monkeypatch):
    short_thread_idle(monkeypatch)
    baseline = client_threads()
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, LONG, finish=False)
        await sink.wait_for(ev.PlayStarted)
        await trio.sleep(0.2)
        assert fake.open_rpcs
        await sup.call("c1", SayFlush())
        released = await wait_until(lambda: not fake.open_rpcs, 0.5, "the fake saw the RPC end")
        assert fake.rpcs[0].outcome == "cancelled" and engine.open_streams == 0
        await sup.call("c1", SayAdd("After the flush."))
        await sup.call("c1", SayFinish())
        await finished(sink)
    flush_at = next(c.time for c in call.controls if c.command and c.command.name == "FLUSH_MEDIA")
    late = [f for f in call.played if f.time > flush_at and f.data[0] == fake_fill_byte(LONG)]
    assert len(late) <= 1  # at most the frame playing when FLUSH_MEDIA arrived
    assert frames_of(call, "After the flush.") >= 10
    assert released < 0.5
    await assert_threads_back(baseline)


async def test_stop_releases_the_rpc_and_every_thread(fake, engine, nursery, monkeypatch):
    short_thread_idle(monkeypatch)
    baseline = client_threads()
    async with vendor_call(engine, nursery) as (sup, sink, _):
        await say(sup, LONG, finish=False)
        await sink.wait_for(ev.PlayStarted)
        assert client_threads() > baseline  # a reader thread is parked in next(call)
        await sup.stop("c1")
        assert engine.open_streams == 0
        await wait_until(lambda: not fake.open_rpcs, 0.5, "the fake saw the RPC end")
    assert fake.rpcs[0].outcome == "cancelled"
    await assert_threads_back(baseline)


async def test_idle_half_close_then_reopen_on_the_next_text(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "First part.", finish=False)
        await wait_until(lambda: fake.rpcs and fake.rpcs[0].ended, 2, "half-closed after idling")
        await sup.call("c1", SayAdd("Second part."))
        await sup.call("c1", SayFinish())
        await finished(sink)
    assert [(r.texts, r.outcome) for r in fake.rpcs] == [
        (["First part."], "completed"),
        (["Second part."], "completed"),
    ]
    assert frames_of(call, "First part.") >= 10 and frames_of(call, "Second part.") >= 10


async def test_server_idle_abort_is_a_normal_end(fake, nursery):
    fake.idle_abort = 0.2  # the server gives up before our half-close
    engine = GoogleTTSEngine(channel=grpc.insecure_channel(fake.address), idle_half_close=5)
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Before the pause.", finish=False)
        await wait_until(lambda: fake.rpcs and fake.rpcs[0].outcome == "aborted", 2, "server aborted")
        await sup.call("c1", SayAdd("After the pause."))
        await sup.call("c1", SayFinish())
        await finished(sink)
    assert frames_of(call, "After the pause.") >= 10 and not sink.of(ev.SessionError)
    await engine.aclose()


# "drop" stops the whole fake server (a lost connection), so the next utterance has nobody to talk to:
# it has its own test below.
@pytest.mark.parametrize("kind", [k for k in FAULTS if k != "drop"])
async def test_faults_end_cleanly_and_the_next_utterance_speaks(fake, engine, nursery, kind, monkeypatch):
    short_thread_idle(monkeypatch)
    baseline = client_threads()
    fake.faults.add(Fault(kind, after_bytes=800, delay=0.2))
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Speak this sentence please.")
        first = await finished(sink, within=4)
        errors = sink.of(ev.SessionError)
        if kind == "slow_first_byte":
            assert not errors and first.completed
        else:
            expected = {
                "stall": "vendor_timeout",
                "error": "vendor_unavailable",
                "malformed": "vendor_protocol",
            }
            assert [e.kind for e in errors] == [expected[kind]]
        await say(sup, "And then this one.")
        await finished(sink, n=2)
    assert frames_of(call, "And then this one.") >= 10
    await wait_until(lambda: not fake.open_rpcs, 1, "every RPC ended")
    await assert_threads_back(baseline)


async def test_connection_drop_is_a_clean_error(fake, engine):
    fake.faults.add(Fault("drop", after_bytes=800))
    with trio.fail_after(3), pytest.raises(VoiceError) as info:
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(LONG)
            await stream.end_input()
            async for _ in stream.audio():
                pass
    assert info.value.kind in {"unavailable", "cancelled", "vendor_error"}
    assert engine.open_streams == 0


async def test_responses_reach_trio_while_its_thread_is_busy(fake, engine):
    """The reader thread keeps taking responses and handing them over while Trio's thread is busy: one
    hand-over per response, no Trio round trip before the next (which at 200 streams read slower than
    the vendor sent). Before, it took one response and waited for Trio to ask for the next."""
    fake.chunk_interval, fake.first_audio_delay = 0.0, 0.0
    text = "Every chunk of this sentence is sent at once."
    expected = len(fake.audio_for(text))
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(text)
            await stream.end_input()
            audio = stream.audio()
            assert await audio.__anext__()
            _hold_trios_thread(fake, expected)
            await trio.testing.wait_all_tasks_blocked()
            assert fake.rpcs[0].bytes_sent == expected
            assert stream.pipe.bytes_in == expected
            await audio.aclose()


def _hold_trios_thread(fake: GoogleTTSFake, expected: int) -> None:
    """Block the calling (Trio's) thread, so nothing in Trio runs, until the fake has sent ``expected``
    bytes, and a little longer for the reader thread to take them."""
    held_until = time.monotonic() + 5
    while fake.rpcs[0].bytes_sent < expected and time.monotonic() < held_until:
        time.sleep(0.01)
    time.sleep(0.3)
