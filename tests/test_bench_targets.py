"""How bench/targets.py judges issue 16's targets, and bench/command_plane.py reads bench.amqp_latency.

No processes, no timing: the figures are made up, so each verdict is known in advance.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from bench import amqp_latency, command_plane
from bench.plan import parse_args, plan
from bench.procs import Scenario
from bench.targets import issue16


def figures(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "late_for_playout_frames": 0,
        "underrun_ticks": 0,
        "sessions_with_underruns": 0,
        "daemon_cpu_pct": 40.0,
        "other_cpu_pct": 0.0,
        "unfinished_sessions": 0,
        "first_audio_ms": {"p50": 1.0, "p99": 3.0, "n": 1000},
        "commands_ms": {"n": 5000, "p50": 0.5, "p99": 4.0, "max": 9.0},
        "rss_idle_kib_per_session": 50.0,
        "connect_failures": 0,
    }
    return base | changes


def verdicts(rows: list[tuple[Scenario, dict[str, Any]]], amqp: dict[str, Any] | None = None) -> list[str]:
    return [status for _name, status, _detail in issue16(rows, amqp)]


TARGET = Scenario("target", 1000, 60.0, inbound=True, create_spread=5.0)


def test_a_clean_target_row_passes_and_one_underrun_fails() -> None:
    assert verdicts([(TARGET, figures())])[0] == "PASS"
    assert verdicts([(TARGET, figures(underrun_ticks=1))])[0] == "FAIL"
    assert verdicts([(TARGET, figures(late_for_playout_frames=3))])[0] == "FAIL"
    assert verdicts([(TARGET, figures(daemon_cpu_pct=55.0))])[0] == "FAIL"
    # Fewer sessions than the target (not connected, or still speaking at the deadline) is no pass.
    assert verdicts([(TARGET, figures(connect_failures=12))])[0] == "FAIL"
    assert verdicts([(TARGET, figures(unfinished_sessions=3))])[0] == "FAIL"
    # First audio (vendor byte -> socket) is read from the same row.
    assert verdicts([(TARGET, figures(first_audio_ms={"p50": 1, "p99": 6.0, "n": 9}))])[3] == "FAIL"


def test_targets_whose_rows_were_not_run_are_not_measured() -> None:
    statuses = verdicts([])
    assert statuses == ["NOT MEASURED"] * 7
    # A pacing row without inbound audio is not the 1,000-session target.
    assert verdicts([(Scenario("pacing", 1000, 60.0), figures())])[0] == "NOT MEASURED"


def test_espeak_target_needs_fast_commands_meanwhile() -> None:
    espeak = Scenario("voice", 200, 30.0, engine="espeak", inbound=True, feed_ahead=3.0)
    assert verdicts([(espeak, figures())])[2] == "PASS"
    slow = figures(commands_ms={"n": 900, "p50": 2.0, "p99": 253.0, "max": 400.0})
    assert verdicts([(espeak, slow)])[2] == "FAIL"
    # Another voice at 200 sessions is not the espeak target.
    gcp = Scenario("voice", 200, 30.0, engine="gcp", inbound=True)
    assert verdicts([(gcp, figures())])[2] == "NOT MEASURED"


def test_idle_memory_is_read_from_the_largest_pacing_row() -> None:
    small = (Scenario("pacing", 1, 60.0), figures(rss_idle_kib_per_session=200.0))
    large = (Scenario("pacing", 500, 60.0), figures(rss_idle_kib_per_session=60.0))
    assert verdicts([small, large])[6] == "PASS"
    assert verdicts([small, (large[0], figures(rss_idle_kib_per_session=70.0))])[6] == "FAIL"


def test_command_plane_figures_are_parsed_from_amqp_latency_s_own_report(
    capsys: pytest.CaptureFixture[str],
) -> None:
    amqp_latency.report("pipelined at 1000/s", [0.002] * 98 + [0.009, 0.012], 0, 5.01, 100)
    runs = command_plane.parse("load average 1.50 on 2 CPUs\n" + capsys.readouterr().out)
    assert len(runs) == 1
    run = runs[0]
    assert run["rate"] == 1000 and run["achieved"] == 20 and run["answered"] == 100 and run["failed"] == 0
    assert run["p99_ms"] == pytest.approx(9.0) and run["max_ms"] == pytest.approx(12.0)
    good = run | {"achieved": 1000.0}
    assert verdicts([], good)[5] == "PASS"
    assert verdicts([], good | {"p99_ms": 12.0})[5] == "FAIL"
    assert verdicts([], run)[5] == "FAIL"  # 20/s achieved is not 1,000/s
    assert verdicts([], {"error": "no broker"})[5] == "NOT MEASURED"


def test_the_full_plan_holds_every_issue_16_row() -> None:
    scenarios = plan(parse_args([]))
    kinds = {(sc.kind, sc.sessions, sc.engine) for sc in scenarios}
    assert {("target", 1000, "synthetic"), ("target", 2000, "synthetic")} <= kinds
    assert {("voice", 200, engine) for engine in ("espeak", "gcp", "elevenlabs", "aws")} <= kinds
    assert ("flush", 1000, "synthetic") in kinds
    target = next(sc for sc in scenarios if sc.kind == "target" and sc.sessions == 1000)
    assert target.inbound and target.create_spread == 5.0 and "inbound 50/s" in target.config_text
    # One receiver process cannot write 100,000 caller frames/s: the 2,000 row goes without.
    big = next(sc for sc in scenarios if sc.kind == "target" and sc.sessions == 2000)
    assert not big.inbound and big.create_spread == 10.0
    burst = next(sc for sc in scenarios if sc.kind == "burst")
    assert burst.create_spread == 1.0 and burst.ramp == 1.0
    assert not math.isnan(sum(sc.duration for sc in scenarios))
