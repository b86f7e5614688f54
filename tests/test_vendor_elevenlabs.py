"""ElevenLabs multi-stream-input: the adapter against a trio-websocket fake over loopback TCP.

Real clock: real sockets (the autojump clock would fire the adapter's timeouts early).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from tests.fakes.elevenlabs import ElevenLabsFake
from tests.fakes.vendor_faults import Fault, fake_fill_byte
from tests.vendor_support import FAULTS, finished, frames_of, say, vendor_call, wait_until
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayFlush
from tts_streamer.adapters.elevenlabs import ElevenLabsEngine
from tts_streamer.adapters.voice import VoiceEngine, VoiceError, VoiceSpec

pytestmark = pytest.mark.realtime
LONG = " ".join(f"Sentence number {i} goes on for a while." for i in range(12))


@pytest.fixture
async def fake(nursery: trio.Nursery) -> ElevenLabsFake:
    f = ElevenLabsFake(seconds_per_char=0.02, chunk_bytes=400, chunk_interval=0.01, first_audio_delay=0.03)
    await nursery.start(f.serve)
    return f


@pytest.fixture
async def engine(fake: ElevenLabsFake) -> AsyncIterator[ElevenLabsEngine]:
    yield ElevenLabsEngine(
        "test-key", base_url=fake.base_url, response_timeout=0.6, keepalive_interval=0.3, inactivity_timeout=1
    )


async def test_is_a_voice_engine(engine: ElevenLabsEngine) -> None:
    voice_engine: VoiceEngine = engine
    assert voice_engine.name == "elevenlabs"


async def test_speaks_an_utterance_end_to_end(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Hello there.", "How are you today?")
        await finished(sink)
    assert frames_of(call, "Hello there. ") >= 10 and frames_of(call, "How are you today? ") >= 15
    (conn,) = fake.connections
    assert conn.query["output_format"] == "ulaw_8000" and conn.voice_id == "EXAVITQu4vr4xnSDxMaL"
    assert conn.close_code == 1000 and engine.open_streams == 0 and not sink.of(ev.SessionError)
    # Our messages are the SDK's own multi-context client messages.
    from elevenlabs.types import WebsocketTtsClientMessageMulti

    for message in conn.inbound:
        WebsocketTtsClientMessageMulti.model_validate(message)
    assert conn.inbound[-1] == {"close_socket": True}


async def test_flush_closes_the_context_drops_late_audio_and_the_next_utterance_speaks(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, LONG, finish=False)
        await sink.wait_for(ev.PlayStarted)
        await trio.sleep(0.2)
        await sup.call("c1", SayFlush())
        first = fake.connections[0]
        closing = {"context_id": next(iter(first.contexts)), "close_context": True}
        released = await wait_until(lambda: closing in first.inbound, 0.5, "the fake saw the context close")
        # The context closed, not the socket: the call keeps its socket for the next utterance.
        assert first.closed_at is None and engine.open_streams == 0
        await sup.call("c1", SayAdd("After the flush."))
        await sup.call("c1", SayFinish())
        await finished(sink)
    assert len(fake.connections) == 1 and first.close_code == 1000
    flush_at = next(c.time for c in call.controls if c.command and c.command.name == "FLUSH_MEDIA")
    assert len([f for f in call.played if f.time > flush_at and f.data[0] == fake_fill_byte(LONG)]) <= 1
    assert frames_of(call, "After the flush.") >= 10
    assert released < 0.5


async def test_audio_of_a_dead_context_is_dropped(fake):
    fake.late_chunks = 3
    # Its own engine: the fixture's 0.6 s response timeout (short, for the timeout tests) is not what
    # this test is about, and a busy machine can take that long to the first audio.
    engine = ElevenLabsEngine("test-key", base_url=fake.base_url, response_timeout=3, keepalive_interval=0.3)
    with trio.fail_after(6):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(LONG)
            async for _ in stream.audio():
                break
            stream._live = False  # as after a flush: whatever still arrives must not be yielded
            await trio.sleep(0.1)
            assert stream.late_chunks_dropped > 0


async def test_stop_closes_the_socket_cleanly(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, _):
        await say(sup, LONG, finish=False)
        await sink.wait_for(ev.PlayStarted)
        await sup.stop("c1")
        assert engine.open_streams == 0
        await wait_until(lambda: not fake.open_connections, 0.5, "the fake saw the socket close")
    assert fake.connections[0].close_code == 1000


async def test_keepalive_holds_the_context_over_a_pause(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Before the pause.", finish=False)
        await trio.sleep(1.3)  # longer than the 1 s inactivity timeout
        await sup.call("c1", SayAdd("After the pause."))
        await sup.call("c1", SayFinish())
        await finished(sink)
    (ctx,) = fake.connections[0].contexts.values()
    # Spoken to its end, then closed by us (the socket outlives it): no timeout, no drain needed.
    assert ctx.keepalives >= 2 and ctx.outcome == "closed" and ctx.final_at is not None
    assert frames_of(call, "After the pause. ") >= 10 and not sink.of(ev.SessionError)


@pytest.mark.parametrize("kind", FAULTS)
async def test_faults_end_cleanly_and_the_next_utterance_speaks(fake, engine, nursery, kind):
    fake.faults.add(Fault(kind, after_bytes=800, delay=0.2))
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Speak this sentence please.")
        await finished(sink, within=4)
        kinds = [e.kind for e in sink.of(ev.SessionError)]
        expected = {
            "slow_first_byte": [],
            "stall": ["vendor_timeout"],
            "error": ["vendor_vendor_error"],
            "drop": ["vendor_connection"],
            "malformed": ["vendor_protocol"],
        }
        assert kinds == expected[kind]
        await say(sup, "And then this one.")
        await finished(sink, n=2)
    assert frames_of(call, "And then this one. ") >= 10
    await wait_until(lambda: not fake.open_connections, 1, "every socket closed")
    assert engine.open_streams == 0


async def test_a_wrong_key_is_an_auth_error(fake):
    engine = ElevenLabsEngine("wrong", base_url=fake.base_url, response_timeout=0.6)
    with trio.fail_after(3), pytest.raises(VoiceError) as info:
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text("Hello.")
            await stream.end_input()
            async for _ in stream.audio():
                pass
    assert info.value.kind == "auth"


async def test_nobody_listening_is_a_connection_error():
    engine = ElevenLabsEngine("k", base_url="ws://127.0.0.1:9", connect_timeout=1)
    with trio.fail_after(3), pytest.raises(VoiceError) as info:
        async with engine.open_stream(VoiceSpec()):
            pass  # pragma: no cover
    assert info.value.kind == "connection" and engine.open_streams == 0
