"""Every command is answered exactly once, whatever ends the session meanwhile (issue 14 §1), in
virtual time against the in-memory simulator."""

from __future__ import annotations

import pytest
import trio

from tests.lifecycle_support import SlowReleaseEngine, StallableStream, stalling_dialer
from tests.support import RecordingSink, media_uri, open_sim_supervisor, tasks_of
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import Command, CommandError, SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.session import SessionConfig
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig

LONG = "x" * 100  # 10 s of audio at 0.1 s per char

# Generous: these tests are about session_ended reaching a caller, not about the caller's deadline.
PATIENT = SessionConfig(command_timeout=30.0)


async def answer(session_call, command: Command) -> object:
    """The command's result, or the CommandError it was answered with (as a value)."""
    try:
        return await session_call(command)
    except CommandError as exc:
        return exc


async def test_flush_while_a_paced_send_is_blocked_is_answered_session_ended(nursery, autojump_clock):
    """Issue 14 §1: the flush waits for the send lock held by a send that never completes; the send
    times out (2 s) and ends the session, and the flush - already off the inbox - must be answered."""
    sim = AsteriskSimulator(seed=1)
    sim.expect("c1")
    streams: dict[str, StallableStream] = {}
    dialer = stalling_dialer(sim, nursery, streams)
    engine = SlowReleaseEngine(release_delay=0.0, seconds_per_char=0.1)
    with trio.fail_after(60):
        async with open_sim_supervisor(sim, engine, nursery, config=PATIENT, dialer=dialer) as (sup, sink):
            session = await sup.start_session("c1", media_uri("c1"))
            await sup.call("c1", SayInit())
            await sup.call("c1", SayAdd(LONG))
            await sink.wait_for(ev.PlayStarted, "c1")
            streams["c1"].stall()  # the peer stops reading: the next paced send blocks
            await trio.sleep(0.2)
            assert streams["c1"].blocked_writes == 1
            flushed_at = trio.current_time()
            result = await answer(sup.get("c1").call, SayFlush())
            assert isinstance(result, CommandError) and result.kind == "session_ended"
            assert trio.current_time() - flushed_at < 3.0  # the send timeout, not the caller's patience
            stopped = await sink.wait_for(ev.Stopped, "c1")  # after the socket's bounded close
            assert stopped.reason == "media_error" and session.ended
            with pytest.raises(CommandError) as later:
                await session.call(SayFlush())
            assert later.value.kind == "session_ended"
            assert tasks_of("c1") == []
            assert engine.open_streams == 0


async def test_a_caller_waits_at_most_the_command_timeout(nursery, autojump_clock):
    """Nobody waits on a session without a bound: the same blocked flush, a 0.5 s command timeout."""
    sim = AsteriskSimulator(seed=2)
    sim.expect("c1")
    streams: dict[str, StallableStream] = {}
    config = SessionConfig(command_timeout=0.5)
    engine = SlowReleaseEngine(release_delay=0.0, seconds_per_char=0.1)
    dialer = stalling_dialer(sim, nursery, streams)
    with trio.fail_after(60):
        async with open_sim_supervisor(sim, engine, nursery, config=config, dialer=dialer) as (sup, sink):
            await sup.start_session("c1", media_uri("c1"))
            await sup.call("c1", SayInit())
            await sup.call("c1", SayAdd(LONG))
            await sink.wait_for(ev.PlayStarted, "c1")
            streams["c1"].stall()
            await trio.sleep(0.2)
            started = trio.current_time()
            result = await answer(sup.get("c1").call, SayFlush())
            assert isinstance(result, CommandError) and result.kind == "timeout"
            assert trio.current_time() - started == pytest.approx(0.5)
            await sink.wait_for(ev.Stopped, "c1")
            assert tasks_of("c1") == []


async def test_a_command_whose_caller_timed_out_before_it_started_is_not_done(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=3)
    sim.expect("c1")
    engine = SlowReleaseEngine(release_delay=1.0, seconds_per_char=0.1)
    with trio.fail_after(60):
        async with open_sim_supervisor(sim, engine, nursery, config=PATIENT) as (sup, sink):
            session = await sup.start_session("c1", media_uri("c1"))
            await session.call(SayInit("m1"))
            await session.call(SayAdd(LONG))
            await sink.wait_for(ev.PlayStarted, "c1")
            async with trio.open_nursery() as callers:
                callers.start_soon(session.call, SayFlush())  # in progress for 1 s (the release)
                await trio.sleep(0.1)
                with pytest.raises(CommandError) as late:
                    await session.call(SayInit("m2"), patience=0.2)
                assert late.value.kind == "timeout"
            await session.call(SayFinish())  # applies to m1: m2 was never started
            assert [e.message_id for e in sink.of(ev.Initiated, "c1")] == ["m1"]


