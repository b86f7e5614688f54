"""The session scope of voice engines: entered when a call's session starts, left when it ends, one
``open_stream()`` per utterance; engines without one get a stream per utterance. Virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import trio
import trio.testing

from tests.support import media_uri, open_sim_supervisor
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.adapters.fallback import FallbackEngine
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.adapters.voice import (
    StreamPerUtterance,
    VoiceError,
    VoiceSpec,
    VoiceStream,
    open_session,
)
from tts_streamer.simulator.asterisk import AsteriskSimulator


@attrs.define
class SessionEngine(SyntheticEngine):
    """A synthetic voice with a session scope that records what happened in it, and when."""

    log: list[tuple[str, float]] = attrs.Factory(list)
    open_sessions: int = 0
    fail_session: bool = False

    @asynccontextmanager
    async def open_session(self, voice: VoiceSpec) -> AsyncIterator[_Session]:
        if self.fail_session:
            raise VoiceError("no session today", kind="connection")
        self.log.append(("open", trio.current_time()))
        self.open_sessions += 1
        try:
            async with trio.open_nursery() as nursery:  # the engine's own nursery for the session
                nursery.start_soon(trio.sleep_forever)
                yield _Session(self, voice)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.01)  # a bounded close handshake, finished even when cancelled
            self.open_sessions -= 1
            self.log.append(("close", trio.current_time()))


@attrs.define
class _Session:
    engine: SessionEngine
    voice: VoiceSpec

    def open_stream(self) -> AbstractAsyncContextManager[VoiceStream]:
        self.engine.log.append(("stream", trio.current_time()))
        return self.engine.open_stream(self.voice)


async def speak(sup, text: str, call_id: str = "c1") -> None:
    await sup.call(call_id, SayInit())
    await sup.call(call_id, SayAdd(text))
    await sup.call(call_id, SayFinish())


async def test_an_engine_without_a_session_gets_one_stream_per_utterance(autojump_clock):
    engine = SyntheticEngine()
    async with open_session(engine, VoiceSpec()) as session:
        assert isinstance(session, StreamPerUtterance)
        for _ in range(2):
            async with session.open_stream() as stream:
                await stream.send_text("hi")
                await stream.end_input()
                assert b"".join([c async for c in stream.audio()])
    assert engine.streams_opened == 2 and engine.open_streams == 0


async def test_the_session_scope_spans_the_call_and_each_utterance_is_a_stream(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=3)
    call = sim.expect("c1")
    engine = SessionEngine(seconds_per_char=0.05)
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await trio.sleep(1)
        assert [what for what, _ in engine.log] == ["open"]  # before the first say
        await speak(sup, "first")
        await sink.wait_for(ev.PlayFinished)
        await sup.call("c1", SayInit())
        await sup.call("c1", SayAdd("second " * 20))
        await sink.wait_for(ev.PlayStarted, where=lambda _: len(sink.of(ev.PlayStarted)) == 2)
        await sup.call("c1", SayFlush(end_message=True))
        await speak(sup, "third")
        await sink.wait_for(ev.PlayFinished, where=lambda _: len(sink.of(ev.PlayFinished)) == 3)
        assert engine.open_sessions == 1 and engine.open_streams == 0
        await sup.stop("c1")  # a cancellation: the close still runs to its end
    assert [what for what, _ in engine.log] == ["open", "stream", "stream", "stream", "close"]
    assert engine.open_sessions == 0 and engine.streams_opened == 3
    assert any(f.data[0] == fill_byte("third") for f in call.played)


async def test_the_chain_opens_its_links_sessions_and_a_failing_one_does_not_fail_the_start(
    nursery, autojump_clock
):
    sim = AsteriskSimulator(seed=4)
    call = sim.expect("c1")
    broken = SessionEngine(name="broken", fail_session=True, fail_after_bytes=0)
    good = SessionEngine(name="good", seconds_per_char=0.05)
    chain = FallbackEngine([broken, good], cooldown=0)
    async with open_sim_supervisor(sim, chain, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await trio.testing.wait_all_tasks_blocked()  # the vendor task has just been started
        assert [what for what, _ in good.log] == ["open"] and chain.open_sessions == 1
        await speak(sup, "spoken by the good one")
        done = await sink.wait_for(ev.PlayFinished)
        assert good.open_sessions == 1
    # The broken link still got its chance, one stream per utterance, and was fallen over.
    assert broken.streams_opened == 1 and done.spoken_by == ("good",)
    assert [(e.from_vendor, e.to_vendor) for e in sink.of(ev.VoiceFallback)] == [("broken", "good")]
    assert [what for what, _ in good.log] == ["open", "stream", "close"]
    assert chain.open_sessions == 0 and good.open_sessions == 0
    assert any(f.data[0] == fill_byte("spoken by the good one") for f in call.played)
