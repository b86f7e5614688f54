"""The vertical slice: session actors speaking into the simulated chan_websocket, in virtual time."""

from __future__ import annotations

import itertools
import math

import pytest
import trio

from tests.support import media_uri, open_sim_supervisor, tasks_of
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import CommandError, SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionStartError
from tts_streamer.adapters.chan_websocket.protocol import ControlFormat
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig
from tts_streamer.supervisor.sessions import DuplicateSession, UnknownSession

THREE_SECONDS = "x" * 30  # 30 chars x 0.1 s per char


def engine(**kwargs: object) -> SyntheticEngine:
    options: dict[str, object] = {"seconds_per_char": 0.1}
    options.update(kwargs)
    return SyntheticEngine(**options)  # type: ignore[arg-type]


async def speak(supervisor, call_id: str, *texts: str, finish: bool = True) -> None:
    await supervisor.call(call_id, SayInit())
    for text in texts:
        await supervisor.call(call_id, SayAdd(text))
    if finish:
        await supervisor.call(call_id, SayFinish())


async def test_three_seconds_is_150_frames_at_exact_20ms_steps(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=1)
    call = sim.expect("c1")
    async with open_sim_supervisor(
        sim, engine(), nursery, pacing=PacingConfig(lead_frames=0, frames_per_message=1)
    ) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS)
        finished = await sink.wait_for(ev.PlayFinished, "c1")
    assert [m.length for m in call.messages] == [160] * 150
    arrivals = [m.time for m in call.messages]
    steps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(math.isclose(step, 0.020, abs_tol=1e-9) for step in steps)
    assert finished.frames_sent == 150 and finished.texts_added == 1
    played = [f for f in call.played if f.data[0] == fill_byte(THREE_SECONDS)]
    assert len(played) == 150 and call.underruns == 0
    # Play finished is reported only after Asterisk played the last frame.
    assert sink.time_of(finished) >= played[-1].time


async def test_lead_frames_go_at_once_then_real_time(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=2)
    call = sim.expect("c1")
    async with open_sim_supervisor(
        sim, engine(), nursery, pacing=PacingConfig(lead_frames=3, frames_per_message=1)
    ) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS)
        await sink.wait_for(ev.PlayFinished, "c1")
    arrivals = [m.time for m in call.messages]
    assert len(arrivals) == 150
    assert arrivals[3] == arrivals[0]
    steps = [b - a for a, b in itertools.pairwise(arrivals[3:])]
    assert all(math.isclose(step, 0.020, abs_tol=1e-9) for step in steps)
    assert call.underruns == 0
    # Each frame waits in Asterisk's queue for at most the lead plus the tick in progress.
    assert max(f.time - f.queued_at for f in call.played) <= 0.020 * 4 + 1e-9


async def test_batched_messages_are_split_by_asterisk_without_underruns(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=3)
    call = sim.expect("c1")
    pacing = PacingConfig(lead_frames=3, frames_per_message=5)
    async with open_sim_supervisor(sim, engine(), nursery, pacing=pacing) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS)
        await sink.wait_for(ev.PlayFinished, "c1")
    assert sum(m.length for m in call.messages) == 150 * 160
    assert len(call.messages) == 30
    assert call.frames_played == 150 and call.underruns == 0


