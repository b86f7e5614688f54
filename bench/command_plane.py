"""The command-plane row of `make bench`: ``python -m bench.amqp_latency`` run as is, its report parsed.

bench/amqp_latency.py drives ``tts-streamer serve`` through RabbitMQ (a private vhost) with pipelined
say_adds on an open-loop schedule; this runs it at one rate and reads back its "pipelined at R/s"
lines. Without a broker (or when the run fails) the row is "not measured", with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

from bench.procs import ROOT

_RUN = re.compile(
    r"pipelined at (?P<rate>[\d.]+)/s: (?P<requests>\d+) say_add in (?P<seconds>[\d.]+) s "
    r"\((?P<achieved>[\d.]+)/s achieved\), (?P<answered>\d+) answered, (?P<failed>\d+) failed"
)
_LATENCY = re.compile(
    r"p50 (?P<p50>[\d.]+) ms\s+p90 (?P<p90>[\d.]+) ms\s+p99 (?P<p99>[\d.]+) ms\s+max (?P<max>[\d.]+) ms"
)
_LOAD = re.compile(r"load average (?P<load>[\d.]+)")


def parse(output: str) -> list[dict[str, Any]]:
    """One dict per "pipelined at" run in bench.amqp_latency's output, with its latency line."""
    runs: list[dict[str, Any]] = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        match = _RUN.search(line)
        if not match:
            continue
        run: dict[str, Any] = {k: float(v) for k, v in match.groupdict().items()}
        latency = _LATENCY.search(lines[i + 1]) if i + 1 < len(lines) else None
        if latency:
            run |= {f"{k}_ms": float(v) for k, v in latency.groupdict().items()}
        runs.append(run)
    return runs


def measure(rate: float, requests: int, quick: bool) -> dict[str, Any]:
    """Run the command-plane bench at ``rate``; its figures, or {"error": why} when it could not run."""
    args = [sys.executable, "-m", "bench.amqp_latency", "--rates", f"{rate:g}", "--requests", str(requests)]
    if quick:
        args += ["--warmup", "20", "--warmup-rate", "100", "--go-style-requests", "5", "--streamings", "4"]
    else:
        args += ["--go-style-requests", "50"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    budget = 120.0 + requests / max(rate, 1.0) * 2
    try:
        proc = subprocess.run(
            args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"bench.amqp_latency still running after {budget:.0f} s"}
    output = proc.stdout + proc.stderr
    runs = parse(output)
    load = _LOAD.search(output)
    if proc.returncode != 0 or not runs:
        tail = " | ".join(output.strip().splitlines()[-3:])
        return {"error": f"bench.amqp_latency exited with {proc.returncode}: {tail}"}
    result = runs[-1] | {"output": output}
    if load:
        result["load"] = float(load.group("load"))
    return result


def table(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"Not measured: {result['error']}"
    head = "| offered req/s | achieved req/s | answered / sent | failed | p50 / p90 / p99 / max ms | load |"
    return "\n".join(
        [
            head,
            "|---|---|---|---|---|---|",
            f"| {result['rate']:.0f} | {result['achieved']:.0f} | {result['answered']:.0f} / "
            f"{result['requests']:.0f} | {result['failed']:.0f} | {result.get('p50_ms', float('nan')):.2f} / "
            f"{result.get('p90_ms', float('nan')):.2f} / {result.get('p99_ms', float('nan')):.2f} / "
            f"{result.get('max_ms', float('nan')):.2f} | {result.get('load', float('nan')):.2f} |",
        ]
    )
