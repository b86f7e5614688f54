"""One process-wide clock that wakes pacers at their own deadlines, without a Cancelled each.

``trio.sleep_until`` is a cancel scope with a deadline: every wake-up registers the scope, expires it,
delivers a ``Cancelled`` into the task and catches it again (~20 us, bench/NOTES.md), once per message
per session. Here a pacer parks with ``wait_task_rescheduled`` and the clock, one system task per
Trio run, keeps every parked deadline in one heap, sleeps once until the earliest (moving its own
scope's deadline, which costs nothing, when an earlier one arrives) and reschedules every task that is
due. Each MediaSocket keeps its own timeline and phase: the clock only does the waking, at the exact
deadline each one asked for (no global tick, no buckets).

A parked task is woken early by ``Alarm.wake`` (a flush) and, like any Trio wait, by cancellation.
The media client paces its reads of caller audio with it too (``chan_websocket.dial``), hence its
place beside the other shared primitives rather than in ``actors``.
"""

from __future__ import annotations

import heapq
import itertools
import math

import outcome
import trio
from trio.lowlevel import Abort, RunVar, Task

_CLOCK: RunVar[PacerClock] = RunVar("tts_streamer_pacer_clock")


class _Entry:
    __slots__ = ("deadline", "live", "seq", "task")

    def __init__(self, deadline: float, seq: int, task: Task) -> None:
        self.deadline = deadline
        self.seq = seq
        self.task = task
        self.live = True

    def __lt__(self, other: _Entry) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


class PacerClock:
    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._scope = trio.CancelScope()

    def park(self, deadline: float, task: Task) -> _Entry:
        entry = _Entry(deadline, next(self._seq), task)
        heapq.heappush(self._heap, entry)
        if deadline < self._scope.deadline:
            self._scope.deadline = deadline  # the clock wakes sooner; no Cancelled is delivered yet
        return entry

    async def serve(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0].deadline <= now:
                entry = heapq.heappop(heap)
                if entry.live:
                    entry.live = False
                    trio.lowlevel.reschedule(entry.task, outcome.Value(True))
            self._scope = trio.CancelScope(deadline=heap[0].deadline if heap else math.inf)
            with self._scope:
                await trio.sleep_forever()


def current_clock() -> PacerClock:
    """This Trio run's clock, started (as a system task) by the first pacer that asks for it."""
    try:
        return _CLOCK.get()
    except LookupError:
        clock = PacerClock()
        _CLOCK.set(clock)
        trio.lowlevel.spawn_system_task(clock.serve, name="pacer-clock")
        return clock


class Alarm:
    """One pacer's wake-ups: ``wait_until`` parks the task until a deadline, ``wake`` ends it early."""

    def __init__(self) -> None:
        self._entry: _Entry | None = None

    async def wait_until(self, deadline: float) -> bool:
        """Wait until ``deadline``; True when it came, False when ``wake`` ended the wait first."""
        task = trio.lowlevel.current_task()
        entry = self._entry = current_clock().park(deadline, task)

        def abort(_: trio.lowlevel.RaiseCancelT) -> Abort:
            entry.live = False
            return Abort.SUCCEEDED

        try:
            woke: bool = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._entry = None
        return woke

    def wake(self) -> None:
        entry = self._entry
        if entry is not None and entry.live:
            entry.live = False
            trio.lowlevel.reschedule(entry.task, outcome.Value(False))
