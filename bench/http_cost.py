"""What the HTTP servers cost the daemon: our h11 servers against the same endpoints on hypercorn.

Issue 18 asked for the health/metrics and media servers on hypercorn's trio worker unless that costs
the pacing loop noticeably. This measures both, A/B in one run:

- ``requests``: the server in this process, a client in another (``client`` below) making requests
  (``/metrics``, ``/health/live``, ``/health/ready``, a GET and a ranged GET of a 64 KB file); CPU
  seconds of this process per request (``getrusage``), on kept-alive and on new connections.
- ``requests --callgrind``: instructions of the server process per request, under callgrind (the
  figure that does not depend on the machine's load);
- ``pacing``: ``bench/procs.py``'s pacing scenario, the driver process also serving HTTP (h11, or
  hypercorn, or none) while a client process scrapes it at ``--rate`` requests a second; the
  lateness of the paced frames as ``bench/analyze.py`` computes it, and the driver's CPU.

The two servers are bench/http_servers.py's (the hypercorn side: a small ASGI app per server with our
routes, statuses and bodies). On a loaded machine the pacing figures say more about the machine than
about the servers: see bench/results/2026-12-03-http-servers.md. Usage::

    python -m bench.http_cost requests --count 3000
    python -m bench.http_cost requests --callgrind --count 100 --mixes "all five,/health/live"
    python -m bench.http_cost pacing --sessions 200 --duration 20 --rate 20
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench.http_servers import start_servers

FILE_NAME = "a1b2c3.wav"
FILE_BYTES = 64 * 1024


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the client (its own process) ---------------------------------------------------------------------------

MIX = (
    ("health", "GET", "/metrics", {}),
    ("health", "GET", "/health/live", {}),
    ("health", "GET", "/health/ready", {}),
    ("media", "GET", f"/{FILE_NAME}", {}),
    ("media", "GET", f"/{FILE_NAME}", {"Range": "bytes=0-1023"}),
)


def client(health: int, media: int, count: int, rate: float, fresh: bool, seconds: float, mix: str) -> int:
    """Make ``count`` requests (or go on for ``seconds``) at ``rate`` a second; print how many succeeded."""
    conns: dict[str, http.client.HTTPConnection] = {}
    ports = {"health": health, "media": media}
    done = failed = 0
    chosen = [MIX[int(i)] for i in mix.split(",")]
    start = time.monotonic()
    while (count and done + failed < count) or (seconds and time.monotonic() - start < seconds):
        server, method, path, headers = chosen[(done + failed) % len(chosen)]
        try:
            conn = conns.get(server)
            if conn is None or fresh:
                conn = conns[server] = http.client.HTTPConnection("127.0.0.1", ports[server], timeout=5)
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            response.read()
            if fresh:
                conn.close()
            done += response.status < 400
            failed += response.status >= 400
        except OSError:
            failed += 1
            conns.pop(server, None)
        if rate:
            next_at = start + (done + failed) / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
    print(json.dumps({"ok": done, "failed": failed}))
    return 0


def _client_args(
    health: int,
    media: int,
    *,
    count: int = 0,
    rate: float = 0,
    fresh: bool = False,
    seconds: float = 0,
    mix: str = "0,1,2,3,4",
) -> list[str]:
    args = [str(health), str(media), str(count), str(rate), str(int(fresh)), str(seconds), mix]
    return [sys.executable, "-m", "bench.http_cost", "client", *args]


def make_media_root() -> Path:
    """A media directory with one 64 KB file, removed when this process exits."""
    root = Path(tempfile.mkdtemp(prefix="http-cost-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / FILE_NAME).write_bytes(b"RIFF" + os.urandom(FILE_BYTES - 4))
    return root


# -- requests: CPU per request ----------------------------------------------------------------------------


MIXES = {"all five": "0,1,2,3,4", "/metrics": "0", "/health/live": "1", "media GET 64 KB": "3"}


async def cost_per_request(kinds: list[str], count: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    root = make_media_root()
    results: dict[str, dict[str, list[float]]] = {}
    async with trio.open_nursery() as nursery:
        ports = {kind: await start_servers(kind, nursery, root) for kind in kinds}
        for _ in range(rounds):
            for label, mix in MIXES.items():
                for fresh in (False, True):
                    for kind in kinds:  # A/B interleaved, so load changes hit both alike
                        args = _client_args(*ports[kind], count=count, fresh=fresh, mix=mix)
                        before = cpu()
                        proc = await trio.run_process(args, capture_stdout=True)
                        used = cpu() - before
                        ok = json.loads(proc.stdout)["ok"]
                        assert ok == count, (kind, proc.stdout)
                        key = f"{label}, {'new connection' if fresh else 'keep-alive'}"
                        results.setdefault(kind, {}).setdefault(key, []).append(used / count * 1e6)
        nursery.cancel_scope.cancel()
    return results


async def serve_for_client(kind: str, count: int, mix: str, fresh: bool) -> None:
    async with trio.open_nursery() as nursery:
        ports = await start_servers(kind, nursery, make_media_root())
        if count:
            args = _client_args(*ports, count=count, fresh=fresh, mix=mix)
            proc = await trio.run_process(args, capture_stdout=True)
            if json.loads(proc.stdout)["ok"] != count:
                raise SystemExit(f"{kind}: not every request succeeded: {proc.stdout!r}")
        nursery.cancel_scope.cancel()


def instructions(kind: str, count: int, mix: str, fresh: bool) -> int:
    """Instructions the server process ran (callgrind), start-up and shut-down included."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        argv += ["-m", "bench.http_cost", "serve", kind, str(count), mix, str(int(fresh))]
        subprocess.run(argv, check=True, capture_output=True)
        for line in out.read_text().splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError("no callgrind totals")


