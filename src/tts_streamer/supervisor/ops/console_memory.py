"""The console's ``memory`` command: what the daemon's Python heap holds, after a full collection.

VmRSS is a poor leak signal: pymalloc keeps its 256 KiB arenas while any block in them lives, and glibc
keeps freed pages, so RSS climbs to a high-water mark and stays (docs/reliability.md). What leaks are
live objects, and those are counted exactly here: ``allocated_blocks`` (``sys.getallocatedblocks()``:
every block allocated through Python's allocators and not freed, large ones included, whatever their
type) and the GC-tracked containers, read right after ``gc.collect()`` so that garbage the daemon's
rare full collections have not reached yet (supervisor/gc_tuning.py) is not counted as live.

Two stores grow on purpose until they are full, and would look like a leak meanwhile: the console's
event history (the last 1,000 ended sessions) and the command plane's recent latencies (10,000
samples). Their blocks are counted by walking what they hold, and ``other_blocks`` is the rest: with
the daemon idle (no live session), that figure growing with the number of sessions served is a leak.

The collection runs on the event loop and stalls it (tens of milliseconds with a few hundred thousand
objects; every session's pacing waits meanwhile): meant for an idle or quiet daemon.
"""

from __future__ import annotations

import collections
import gc
import resource
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from tts_streamer.supervisor.ops.console_views import EventHistory

if TYPE_CHECKING:
    from tts_streamer.supervisor.services.command_plane import PlaneStats

_CONTAINERS = (dict, list, tuple, set, frozenset, collections.deque)


def held_blocks(roots: Iterable[object]) -> int:
    """Blocks of the distinct objects reachable from ``roots`` through containers and attrs instances
    (types, functions and everything else are counted but not entered, so the walk stays inside the
    store). A dict, set or non-empty list owns a second block (its table, its item array), a deque one
    per 64 items: what ``sys.getallocatedblocks()`` counts for them, within a few per thousand
    (tests/test_console_memory.py measures it)."""
    seen: set[int] = set()
    stack = list(roots)
    blocks = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        blocks += 1
        kind = type(obj)
        if kind is dict or kind is set or kind is frozenset or (kind is list and obj):
            blocks += 1
        elif kind is collections.deque:
            blocks += len(obj) // 64 + 1  # type: ignore[arg-type]
        if isinstance(obj, _CONTAINERS) or (not isinstance(obj, type) and attrs.has(kind)):
            stack.extend(gc.get_referents(obj))
    return blocks


def _status_kib() -> dict[str, int]:
    """VmRSS and RssAnon from /proc (Linux); the peak from getrusage elsewhere too."""
    values = {"rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                name = {"VmRSS": "rss_kib", "RssAnon": "rss_anon_kib"}.get(key)
                if name is not None:
                    values[name] = int(rest.split()[0])
    except OSError:
        pass
    return values


def memory_report(history: EventHistory, plane: PlaneStats | None) -> dict[str, object]:
    """A full collection, then the heap's figures (see the module docstring). Synchronous on purpose:
    nothing may run between the collection and the counts."""
    started = time.perf_counter()
    collected = gc.collect()
    collect_ms = round((time.perf_counter() - started) * 1000, 1)
    blocks = sys.getallocatedblocks()  # first: the walks below allocate (their own sets, lists)
    history_blocks = held_blocks(history.contents())
    latency_blocks = held_blocks([plane.latency]) if plane is not None else 0
    tracked = len(gc.get_objects())
    sessions, events = history.held()
    return {
        "collected": collected,
        "collect_ms": collect_ms,
        "allocated_blocks": blocks,
        "history_sessions": sessions,
        "history_events": events,
        "history_blocks": history_blocks,
        "latency_samples": min(plane.latency.count, plane.latency.capacity) if plane is not None else 0,
        "latency_blocks": latency_blocks,
        "other_blocks": blocks - history_blocks - latency_blocks,
        "gc_objects": tracked,
        "gc_frozen": gc.get_freeze_count(),
        "gc_collections": [generation["collections"] for generation in gc.get_stats()],
        **_status_kib(),
    }
