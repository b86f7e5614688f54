"""MediaSocket behaviour that needs a hand-driven peer: XOFF/XON, and the timeline after idle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream, wrap_server_stream

from tests.support import RecordingSink, media_uri, open_sim_supervisor
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig
from tts_streamer.supervisor.sessions import open_supervisor

MEDIA_START = "MEDIA_START connection_id:x channel:c format:ulaw optimal_frame_size:160 ptime:20"


async def test_xoff_pauses_sending_until_xon(nursery, autojump_clock):
    peer: list[WebSocketConnection] = []
    arrivals: list[float] = []

    @asynccontextmanager
    async def dial(uri: str) -> AsyncIterator[WebSocketConnection]:
        client_end, server_end = trio.testing.memory_stream_pair()

        async def asterisk() -> None:
            request = await wrap_server_stream(nursery, server_end)
            ws = await request.accept(subprotocol="media")
            peer.append(ws)
            await ws.send_message(MEDIA_START)
            await ws.send_message(b"\xff" * 160)  # caller audio: the leg is bridged
            try:
                while True:
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        arrivals.append(trio.current_time())
            except ConnectionClosed:
                return

        nursery.start_soon(asterisk)
        # trio-websocket types the stream as a socket stream; any trio Stream works (as its docs show).
        ws = await wrap_client_stream(
            nursery,
            client_end,  # type: ignore[arg-type]
            "asterisk",
            "/media/x",
            subprotocols=["media"],
        )
        try:
            yield ws
        finally:
            await ws.aclose()

    sink = RecordingSink()
    engine = SyntheticEngine(seconds_per_char=0.1)
    async with open_supervisor(
        engines={"synthetic": engine},
        default_engine="synthetic",
        dialer=dial,
        events=sink,
        config=SessionConfig(pacing=PacingConfig(lead_frames=0, frames_per_message=1)),
    ) as supervisor:
        await supervisor.start_session("c1", "ws://asterisk/media/x")
        await supervisor.call("c1", SayInit())
        await supervisor.call("c1", SayAdd("x" * 30))
        await supervisor.call("c1", SayFinish())
        await trio.sleep(0.5)
        await peer[0].send_message("MEDIA_XOFF")
        await trio.sleep(0.1)
        paused_at, sent_before = trio.current_time(), len(arrivals)
        await trio.sleep(1.0)
        assert len(arrivals) == sent_before, "frames were sent while Asterisk said XOFF"
        await peer[0].send_message("MEDIA_XON")
        await sink.wait_for(ev.PlayFinished, "c1")
    assert len(arrivals) == 150
    assert not [t for t in arrivals if paused_at < t < paused_at + 1.0]


async def test_the_timeline_restarts_with_a_fresh_lead_after_idle(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=3)
    call = sim.expect("c1")
    engine = SyntheticEngine(seconds_per_char=0.1)
    async with open_sim_supervisor(
        sim, engine, nursery, pacing=PacingConfig(lead_frames=3, frames_per_message=1)
    ) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        for text in ("first", "second"):
            await sup.call("c1", SayInit())
            await sup.call("c1", SayAdd(text))
            await sup.call("c1", SayFinish())
            await sink.wait_for(ev.PlayFinished, "c1", where=lambda e: e.text == text)  # noqa: B023
            await trio.sleep(2.0)  # idle: Asterisk's queue runs dry
        media = sup.get("c1").media
        assert media is not None and media.stats.timeline_restarts == 1
    second = [m.time for m in call.messages][25:]
    assert len(second) == 30
    assert second[0] == second[3] and second[4] - second[3] > 0.019  # lead of 3 + 1 at once, then paced
    # Without marks (plain-text control) the simulator cannot tell the deliberate idle from an
    # underrun, so it is the one gap allowed; every other tick played a frame.
    assert [gap.ticks > 50 for gap in call.gaps] == [True]


async def test_a_held_xoff_pauses_the_message_which_then_plays_to_its_end(nursery, autojump_clock):
    """Asterisk says XOFF and its queue stops draining for 2 s: nothing is sent meanwhile (beyond one
    message in flight), nothing is lost, and the message ends normally after XON."""
    sim = AsteriskSimulator(seed=4)
    call = sim.expect("c1", SimConfig(hold_xoff=(0.5, 2.0)))
    engine = SyntheticEngine(seconds_per_char=0.1)  # 3 s of audio
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await sup.call("c1", SayInit())
        await sup.call("c1", SayAdd("x" * 30))
        await sup.call("c1", SayFinish())
        finished = await sink.wait_for(ev.PlayFinished, "c1")
        assert call.media_start_at is not None
        held_from, held_until = call.media_start_at + 0.5, call.media_start_at + 2.5
        assert finished.completed and sink.time_of(finished) > held_until
        await trio.sleep(0.2)  # the lead still queued in Asterisk plays out
    during = [m for m in call.messages if held_from + 0.1 < m.time < held_until]
    assert len(during) <= 1, "audio was sent while Asterisk held XOFF"
    assert (call.xoff_sent, call.xon_sent) == (1, 1)
    assert call.frames_received == call.frames_played == 150
    assert not [f for f in call.played if held_from + 0.02 < f.time < held_until]  # the stall itself


async def test_flush_and_stop_work_while_xoff_is_held(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=5)
    flushed_call = sim.expect("f", SimConfig(hold_xoff=(0.3, 2.0)))
    stopped_call = sim.expect("s", SimConfig(hold_xoff=(0.3, 30.0)))
    engine = SyntheticEngine(seconds_per_char=0.1)
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        for call_id in ("f", "s"):
            await sup.start_session(call_id, media_uri(call_id))
            await sup.call(call_id, SayInit())
            await sup.call(call_id, SayAdd("x" * 100))
        await trio.sleep(1.0)  # well inside both holds
        with trio.fail_after(0.5):
            await sup.call("f", SayFlush())
            await sup.stop("s")
        assert [c.command.name for c in flushed_call.controls if c.command] == ["FLUSH_MEDIA"]
        assert stopped_call.hung_up and sink.of(ev.Stopped, "s")
        # The flushed call stays up, and once Asterisk says XON the next words play in full.
        await sup.call("f", SayAdd("y" * 10))
        await sup.call("f", SayFinish())
        finished = await sink.wait_for(ev.PlayFinished, "f")
        await trio.sleep(0.2)
    assert flushed_call.media_start_at is not None
    assert finished.completed and sink.time_of(finished) > flushed_call.media_start_at + 2.3
    assert sum(1 for f in flushed_call.played if f.data[0] == fill_byte("y" * 10)) == 50