def instructions_per_request(kinds: list[str], count: int, mixes: list[str]) -> None:
    """(Ir(warm + count) - Ir(warm)) / count: start-up, imports and first-request warm-up cancel out."""
    warm = 20
    for label in mixes:
        mix = MIXES[label]
        for fresh in (False, True):
            for kind in kinds:
                base = instructions(kind, warm, mix, fresh)
                total = instructions(kind, warm + count, mix, fresh)
                per = (total - base) / count
                mode = "new connection" if fresh else "keep-alive"
                print(f"{kind:10} {label + ', ' + mode:35} instructions/request: {per:,.0f}", flush=True)


# -- pacing with a scraper -------------------------------------------------------------------------------


async def driver_with_http(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """bench/driver.py's run, this process also serving HTTP to a scraper process meanwhile."""
    from bench import driver

    rate = float(cfg.get("http_rate", 0.0))
    root = make_media_root()
    client_result: dict[str, Any] = {}
    scraped = trio.Event()
    async with trio.open_nursery() as nursery:
        if kind != "none":
            health, media = await start_servers(kind, nursery, root)
            # The scrape spans the connect, idle, ramp and speech phases of the run.
            seconds = float(cfg["duration"]) + float(cfg["idle_seconds"]) + float(cfg["speak_ramp"])

            async def scrape() -> None:
                args = _client_args(health, media, rate=rate, seconds=seconds)
                proc = await trio.run_process(args, capture_stdout=True, check=False)
                client_result.update(json.loads(proc.stdout or b"{}"))
                scraped.set()

            nursery.start_soon(scrape)
        else:
            scraped.set()
        with trio.fail_after(float(cfg["max_seconds"])):
            result = await driver.run(cfg)
        with trio.move_on_after(30):
            await scraped.wait()
        result["http"] = {"kind": kind, "rate": rate, **client_result}
        nursery.cancel_scope.cancel()
    return result


def pacing(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench import analyze as an
    from bench import procs
    from bench.procs import Scenario

    kinds = args.kinds.split(",")
    original = procs._spawn
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="http-cost-pacing-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    for attempt in range(args.rounds):
        for kind in kinds:

            def spawn(argv: list[str], log: Any, _kind: str = kind, **kwargs: Any) -> subprocess.Popen[bytes]:
                if argv[:2] == ["-m", "bench.driver"]:
                    cfg_path = Path(argv[2])
                    cfg = json.loads(cfg_path.read_text())
                    cfg["http_rate"] = args.rate
                    cfg_path.write_text(json.dumps(cfg))
                    argv = ["-m", "bench.http_cost", "driver", _kind, argv[2]]
                return original(argv, log, **kwargs)

            procs._spawn = spawn  # type: ignore[assignment]
            sc = Scenario("pacing", args.sessions, args.duration)
            tag = f"{kind}-{attempt}"
            paths, drv = procs.run_scenario(sc, work / tag, tag)
            cols, meta = an.load_receiver(paths["light"])
            row = an.analyze(cols, meta, drv)
            lat, steady = row["lateness_ms"], row.get("steady_lateness_ms", {})
            rows.append(
                {
                    "kind": kind,
                    "round": attempt,
                    "lateness_ms": {k: round(v, 2) for k, v in lat.items()},
                    "steady_p99_ms": round(steady.get("p99", math.nan), 2),
                    "late_for_playout_frames": row["late_for_playout_frames"],
                    "underrun_ticks": row["underrun_ticks"],
                    "daemon_cpu_pct": round(row.get("daemon_cpu_pct", math.nan), 1),
                    "http": drv.get("http", {}),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    procs._spawn = original  # type: ignore[assignment]
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        h, m, count, rate, fresh, seconds, mix = argv[1:]
        return client(int(h), int(m), int(count), float(rate), fresh == "1", float(seconds), mix)
    if argv and argv[0] == "serve":  # one server process for callgrind: serve COUNT requests, exit
        kind, count, mix, fresh = argv[1], int(argv[2]), argv[3], argv[4] == "1"
        trio.run(serve_for_client, kind, count, mix, fresh)
        return 0
    if argv and argv[0] == "driver":
        from bench.procs import SERVE_GC
        from bench.recording import raise_fd_limit
        from tts_streamer.supervisor.gc_tuning import tune_gc

        raise_fd_limit()
        cfg = json.loads(Path(argv[2]).read_text())
        if cfg.get("gc", SERVE_GC) == SERVE_GC:
            tune_gc()  # as bench/driver.py's main does
        Path(cfg["out"]).write_text(json.dumps(trio.run(driver_with_http, argv[1], cfg)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("requests")
    r.add_argument("--count", type=int, default=2000)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--kinds", default="h11,hypercorn")
    r.add_argument("--callgrind", action="store_true", help="instructions per request (load-independent)")
    r.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated, of {', '.join(MIXES)}")
    q = sub.add_parser("pacing")
    q.add_argument("--sessions", type=int, default=200)
    q.add_argument("--duration", type=float, default=20.0)
    q.add_argument("--rate", type=float, default=20.0)
    q.add_argument("--rounds", type=int, default=2)
    q.add_argument("--kinds", default="none,h11,hypercorn")
    args = p.parse_args(argv)
    print(f"uptime: {os.getloadavg()}")
    if args.what == "requests" and args.callgrind:
        instructions_per_request(args.kinds.split(","), args.count, args.mixes.split(","))
    elif args.what == "requests":
        results = trio.run(cost_per_request, args.kinds.split(","), args.count, args.rounds)
        for kind, modes in results.items():
            for mode, values in modes.items():
                shown = " ".join(f"{v:.0f}" for v in values)
                print(f"{kind:10} {mode:35} CPU µs/request: {shown} (min {min(values):.0f})")
    else:
        pacing(args)
    print(f"uptime: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
