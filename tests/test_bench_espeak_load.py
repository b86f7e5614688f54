"""``python -m bench.espeak_load`` in miniature: the harness runs end to end through the worker pool and
counts what it should. A three-session, one-second run says nothing about performance: no target."""

from __future__ import annotations

import pytest
import trio
from bench.espeak_load import children_pids, run_one

from tts_streamer.adapters.espeak import EspeakEngine

pytestmark = pytest.mark.realtime


async def test_espeak_load_harness_runs_and_counts() -> None:
    engine = EspeakEngine(workers=1)
    try:
        await engine.start()
        assert engine.worker_pids[0] in children_pids()  # its CPU is counted as the workers'
        row = await run_one(engine, 3, 1.0)
    finally:
        with trio.fail_after(3):
            await engine.aclose()
    assert row["sessions"] == 3 and row["errors"] == 0
    assert row["utterances"] >= 3 and row["chunks"] > row["utterances"]
    assert row["audio_s"] > 3 and row["stall_max_ms"] >= row["stall_p99_ms"] >= row["stall_p50_ms"]
    assert row["workers_cpu_pct"] > 0 and row["synth_cpu_ms_per_audio_s"] > 0
