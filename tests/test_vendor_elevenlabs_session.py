"""ElevenLabs: one socket per call, one context per utterance (issue 17 §1), against the loopback fake.

Real clock: real sockets (the autojump clock would fire the adapter's timeouts early).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from tests.fakes.elevenlabs import MAX_CONTEXTS, ElevenLabsFake
from tests.fakes.vendor_faults import Fault, fake_fill_byte
from tests.support import RecordingSink, media_uri, open_sim_supervisor
from tests.vendor_support import finished, frames_of, say, vendor_call, wait_until
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayFinish, SayFlush
from tts_streamer.adapters.elevenlabs import ElevenLabsEngine
from tts_streamer.adapters.fallback import FallbackEngine
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.adapters.voice import VoiceSpec
from tts_streamer.simulator.asterisk import AsteriskSimulator

pytestmark = pytest.mark.realtime
LONG = " ".join(f"Sentence number {i} goes on for a while." for i in range(12))


@pytest.fixture
async def fake(nursery: trio.Nursery) -> ElevenLabsFake:
    f = ElevenLabsFake(seconds_per_char=0.02, chunk_bytes=400, chunk_interval=0.01, first_audio_delay=0.03)
    await nursery.start(f.serve)
    return f


@pytest.fixture
def engine(fake: ElevenLabsFake) -> ElevenLabsEngine:
    return ElevenLabsEngine(
        "test-key",
        base_url=fake.base_url,
        response_timeout=0.6,
        keepalive_interval=0.3,
        inactivity_timeout=1,
        close_timeout=0.3,
    )


def spoken(fake: ElevenLabsFake) -> list[str]:
    """Context ids that were given text, over every connection."""
    return [ctx.context_id for ctx in fake.contexts if ctx.texts]


def stalled(fake: ElevenLabsFake, count: int) -> Callable[[], bool]:
    return lambda: sum(1 for c in fake.contexts if c.outcome == "fault:stall") >= count


def started(sink: RecordingSink, count: int) -> Callable[[object], bool]:
    return lambda _: len(sink.of(ev.PlayStarted)) >= count


async def test_a_call_keeps_one_socket_across_utterances_and_flushes(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        # Connected when the session starts, before the first say.
        await wait_until(lambda: len(fake.open_connections) == 1, 1, "the socket opened at session start")
        assert not fake.connections[0].inbound  # no context yet
        for n in range(3):
            await say(sup, f"Utterance {n} is short.")
            await finished(sink, n=2 * n + 1)
            await say(sup, LONG, finish=False)
            await sink.wait_for(ev.PlayStarted, where=started(sink, 2 * n + 2))
            await sup.call("c1", SayFlush(end_message=True))
            await finished(sink, n=2 * n + 2)
        await say(sup, "The last one.")
        await finished(sink, n=7)
        assert engine.open_sessions == 1 and engine.open_streams == 0
    (conn,) = fake.connections
    assert engine.connects == 1 and engine.open_sessions == 0
    assert spoken(fake) == [f"c{n}" for n in range(1, 8)]  # a fresh context per utterance
    assert [c for c in conn.inbound if c.get("close_context")] == [
        {"context_id": f"c{n}", "close_context": True} for n in range(1, 8)
    ]
    assert all(frames_of(call, f"Utterance {n} is short. ") >= 5 for n in range(3))
    assert frames_of(call, "The last one. ") >= 5 and not sink.of(ev.SessionError)
    # The session's end closed the socket cleanly.
    assert (
        conn.closed_at is not None and conn.close_code == 1000 and conn.inbound[-1] == {"close_socket": True}
    )


async def test_a_flush_on_one_call_does_not_touch_another_calls_context(fake, engine, nursery):
    sim = AsteriskSimulator(seed=1)
    call1, call2 = sim.expect("c1"), sim.expect("c2")
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        for call_id in ("c1", "c2"):
            await sup.start_session(call_id, media_uri(call_id))
            await say(sup, LONG, finish=False, call_id=call_id)
        await sink.wait_for(ev.PlayStarted, where=lambda _: len(sink.of(ev.PlayStarted)) == 2)
        await sup.call("c1", SayFlush(end_message=True))
        await sup.call("c2", SayFinish())
        with trio.fail_after(10):
            await sink.wait_for(ev.PlayFinished, where=lambda e: e.call_id == "c2")
        assert engine.open_sessions == 2
    first, second = fake.connections  # a socket each
    assert [m for m in first.inbound if m.get("close_context")] == [
        {"context_id": "c1", "close_context": True}
    ]
    # The other call's context was never closed by the flush: it spoke to its end.
    assert not [m for m in second.inbound if m.get("close_context") and m["context_id"] != "c1"]
    done = next(e for e in sink.of(ev.PlayFinished) if e.call_id == "c2")
    assert done.completed and frames_of(call2, LONG) >= len(LONG) * 0.02 * 8000 / 160 - 2
    assert frames_of(call1, LONG) < frames_of(call2, LONG)
    assert not sink.of(ev.SessionError)


async def test_idle_keepalive_holds_the_socket_and_the_next_utterance_uses_it(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Before the pause.")
        await finished(sink)
        await trio.sleep(1.5)  # idle past the 1 s inactivity timeout
        await say(sup, "After the pause.")
        await finished(sink, n=2)
    (conn,) = fake.connections
    standby = conn.contexts["c2"]  # opened by the first idle keep-alive, adopted by the next utterance
    assert standby.keepalives >= 2 and standby.texts == ["After the pause. "]
    assert frames_of(call, "After the pause. ") >= 10 and not sink.of(ev.SessionError)


async def test_the_vendor_closing_an_idle_socket_makes_the_next_utterance_reconnect(fake, engine, nursery):
    engine.keepalive_interval = 60  # no keep-alive: the fake's 1 s inactivity timeout closes the socket
    async with vendor_call(engine, nursery) as (sup, sink, call):
        await say(sup, "Before the close.")
        await finished(sink)
        await wait_until(lambda: not fake.open_connections, 2, "the fake closed the idle socket")
        assert fake.connections[0].close_code == 1008
        await say(sup, "After the close.")
        await finished(sink, n=2)
    assert len(fake.connections) == 2 and engine.connects == 2
    assert frames_of(call, "After the close. ") >= 10 and not sink.of(ev.SessionError)


async def test_closing_contexts_never_exceed_the_vendors_limit(fake, engine, nursery):
    # Contexts that stall never send their isFinal once closed, so they keep counting at the vendor.
    for _ in range(MAX_CONTEXTS):
        fake.faults.add(Fault("stall", after_bytes=400))
    async with vendor_call(engine, nursery) as (sup, sink, call):
        for n in range(MAX_CONTEXTS):
            await say(sup, LONG, finish=False)
            await wait_until(stalled(fake, n + 1), 2, f"context {n + 1} stalled")
            await sup.call("c1", SayFlush(end_message=True))
        await say(sup, "On a fresh socket.")
        await finished(sink, n=MAX_CONTEXTS + 1)
    assert [e.kind for e in sink.of(ev.SessionError)] == []  # never max_active_conversations
    assert len(fake.connections) == 2 and len(fake.connections[0].contexts) == MAX_CONTEXTS
    assert frames_of(call, "On a fresh socket. ") >= 10


async def test_the_session_end_closes_the_socket(fake, engine, nursery):
    async with vendor_call(engine, nursery) as (sup, _sink, _call):
        await wait_until(lambda: len(fake.open_connections) == 1, 1, "connected at session start")
        await sup.stop("c1")
        assert engine.open_sessions == 0
        await wait_until(lambda: not fake.open_connections, 0.5, "the fake saw the socket close")
    assert fake.connections[0].close_code == 1000


async def test_the_chain_falls_over_when_elevenlabs_is_unreachable_at_session_start(nursery):
    eleven = ElevenLabsEngine("k", base_url="ws://127.0.0.1:9", connect_timeout=1)
    switches: list[object] = []
    chain = FallbackEngine([eleven, SyntheticEngine()], cooldown=0, on_switch=switches.append)
    async with vendor_call(chain, nursery) as (sup, sink, call):
        await say(sup, "Spoken anyway.")
        done = await finished(sink)
        await say(sup, "And again.")
        await finished(sink, n=2)
    assert done.spoken_by == ("synthetic",) and not sink.of(ev.SessionError)
    assert [(e.from_vendor, e.to_vendor, e.kind) for e in sink.of(ev.VoiceFallback)] == [
        ("elevenlabs", "synthetic", "connection")
    ] * 2
    assert sum(1 for f in call.played if f.bridged and f.data[0] == fill_byte("Spoken anyway.")) > 0
    assert eleven.open_sessions == 0 and chain.open_sessions == 0 and chain.open_streams == 0


async def test_late_audio_of_a_closed_context_is_dropped_and_the_next_context_hears_only_its_own(
    fake, engine
):
    fake.late_chunks = 3
    fake.chunk_interval = 0.03  # the late chunks overlap the next utterance's start
    with trio.fail_after(5):
        async with engine.open_session(VoiceSpec()) as session:
            async with session.open_stream() as first:
                await first.send_text(LONG)
                async for _ in first.audio():
                    break  # a flush after the first chunk
            async with session.open_stream() as second:
                await second.send_text("The next one.")
                await second.end_input()
                audio = b"".join([chunk async for chunk in second.audio()])
            await wait_until(lambda: fake.contexts[0].final_at is not None, 1, "c1's isFinal")
    assert set(audio) == {fake_fill_byte("The next one. ")}
    # Every late chunk is dropped; on a loaded machine so are c1's chunks that were already on their way
    # when its close went out (they come after the flush just the same).
    assert session.late_chunks_dropped >= fake.contexts[0].late_chunks_sent > 0
    assert (first.context_id, second.context_id) == ("c1", "c2") and len(fake.connections) == 1
