"""What the admin console shows: recent events per session, rows and tables, the Trio task tree.

Text rows are whitespace-separated tokens (free text is JSON-quoted), so they stay awk-able.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterator, Sequence

import attrs
import trio

from tts_streamer.actors import events as ev

EVENT_NAMES: dict[type[ev.SessionEvent], str] = {
    ev.Initiated: "initiated",
    ev.PlayStarted: "play_started",
    ev.PlayFinished: "play_finished",
    ev.VendorFirstAudio: "vendor_first_audio",
    ev.VoiceFallback: "voice_fallback",
    ev.Flushed: "flushed",
    ev.SessionError: "error",
    ev.Stopped: "stopped",
}
_TRIO_DIR = os.path.dirname(trio.__file__)
_MAX_TEXT_SHOWN = 60
# What the history keeps of a message's text: a message may carry many kilobytes, and the history holds
# up to 50 events of each of the last 1,000 ended sessions; the console shows 60 characters anyway.
HISTORY_TEXT_CHARS = 200


# -- recent events per session -------------------------------------------------------------------------


@attrs.define
class EventHistory:
    """A bounded ring of recent events per call id, kept for ``retention`` seconds after Stopped (at most
    ``max_ended`` stopped sessions); message texts trimmed to HISTORY_TEXT_CHARS, so the whole is
    bounded whatever callers say."""

    per_session: int = 50
    retention: float = 600.0
    max_ended: int = 1000
    _rings: dict[str, collections.deque[tuple[float, float, ev.SessionEvent]]] = attrs.field(factory=dict)
    _ended_at: dict[str, float] = attrs.field(factory=dict)  # insertion order = oldest first

    def record(self, event: ev.SessionEvent) -> None:
        """EventBus listener: runs inline in the emitting session, so O(1) and never raising."""
        now = trio.current_time()
        if isinstance(event, ev.PlayFinished) and len(event.text) > HISTORY_TEXT_CHARS:
            event = attrs.evolve(event, text=event.text[: HISTORY_TEXT_CHARS - 1] + "…")
        ring = self._rings.get(event.call_id)
        if ring is None:
            ring = self._rings[event.call_id] = collections.deque(maxlen=self.per_session)
        ring.append((now, time.time(), event))
        # A new session may reuse a stopped one's id: it is live again until its own Stopped.
        self._ended_at.pop(event.call_id, None)
        if isinstance(event, ev.Stopped):
            self._ended_at[event.call_id] = now
        self._prune(now)

    def recent(self, call_id: str) -> list[tuple[float, float, ev.SessionEvent]]:
        """(trio time, wall time, event) of the session's recent events, oldest first."""
        self._prune(trio.current_time())
        return list(self._rings.get(call_id, ()))

    def held(self) -> tuple[int, int]:
        """(sessions, events) held now, live and ended."""
        return len(self._rings), sum(len(ring) for ring in self._rings.values())

    def contents(self) -> tuple[object, ...]:
        """What the history holds, for counting its memory (console_memory.held_blocks)."""
        return (self._rings, self._ended_at)

    def _prune(self, now: float) -> None:
        while self._ended_at:
            call_id, ended = next(iter(self._ended_at.items()))
            if now - ended <= self.retention and len(self._ended_at) <= self.max_ended:
                return
            del self._ended_at[call_id]
            self._rings.pop(call_id, None)


# -- rendering -----------------------------------------------------------------------------------------


def event_name(event: ev.SessionEvent) -> str:
    return EVENT_NAMES.get(type(event), type(event).__name__)


def event_fields(event: ev.SessionEvent) -> dict[str, object]:
    fields = attrs.asdict(event)
    fields.pop("call_id")
    return fields


def text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if isinstance(value, str) and len(text) > _MAX_TEXT_SHOWN:
        text = text[: _MAX_TEXT_SHOWN - 1] + "…"
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def event_details(event: ev.SessionEvent) -> str:
    return " ".join(f"{key}={text_value(value)}" for key, value in event_fields(event).items()) or "-"


def table(columns: Sequence[str], rows: Sequence[dict[str, object]]) -> list[str]:
    """Aligned text rows under an upper-case header; values are space-free tokens."""
    cells = [[name.upper() for name in columns]]
    cells += [[text_value(row[name]) for name in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]


def key_values(values: dict[str, object]) -> list[str]:
    width = max((len(key) for key in values), default=0)
    return [f"{key.ljust(width)}  {text_value(value)}" for key, value in values.items()]


def error_row(kind: str, message: str, *, as_json: bool) -> str:
    if as_json:
        return json.dumps({"error": kind, "message": message})
    return f"error: {kind}: {message}"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def follow_row(event: ev.SessionEvent, *, as_json: bool) -> str:
    wall = time.time()
    if as_json:
        return json.dumps(
            {"time": round(wall, 3), "id": event.call_id, "event": event_name(event), **event_fields(event)}
        )
    stamp = time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"
    return f"{stamp}  {text_value(event.call_id)}  {event_name(event)}  {event_details(event)}"


def event_table(rows: list[dict[str, object]]) -> list[str]:
    # The details column is the last one and holds key=value pairs, so it is left unpadded.
    lines = table(("ago_s", "event"), rows)
    width = max(len(line) for line in lines)
    details = ["DETAILS"] + [str(row["details"]) for row in rows]
    return [f"{line.ljust(width)}  {extra}" for line, extra in zip(lines, details, strict=True)]


def task_tree(*, ordered: bool = True) -> Iterator[tuple[int, trio.lowlevel.Task]]:
    """(depth, task) for every live task of the current Trio run, parents before children; none outside
    a run. ``ordered``: siblings by name, for a stable listing (a count need not pay for the sort)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return
    if root is None:
        return
    stack: list[tuple[int, trio.lowlevel.Task]] = [(0, root)]
    while stack:
        depth, task = stack.pop()
        yield depth, task
        children = [child for nursery in task.child_nurseries for child in nursery.child_tasks]
        if ordered:
            # child_tasks is unordered: reversed onto the stack so they come out in order.
            children.sort(key=lambda t: t.name, reverse=True)
        stack.extend((depth + 1, child) for child in children)


def walk_tasks() -> Iterator[tuple[int, str, str]]:
    """(depth, name, where it waits) for every live task, parents before children."""
    for depth, task in task_tree():
        yield depth, task.name, _waiting_at(task)


def _waiting_at(task: trio.lowlevel.Task) -> str:
    """The innermost await frame outside trio itself: the line of our code the task is parked on."""
    where = ""
    for frame, lineno in task.iter_await_frames():
        filename = frame.f_code.co_filename
        if not filename.startswith(_TRIO_DIR):
            where = f"{frame.f_code.co_name} {os.path.basename(filename)}:{lineno}"
    return where
