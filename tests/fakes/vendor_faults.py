"""Fault injection shared by the loopback vendor fakes (Google, ElevenLabs, Polly).

A fake takes its faults from a queue: each new stream (RPC, context, request) pops the next one, so a test
can make the first attempt fail and let the retry or the next utterance through.
"""

from __future__ import annotations

import threading
import time
import zlib

import attrs

FAULT_KINDS = ("slow_first_byte", "stall", "error", "drop", "malformed")


@attrs.frozen
class Fault:
    """``slow_first_byte``: first audio ``delay`` s late. The others happen after ``after_bytes`` of audio:
    ``stall`` sends nothing more (until cancelled), ``error`` ends the stream with the vendor's error,
    ``drop`` cuts the connection, ``malformed`` sends a message the client cannot parse."""

    kind: str
    after_bytes: int = 0
    delay: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {FAULT_KINDS}")


@attrs.define
class FaultQueue:
    """Thread-safe: fakes serve from worker threads."""

    _items: list[Fault] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self._items.extend(faults)

    def next(self) -> Fault | None:
        with self._lock:
            return self._items.pop(0) if self._items else None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def fake_fill_byte(text: str) -> int:
    """The mu-law byte a fake speaks ``text`` with (never 0xFF): a receiver can tell texts apart."""
    return 0x10 + zlib.crc32(text.strip().encode()) % 0x60


@attrs.define
class PaceLog:
    """When a fake sent each chunk, against its own schedule (``late``) and against real time from the
    text's start (``behind``: positive when the audio left later than it plays), in seconds. A bench
    reads it to tell a far side that fell behind from a client that read late. Appends are atomic."""

    late: list[float] = attrs.field(factory=list)
    behind: list[float] = attrs.field(factory=list)

    def sent(self, due: float, plays_at: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.late.append(now - due)
        self.behind.append(now - plays_at)

    def summary(self) -> dict[str, dict[str, float]]:
        return {"late": percentiles(self.late), "behind": percentiles(self.behind)}


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p99 / max in ms, and how many."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {"n": len(ordered), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": ordered[-1] * 1e3}
