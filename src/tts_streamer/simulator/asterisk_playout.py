"""Sans-IO model of one chan_websocket leg: frame queue, 50 Hz playout and commands.

It follows channels/chan_websocket.c (INCOMING, ulaw, 22.9+ behaviour: no generated silence, no
short-frame padding): a binary message is cut into 160-byte frames on a queue; each tick dequeues one
frame; marks sit in the queue but do not count in its length and do not use up a tick. Every time is
passed in by the caller, so this module never touches a clock or a socket.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import attrs

from tts_streamer.adapters.chan_websocket.protocol import (
    DROP_FRAMES,
    FRAME_BYTES,
    MAX_CONTROL_BYTES,
    MAX_MESSAGE_PAYLOAD,
    PTIME_MS,
    XOFF_FRAMES,
    XON_FRAMES,
    Command,
    ControlEvent,
    ControlFormat,
    ProtocolError,
    parse_command,
    render_control_event,
)
from tts_streamer.simulator.asterisk_call import (
    BinaryMessage,
    ControlMessage,
    Gap,
    PlayedFrame,
    QueuedFrame,
    SentEvent,
    SimCall,
)

TICK = PTIME_MS / 1000
JSON_PARSE_ERROR = "Unable to parse JSON command"


@attrs.frozen
class Reaction:
    """What the connection layer must do after an inbound message."""

    send: list[str] = attrs.field(factory=list)
    close_code: int | None = None
    hangup_by: str | None = None
    error: bool = False


@attrs.define
class _Mark:
    event: str  # MEDIA_MARK_PROCESSED | MEDIA_BUFFERING_COMPLETED
    correlation_id: str


def _is_json_container(text: str) -> bool:
    # Asterisk's JSON loader rejects bare scalars; an object without "command" is merely unknown.
    try:
        return isinstance(json.loads(text), dict | list)
    except ValueError:
        return False


class Playout:
    """The leg's queue and timer logic; mutates ``call`` and returns the text messages to send."""

    def __init__(self, call: SimCall) -> None:
        self.call = call
        self._format = call.config.control_format
        self._record = call.config.record_frames
        self._queue: deque[QueuedFrame | _Mark] = deque()
        self._length = 0  # frames only: marks do not count, as in Asterisk
        self._queue_full = False
        self._paused = False
        self._xoff_held = False
        self._bulk = False
        self._leftover = b""
        self._report_drained = False
        self._in_utterance = False
        self._gap: list[float] = []

    @property
    def queue_length(self) -> int:
        return self._length

    # ------------------------------------------------------------------------------------ events

    def event(self, now: float, name: str, argument: str = "", **fields: Any) -> str:
        """Render an event in the call's control form and record it as sent."""
        if self._format is ControlFormat.JSON:
            fields = {"channel_id": self.call.channel_id, **fields}
        text = render_control_event(ControlEvent(name, argument, fields), self._format)
        self.call.events.append(SentEvent(now, name, text))
        return text

    def _error(self, now: float, text: str) -> Reaction:
        event = self.event(now, "ERROR", text, channel_id=self.call.channel_id, error_text=text)
        return Reaction([event], error=True)

    def _status(self, now: float) -> str:
        values: dict[str, Any] = {
            "queue_length": self._length,
            "xon_level": XON_FRAMES,
            "xoff_level": XOFF_FRAMES,
            "queue_full": self._queue_full,
            "bulk_media": self._bulk,
            "media_paused": self._paused,
        }
        if self._format is ControlFormat.TEXT:
            values = {k: str(v).lower() if isinstance(v, bool) else v for k, v in values.items()}
        return self.event(now, "STATUS", channel_id=self.call.channel_id, **values)

    # ------------------------------------------------------------------------------------- audio

    def _enqueue(self, now: float, data: bytes, out: list[str]) -> None:
        frame = QueuedFrame(now, data)
        self._queue.append(frame)
        self._length += 1
        self.call.frames_received += 1
        if self._record:
            self.call.queued.append(frame)
        if not self._queue_full and self._length >= XOFF_FRAMES:
            self._queue_full = True
            self.call.xoff_sent += 1
            out.append(self.event(now, "MEDIA_XOFF"))

    def on_binary(self, now: float, data: bytes) -> Reaction:
        call = self.call
        if len(data) > MAX_MESSAGE_PAYLOAD:
            call.oversize_closes += 1
            call.messages.append(BinaryMessage(now, len(data), "oversize"))
            return Reaction(close_code=1009, hangup_by="oversize")
        if call.direction == "in":
            call.messages.append(BinaryMessage(now, len(data), "dropped_direction"))
            return Reaction()
        if self._length >= DROP_FRAMES:
            # The check is per message: one arriving at 999 goes in whole.
            call.messages_dropped_full += 1
            call.messages.append(BinaryMessage(now, len(data), "dropped_full"))
            return Reaction()
        if self._record:
            call.messages.append(BinaryMessage(now, len(data), "queued"))
        out: list[str] = []
        if self._bulk and self._leftover:
            need = FRAME_BYTES - len(self._leftover)
            self._leftover += data[:need]
            data = data[need:]
            if len(self._leftover) < FRAME_BYTES:
                return Reaction(out)
            self._enqueue(now, self._leftover, out)
        self._leftover = b""
        whole = len(data) - len(data) % FRAME_BYTES
        for start in range(0, whole, FRAME_BYTES):
            self._enqueue(now, data[start : start + FRAME_BYTES], out)
        tail = data[whole:]
        if self._bulk:
            self._leftover = tail
        elif tail:
            call.tail_bytes_discarded += len(tail)
        return Reaction(out)

    # ---------------------------------------------------------------------------------- commands

    def on_text(self, now: float, raw: str) -> Reaction:
        call = self.call
        size = len(raw.encode())
        if size == 0 or size > MAX_CONTROL_BYTES:
            call.text_dropped_oversize += size > MAX_CONTROL_BYTES
            call.controls.append(ControlMessage(now, raw, None, "oversize" if size else "empty"))
            return Reaction()
        text = raw.strip()
        try:
            command = parse_command(text, self._format)
        except ProtocolError:
            if self._format is ControlFormat.JSON and not _is_json_container(text):
                call.controls.append(ControlMessage(now, raw, None, "bad_json"))
                return self._error(now, JSON_PARSE_ERROR)
            # Plain-text JSON, or JSON without a "command" string: Asterisk only logs a warning.
            call.unknown_commands += 1
            call.controls.append(ControlMessage(now, raw, None, "unknown"))
            return Reaction()
        reaction = self._dispatch(now, command)
        outcome = "ok"
        if reaction is None:
            call.unknown_commands += 1
            outcome, reaction = "unknown", Reaction()
        elif reaction.error:
            outcome = "error"
        call.controls.append(ControlMessage(now, raw, command, outcome))
        return reaction

    def _dispatch(self, now: float, command: Command) -> Reaction | None:
        name, arg = command.name, command.argument
        if name == "ANSWER":
            self.call.answered = True
        elif name == "HANGUP":
            return Reaction(close_code=1000, hangup_by="HANGUP")
        elif name == "START_MEDIA_BUFFERING":
            self._bulk = True
        elif name == "STOP_MEDIA_BUFFERING":
            out: list[str] = []
            self._bulk = False
            if self._leftover:
                self._enqueue(now, self._leftover, out)  # the short final frame
            self._leftover = b""
            self._queue.append(_Mark("MEDIA_BUFFERING_COMPLETED", arg))
            return Reaction(out)
        elif name == "MARK_MEDIA":
            self._queue.append(_Mark("MEDIA_MARK_PROCESSED", arg))
        elif name == "FLUSH_MEDIA":
            self.call.flushes += 1
            self.call.frames_flushed += self._length
            self._queue.clear()
            self._length = 0
            self._bulk = False
            self._leftover = b""
            self._end_utterance()
        elif name == "REPORT_QUEUE_DRAINED":
            self._report_drained = True
        elif name == "GET_STATUS":
            return Reaction([self._status(now)])
        elif name == "PAUSE_MEDIA":
            self._paused = True
        elif name == "CONTINUE_MEDIA":
            self._paused = False
        elif name == "SET_MEDIA_DIRECTION":
            if self._format is ControlFormat.TEXT:
                return self._error(now, "SET_MEDIA_DIRECTION requires JSON control messages")
            if arg not in ("both", "in", "out"):
                return self._error(now, f"Invalid media direction '{arg}'")
            self.call.direction = arg
        else:
            return None
        return Reaction()

    # -------------------------------------------------------------------------------------- tick

    def _end_utterance(self) -> None:
        self._in_utterance = False
        self._gap.clear()

    def tick(self, now: float, *, bridged: bool, lost: bool = False) -> list[str]:
        """One timer tick at ``now``; returns the events it produced."""
        call = self.call
        index = call.ticks
        call.ticks += 1
        if call.first_tick_at is None:
            call.first_tick_at = now
        if lost:
            call.ticks_lost += 1
            return []
        if self._paused:
            return []
        out: list[str] = []
        hold = call.config.hold_xoff
        if hold is not None and call.media_start_at is not None:
            held_from = call.media_start_at + hold[0]
            if held_from <= now < held_from + hold[1]:
                if not self._xoff_held:
                    self._xoff_held = True
                    call.xoff_sent += 1
                    out.append(self.event(now, "MEDIA_XOFF"))
                return out
            if self._xoff_held:
                self._xoff_held = False
                call.xon_sent += 1
                out.append(self.event(now, "MEDIA_XON"))
        # Checked before dequeuing, so the XON tick still sees this tick's frame queued.
        if self._queue_full and self._length < XON_FRAMES:
            self._queue_full = False
            call.xon_sent += 1
            out.append(self.event(now, "MEDIA_XON"))
        if not self._queue:
            if self._report_drained:
                self._report_drained = False
                out.append(self.event(now, "QUEUE_DRAINED"))
            if self._in_utterance:
                self._gap.append(now)
            return out
        # Marks use no time slot: every mark at the head is reported, then a frame may still play.
        while self._queue and isinstance(self._queue[0], _Mark):
            mark = self._queue.popleft()
            assert isinstance(mark, _Mark)
            call.marks_processed += 1
            out.append(self.event(now, mark.event, mark.correlation_id))
            self._end_utterance()
        if not self._queue:
            return out
        frame = self._queue.popleft()
        assert isinstance(frame, QueuedFrame)
        self._length -= 1
        call.frames_played += 1
        if not bridged:
            call.frames_lost_unbridged += 1
        if self._record:
            call.played.append(PlayedFrame(index, now, frame.data, bridged, frame.time))
        if self._gap:
            call.underruns += len(self._gap)
            call.gaps.append(Gap(self._gap[0], len(self._gap)))
            self._gap.clear()
        self._in_utterance = True
        return out
