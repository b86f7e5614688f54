"""Request->reply latency of the AMQP command plane, on loopback: ``python -m bench.amqp_latency``.

The daemon runs as its own process, as in production: by default ``tts-streamer serve`` (through
``tests.fakes.daemon_process``) with a synthetic voice that makes 20 ms of
audio per say_add, so the figures are the command plane's rather than a voice engine's;
``--engine espeak`` runs ``tts-streamer serve`` itself. This process plays everything around it: the
chan_websocket simulator, a fake call-manager and the callers. It creates live streamings (20 by
default), opens a message on each, then sends ``say_add`` requests round-robin over them on an open-loop
schedule (request i is due at t0 + i/rate whether or not earlier ones were answered, so a slow daemon
cannot hide its delay by slowing the sender) and reports the latency from the publish of each request
to the arrival of its reply:

- **go-style**: every request exactly as the Go services send it (``VoipbinCaller``: a new channel and
  a server-named exclusive reply queue per call, no correlation id). The per-call channel and queue
  setup is not counted (it is the caller's cost), but it costs this Python caller ~9 ms of CPU per call,
  so one caller process cannot offer much more than ~100 calls/s, and near that its own scheduling
  delays show up in the figures: it runs at 50/s by default.
- **pipelined**: one channel and one reply queue for all requests, matched by correlation id; the daemon
  sees the same requests (the echoed correlation id aside). One run per rate in ``--rates`` (default
  250, 500 and 1000/s), so the report shows where the pod saturates: past it, requests wait in the
  broker, latency grows by the backlog, and per-pod requests older than 3 s expire unanswered.

With ``--publishers N`` (default 2) the pipelined runs are sent by N generator processes of their own
(``bench/amqp_load.py``: plain asyncio on aiormq), so the figures are the daemon's, not this
process's: here the caller shares one loop with the simulator and the fake call-manager and cannot
itself offer 1,000/s on a loaded 2-core machine (``--publishers 0`` keeps it in this process).
``--kind get`` sends GET ``/v1/streamings/<id>`` (no session command) instead of say_add.

Each run reports the achieved rate, how many requests were answered, failed (non-200) or left
unanswered, and p50/p90/p99/max of the latency, then the daemon's CPU time per request (user +
system from ``/proc``, over the run: a figure that depends far less on the machine's load than the
latencies do) and the generators', and the daemon's CPU net of what it burns idle (measured for
``--idle-seconds`` before each run) per request sent. The load average is printed too: on a shared
machine the figures are only comparable at a similar load.

By default it runs in a temporary vhost (made with ``rabbitmqctl`` when that works), so tests or
benchmarks running against the same broker cannot take its requests.

A little over the ~400-line guide: the modes share one report; the load generators live in
bench/amqp_load.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import aio_pika
import trio
import trio_asyncio
from aio_pika.abc import AbstractIncomingMessage
from tests.fakes.call_manager import open_fake_call_manager
from tests.fakes.daemon_process import DaemonProcess, open_daemon_process
from tests.fakes.voipbin_client import SHARED_QUEUE, VoipbinCaller, open_voipbin_caller

from tts_streamer.adapters.voipbin import envelope
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig, serve_asterisk_simulator

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@contextmanager
def temporary_vhost(base_url: str) -> Iterator[str]:
    """A fresh vhost for this run (deleted afterwards), or ``base_url`` unchanged if rabbitmqctl fails."""
    name = f"tts-bench-{uuid.uuid4().hex[:10]}"

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=30)

    try:
        ctl("add_vhost", name)
        ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"(no private vhost: {exc}; using {base_url})", file=sys.stderr)
        yield base_url
        return
    try:
        parts = urllib.parse.urlsplit(base_url)
        yield urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name, safe="")))
    finally:
        try:
            ctl("delete_vhost", name)
        except (OSError, subprocess.SubprocessError):
            pass


SYNTHETIC_SECONDS_PER_CHAR = 0.002  # "word 123. ": 20 ms of audio, so the media path stays light


async def call(caller: VoipbinCaller, queue: str, uri: str, method: str, data: Any = None) -> Any:
    reply = await caller.call(queue, uri, method, data)
    if reply is None or reply.status_code != 200:
        raise RuntimeError(f"{method} {uri}: {reply}")
    return reply.data


async def go_style_load(
    caller: VoipbinCaller,
    pod_queue: str,
    targets: list[tuple[str, str]],
    requests: int,
    rate: float,
    concurrency: int,
) -> tuple[list[float], int, float]:
    """``requests`` say_adds at ``rate``/s round-robin over ``targets``; (latencies, failures, seconds)."""
    caller.latencies.clear()
    failures = 0
    limit = trio.CapacityLimiter(concurrency)

    async def one(index: int) -> None:
        nonlocal failures
        sid, message_id = targets[index % len(targets)]
        async with limit:
            reply = await caller.call(pod_queue, *say_add(sid, message_id, index))
        if reply is None or reply.status_code != 200:
            failures += 1

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for index in range(requests):
            await trio.sleep_until(started + index / rate)
            nursery.start_soon(one, index)
    return list(caller.latencies), failures, trio.current_time() - started


def say_add(sid: str, message_id: str, index: int) -> tuple[str, str, dict[str, str]]:
    return f"/v1/streamings/{sid}/say_add", "POST", {"message_id": message_id, "text": f"word {index}. "}


async def pipelined_load(
    caller: VoipbinCaller, pod_queue: str, targets: list[tuple[str, str]], requests: int, rate: float
) -> tuple[list[float], int, float]:
    """The same say_adds from one channel with one reply queue, replies matched by correlation id."""
    aio = trio_asyncio.aio_as_trio
    channel = await aio(caller.connection.channel)(publisher_confirms=False)
    sent_at: dict[str, float] = {}
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    failures = 0
    all_answered = trio.Event()

    def on_reply(message: AbstractIncomingMessage) -> None:
        nonlocal failures
        now = time.perf_counter()
        started = sent_at.pop(message.correlation_id or "", None)
        if started is None:
            return
        latencies.append(now - started)
        status = envelope.parse_response(message.body).status_code
        if status != 200:
            failures += 1
            statuses[status] += 1
        if len(latencies) == requests:
            all_answered.set()

    async def consume(message: AbstractIncomingMessage) -> None:
        on_reply(message)

    try:
        queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
        await aio(queue.consume)(consume, no_ack=True)
        publish = aio(channel.default_exchange.publish)
        started = trio.current_time()
        for index in range(requests):
            await trio.sleep_until(started + index / rate)
            sid, message_id = targets[index % len(targets)]
            body = envelope.render_request(
                envelope.make_request(*say_add(sid, message_id, index), publisher="bench")
            )
            correlation_id = str(index)
            sent_at[correlation_id] = time.perf_counter()
            message = aio_pika.Message(
                body, content_type="text/plain", reply_to=queue.name, correlation_id=correlation_id
            )
            await publish(message, routing_key=pod_queue)
        with trio.move_on_after(5):
            await all_answered.wait()
        elapsed = trio.current_time() - started
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await aio(channel.close)()
    if statuses:
        print(f"  error replies by status: {dict(statuses)}")
    return latencies, failures + len(sent_at), elapsed


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def process_load(
    url: str,
    pod_queue: str,
    targets: list[tuple[str, str]],
    requests: int,
    rate: float,
    publishers: int,
    kind: str = "say_add",
) -> tuple[list[float], int, float, float]:
    """The pipelined load from ``publishers`` generator processes (bench/amqp_load.py) sharing one
    schedule; (latencies, failures, seconds, generators' CPU seconds)."""
    start_at = time.time() + 1.5  # interpreter start-up and connection of every generator first
    results: list[dict[str, Any]] = []

    async def one(offset: int) -> None:
        job = {
            "url": url,
            "queue": pod_queue,
            "targets": targets,
            "requests": len(range(offset, requests, publishers)),
            "rate": rate,
            "offset": offset,
            "step": publishers,
            "kind": kind,
            "start_at": start_at,
            "wait": 5.0,
        }
        done = await trio.run_process(
            [sys.executable, "-m", "bench.amqp_load"],
            stdin=json.dumps(job).encode(),
            capture_stdout=True,
            check=True,
        )
        results.append(json.loads(done.stdout))

    async with trio.open_nursery() as nursery:
        for offset in range(publishers):
            nursery.start_soon(one, offset)
    latencies = [value for result in results for value in result["latencies"]]
    statuses: collections.Counter[int] = collections.Counter()
    for result in results:
        statuses.update({int(code): count for code, count in result["statuses"].items()})
    if statuses:
        print(f"  error replies by status: {dict(statuses)}")
    failures = sum(statuses.values()) + sum(result["unanswered"] for result in results)
    sending = max(result["sending_seconds"] for result in results)
    return latencies, failures, sending, sum(result["cpu_seconds"] for result in results)


def report(
    label: str, latencies: list[float], failures: int, seconds: float, requests: int, what: str = "say_add"
) -> None:
    ordered = sorted(latencies)
    ms = [value * 1000 for value in ordered]
    print(
        f"{label}: {requests} {what} in {seconds:.2f} s ({requests / seconds:.0f}/s achieved), "
        f"{len(ordered)} answered, {failures} failed or unanswered"
    )
    if ms:
        print(
            f"  request->reply  p50 {percentile(ms, 0.50):.2f} ms   p90 {percentile(ms, 0.90):.2f} ms   "
            f"p99 {percentile(ms, 0.99):.2f} ms   max {ms[-1]:.2f} ms"
        )


async def run(options: argparse.Namespace) -> int:
    # Light legs: this process stands in for Asterisk, whose cost is not what is measured here.
    legs = SimConfig(record_frames=False, send_caller_audio=False, write_timeout=None)
    sim = AsteriskSimulator(legs, seed=1)
    with temporary_vhost(options.amqp) if options.private_vhost else _same(options.amqp) as url:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
            fake = await stack.enter_async_context(open_fake_call_manager(url, sim, "127.0.0.1", port))
            fake.leg_config = legs
            caller = await stack.enter_async_context(open_voipbin_caller(url))
            synthetic = {"SYNTHETIC_SECONDS_PER_CHAR": repr(SYNTHETIC_SECONDS_PER_CHAR)}
            daemon = await stack.enter_async_context(
                open_daemon_process(url, caller, engine=options.engine, env=synthetic)
            )
            await measure(options, caller, daemon, url)
            nursery.cancel_scope.cancel()
    # open_daemon_process stopped it with SIGTERM: a clean drain exits 0.
    return 0 if daemon.process.returncode == 0 else 1


async def measure(
    options: argparse.Namespace, caller: VoipbinCaller, daemon: DaemonProcess, url: str
) -> None:
    pod_queue = daemon.pod_queue
    targets = []
    for _ in range(options.streamings):
        body = {"reference_type": "call", "reference_id": str(uuid.uuid4()), "direction": "out"}
        sid = (await call(caller, pod_queue, "/v1/streamings", "POST", body))["id"]
        message_id = str(uuid.uuid4())
        await call(caller, pod_queue, f"/v1/streamings/{sid}/say_init", "POST", {"message_id": message_id})
        targets.append((sid, message_id))
    print(
        f"daemon pid {daemon.process.pid} (pod {daemon.pod_id}, {options.engine} voice), "
        f"{options.streamings} live streamings, vhost {urllib.parse.urlsplit(url).path}, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    warm = await pipelined_load(caller, pod_queue, targets, options.warmup, options.warmup_rate)
    report("warm-up (pipelined)", *warm, options.warmup)
    go_style = await go_style_load(
        caller, pod_queue, targets, options.go_style_requests, options.go_style_rate, options.concurrency
    )
    report(f"go-style at {options.go_style_rate:.0f}/s", *go_style, options.go_style_requests)
    pid = daemon.process.pid
    label = "pipelined" if options.kind == "say_add" else f"pipelined {options.kind}"
    for rate in options.rates:
        await trio.sleep(1.0)  # let the previous run's backlog and audio settle
        # What the daemon burns with no request (its streamings' media tasks, timers): subtracted below
        # so the per-request figure is the requests' own, whatever the run's length.
        idle_before, idle_started = process_cpu_seconds(pid), trio.current_time()
        await trio.sleep(options.idle_seconds)
        idle_rate = (process_cpu_seconds(pid) - idle_before) / (trio.current_time() - idle_started)
        cpu_before, run_started = process_cpu_seconds(pid), trio.current_time()
        generators_cpu = math.nan
        pipelined: tuple[list[float], int, float]
        if options.publishers > 0:
            got, lost, seconds, generators_cpu = await process_load(
                url, pod_queue, targets, options.requests, rate, options.publishers, options.kind
            )
            pipelined = (got, lost, seconds)
        else:
            pipelined = await pipelined_load(caller, pod_queue, targets, options.requests, rate)
        daemon_cpu = process_cpu_seconds(pid) - cpu_before
        net_cpu = daemon_cpu - idle_rate * (trio.current_time() - run_started)
        latencies, failures, seconds = pipelined
        report(f"{label} at {rate:.0f}/s", latencies, failures, seconds, options.requests, options.kind)
        answered = max(1, len(latencies))
        print(
            f"  daemon CPU {daemon_cpu * 1e6 / answered:.0f} us/request ({daemon_cpu:.2f} s)"
            + (
                f", generators {generators_cpu * 1e6 / answered:.0f} us/request "
                f"({options.publishers} processes)"
                if options.publishers > 0
                else ", generator in this process"
            )
            + f"; load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"  daemon CPU net of idle ({idle_rate * 1000:.0f} ms/s): {net_cpu * 1e6 / options.requests:.0f} "
            f"us per request sent, {net_cpu * 1e6 / answered:.0f} us per answered"
        )
    for sid, _ in targets:
        await call(caller, SHARED_QUEUE, f"/v1/streamings/{sid}", "DELETE")


@contextmanager
def _same(url: str) -> Iterator[str]:
    yield url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--amqp", default=os.environ.get("RABBITMQ_ADDRESS", DEFAULT_URL))
    parser.add_argument("--requests", type=int, default=2000, help="pipelined say_adds")
    parser.add_argument(
        "--rates",
        type=lambda raw: [float(rate) for rate in raw.split(",")],
        default=[250.0, 500.0, 1000.0],
        help="pipelined say_adds per second, one run per rate (open loop); default 250,500,1000",
    )
    parser.add_argument("--go-style-requests", type=int, default=500)
    parser.add_argument(
        "--go-style-rate",
        type=float,
        default=50.0,
        help="go-style calls per second (each costs this process ~9 ms of CPU: keep it well below 100)",
    )
    parser.add_argument(
        "--publishers",
        type=int,
        default=2,
        help="generator processes for the pipelined runs (bench/amqp_load.py); 0: send from this process",
    )
    parser.add_argument(
        "--kind",
        choices=["say_add", "get"],
        default="say_add",
        help="pipelined request: say_add on a live streaming, or GET of it (no session command)",
    )
    parser.add_argument("--streamings", type=int, default=20, help="live streamings the say_adds go to")
    parser.add_argument(
        "--engine",
        choices=["synthetic", "espeak"],
        default="synthetic",
        help="the daemon's voice: synthetic (20 ms per say_add, measures the command plane) or espeak",
    )
    parser.add_argument("--concurrency", type=int, default=200, help="go-style calls in flight at most")
    parser.add_argument(
        "--idle-seconds", type=float, default=2.0, help="daemon CPU measured idle before each run"
    )
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--warmup-rate", type=float, default=300.0)
    parser.add_argument(
        "--no-private-vhost", dest="private_vhost", action="store_false", help="use the URL's vhost as is"
    )
    options = parser.parse_args(argv)
    started = time.monotonic()
    status = trio.run(run, options)
    print(f"({time.monotonic() - started:.1f} s in all)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
