"""The Asterisk chan_websocket simulator, driven by a raw trio-websocket client.

Unless a test says otherwise the leg connects at t=0 under the autojump clock and its ticks fall at
0.005 + k * 0.020, so client actions at whole multiples of 20 ms never coincide with a tick. The
mechanics tests use a leg already bridged at the connection in a softmix bridge (``bridged()``: every
frame is heard, caller frames flow); the simulator's own default (voipbin's topology: a join 20 ms
after the connection, no caller frames ever) has tests of its own.

Over the ~400-line guide: the simulator is the reference the other tests trust, so every mechanism
of chan_websocket.md it models is pinned here, sharing one raw client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
    wrap_server_stream,
)

from tts_streamer.adapters.chan_websocket.protocol import (
    ControlEvent,
    ControlFormat,
    MediaStart,
    parse_event,
)
from tts_streamer.adapters.wav import WAVE_FORMAT_MULAW, read_wav
from tts_streamer.simulator.asterisk import (
    AsteriskSimulator,
    SimCall,
    SimConfig,
    memory_dialer,
    serve_asterisk_simulator,
)
from tts_streamer.simulator.asterisk_playout import Playout
from tts_streamer.simulator.ws_tap import WireTap

PHASE = 0.005
FRAME = 160


def frames(n: int, start: int = 0) -> bytes:
    # Distinct content per frame so playout order is checkable.
    return b"".join(bytes([(start + i) % 200]) * FRAME for i in range(n))


def bridged(**changes: Any) -> SimConfig:
    """A leg in a softmix bridge from the connection on, caller frames from the first tick."""
    return SimConfig.softmix(**{"bridge_delay": 0.0, "caller_audio_delay": 0.0, **changes})


def tick_time(k: int) -> float:
    return PHASE + 0.020 * k


@attrs.define
class Inbox:
    """Everything the client received, drained continuously as a well-behaved client must."""

    texts: list[tuple[float, str]] = attrs.field(factory=list)
    binary_times: list[float] = attrs.field(factory=list)
    order: list[str] = attrs.field(factory=list)
    close_code: int | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)

    async def drain(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str):
                    self.texts.append((trio.current_time(), message))
                    self.order.append("text")
                else:
                    self.binary_times.append(trio.current_time())
                    self.order.append("binary")
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
            self.closed.set()

    def events(self, name: str) -> list[tuple[float, ControlEvent]]:
        found = []
        for t, text in self.texts:
            event = parse_event(text)
            if isinstance(event, ControlEvent) and event.name == name:
                found.append((t, event))
        return found


@asynccontextmanager
async def leg(
    nursery: trio.Nursery, config: SimConfig | None = None, *, connection_id: str = "c1"
) -> AsyncIterator[tuple[WebSocketConnection, SimCall, Inbox]]:
    sim = AsteriskSimulator(seed=0)
    call = sim.expect(connection_id, attrs.evolve(config or bridged(), tick_phase=PHASE))
    async with memory_dialer(sim, nursery)(f"ws://asterisk:8088/media/{connection_id}") as ws:
        inbox = Inbox()
        nursery.start_soon(inbox.drain, ws)
        yield ws, call, inbox


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# ------------------------------------------------------------------------------------- handshake


async def test_media_start_plain_text(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    config = bridged(media_start_extra={"passthrough": "false", "unbuffered": "false"})
    async with leg(nursery, config) as (_ws, call, inbox):
        await settle()
        t, text = inbox.texts[0]
        assert text.startswith("MEDIA_START connection_id:c1 channel:WebSocket/c1/")
        event = parse_event(text)
        assert isinstance(event, MediaStart)
        assert event.connection_id == "c1"
        assert event.channel == call.channel
        assert event.channel_id == call.channel_id
        assert (event.format, event.optimal_frame_size, event.ptime) == ("ulaw", 160, 20)
        assert event.control_format is ControlFormat.TEXT
        assert event.extra == {"passthrough": "false", "unbuffered": "false"}
        assert call.subprotocol == "media"
        assert call.media_start_at == t == 0.0


async def test_media_start_json(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    config = bridged(control_format=ControlFormat.JSON, media_start_extra={"unbuffered": False})
    async with leg(nursery, config) as (_ws, call, inbox):
        await settle()
        event = parse_event(inbox.texts[0][1])
        assert isinstance(event, MediaStart)
        assert event.control_format is ControlFormat.JSON
        assert (event.connection_id, event.channel_id) == ("c1", call.channel_id)
        assert (event.optimal_frame_size, event.ptime) == (160, 20)
        assert event.extra["unbuffered"] is False
        assert event.extra["channel_variables"]["MEDIA_WEBSOCKET_CONNECTION_ID"] == "c1"


async def test_faults_around_media_start(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(audio_before_media_start=True)) as (_ws, _call, inbox):
        await trio.sleep(0.1)
        assert inbox.order[:3] == ["binary", "binary", "text"]
        assert isinstance(parse_event(inbox.texts[0][1]), MediaStart)
    async with leg(nursery, bridged(never_send_media_start=True), connection_id="c2") as (_ws, _c, inbox):
        await trio.sleep(1)
        assert inbox.texts == []
        assert len(inbox.binary_times) == 50  # bridged, so the caller is heard all the same


# --------------------------------------------------------------------------------------- playout


async def test_three_seconds_sent_at_once_play_at_50_fps(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    audio = frames(150)
    async with leg(nursery) as (ws, call, _inbox):
        await ws.send_message(audio)
        await trio.sleep(4)
        assert call.frames_received == 150
        assert call.frames_played == 150
        assert [p.time for p in call.played] == pytest.approx([tick_time(k) for k in range(150)])
        assert all(p.queued_at == 0.0 for p in call.played)
        assert b"".join(p.data for p in call.played) == audio
        heard = call.played_audio()
        assert heard[: len(audio)] == audio
        assert set(heard[len(audio) :]) == {0xFF}
        assert call.underruns == 0


async def test_flush_stops_playout_at_the_next_tick(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with leg(nursery) as (ws, call, _inbox):
        await ws.send_message(frames(150))
        await trio.sleep_until(1.0)
        await ws.send_message("FLUSH_MEDIA")
        await trio.sleep(0.5)
        assert call.frames_played == 50  # ticks 0.005 .. 0.985; the tick at 1.005 is silent
        assert call.played[-1].time == pytest.approx(tick_time(49))
        assert (call.flushes, call.frames_flushed) == (1, 100)
        # The queue length was reset (#1304): new audio plays again.
        await ws.send_message(frames(2))
        await trio.sleep(0.1)
        assert call.frames_played == 52
        assert call.underruns == 0  # a flush ends the utterance


async def test_mark_reported_when_playout_reaches_it(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message(frames(50))
        await ws.send_message("MARK_MEDIA m1")
        await trio.sleep(0.5)
        assert inbox.events("MEDIA_MARK_PROCESSED") == []
        await trio.sleep(1)
        [(t, event)] = inbox.events("MEDIA_MARK_PROCESSED")
        # The tick after the last frame's: the frame has been heard in full.
        assert t == pytest.approx(tick_time(50))
        assert event.argument == "m1"
        assert call.event_texts("MEDIA_MARK_PROCESSED") == ["MEDIA_MARK_PROCESSED m1"]


async def test_mark_json_and_marks_use_no_tick(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(control_format=ControlFormat.JSON)) as (ws, call, inbox):
        await ws.send_message(frames(1))
        await ws.send_message(json.dumps({"command": "MARK_MEDIA", "correlation_id": "utt-1"}))
        await ws.send_message(frames(1, start=1))
        await trio.sleep(0.1)
        [(t, event)] = inbox.events("MEDIA_MARK_PROCESSED")
        assert event.argument == "utt-1"
        assert event.fields["channel_id"] == call.channel_id
        assert t == pytest.approx(tick_time(1))
        assert [p.time for p in call.played] == pytest.approx([tick_time(0), tick_time(1)])


async def test_mark_never_reported_after_flush(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message(frames(150))
        await ws.send_message("MARK_MEDIA m2")
        await trio.sleep_until(1.0)
        await ws.send_message("FLUSH_MEDIA")
        await trio.sleep(4)
        assert inbox.events("MEDIA_MARK_PROCESSED") == []
        assert call.marks_processed == 0


async def test_xoff_xon_and_whole_message_drop(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await settle()
        for n in (400, 400, 99):
            await ws.send_message(frames(n))
        await settle()
        assert call.xoff_sent == 0
        await ws.send_message(frames(1))  # 900
        await settle()
        assert call.xoff_sent == 1
        assert len(inbox.events("MEDIA_XOFF")) == 1
        await ws.send_message(frames(95))
        await ws.send_message(frames(5))  # 1000
        await ws.send_message(frames(1))  # dropped whole at >= 1000
        await ws.send_message("GET_STATUS")
        await settle()
        assert call.frames_received == 1000
        assert call.messages_dropped_full == 1
        [(_, status)] = inbox.events("STATUS")
        assert status.fields["queue_length"] == "1000"
        assert status.fields["queue_full"] == "true"
        assert status.fields["xon_level"] == "800"
        await trio.sleep(5)
        # Tick k sees 1000 - k queued before dequeuing: first below 800 at k = 201.
        [(t, _)] = inbox.events("MEDIA_XON")
        assert t == pytest.approx(tick_time(201))
        assert (call.xoff_sent, call.xon_sent) == (1, 1)


async def test_tail_discarded_outside_buffering(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with leg(nursery) as (ws, call, _inbox):
        await ws.send_message(frames(2)[:250])
        await ws.send_message(frames(1)[:100])
        await trio.sleep(0.2)
        assert call.frames_played == 1
        assert call.tail_bytes_discarded == 90 + 100
        assert call.played[0].data == frames(1)


async def test_buffering_carries_over_and_completes(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    audio = frames(4)[:500]
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message("START_MEDIA_BUFFERING")
        await ws.send_message(audio[:250])
        await ws.send_message(audio[250:])
        await ws.send_message("STOP_MEDIA_BUFFERING b1")
        await trio.sleep(0.2)
        assert call.tail_bytes_discarded == 0
        assert [len(p.data) for p in call.played] == [160, 160, 160, 20]
        assert b"".join(p.data for p in call.played) == audio
        [(t, event)] = inbox.events("MEDIA_BUFFERING_COMPLETED")
        assert event.argument == "b1"
        assert t == pytest.approx(tick_time(4))
        # The short final frame is padded with silence in what the caller heard.
        assert call.played_audio()[480:640] == audio[480:] + b"\xff" * 140


async def test_underruns_counted_for_a_gap_mid_utterance(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with leg(nursery) as (ws, call, _inbox):
        await ws.send_message(frames(10))  # ticks 0..9
        await trio.sleep_until(0.3)  # ticks 10..14 (0.205 .. 0.285) find nothing
        await ws.send_message(frames(10))
        await ws.send_message("MARK_MEDIA end")
        await trio.sleep(1)  # silence after the mark is between utterances
        await ws.send_message(frames(5))
        await ws.send_message("MARK_MEDIA end2")
        await trio.sleep(1)
        assert call.underruns == 5
        [gap] = call.gaps
        assert gap.start == pytest.approx(tick_time(10))
        assert gap.ticks == 5


async def test_paced_client_has_no_underruns(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, _inbox):
        await ws.send_message(frames(3))  # lead
        for k in range(3, 100):
            await trio.sleep_until(0.020 * (k - 2))
            await ws.send_message(frames(1, start=k))
        await ws.send_message("MARK_MEDIA done")
        await trio.sleep(1)
        assert call.frames_played == 100
        assert call.underruns == 0
        assert call.played_audio()[: 100 * FRAME] == frames(100)


async def test_lost_tick_delays_the_rest(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(lost_ticks=frozenset({2}))) as (ws, call, _inbox):
        await ws.send_message(frames(4))
        await trio.sleep(0.2)
        assert [p.tick for p in call.played] == [0, 1, 3, 4]
        assert call.ticks_lost == 1
        assert call.underruns == 0


async def test_audio_before_bridge_is_lost(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(bridge_delay=0.5)) as (ws, call, inbox):
        await ws.send_message(frames(50))
        await trio.sleep(1.5)
        assert call.frames_played == 50
        assert call.frames_lost_unbridged == 25  # ticks 0.005 .. 0.485
        heard = call.played_audio()
        assert set(heard[: 25 * FRAME]) == {0xFF}
        assert heard[25 * FRAME : 50 * FRAME] == frames(50)[25 * FRAME :]
        assert call.played_audio(include_unbridged=True)[: 50 * FRAME] == frames(50)
        # No caller audio while unbridged, 50/s after.
        assert inbox.binary_times[0] >= 0.5
        assert len([t for t in inbox.binary_times if t < 1.5]) == 50


async def test_by_default_the_leg_joins_after_the_connection_and_hears_no_caller(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    # voipbin's topology (chan_websocket.md §8): the join comes after the connection, and a spy-less
    # snoop in a simple_bridge sends the media leg nothing at all.
    async with leg(nursery, SimConfig()) as (ws, call, inbox):
        await ws.send_message(frames(10))
        await trio.sleep(2)
        assert call.bridged_at == pytest.approx(0.020)
        assert call.frames_played == 10
        assert call.frames_lost_unbridged == 1  # the tick at 5 ms, before the join at 20 ms
        assert call.played_audio()[FRAME : 10 * FRAME] == frames(10)[FRAME:]
        assert inbox.binary_times == [] and call.caller_frames_sent == 0


async def test_a_softmix_bridge_sends_caller_frames_from_a_little_after_the_join(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with leg(nursery, SimConfig.softmix(bridge_delay=0.05)) as (_ws, call, inbox):
        await trio.sleep(1.1)
        # Joined at 50 ms, caller audio from 58 ms: the first frame goes on the tick at 65 ms, then 50/s.
        assert inbox.binary_times[0] == pytest.approx(tick_time(3))
        assert len([t for t in inbox.binary_times if t < tick_time(53)]) == 50
        assert call.caller_frames_sent == len(inbox.binary_times)


async def test_manual_bridge(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(bridge_delay=None)) as (_ws, call, inbox):
        await trio.sleep(1)
        assert inbox.binary_times == []
        call.bridge()
        await trio.sleep(0.2)
        assert len(inbox.binary_times) == 10 == call.caller_frames_sent


# -------------------------------------------------------------------------------------- commands


async def test_status_drained_pause(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message(frames(10))
        await ws.send_message("REPORT_QUEUE_DRAINED")
        await trio.sleep_until(0.1)  # 5 played
        await ws.send_message("PAUSE_MEDIA")
        await ws.send_message("GET_STATUS")
        await trio.sleep_until(0.5)
        assert call.frames_played == 5
        [(t, status)] = inbox.events("STATUS")
        assert t == 0.1
        assert status.fields["queue_length"] == "5"
        assert status.fields["media_paused"] == "true"
        assert inbox.events("QUEUE_DRAINED") == []  # no drained event while paused
        await ws.send_message("CONTINUE_MEDIA")
        await trio.sleep(0.5)
        assert call.frames_played == 10
        [(t, _)] = inbox.events("QUEUE_DRAINED")
        assert t == pytest.approx(tick_time(30))  # first tick after 0.5: 0.505 plays, then 4 more
        assert call.underruns == 0


async def test_ignored_text(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message(frames(50))
        await ws.send_message("MARK_MEDIA " + "x" * 118)  # 129 bytes: dropped silently
        await ws.send_message("flush_media")  # names are case-sensitive
        await ws.send_message("NO_SUCH_COMMAND arg")
        await ws.send_message('{"command":"FLUSH_MEDIA"}')  # JSON on a plain-text call
        await trio.sleep(1.5)
        assert inbox.texts[1:] == []  # only MEDIA_START: no replies at all
        assert call.frames_played == 50
        assert [c.outcome for c in call.controls] == ["oversize", "unknown", "unknown", "unknown"]
        assert call.controls[2].command is not None
        assert call.controls[2].command.name == "NO_SUCH_COMMAND"
        assert (call.text_dropped_oversize, call.unknown_commands) == (1, 3)


async def test_json_mode_errors(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(control_format=ControlFormat.JSON)) as (ws, call, inbox):
        await ws.send_message("GET_STATUS")
        await ws.send_message("{not json")
        await ws.send_message('{"verb":"GET_STATUS"}')  # valid JSON, no command: unknown, no reply
        await ws.send_message('{"command":"GET_STATUS"}')
        await settle()
        errors = inbox.events("ERROR")
        assert [e.argument for _, e in errors] == ["Unable to parse JSON command"] * 2
        assert errors[0][1].fields["channel_id"] == call.channel_id
        [(_, status)] = inbox.events("STATUS")
        assert status.fields["queue_length"] == 0
        assert status.fields["queue_full"] is False
        assert [c.outcome for c in call.controls] == ["bad_json", "bad_json", "unknown", "ok"]


async def test_error_form_plain_text(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message("SET_MEDIA_DIRECTION in")
        await settle()
        [(_, error)] = inbox.events("ERROR")
        assert error.fields["channel_id"] == call.channel_id
        assert error.argument.startswith("SET_MEDIA_DIRECTION")


# ----------------------------------------------------------------------------------------- endings


@pytest.mark.parametrize("code", [1000, 4001])
async def test_client_close_hangs_up(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, code: int
) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await trio.sleep(0.1)
        await ws.aclose(code)
    await call.ended.wait()
    assert (call.hung_up, call.hangup_by, call.closed_code) == (True, "client_close", code)
    assert call.closed_at == pytest.approx(0.1)
    assert call.ticks == 5  # ticks stop with the call
    assert inbox.close_code == 1000  # the client's own view of its close


async def test_hangup_command_closes_1000(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message("HANGUP")
        await inbox.closed.wait()
        assert inbox.close_code == 1000
    assert (call.hung_up, call.hangup_by, call.closed_code) == (True, "HANGUP", 1000)


async def test_simulated_hangup(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(close_after=1.0)) as (_ws, call, inbox):
        await inbox.closed.wait()
        assert trio.current_time() == pytest.approx(1.0)
        assert inbox.close_code == 1000
    assert (call.hangup_by, call.closed_code) == ("simulated", 1000)


async def test_oversize_message_closes_1009(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, inbox):
        await ws.send_message(b"\x00" * 65527)  # largest accepted
        await ws.send_message(b"\x00" * 65528)
        await inbox.closed.wait()
        assert inbox.close_code == 1009
    assert call.frames_received == 409
    assert (call.oversize_closes, call.hangup_by, call.closed_code) == (1, "oversize", 1009)


async def test_stalled_reads(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery, bridged(stall_reads=0.0)) as (ws, call, inbox):
        await ws.send_message(frames(10))
        await ws.send_message(frames(10))
        await trio.sleep(1)
        assert call.frames_received == 0
        assert len(inbox.binary_times) == 50  # still writing
        nursery.cancel_scope.cancel()


async def test_wav_written_and_readable(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with leg(nursery) as (ws, call, _inbox):
        await ws.send_message(frames(50))
        await trio.sleep(2)
    await call.ended.wait()
    path = tmp_path / "call.wav"
    call.write_wav(path)
    fmt, rate, data = read_wav(path)
    assert (fmt, rate) == (WAVE_FORMAT_MULAW, 8000)
    assert data == call.played_audio()
    assert len(data) == call.ticks * FRAME == 100 * FRAME
    assert data[: 50 * FRAME] == frames(50)


async def test_client_faults_recorded(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    async with leg(nursery) as (ws, call, _inbox):
        await ws.pong(b"unasked")
        await settle()
        assert [f.kind for f in call.client_faults] == ["unsolicited_pong"]


def test_wire_tap_spots_fragments() -> None:
    tap = WireTap(trio.testing.memory_stream_pair()[0])

    def frame(fin: bool, opcode: int, payload: bytes) -> bytes:
        mask = b"\x00\x00\x00\x00"
        return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + payload

    async def run() -> None:
        tap._feed(b"GET /media/x HTTP/1.1\r\nHost: a\r\n\r\n" + frame(False, 0x2, b"ab"))
        tap._feed(frame(False, 0x0, b"cd")[:3])
        tap._feed(frame(False, 0x0, b"cd")[3:] + frame(True, 0x0, b"ef") + frame(True, 0x9, b""))

    trio.run(run)
    assert [f.kind for f in tap.faults] == ["fragmented_message"]
    assert tap.pings == 1


# ------------------------------------------------------------------------------------- handshakes


async def _rejected_status(dial: Any, uri: str, **kwargs: Any) -> int:
    with pytest.raises(ConnectionRejected) as info:
        async with dial(uri, **kwargs):
            pass
    status: int = info.value.status_code
    return status


@pytest.mark.realtime
async def test_handshake_statuses_over_tcp(nursery: trio.Nursery) -> None:
    sim = AsteriskSimulator(seed=1)
    port = await nursery.start(serve_asterisk_simulator, sim)
    base = f"ws://127.0.0.1:{port}/media"
    first, second = sim.expect("first"), sim.expect("second")

    def dial(uri: str, **kwargs: Any) -> Any:
        return open_websocket_url(uri, connect_timeout=2, disconnect_timeout=2, **kwargs)

    with trio.fail_after(10):
        assert await _rejected_status(dial, f"{base}/unknown", subprotocols=["media"]) == 404
        assert await _rejected_status(dial, f"{base}/first/", subprotocols=["media"]) == 404
        async with dial(f"{base}/first", subprotocols=["media"]) as ws:
            assert ws.subprotocol == "media"
            assert isinstance(parse_event(str(await ws.get_message())), MediaStart)
            assert await _rejected_status(dial, f"{base}/first", subprotocols=["media"]) == 409
        await first.ended.wait()
        assert first.hangup_by == "client_close"
        assert await _rejected_status(dial, f"{base}/first", subprotocols=["media"]) == 404  # leg gone
        assert await _rejected_status(dial, f"{base}/second", subprotocols=["rtp"]) == 400
        async with dial(f"{base}/second?x=1") as ws:  # none offered is fine; query ignored
            assert ws.subprotocol is None
            await ws.get_message()
        await second.ended.wait()
    assert [status for _, status in sim.rejections] == [404, 404, 409, 404, 400]


async def test_memory_dialer_registry(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    sim = AsteriskSimulator(bridged(connect_deadline=30.0), seed=2)
    dial = memory_dialer(sim, nursery)
    assert await _rejected_status(dial, "ws://a/media/nobody") == 404
    sim.expect("late")
    await trio.sleep(31)
    assert await _rejected_status(dial, "ws://a/media/late") == 404

    anyone = AsteriskSimulator(accept_any=True, seed=2)
    dial_any = memory_dialer(anyone, nursery)
    async with dial_any("ws://a/media/whoever") as ws:
        await ws.get_message()
        assert await _rejected_status(dial_any, "ws://a/media/whoever") == 409
        await trio.sleep(0.1)
    call = anyone.calls["whoever"]
    await call.ended.wait()
    assert call.first_tick_at is not None and call.connected_at is not None
    assert 0 <= call.first_tick_at - call.connected_at < 0.020


def test_tick_phase_is_seeded() -> None:
    phases = []
    for seed in (7, 7, 8):
        sim = AsteriskSimulator(seed=seed)
        phases.append(sim.rng.uniform(0, 0.020))
    assert phases[0] == phases[1] != phases[2]


# -------------------------------------------------------------------------------- sans-IO model


def test_playout_model_directly() -> None:
    call = SimCall(connection_id="x", config=SimConfig(), channel="WebSocket/x", channel_id="1.1")
    playout = Playout(call)
    assert playout.on_binary(0.0, frames(2)).send == []
    playout.on_text(0.0, "MARK_MEDIA a")
    playout.on_text(0.0, "MARK_MEDIA b")
    assert playout.tick(0.01, bridged=True) == []
    assert playout.tick(0.03, bridged=True) == []
    assert playout.tick(0.05, bridged=True) == ["MEDIA_MARK_PROCESSED a", "MEDIA_MARK_PROCESSED b"]
    assert playout.queue_length == 0
    assert playout.tick(0.07, bridged=False) == []
    assert call.ticks == 4
    assert len(call.played_audio()) == 4 * FRAME


def test_drop_check_is_per_message() -> None:
    call = SimCall(connection_id="x", config=SimConfig(), channel="WebSocket/x", channel_id="1.1")
    playout = Playout(call)
    for n in (400, 400, 199):
        playout.on_binary(0.0, frames(n))
    assert playout.queue_length == 999
    playout.on_binary(0.0, frames(10))  # arrives at 999: goes in whole
    assert playout.queue_length == 1009
    playout.on_binary(0.0, frames(1))
    assert (playout.queue_length, call.messages_dropped_full) == (1009, 1)
    assert [m.outcome for m in call.messages][-2:] == ["queued", "dropped_full"]


async def test_cancelled_client_leaves_1006(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    sim = AsteriskSimulator(seed=3)
    call = sim.expect("c1")
    with trio.move_on_after(0.1):
        async with memory_dialer(sim, nursery)("ws://a/media/c1"):
            await trio.sleep_forever()
    await call.ended.wait()
    # As with open_websocket_url: a clean 1000 needs a shielded close by the client itself.
    assert (call.hangup_by, call.closed_code) == ("connection_lost", 1006)


async def test_client_that_stops_reading_is_dropped(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    sim = AsteriskSimulator(bridged(), seed=4)  # caller frames: Asterisk writes every 20 ms
    call = sim.expect("c1")
    # Lockstep streams have no buffer, so a write blocks as soon as the client stops reading.
    client_end, server_end = trio.testing.lockstep_stream_pair()
    nursery.start_soon(sim.serve_stream, server_end)
    async with trio.open_nursery() as client_nursery:
        stream = cast(trio.SocketStream, client_end)  # typed for sockets, works with any Stream
        await wrap_client_stream(client_nursery, stream, "a", "/media/c1", subprotocols=["media"])
        await call.ended.wait()
        client_nursery.cancel_scope.cancel()
    assert (call.hangup_by, call.closed_code) == ("write_timeout", 1011)
    assert call.closed_at is not None and call.closed_at < 1.0


async def test_a_stall_of_the_simulator_itself_is_not_a_write_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Asterisk is another process: if ours stalls (a GC pause in a busy test run), the client did
    not stop reading, so a pending write must not be timed out for that stall."""
    sim = AsteriskSimulator(bridged(write_timeout=0.3), seed=4)
    call = sim.expect("c1")
    client_end, server_end = trio.testing.lockstep_stream_pair()
    nursery.start_soon(sim.serve_stream, server_end)
    reading = trio.Event()
    reading.set()
    received = 0

    async def read(ws: WebSocketConnection) -> None:
        nonlocal received
        while True:
            await reading.wait()
            await ws.get_message()
            received += 1

    async with trio.open_nursery() as client_nursery:
        stream = cast(trio.SocketStream, client_end)
        ws = await wrap_client_stream(client_nursery, stream, "a", "/media/c1", subprotocols=["media"])
        client_nursery.start_soon(read, ws)
        await trio.sleep(0.2)
        reading = trio.Event()  # stop reading: the simulator's writes block (lockstep: no buffer)
        await trio.sleep(0.15)
        before = received
        autojump_clock.jump(2.0)  # the whole process stalls for 2 s
        reading.set()
        await trio.sleep(0.5)
        assert call.hangup_by is None
        assert received > before + 10  # the caller audio flowed again
        client_nursery.cancel_scope.cancel()


async def test_handle_serves_a_wrapped_server_stream(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    sim = AsteriskSimulator(seed=5)
    call = sim.expect("c1")
    client_end, server_end = trio.testing.memory_stream_pair()

    async def serve() -> None:
        async with trio.open_nursery() as server_nursery:
            await sim.handle(await wrap_server_stream(server_nursery, server_end))

    nursery.start_soon(serve)
    async with trio.open_nursery() as client_nursery:
        stream = cast(trio.SocketStream, client_end)
        ws = await wrap_client_stream(client_nursery, stream, "a", "/media/c1", subprotocols=["media"])
        assert isinstance(parse_event(str(await ws.get_message())), MediaStart)
        await trio.sleep(0.1)
        await ws.aclose()
    await call.ended.wait()
    assert (call.hangup_by, call.closed_code, call.ticks) == ("client_close", 1000, 5)
