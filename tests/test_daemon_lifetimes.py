"""serve_daemon's pieces nest (issue 18): the voices it builds it closes; the supervisor can be read before
it serves, starts sessions only while serving, and stops them when serving ends."""

from __future__ import annotations

import pytest
import trio

from tests.support import media_uri
from tts_streamer.actors.commands import CommandError
from tts_streamer.adapters.engines import close_engines
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator, memory_dialer
from tts_streamer.supervisor import daemon
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.sessions import Supervisor


class ClosableEngine(SyntheticEngine):
    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed += 1


async def test_voices_built_by_the_daemon_are_closed_once_and_passed_ones_never(monkeypatch):
    built = ClosableEngine()
    # A fallback chain lists engines that are also listed on their own: closed once all the same.
    monkeypatch.setattr(daemon, "engines_from_environment", lambda: ({"a": built, "b": built}, {}))
    async with daemon.open_voices(None) as (voices, _unavailable):
        assert voices["a"] is built and built.closed == 0
    assert built.closed == 1
    passed = ClosableEngine()
    async with daemon.open_voices({"x": passed}) as (voices, _unavailable):
        assert voices == {"x": passed}
    assert passed.closed == 0


async def test_closing_is_bounded_and_runs_inside_a_cancelled_scope(autojump_clock):
    class Stuck(ClosableEngine):
        async def aclose(self) -> None:
            await trio.sleep_forever()

    stuck, fine = Stuck(), ClosableEngine()
    with trio.CancelScope() as outer:
        outer.cancel()
        started = trio.current_time()
        await close_engines({"stuck": stuck, "fine": fine}, within=2.0)
    assert fine.closed == 1  # shielded: the way out is usually cancelled already
    assert trio.current_time() - started == pytest.approx(2.0)


async def test_the_supervisor_starts_sessions_only_while_serving(nursery, autojump_clock):

    sim = AsteriskSimulator(seed=3)
    sim.expect("c1")
    engine = SyntheticEngine()
    supervisor = Supervisor(
        engines={engine.name: engine},
        default_engine=engine.name,
        dialer=memory_dialer(sim, nursery),
        events=EventBus(),
    )
    with pytest.raises(CommandError) as refused:
        await supervisor.start_session("c0", media_uri("c0"))
    assert refused.value.kind == "not_serving" and len(supervisor) == 0
    async with supervisor.serving(stop_grace=1.0):
        session = await supervisor.start_session("c1", media_uri("c1"))
        assert len(supervisor) == 1
    assert session.ended and len(supervisor) == 0
    assert session.state == "stopped"
