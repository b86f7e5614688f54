"""`make bench` in miniature: the harness runs real processes on loopback and writes its results.

Only checks that the harness works end to end (a table, a results file, no stray processes); the
figures of a two-session, one-second run say nothing about performance, so no target is asserted.
Deselect with ``-m "not realtime"``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ("pacing", "baseline", "crosscheck (simulator half)", "flush")
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
        ]
    )
    assert table_scenarios(output) == list(EXPECTED)


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
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    raw = tmp_path / "raw"
    args = ["--quick", "--sessions", "2", "--duration", "1", "--flush-sessions", "2"]
    args += ["--out", str(tmp_path), "--keep-raw", str(raw)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # 0: every target met or not measured; 1: a target missed (timing on a shared machine); 2: harness error.
    assert proc.returncode in (0, 1), output
    assert "| scenario | N |" in output
    printed = table_scenarios(output)
    assert all(scenario in printed for scenario in EXPECTED), output
    results = list(tmp_path.glob("*-quick.md"))
    assert len(results) == 1, output
    # The same rows in the machine-readable results, keyed by scenario, not by the printed label.
    dump = json.loads(results[0].with_suffix(".json").read_text())
    recorded = {(scenario["kind"], scenario["receiver"]) for scenario, _figures in dump["rows"]}
    for kind in ("pacing", "baseline", "flush"):
        assert any(k == kind for k, _receiver in recorded), sorted(recorded)
    assert ("crosscheck", "sim") in recorded, sorted(recorded)
    text = results[0].read_text()
    assert "## Results" in text and "## Targets" in text and "Python 3." in text and "trio " in text
    assert "| flush" in text and "## Sweep" in text
    assert list(raw.glob("*-driver.json")), "the driver processes left no records"
    assert _processes_mentioning(str(raw)) == [], "driver or receiver processes outlived the harness"
