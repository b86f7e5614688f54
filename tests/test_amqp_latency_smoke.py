"""``python -m bench.amqp_latency`` in miniature, with its generator processes (``--publishers``).

Only that the harness works end to end: the daemon process answers, the generator processes report
back, and the per-run lines (latency, daemon CPU per request) are printed. No figure is judged.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench.amqp_load import request_body

from tests.services import require_rabbitmq
from tts_streamer.adapters.voipbin.envelope import parse_request

ROOT = Path(__file__).resolve().parent.parent


def test_the_generators_send_what_the_bench_names() -> None:
    sid, message_id = "5f0c5a9e-0000-4000-8000-000000000001", "5f0c5a9e-0000-4000-8000-000000000002"
    get = parse_request(request_body("get", sid, message_id, 7))
    assert (get.method, get.uri, get.data) == ("GET", f"/v1/streamings/{sid}", None)
    add = parse_request(request_body("say_add", sid, message_id, 7))
    assert (add.method, add.uri) == ("POST", f"/v1/streamings/{sid}/say_add")
    assert add.data == {"message_id": message_id, "text": "word 7. "}


@pytest.mark.realtime
def test_the_latency_bench_runs_with_generator_processes() -> None:
    require_rabbitmq()
    kind = "say_add"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.amqp_latency",
            "--streamings=2",
            "--warmup=5",
            "--go-style-requests=3",
            "--requests=30",
            "--rates=60",
            "--publishers=2",
            f"--kind={kind}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    label = "pipelined" if kind == "say_add" else f"pipelined {kind}"
    run = re.search(rf"^{label} at 60/s: 30 {kind} in .* (\d+) answered", done.stdout, re.MULTILINE)
    assert run is not None, done.stdout
    assert int(run.group(1)) > 0
    assert re.search(r"daemon CPU \d+ us/request .* generators \d+ us/request \(2 processes\)", done.stdout)


@pytest.mark.realtime
def test_the_cost_bench_runs_and_counts_every_request() -> None:
    """``python -m bench.amqp_cost`` without callgrind (valgrind is not a test dependency)."""
    require_rabbitmq()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.amqp_cost",
            "--no-callgrind",
            "--requests=40",
            "--burst=10",
            "--gap=0.05",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(
        r"^40 say_add in bursts of 10 .* 40 replies, not started \{\}", done.stdout, re.MULTILINE
    )
    inline = re.search(r"(\d+) deliveries handed over inline", done.stdout)
    assert inline is not None and int(inline.group(1)) == 40, done.stdout
