"""The daemon's garbage-collector settings (chosen by make bench) are applied and reversible in tests."""

from __future__ import annotations

import gc

from tts_streamer.supervisor.gc_tuning import THRESHOLDS, tune_gc


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    saved = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
