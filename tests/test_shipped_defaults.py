"""One source of truth for the pacing defaults: what `serve` ships is what the demo and the bench use.

Issue 16 ("What ships"): the bench's "(shipped defaults)" rows measured 1 frame per message with the
stock collector while `serve` shipped 5 frames per message and tune_gc().
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from bench import driver, lead_sweep, procs
from bench import plan as bench_plan
from bench import targets as bench_targets

from tts_streamer import cli
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.supervisor.config import DaemonConfig


def test_daemon_demo_and_bench_agree_on_the_shipped_pacing() -> None:
    shipped = PacingConfig()
    daemon = DaemonConfig()
    from_env = DaemonConfig.from_env({})
    demo = cli.demo_options(cli._parser().parse_args(["demo"]))
    bench_lead, bench_fpm, bench_gc = bench_plan.SHIPPED
    for lead, fpm in [
        (daemon.lead_frames, daemon.frames_per_message),
        (from_env.lead_frames, from_env.frames_per_message),
        (demo.lead_frames, demo.frames_per_message),
        (bench_lead, bench_fpm),
        (SessionConfig().pacing.lead_frames, SessionConfig().pacing.frames_per_message),
    ]:
        assert (lead, fpm) == (shipped.lead_frames, shipped.frames_per_message)
    # What bench/lead_sweep.py's rule chose is what ships.
    assert (shipped.lead_frames, shipped.frames_per_message) == lead_sweep.CHOSEN
    assert bench_gc == procs.SERVE_GC


def test_demo_flags_still_override() -> None:
    demo = cli.demo_options(cli._parser().parse_args(["demo", "--frames-per-message", "1"]))
    assert demo.frames_per_message == 1 and demo.lead_frames == PacingConfig().lead_frames


def test_bench_shipped_rows_run_as_serve_runs() -> None:
    """Every pacing/flush/baseline row labelled shipped carries F=5 and tune_gc() at driver start-up."""
    args = bench_plan.parse_args(["--quick"])
    scenarios = bench_plan.plan(args)
    shipped = [
        sc
        for sc in scenarios
        if sc.kind in ("pacing", "flush", "baseline", "crosscheck", "target", "burst", "voice")
    ]
    assert shipped and all(sc.config_key == bench_plan.SHIPPED for sc in shipped)
    assert "(shipped defaults)" in bench_targets.config_name(bench_plan.SHIPPED)
    assert "(shipped defaults)" not in bench_targets.config_name((3, 1, "stock"))


def test_bench_driver_applies_tune_gc_only_for_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(driver, "tune_gc", lambda: calls.append("tuned"))
    monkeypatch.setattr(trio, "run", lambda fn: {"sessions": {}, "connect_failures": []})
    for gc_mode, expected in [("serve", ["tuned"]), ("stock", [])]:
        calls.clear()
        path = tmp_path / f"{gc_mode}.json"
        out = tmp_path / f"{gc_mode}.out"
        path.write_text(json.dumps({"gc": gc_mode, "max_seconds": 1, "out": str(out)}))
        assert driver.main([str(path)]) == 0
        assert calls == expected
