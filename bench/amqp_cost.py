"""The command plane's own cost per request, counted in instructions: ``python -m bench.amqp_cost``.

bench/amqp_latency.py measures the whole daemon in CPU seconds, which on a shared 2-core machine moves
by a third from one minute to the next and depends on how much the load lets the daemon batch. This
runs only the AMQP side: ``open_amqp_bridge`` and ``CommandPlane`` exactly as the daemon wires them
(manual ack, prefetch 10, the outbox), with a say_add handler that answers 200 at once, in a child
process; with ``--callgrind`` (the default when valgrind is installed) that child runs under
``valgrind --tool=callgrind --instr-atstart=no`` and instructions are counted only from the first to
the last request (``callgrind_control -i on/off``), so the figure is instructions per request, the
same on a busy machine as on a quiet one.

The parent sends ``--requests`` say_adds (round-robin over 20 streaming ids, one lane each) in bursts
of ``--burst`` every ``--gap`` seconds from one aiormq channel, waits for every reply (each must be a
200), and prints the counts: instructions (or CPU seconds without callgrind) per request, and how
the outbox batched (socket writes of replies, acks written, flushes). Under callgrind the child runs
~50x slower than natively: keep the bursts small and the gap long enough for a burst to be answered
(the defaults: 10 every 0.5 s), or requests would expire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
QUEUE = "tts-bench-cost.requests"


# -- the child: bridge + command plane ------------------------------------------------------------------


async def serve_child(url: str) -> None:
    import trio

    from tts_streamer.adapters.amqp.bridge import QueueSpec, Topology, open_amqp_bridge
    from tts_streamer.adapters.voipbin import envelope
    from tts_streamer.adapters.voipbin.routes import RouteName
    from tts_streamer.supervisor.services.command_plane import CommandPlane, RouteCall

    async def say_add(call: RouteCall) -> envelope.Response:
        await trio.lowlevel.checkpoint()
        return envelope.ok({"id": str(call.match.id)})

    topology = Topology(consume=(QueueSpec(QUEUE, durable=False, auto_delete=True),), manual_ack=True)
    async with open_amqp_bridge(url, topology) as bridge, trio.open_nursery() as nursery:
        plane = CommandPlane(bridge, {RouteName.STREAMING_SAY_ADD: say_add}, pod_id="bench-cost")
        await nursery.start(plane.serve)
        print("ready", flush=True)
        # The parent closes our stdin when it is done.
        await trio.to_thread.run_sync(sys.stdin.read)
        outbox = bridge._outbox
        stats = {
            "requests": plane.stats.requests,
            "replies": plane.stats.replies,
            "reply_failures": plane.stats.reply_failures,
            "not_started": dict(plane.stats.not_started),
            # getattr: the bench also counts older trees (PYTHONPATH), which lack some of these.
            "direct_deliveries": getattr(getattr(bridge, "_direct", None), "direct", None),
            "flushes": getattr(outbox, "flushes", None),
            "reply_writes": getattr(outbox, "reply_writes", None),
            "acks_written": getattr(outbox, "acks_written", None),
        }
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stats["cpu_seconds"] = usage.ru_utime + usage.ru_stime
        print("stats " + json.dumps(stats), flush=True)
        nursery.cancel_scope.cancel()


# -- the parent: the load and the counting ------------------------------------------------------------------


async def send(url: str, requests: int, burst: int, gap: float, on_first: Any) -> list[float]:
    import aiormq
    from pamqp import commands as spec

    from bench.amqp_load import request_body

    connection = await aiormq.connect(url)
    channel = await connection.channel(publisher_confirms=False)
    reply_queue = (await channel.queue_declare("", exclusive=True, auto_delete=True)).queue or ""
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    bad: list[int] = []
    done = asyncio.Event()

    def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
        started = sent_at.pop(message.header.properties.correlation_id or "", None)
        if started is None:
            return
        latencies.append(time.perf_counter() - started)
        status = json.loads(message.body)["status_code"]
        if status != 200:
            bad.append(status)
        if len(latencies) == requests:
            done.set()

    await channel.basic_consume(reply_queue, on_reply, no_ack=True)
    targets = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(20)]
    on_first()
    for index in range(requests):
        if index and index % burst == 0:
            await asyncio.sleep(gap)
        sid, message_id = targets[index % len(targets)]
        properties = spec.Basic.Properties(
            content_type="text/plain", reply_to=reply_queue, correlation_id=str(index), delivery_mode=1
        )
        sent_at[str(index)] = time.perf_counter()
        await channel.basic_publish(
            request_body("say_add", sid, message_id, index), routing_key=QUEUE, properties=properties
        )
    await asyncio.wait_for(done.wait(), 60 + requests * 0.2)
    await connection.close()
    if bad:
        raise RuntimeError(f"{len(bad)} replies not 200: {sorted(set(bad))}")
    return latencies


def callgrind_total(path: str) -> int:
    """Total instructions (Ir) in a callgrind output file (its ``summary``/``totals`` line)."""
    total = 0
    with open(path) as out:
        for line in out:
            match = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if match:
                total = max(total, int(match.group(1)))
    return total


def run(options: argparse.Namespace) -> int:
    outdir = tempfile.mkdtemp(prefix="tts-bench-cost-")
    out_file = os.path.join(outdir, "callgrind.out")
    command = [sys.executable, "-m", "bench.amqp_cost", "--child", "--amqp", options.url]
    if options.callgrind:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_file}",
            *command,
        ]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"child did not start: {line!r}")

        def instrument(state: str) -> None:
            if options.callgrind:
                subprocess.run(
                    ["callgrind_control", "-i", state, str(child.pid)], check=True, capture_output=True
                )

        started = time.perf_counter()
        latencies = asyncio.run(
            send(options.url, options.requests, options.burst, options.gap, lambda: instrument("on"))
        )
        instrument("off")
        elapsed = time.perf_counter() - started
        child.stdin.close()
        stats_line = child.stdout.readline()
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    stats = json.loads(stats_line.removeprefix("stats "))
    n = options.requests
    ordered = sorted(latencies)
    print(
        f"{n} say_add in bursts of {options.burst} every {options.gap} s ({elapsed:.1f} s), "
        f"{stats['replies']} replies, not started {stats['not_started']}; "
        f"p50 {ordered[len(ordered) // 2] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"  outbox: {stats['flushes']} flushes, {stats['reply_writes']} reply writes, "
        f"{stats['acks_written']} acks written; {stats['direct_deliveries']} deliveries handed over inline"
    )
    if options.callgrind:
        total = callgrind_total(out_file)
        print(f"  instructions: {total / n:,.0f} per request ({total:,} in all; {out_file})")
    else:
        print(f"  child CPU {stats['cpu_seconds']:.2f} s in all (start-up included)")
        shutil.rmtree(outdir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--amqp", dest="url", default=os.environ.get("RABBITMQ_ADDRESS", DEFAULT_URL))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--no-callgrind", dest="callgrind", action="store_false")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        import trio

        trio.run(serve_child, options.url)
        return 0
    if options.callgrind and shutil.which("valgrind") is None:
        print("(valgrind not installed: CPU seconds instead of instructions)", file=sys.stderr)
        options.callgrind = False
    from bench.amqp_latency import temporary_vhost

    with temporary_vhost(options.url) as url:
        options.url = url
        return run(options)


if __name__ == "__main__":
    raise SystemExit(main())