async def test_flush_racing_a_hang_up_is_answered_session_ended(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=4)
    sim.expect("c1", SimConfig(close_after=1.5))
    engine = SlowReleaseEngine(release_delay=1.0, seconds_per_char=0.1)
    with trio.fail_after(60):
        async with open_sim_supervisor(sim, engine, nursery, config=PATIENT) as (sup, sink):
            session = await sup.start_session("c1", media_uri("c1"))
            await session.call(SayInit())
            await session.call(SayAdd(LONG))
            await trio.sleep(1.0)
            # The flush is in progress (the vendor's release takes 1 s) when the caller hangs up at 1.5 s.
            result = await answer(session.call, SayFlush())
            assert isinstance(result, CommandError) and result.kind == "session_ended"
            assert (await sink.wait_for(ev.Stopped, "c1")).reason == "hangup"
            assert tasks_of("c1") == []
            assert engine.open_streams == 0


class CrashingSink(RecordingSink):
    """An event consumer with a bug: it raises on Flushed, inside the session's own task, mid-flush."""

    def emit(self, event: ev.SessionEvent) -> None:
        super().emit(event)
        if isinstance(event, ev.Flushed):
            raise RuntimeError("listener bug")


async def test_flush_racing_an_internal_error_is_answered_session_ended(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=5)
    sim.expect("c1")
    engine = SlowReleaseEngine(release_delay=0.5, seconds_per_char=0.1)
    sink = CrashingSink()
    with trio.fail_after(60):
        async with open_sim_supervisor(sim, engine, nursery, config=PATIENT, sink=sink) as (sup, _):
            session = await sup.start_session("c1", media_uri("c1"))
            await session.call(SayInit())
            await session.call(SayAdd(LONG))
            await sink.wait_for(ev.PlayStarted, "c1")
            result = await answer(session.call, SayFlush())
            assert isinstance(result, CommandError) and result.kind == "session_ended"
            assert (await sink.wait_for(ev.Stopped, "c1")).reason == "internal_error"
            assert tasks_of("c1") == []
            assert engine.open_streams == 0


@pytest.mark.parametrize("command", [SayInit(), SayAdd("more words"), SayFlush(), SayFinish()], ids=repr)
@pytest.mark.parametrize("in_flight", [False, True], ids=["queued", "behind-a-flush"])
async def test_stop_racing_every_command_answers_it(nursery, autojump_clock, command, in_flight):
    """Stop while the command is queued behind a flush in progress, or racing it directly: the caller
    gets its result or session_ended, never silence, and nothing of the session is left running."""
    sim = AsteriskSimulator(seed=6)
    sim.expect("c1")
    engine = SlowReleaseEngine(release_delay=1.0, seconds_per_char=0.1)
    results: list[object] = []
    with trio.fail_after(60):
        async with open_sim_supervisor(sim, engine, nursery, config=PATIENT) as (sup, sink):
            session = await sup.start_session("c1", media_uri("c1"))
            await session.call(SayInit())
            await session.call(SayAdd(LONG))
            await sink.wait_for(ev.PlayStarted, "c1")

            async def issue(cmd: Command) -> None:
                results.append(await answer(session.call, cmd))

            async with trio.open_nursery() as callers:
                if in_flight:
                    callers.start_soon(issue, SayFlush())
                    await trio.sleep(0.1)  # the flush is now waiting for the vendor's release
                callers.start_soon(issue, command)
                await trio.lowlevel.checkpoint()
                await session.stop("deleted")
            assert len(results) == (2 if in_flight else 1)
            for result in results:
                assert not isinstance(result, CommandError) or result.kind == "session_ended", result
            if in_flight:
                assert all(isinstance(r, CommandError) for r in results)
            assert sink.of(ev.Stopped, "c1")[0].reason == "deleted"
            assert tasks_of("c1") == []
            assert engine.open_streams == 0


async def test_a_command_whose_caller_was_cancelled_before_it_started_is_not_done(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=7)
    sim.expect("c1")
    engine = SlowReleaseEngine(release_delay=1.0, seconds_per_char=0.1)
    with trio.fail_after(60):
        async with open_sim_supervisor(sim, engine, nursery, config=PATIENT) as (sup, sink):
            session = await sup.start_session("c1", media_uri("c1"))
            await session.call(SayInit("m1"))
            await session.call(SayAdd(LONG))
            await sink.wait_for(ev.PlayStarted, "c1")
            async with trio.open_nursery() as callers:
                callers.start_soon(session.call, SayFlush())  # in progress for 1 s (the release)
                await trio.sleep(0.1)
                with trio.move_on_after(0.2):  # e.g. the AMQP lane shut down
                    await session.call(SayInit("m2"))
            await session.call(SayFinish())
            assert [e.message_id for e in sink.of(ev.Initiated, "c1")] == ["m1"]
