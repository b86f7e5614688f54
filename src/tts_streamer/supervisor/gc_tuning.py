"""Garbage-collector settings for the daemon, from `make bench` (bench/NOTES.md).

With hundreds of sessions, full collections walked every live object and paused the loop for
75-290 ms, longer than the pacing lead, so every session missed its slot at once. Freezing what
start-up allocated and collecting the youngest generation less often removed most of those pauses
(flush at 500 sessions, 5 frames per message: p99 lateness 1028 ms -> 61 ms).
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Call once, after imports and configuration, before serving."""
    gc.collect()
    gc.freeze()  # start-up objects are never garbage: keep them out of every future collection
    gc.set_threshold(*THRESHOLDS)