async def test_short_last_frame_is_padded_with_silence(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=4)
    call = sim.expect("c1")
    text = "abc"  # 0.3 s * 8000 = 2400 bytes = 15 frames exactly; make it uneven:
    eng = SyntheticEngine(seconds_per_char=0.0105)  # 3 * 84 = 252 bytes -> 2 frames, 68 bytes of padding
    async with open_sim_supervisor(sim, eng, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", text)
        await sink.wait_for(ev.PlayFinished, "c1")
    assert [m.length for m in call.messages] == [160, 160]
    assert call.tail_bytes_discarded == 0
    assert call.played[-1].data == bytes([fill_byte(text)]) * 92 + b"\xff" * 68


@pytest.mark.parametrize("speed", [math.inf, 2.0])
async def test_flush_mid_utterance_cuts_old_audio_and_keeps_the_call(nursery, autojump_clock, speed):
    sim = AsteriskSimulator(seed=5)
    call = sim.expect("c1")
    eng = engine(speed=speed)
    old, new = "old speech " * 5, "new words " * 2
    async with open_sim_supervisor(sim, eng, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", old, finish=False)
        await sink.wait_for(ev.PlayStarted, "c1")
        await trio.sleep(1.0)
        dropped = await sup.call("c1", SayFlush())
        flushed_at = trio.current_time()
        # The vendor stream was released before the flush returned.
        assert eng.open_streams == 0 and eng.streams_cancelled == 1
        assert isinstance(dropped, int)
        flush_event = sink.of(ev.Flushed, "c1")[0]
        await sup.call("c1", SayAdd(new))
        await sup.call("c1", SayFinish())
        finished = await sink.wait_for(ev.PlayFinished, "c1")
        assert not call.hung_up
    old_fill, new_fill = fill_byte(old), fill_byte(new)
    flush_cmd = next(c for c in call.controls if c.command and c.command.name == "FLUSH_MEDIA")
    assert flush_cmd.time <= flushed_at
    assert not [m for m in call.queued if m.time > flush_cmd.time and m.data[0] == old_fill]
    # At most the frame already playing when FLUSH_MEDIA arrived is heard after it.
    late_old = [f for f in call.played if f.time > flush_cmd.time and f.data[0] == old_fill]
    assert len(late_old) <= 1
    assert len([f for f in call.played if f.data[0] == new_fill]) == 2 * 10 * 5  # 2 s of new audio
    assert flush_event.message_id == finished.message_id
    assert finished.flushes == 1 and finished.texts_added == 2


async def test_stop_ends_every_task_closes_socket_and_releases_vendor(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=6)
    call = sim.expect("c1")
    eng = engine(speed=1.5)
    async with open_sim_supervisor(sim, eng, nursery) as (sup, sink):
        session = await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS, finish=False)
        await sink.wait_for(ev.PlayStarted, "c1")
        assert tasks_of("c1")
        await sup.stop("c1")
        assert tasks_of("c1") == []
        assert eng.open_streams == 0
        assert list(sup) == []
        with pytest.raises(UnknownSession):
            sup.get("c1")
        await session.stop()  # stopping twice is harmless
        await call.ended.wait()
        assert call.hung_up and call.closed_code == 1000
        with pytest.raises(CommandError, match="ended"):
            await session.call(SayAdd("too late"))
    assert [e.reason for e in sink.of(ev.Stopped, "c1")] == ["stopped"]


async def test_peer_closing_mid_utterance_ends_the_session_with_events(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=7)
    sim.expect("c1", SimConfig(close_after=1.0))
    eng = engine(speed=1.0)
    async with open_sim_supervisor(sim, eng, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS, finish=False)
        stopped = await sink.wait_for(ev.Stopped, "c1")
        assert stopped.reason == "hangup"
        assert sink.of(ev.SessionError, "c1")[0].kind == "hangup"
        assert tasks_of("c1") == [] and list(sup) == []
        assert eng.open_streams == 0


async def test_media_start_never_arriving_is_a_clear_timeout(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=8)
    call = sim.expect("c1", SimConfig(never_send_media_start=True))
    async with open_sim_supervisor(sim, engine(), nursery) as (sup, sink):
        started = trio.current_time()
        with pytest.raises(SessionStartError, match=r"no MEDIA_START within 5\.0 s"):
            await sup.start_session("c1", media_uri("c1"))
        assert trio.current_time() - started == pytest.approx(5.0, abs=0.01)
        assert tasks_of("c1") == [] and list(sup) == []
        await call.ended.wait()
        assert call.hung_up
    assert sink.events == []


async def test_unknown_connection_is_a_start_error(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=9)
    async with open_sim_supervisor(sim, engine(), nursery) as (sup, _sink):
        with pytest.raises(SessionStartError, match="404"):
            await sup.start_session("c1", media_uri("nobody"))
        assert list(sup) == []


async def test_bad_input_gets_clear_errors_and_the_session_goes_on(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=10)
    sim.expect("c1")
    async with open_sim_supervisor(sim, engine(), nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        with pytest.raises(UnknownSession):
            await sup.call("nope", SayInit())
        with pytest.raises(DuplicateSession):
            await sup.start_session("c1", media_uri("c1"))
        with pytest.raises(CommandError) as info:
            await sup.call("c1", SayAdd("hello"))
        assert info.value.kind == "no_message"
        await sup.call("c1", SayInit("m1"))
        bad_texts: list[tuple[str | bytes, str]] = [
            ("", "empty_text"),
            ("   ", "empty_text"),
            (b"\xff\xfe", "bad_text"),
            ("a\x00", "bad_text"),
        ]
        for bad, kind in bad_texts:
            with pytest.raises(CommandError) as info:
                await sup.call("c1", SayAdd(bad))
            assert info.value.kind == kind
        with pytest.raises(CommandError, match="limit is 5000"):
            await sup.call("c1", SayAdd("é" * 2501))
        await sup.call("c1", SayAdd("fine now"))
        await sup.call("c1", SayFinish())
        with pytest.raises(CommandError) as info:
            await sup.call("c1", SayAdd("after finish"))
        assert info.value.kind in {"message_finished", "no_message"}
        finished = await sink.wait_for(ev.PlayFinished, "c1")
        assert finished.message_id == "m1" and finished.text == "fine now"


async def test_vendor_failure_is_reported_and_the_next_utterance_speaks(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=11)
    call = sim.expect("c1")
    eng = engine(fail_after_bytes=1600)
    async with open_sim_supervisor(sim, eng, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS)
        error = await sink.wait_for(ev.SessionError, "c1")
        assert error.kind == "vendor_injected"
        finished = await sink.wait_for(ev.PlayFinished, "c1")
        assert finished.frames_sent == 10  # what the vendor produced before failing still played
        assert not finished.completed  # the rest of its text was never spoken
        eng.fail_after_bytes = None
        await speak(sup, "c1", "second")
        second = await sink.wait_for(ev.PlayFinished, "c1", where=lambda e: e.text == "second")
        assert second.completed
    assert len([f for f in call.played if f.data[0] == fill_byte("second")]) == 30


class ExplodingEngine(SyntheticEngine):
    """A vendor adapter with a bug: raises something other than VoiceError."""

    def open_stream(self, voice):
        raise RuntimeError("adapter bug")


async def test_a_crashing_session_is_removed_without_touching_its_neighbour(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=12)
    good_call = sim.expect("good")
    sim.expect("bad")
    good, bad = engine(), ExplodingEngine(name="exploding")
    async with open_sim_supervisor(sim, good, nursery) as (sup, sink):
        sup.engines["exploding"] = bad
        await sup.start_session("good", media_uri("good"))
        await sup.start_session("bad", media_uri("bad"), engine="exploding")
        await speak(sup, "good", THREE_SECONDS)
        await speak(sup, "bad", "boom", finish=False)
        stopped = await sink.wait_for(ev.Stopped, "bad")
        assert stopped.reason == "internal_error"
        assert "adapter bug" in sink.of(ev.SessionError, "bad")[0].reason
        assert [s.call_id for s in sup] == ["good"]
        await sink.wait_for(ev.PlayFinished, "good")
    assert good_call.underruns == 0 and good_call.frames_played == 150


async def test_json_control_reports_play_finished_on_the_mark(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=13)
    call = sim.expect("c1", SimConfig(control_format=ControlFormat.JSON))
    async with open_sim_supervisor(sim, engine(), nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS)
        finished = await sink.wait_for(ev.PlayFinished, "c1")
    marks = [c for c in call.controls if c.command and c.command.name == "MARK_MEDIA"]
    assert len(marks) == 1 and marks[0].raw.startswith("{")
    assert call.marks_processed == 1
    assert sink.time_of(finished) >= call.played[-1].time


async def test_events_in_order_for_a_message(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=14)
    sim.expect("c1")
    async with open_sim_supervisor(sim, engine(), nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", "one ", "two ")
        await sink.wait_for(ev.PlayFinished, "c1")
        await sup.stop("c1")
    kinds = [type(e).__name__ for _, e in sink.events]
    assert kinds == ["Initiated", "VendorFirstAudio", "PlayStarted", "PlayFinished", "Stopped"]
    finished = sink.of(ev.PlayFinished)[0]
    assert finished.text == "one  two " and finished.texts_added == 2 and finished.frames_sent == 40


async def test_flush_that_ends_the_message_reports_it_not_completed(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=15)
    call = sim.expect("c1")
    async with open_sim_supervisor(sim, engine(speed=2.0), nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", THREE_SECONDS, finish=False)
        await sink.wait_for(ev.PlayStarted, "c1")
        await sup.call("c1", SayFlush(end_message=True))
        finished = await sink.wait_for(ev.PlayFinished, "c1")
        assert not finished.completed and finished.flushes == 1
        with pytest.raises(CommandError) as info:
            await sup.call("c1", SayAdd("no message any more"))
        assert info.value.kind == "no_message"
        assert not call.hung_up


async def test_vendor_first_audio_latency_is_reported(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=16)
    sim.expect("c1")
    async with open_sim_supervisor(sim, engine(first_audio_delay=0.25), nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", "hello")
        first = await sink.wait_for(ev.VendorFirstAudio, "c1")
        started = await sink.wait_for(ev.PlayStarted, "c1")
    assert first.vendor == "synthetic" and first.seconds == pytest.approx(0.25)
    assert sink.time_of(started) >= sink.time_of(first)


async def test_a_finished_message_still_playing_is_reported_cut_when_a_flush_comes(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=17)
    sim.expect("c1")
    async with open_sim_supervisor(sim, engine(speed=2.0), nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await sup.call("c1", SayInit("m1"))
        await sup.call("c1", SayAdd(THREE_SECONDS))
        await sup.call("c1", SayFinish())  # m1 is finished but will play for 3 s
        await sup.call("c1", SayInit("m2"))
        await sup.call("c1", SayAdd("second message"))
        await sink.wait_for(ev.PlayStarted, "c1")
        await trio.sleep(0.5)
        await sup.call("c1", SayFlush())
        flushed_at = trio.current_time()
        with trio.fail_after(10):  # virtual seconds: before the fix m1 was only reported at stop
            first = await sink.wait_for(ev.PlayFinished, "c1", where=lambda e: e.message_id == "m1")
        assert sink.time_of(first) == flushed_at  # reported at the flush, not when the call stops
        assert not first.completed and first.flushes == 1
        assert sup.get("c1").message_id == "m2"  # the flush keeps the current message open


async def test_events_say_which_vendor_spoke_and_when_the_chain_fell_over(nursery, autojump_clock):
    from tts_streamer.adapters.fallback import FallbackEngine

    sim = AsteriskSimulator(seed=18)
    call = sim.expect("c1")
    broken = SyntheticEngine(name="first", seconds_per_char=0.1, fail_after_bytes=0)
    backup = SyntheticEngine(name="second", seconds_per_char=0.1)
    chain = FallbackEngine([broken, backup])
    async with open_sim_supervisor(sim, chain, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", "spoken by the backup")
        finished = await sink.wait_for(ev.PlayFinished, "c1")
    (fallback,) = sink.of(ev.VoiceFallback, "c1")
    assert (fallback.from_vendor, fallback.to_vendor, fallback.resumed_at) == ("first", "second", 0)
    assert finished.spoken_by == ("second",) and finished.completed
    assert len([f for f in call.played if f.data[0] == fill_byte("spoken by the backup")]) == 100
    assert broken.open_streams == backup.open_streams == 0


async def test_a_plain_engine_is_named_as_the_speaker(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=19)
    sim.expect("c1")
    async with open_sim_supervisor(sim, engine(), nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await speak(sup, "c1", "hello")
        finished = await sink.wait_for(ev.PlayFinished, "c1")
    assert finished.spoken_by == ("synthetic",) and sink.of(ev.VoiceFallback) == []


async def test_an_unexpected_failure_while_connecting_is_a_start_error(nursery, autojump_clock):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def broken_dialer(uri):
        raise RuntimeError("malformed handshake")
        yield  # pragma: no cover

    from tests.support import RecordingSink
    from tts_streamer.supervisor.sessions import open_supervisor

    async with open_supervisor(
        engines={"synthetic": engine()},
        default_engine="synthetic",
        dialer=broken_dialer,
        events=RecordingSink(),
    ) as sup:
        with pytest.raises(SessionStartError, match="malformed handshake"):
            await sup.start_session("c1", media_uri("c1"))
        assert list(sup) == []
