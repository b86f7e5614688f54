"""`make bench` in miniature: the harness runs real processes on loopback and writes its results.

Only checks that the harness works end to end (a table, a results file, no stray processes) and that
each scenario measured what it names (inbound caller frames sent and read, a burst's start window, a
real voice's audio, commands timed, the command plane's figures); the figures of a two-session,
one-second run say nothing about performance, so no target is asserted.
Deselect with ``-m "not realtime"``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.services import require_rabbitmq

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ("pacing", "baseline", "crosscheck (simulator half)", "flush", "target", "burst", "voice")
# The table marks a row measured while other processes loaded the machine; that is not part of its key.
_BUSY = " (machine busy)"


def table_scenarios(output: str) -> list[str]:
    """The scenario of every row of the results table in ``output``, whatever the machine's load."""
    names = []
    for line in output.splitlines():
        match = re.match(r"\| ([^|]+?) \| \d+ \|", line)
        if match:
            names.append(match.group(1).removesuffix(_BUSY))
    return names


def test_table_rows_are_found_whatever_the_machine_load() -> None:
    output = "\n".join(
        [
            "| scenario | N | config |",
            "|---|---|---|",
            "| pacing (machine busy) | 2 | L=3 F=5 1x, 1 s |",
            "| baseline | 2 | L=3 F=5 1x, 1 s |",
            "| crosscheck (simulator half) (machine busy) | 2 | L=3 F=5 1x |",
            "| flush | 2 | L=3 F=5 inf |",
            "| target (machine busy) | 6 | L=3 F=5 4x, created within 0.03 s, inbound 50/s, 2 s |",
            "| burst | 4 | L=3 F=5 4x, created within 1 s, inbound 50/s, 1.5 s |",
            "| voice | 2 | L=3 F=5 espeak, fed 3 s ahead, inbound 50/s, 3 s |",
        ]
    )
    assert table_scenarios(output) == list(EXPECTED)


def _run_bench(tmp_path: Path, args: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.run",
            *args,
            "--out",
            str(tmp_path),
            "--keep-raw",
            str(tmp_path / "raw"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output


def _rows(tmp_path: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    results = list(tmp_path.glob("*-quick.md"))
    assert len(results) == 1
    rows: list[tuple[dict[str, Any], dict[str, Any]]] = json.loads(
        results[0].with_suffix(".json").read_text()
    )["rows"]
    return rows


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (the harness's children name their files)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.realtime
def test_quick_bench_writes_a_table_and_a_results_file(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    args = ["--quick", "--sessions", "2", "--duration", "1", "--flush-sessions", "2"]
    # The cloud voices and the command plane have smoke runs of their own (below).
    args += ["--voices", "espeak", "--voice-duration", "1.5", "--amqp-rate", "0"]
    returncode, output = _run_bench(tmp_path, args, timeout=120)
    # 0: every target met or not measured; 1: a target missed (timing on a shared machine); 2: harness error.
    assert returncode in (0, 1), output
    assert "| scenario | N |" in output
    printed = table_scenarios(output)
    assert all(scenario in printed for scenario in EXPECTED), output
    results = list(tmp_path.glob("*-quick.md"))
    assert len(results) == 1, output
    # The same rows in the machine-readable results, keyed by scenario, not by the printed label.
    dump = json.loads(results[0].with_suffix(".json").read_text())
    recorded = {(scenario["kind"], scenario["receiver"]) for scenario, _figures in dump["rows"]}
    for kind in ("pacing", "baseline", "flush", "target", "burst", "voice"):
        assert any(k == kind for k, _receiver in recorded), sorted(recorded)
    by_kind = {scenario["kind"]: (scenario, figures) for scenario, figures in dump["rows"]}
    # Inbound audio: the receiver sent each call its caller frames (50/s) and the daemon read them.
    scenario, figures = by_kind["target"]
    assert scenario["inbound"] and scenario["create_spread"] is not None
    speaking = scenario["duration"] * scenario["sessions"]
    assert figures["caller_frames_sent"] >= 40 * speaking, figures["caller_frames_sent"]
    assert figures["caller_frames_daemon"] >= 0.9 * figures["caller_frames_sent"]
    # Without inbound, one caller frame per call (the "bridged" signal).
    scenario, figures = by_kind["pacing"]
    assert figures["caller_frames_sent"] == scenario["sessions"], figures["caller_frames_sent"]
    # A burst has no connect phase: the sessions are created as they start speaking; lateness while
    # they start is reported.
    assert "p99" in by_kind["burst"][1]["burst"]
    # espeak-ng spoke, and every command sent meanwhile was timed.
    scenario, figures = by_kind["voice"]
    assert scenario["engine"] == "espeak" and figures["frames_received"] > 0
    assert figures["commands_ms"]["n"] >= scenario["sessions"] * 3  # say_init, say_adds, say_finish
    assert figures["first_audio_ms"]["n"] == scenario["sessions"]
    flush = by_kind["flush"][1]
    assert flush["flush_media_ms"]["p99"] > 0  # say_flush -> FLUSH_MEDIA on the wire
    assert ("crosscheck", "sim") in recorded, sorted(recorded)
    text = results[0].read_text()
    assert "## Results" in text and "## Targets (issue 16" in text and "Python 3." in text and "trio " in text
    verdicts = re.findall(
        r"^- \*\*(PASS|FAIL|NOT MEASURED)\*\* ", text.split("## Targets (issue 16")[1], re.M
    )
    assert len(verdicts) >= 7, text  # one per issue 16 target, before the earlier ones
    assert "| flush" in text and "## Sweep" in text
    assert list(raw.glob("*-driver.json")), "the driver processes left no records"
    assert _processes_mentioning(str(raw)) == [], "driver or receiver processes outlived the harness"


@pytest.mark.realtime
def test_quick_bench_speaks_through_every_cloud_adapter(tmp_path: Path) -> None:
    args = ["--quick", "--only", "voice", "--voices", "gcp,elevenlabs,aws", "--voice-duration", "1.5"]
    returncode, output = _run_bench(tmp_path, [*args, "--amqp-rate", "0"], timeout=120)
    assert returncode in (0, 1), output
    rows = _rows(tmp_path)
    assert sorted(scenario["engine"] for scenario, _ in rows) == ["aws", "elevenlabs", "gcp"], output
    for scenario, figures in rows:
        # Each adapter's audio, through TLS from its fake in another process, reached the receiver.
        assert figures["frames_received"] > 0 and figures["session_errors"] == 0, (scenario, output)
        assert figures["first_audio_ms"]["n"] == scenario["sessions"], scenario
    assert _processes_mentioning(str(tmp_path / "raw")) == [], "the vendor fakes outlived the harness"


@pytest.mark.realtime
def test_quick_bench_measures_the_command_plane(tmp_path: Path) -> None:
    require_rabbitmq()
    returncode, output = _run_bench(tmp_path, ["--quick", "--only", "amqp"], timeout=120)
    assert returncode in (0, 1), output
    text = next(tmp_path.glob("*-quick.md")).read_text()
    section = text.split("## Command plane")[1].split("##")[0]
    assert "| 100 |" in section, section  # the offered rate's row, parsed from bench.amqp_latency
    line = next(line for line in text.splitlines() if "command plane: 1,000 requests/s" in line)
    assert "NOT MEASURED" not in line, line
