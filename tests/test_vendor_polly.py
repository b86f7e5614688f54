"""AWS Polly: the real boto3 client (endpoint_url) against a stdlib HTTP fake, into the simulated call.

Real clock: worker threads and sockets run in real time.
"""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
import trio
from botocore import exceptions as bexc

from tests.fakes.polly import PollyFake
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
from tts_streamer.adapters.polly import PollyEngine, make_client, map_error
from tts_streamer.adapters.voice import VoiceEngine, VoiceSpec

pytestmark = pytest.mark.realtime
SENTENCES = [f"Sentence number {i} goes on for a while." for i in range(12)]
LONG = " ".join(SENTENCES)


@pytest.fixture
def fake() -> Iterator[PollyFake]:
    with PollyFake(seconds_per_char=0.02, chunk_bytes=800, chunk_interval=0.01, first_audio_delay=0.03) as f:
        yield f


def client_for(fake: PollyFake, **kwargs: object) -> object:
    session = boto3.Session(aws_access_key_id="AKIDTEST", aws_secret_access_key="x", region_name="eu-west-1")
    return make_client(session, endpoint_url=fake.endpoint_url, read_timeout=1.0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def engine(fake: PollyFake) -> PollyEngine:
    return PollyEngine(client_for(fake), max_concurrency=8)


async def test_is_a_voice_engine(engine: PollyEngine) -> None:
    voice_engine: VoiceEngine = engine
    assert voice_engine.name == "aws"
    assert engine.client.meta.config.max_pool_connections == 50  # make_client's default, sized by config


async def test_speaks_an_utterance_end_to_end_one_request_per_sentence(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Hello there. How are you today?")
        await finished(sink)
    assert frames_of(call, "Hello there.") >= 10 and frames_of(call, "How are you today?") >= 15
    assert sorted(r.text for r in fake.requests) == ["Hello there.", "How are you today?"]
    first = next(r for r in fake.requests if r.text == "Hello there.")
    assert (first.output_format, first.sample_rate, first.voice, first.engine) == (
        "pcm",
        "8000",
        "Joanna",
        "neural",
    )
    assert engine.open_streams == 0 and not sink.of(ev.SessionError)


async def test_next_sentence_is_fetched_while_one_is_read(fake, engine):
    fake.chunk_interval = 0.03
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec(language="ja-JP", gender="male")) as stream:
            await stream.send_text(" ".join(SENTENCES[:3]))
            await stream.end_input()
            audio = b"".join([c async for c in stream.audio()])
    a, b, c = sorted(fake.requests, key=lambda r: SENTENCES.index(r.text))
    assert b.started_at < a.ended_at  # fetched while the one before was being read
    assert c.started_at >= a.ended_at - 0.01  # but never more than one ahead (the fake notes the end late)
    assert a.voice == "Takumi" and a.language == "ja-JP"
    assert audio[0] == fake_fill_byte(SENTENCES[0]) and audio[-1] == fake_fill_byte(SENTENCES[2])
    assert stream.inputs_spoken == 1


async def test_long_sentences_are_split_under_the_limit(fake):
    engine = PollyEngine(client_for(fake), max_chars=40)
    text = "This sentence is rather long, with clauses, and more words than forty characters allow."
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(text)
            await stream.end_input()
            [c async for c in stream.audio()]
    assert len(fake.requests) >= 3 and all(len(r.text) <= 40 for r in fake.requests)
    assert " ".join(sorted((r.text for r in fake.requests), key=text.index)) == text


async def test_flush_drops_the_body_and_the_next_utterance_speaks(fake, engine, nursery, monkeypatch):
    short_thread_idle(monkeypatch)
    baseline = client_threads()
    engine.drain_bytes = 0  # the drop path (test_vendor_reuse covers draining to keep the connection)
    fake.chunk_interval = 0.05  # bodies last a while, so the flush lands mid-body
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, LONG, finish=False)
        await sink.wait_for(ev.PlayStarted)
        await sup.call("c1", SayFlush())
        assert engine.open_streams == 0
        out = await wait_until(lambda: engine.threads_running == 0, 0.5, "workers left their bodies")
        seen = await wait_until(lambda: not fake.open_requests, 0.5, "the fake saw the disconnect")
        assert "disconnected" in [r.outcome for r in fake.requests]
        fake.chunk_interval = 0.01
        await sup.call("c1", SayAdd("After the flush."))
        await sup.call("c1", SayFinish())
        await finished(sink)
    flush_at = next(c.time for c in call.controls if c.command and c.command.name == "FLUSH_MEDIA")
    old = {fake_fill_byte(s) for s in SENTENCES}
    assert len([f for f in call.played if f.time > flush_at and f.data[0] in old]) <= 1
    assert frames_of(call, "After the flush.") >= 10
    assert out < 0.5 and seen < 0.5
    await assert_threads_back(baseline)


async def test_stop_releases_every_thread_and_connection(fake, engine, nursery, monkeypatch):
    short_thread_idle(monkeypatch)
    baseline = client_threads()
    fake.chunk_interval = 0.05
    async with vendor_call(engine, nursery) as (sup, sink, _):
        await say(sup, LONG, finish=False)
        await sink.wait_for(ev.PlayStarted)
        assert engine.threads_running > 0
        await sup.stop("c1")
        assert engine.open_streams == 0
        await wait_until(lambda: engine.threads_running == 0 and not fake.open_requests, 1, "all released")
    await assert_threads_back(baseline)


@pytest.mark.parametrize("kind", FAULTS)
async def test_faults_end_cleanly_and_the_next_utterance_speaks(fake, engine, nursery, kind, monkeypatch):
    short_thread_idle(monkeypatch)
    baseline = client_threads()
    fake.faults.add(Fault(kind, after_bytes=1600, delay=0.2))
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Speak this sentence please.")
        await finished(sink, within=4)
        expected = {
            "slow_first_byte": [],
            "stall": ["vendor_timeout"],
            "error": ["vendor_connection"],
            "drop": ["vendor_connection"],
            "malformed": ["vendor_protocol"],
        }
        assert [e.kind for e in sink.of(ev.SessionError)] == expected[kind]
        await say(sup, "And then this one.")
        await finished(sink, n=2)
    assert frames_of(call, "And then this one.") >= 10
    await wait_until(lambda: engine.threads_running == 0 and not fake.open_requests, 1, "all released")
    await assert_threads_back(baseline)


def test_service_errors_map_to_kinds() -> None:
    def client_error(code: str) -> bexc.ClientError:
        return bexc.ClientError({"Error": {"Code": code, "Message": "m"}}, "SynthesizeSpeech")

    assert map_error(client_error("ThrottlingException")).kind == "throttled"
    assert map_error(client_error("TextLengthExceededException")).kind == "invalid_request"
    assert map_error(client_error("ServiceFailureException")).kind == "unavailable"
    assert map_error(bexc.NoCredentialsError()).kind == "auth"
    assert map_error(bexc.ReadTimeoutError(endpoint_url="x")).kind == "timeout"
