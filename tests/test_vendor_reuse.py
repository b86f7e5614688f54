"""Issue 17 §3: Google's channel and Polly's connection pool are reused across utterances and calls (no
TCP/TLS handshake per utterance, counted at the fake or at a counting proxy), and ``warm()`` sets them up
before the first call, so a call's first utterance does not pay for it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import boto3
import grpc
import pytest
import trio
from bench.netem import DelayProxy

from tests.fakes.google_tts import GoogleTTSFake
from tests.fakes.polly import PollyFake
from tests.vendor_support import say, vendor_call, wait_until
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayFlush
from tts_streamer.adapters.engines import warm_engine, warm_engines
from tts_streamer.adapters.google_tts import CHANNEL_OPTIONS, GoogleTTSEngine
from tts_streamer.adapters.polly import PollyEngine, make_client
from tts_streamer.adapters.voice import VoiceEngine

pytestmark = pytest.mark.realtime  # threads, gRPC core and sockets: the real clock (vendors.md)

TEXT = "Here is a sentence to speak. And one more after it."


@pytest.fixture
def polly() -> Iterator[PollyFake]:
    with PollyFake(seconds_per_char=0.02, chunk_bytes=800, chunk_interval=0.01, first_audio_delay=0.02) as f:
        yield f


def polly_engine(fake: PollyFake, **kwargs: object) -> PollyEngine:
    session = boto3.Session(aws_access_key_id="AKIDTEST", aws_secret_access_key="x", region_name="eu-west-1")
    client = make_client(session, endpoint_url=fake.endpoint_url, read_timeout=1.0)
    return PollyEngine(client, max_concurrency=8, **kwargs)  # type: ignore[arg-type]


async def speak_and_flush(
    engine: VoiceEngine,
    nursery: trio.Nursery,
    calls: int,
    utterances: int,
    idle: Callable[[], Awaitable[object]],
) -> None:
    """``calls`` calls of ``utterances`` utterances each, every one flushed once it plays; ``idle()``
    waits until the vendor side is quiet before the next utterance."""
    for c in range(calls):
        call_id = f"c{c}"
        async with vendor_call(engine, nursery, call_id) as (sup, sink, _call):
            for u in range(utterances):
                await say(sup, TEXT, finish=False, call_id=call_id)

                def started(_event: ev.SessionEvent, n: int = u) -> bool:
                    return len(sink.of(ev.PlayStarted)) > n

                with trio.fail_after(5):
                    await sink.wait_for(ev.PlayStarted, where=started)
                await sup.call(call_id, SayFlush())
                await idle()


async def test_polly_warm_opens_the_pool_and_flushed_bodies_keep_their_connections(polly, nursery) -> None:
    engine = polly_engine(polly)
    with trio.fail_after(5):
        await engine.warm()
    assert polly.describe_calls == 2 and polly.connections == 2  # 1 + prefetch, before any call

    async def quiet() -> None:
        await wait_until(lambda: engine.threads_running == 0 and not polly.open_requests, 3, "drained")

    await speak_and_flush(engine, nursery, calls=2, utterances=3, idle=quiet)
    assert len(polly.requests) >= 6
    assert polly.connections == 2, "a handshake per utterance: the pool was not reused"
    assert "disconnected" not in [r.outcome for r in polly.requests]


async def test_polly_without_the_drain_pays_a_connection_per_flushed_body(polly, nursery) -> None:
    """The measurement can fail: dropping flushed bodies (drain_bytes=0) opens new connections."""
    engine = polly_engine(polly, drain_bytes=0)
    polly.chunk_interval = 0.05  # bodies last long enough for the flush to land mid-body

    async def quiet() -> None:
        await wait_until(lambda: engine.threads_running == 0 and not polly.open_requests, 3, "released")

    await speak_and_flush(engine, nursery, calls=1, utterances=3, idle=quiet)
    assert "disconnected" in [r.outcome for r in polly.requests]
    assert polly.connections > 2


async def test_google_channel_is_connected_by_warm_and_reused_across_utterances_and_calls(nursery) -> None:
    with GoogleTTSFake(seconds_per_char=0.02, first_audio_delay=0.02) as fake:
        proxy = DelayProxy(("127.0.0.1", fake.port), 0.0)  # plain TCP, counting connections
        port = await nursery.start(proxy.serve)
        engine = GoogleTTSEngine(channel=grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS))
        try:
            assert proxy.connections == 0  # gRPC channels connect lazily: the first call would pay
            assert await warm_engine(engine, within=5) == ""
            assert proxy.connections == 1

            async def quiet() -> None:
                await wait_until(lambda: not fake.open_rpcs, 3, "RPC ended")

            await speak_and_flush(engine, nursery, calls=2, utterances=3, idle=quiet)
            assert len(fake.rpcs) >= 6 and proxy.connections == 1
        finally:
            engine.close()


async def test_warm_failures_are_reported_not_raised(nursery) -> None:
    # Nothing listens there: the channel never gets ready, warm-up gives up at its bound.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = GoogleTTSEngine(channel=grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        failed = await warm_engines({"gcp": engine, "espeak": object()}, within=0.5)  # type: ignore[dict-item]
        assert list(failed) == ["gcp"] and "0.5 s" in failed["gcp"]
    finally:
        engine.close()
