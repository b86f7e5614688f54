"""Runs one scenario as two processes, the daemon driver and a receiver, and collects their records.

The listening socket is bound here (127.0.0.1, ephemeral port) and handed to the receiver as an
inherited fd, so both processes start at once and connections wait in the backlog meanwhile. Each
child gets PR_SET_PDEATHSIG(SIGKILL): if this process dies, so do they. Every wait is bounded; on any
error both children are killed before the error propagates.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import attrs

from tts_streamer.actors.media_socket import PacingConfig

ROOT = Path(__file__).resolve().parent.parent
SERVE_GC = "serve"  # Scenario.gc: tune_gc() at start-up, exactly as serve applies it
CLOUD_ENGINES = ("gcp", "elevenlabs", "aws")  # each against its fake in bench.vendor_fakes
VENDOR_DELAY = 0.02  # one way, between the daemon and the vendor fakes (bench.netem.DelayProxy)


class ScenarioError(RuntimeError):
    pass


@attrs.frozen
class Scenario:
    # pacing | baseline | baseline-go | crosscheck | flush | speed-inf | sweep | burst | target | voice
    kind: str
    sessions: int
    duration: float
    mode: str = "absolute"
    receiver: str = "light"  # light | sim | both (sessions dealt alternately to the two)
    # Defaults are what `serve` ships: PacingConfig's defaults and tune_gc() at start-up.
    lead_frames: int = PacingConfig().lead_frames
    frames_per_message: int = PacingConfig().frames_per_message
    speed: float = 4.0
    flush: bool = False
    flush_after: float = 3.0
    flush_spread: float = 5.0
    new_seconds: float = 2.0
    idle_seconds: float = 1.0
    speak_ramp: float | None = None  # None: max(1 s, N / 200 per second)
    connect_concurrency: int = 16
    # serve: tune_gc() at driver start-up, as `tts-streamer serve` does (shipped); stock: the stock
    # collector ("default" in results written before 2026-12-03); freeze | tuned | off: experiments
    # applied once the sessions are connected.
    gc: str = SERVE_GC
    # The receiver sends each call 50 caller frames/s from MEDIA_START, as a softmix bridge does
    # (chan_websocket.md §8); off: one caller frame, enough to signal "bridged".
    inbound: bool = False
    # Burst: each session is created and starts speaking at once, all within this many seconds
    # (connections are not made first). None: connect all, idle, then speak spread over ``ramp``.
    create_spread: float | None = None
    engine: str = "synthetic"  # synthetic | espeak | gcp | elevenlabs | aws (bench/voices.py)
    # Texts are said as playback goes, this many seconds ahead of it (a stream of say_adds, each one
    # timed); None: every say_add at the start.
    feed_ahead: float | None = None

    @property
    def ramp(self) -> float:
        if self.create_spread is not None:
            return self.create_spread
        return self.speak_ramp if self.speak_ramp is not None else max(1.0, self.sessions / 200)

    @property
    def config_key(self) -> tuple[int, int, str]:
        return (self.lead_frames, self.frames_per_message, self.gc)

    @property
    def label(self) -> str:
        if self.kind == "crosscheck":
            return f"crosscheck ({'simulator' if self.receiver == 'sim' else 'lightweight'} half)"
        return self.kind

    @property
    def config_text(self) -> str:
        speed = "inf" if self.speed == float("inf") else f"{self.speed:g}x"
        text = f"L={self.lead_frames} F={self.frames_per_message} {speed}"
        if self.mode != "absolute":
            text += " " + self.mode.replace("_", "-")
        if self.receiver == "sim" and self.kind != "crosscheck":
            text += " simulator"
        if self.gc != SERVE_GC:
            text += f" gc {self.gc}"
        if self.engine != "synthetic":
            text = text.replace(speed, self.engine)
        if self.create_spread is not None:
            text += f", created within {self.create_spread:g} s"
        if self.feed_ahead is not None:
            text += f", fed {self.feed_ahead:g} s ahead"
        if self.inbound:
            text += ", inbound 50/s"
        return text

    @property
    def speech_seconds(self) -> float:
        if self.flush:
            return self.flush_after + self.flush_spread + 5.0 + self.new_seconds
        return self.duration

    @property
    def cloud(self) -> bool:
        return self.engine in CLOUD_ENGINES


# Niceness of the driver and receivers (bench/run.py --nice): on a machine shared with other work,
# a negative value (root only) keeps their CPU from being counted as tts-streamer's lateness.
NICE = 0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if NICE:
        os.nice(NICE)


def _spawn(args: list[str], log: IO[bytes], **kwargs: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
        **kwargs,
    )


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_scenario(sc: Scenario, workdir: Path, tag: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """Run one scenario; returns each receiver's record path (by kind) and the driver's result.

    ``receiver="both"`` starts the lightweight receiver and the simulator side by side; the driver
    deals sessions to them alternately, so both see the same daemon at the same moment.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = ["light", "sim"] if sc.receiver == "both" else [sc.receiver]
    drv_out = workdir / f"{tag}-driver.json"
    # The driver bounds each phase (warm-up 30 s, connecting, speaking, stopping 10 s), so a daemon that
    # cannot keep up still gives its figures; this budget only catches a harness that hangs.
    connect_budget = 10.0 + sc.sessions * 0.03
    budget = 30.0 + connect_budget + sc.idle_seconds + sc.ramp + sc.speech_seconds * 1.25 + 10.0 + 10.0 + 40.0
    messages = int(sc.sessions * (sc.speech_seconds + 5) * 50 / sc.frames_per_message * 1.1) + 1024
    cfg: dict[str, Any] = {
        "ports": [],
        "sessions": sc.sessions,
        "duration": sc.duration if not sc.flush else sc.flush_after + sc.flush_spread + 5.0,
        "speed": sc.speed,
        "lead_frames": sc.lead_frames,
        "frames_per_message": sc.frames_per_message,
        # Without inbound audio the simulator sends no caller frame, so it never signals "bridged": do
        # not wait for it. The lightweight receiver sends at least one after MEDIA_START.
        "bridge_timeout": 0.0 if "sim" in kinds and not sc.inbound else 0.5,
        "mode": sc.mode,
        "flush": sc.flush,
        "flush_after": sc.flush_after,
        "flush_spread": sc.flush_spread,
        "new_seconds": sc.new_seconds,
        "idle_seconds": sc.idle_seconds,
        "speak_ramp": sc.ramp,
        "connect_concurrency": sc.connect_concurrency,
        "gc": sc.gc,
        "engine": sc.engine,
        "create_spread": sc.create_spread,
        "feed_ahead": sc.feed_ahead,
        "connect_seconds": connect_budget,
        "max_seconds": budget,
        "out": str(drv_out),
    }
    listeners: list[socket.socket] = []
    procs: list[subprocess.Popen[bytes]] = []
    receivers: list[tuple[str, subprocess.Popen[bytes], Path, Path]] = []
    logs: list[IO[bytes]] = []
    try:
        for kind in kinds:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners.append(listener)
            listener.bind(("127.0.0.1", 0))
            listener.listen(4096)
            cfg["ports"].append(listener.getsockname()[1])
            out = workdir / f"{tag}-{kind}"
            log_path = workdir / f"{tag}-{kind}.log"
            logs.append(log_path.open("wb"))
            module = "bench.receiver" if kind == "light" else "bench.sim_receiver"
            args = ["-m", module, "--listen-fd", str(listener.fileno()), "--out", str(out)]
            args += ["--capacity", str(messages), "--max-seconds", str(budget + 30)]
            if sc.inbound:
                args.append("--inbound")
            proc = _spawn(args, logs[-1], stdin=subprocess.PIPE, pass_fds=[listener.fileno()])
            procs.append(proc)
            receivers.append((kind, proc, out, log_path))
            listener.close()
        if sc.cloud:
            far = workdir / f"{tag}-vendors"
            logs.append((workdir / f"{tag}-vendors.log").open("wb"))
            procs.append(_start_vendor_fakes(sc, far, logs[-1]))
            cfg |= {"cert_dir": str(far), "vendor_ports": _vendor_ports(procs[-1], far)}
            cfg["vendor_pid"] = procs[-1].pid
        cfg_path = workdir / f"{tag}-config.json"
        cfg_path.write_text(json.dumps(cfg))
        drv_log_path = workdir / f"{tag}-driver.log"
        logs.append(drv_log_path.open("wb"))
        driver = _spawn(["-m", "bench.driver", str(cfg_path)], logs[-1])
        procs.append(driver)
        try:
            code = driver.wait(timeout=budget + 10)
        except subprocess.TimeoutExpired:
            raise ScenarioError(f"{tag}: driver still running after {budget + 10:.0f} s") from None
        if code != 0 or not drv_out.exists():
            raise ScenarioError(f"{tag}: driver exited with {code}:\n{_tail(drv_log_path)}")
        for _kind, proc, _out, _log in receivers:
            assert proc.stdin is not None
            try:
                proc.stdin.write(b"STOP\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass
        for kind, proc, out, log_path in receivers:
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise ScenarioError(f"{tag}: {kind} receiver did not stop within 60 s") from None
            if code != 0 or not out.with_suffix(".npz").exists():
                raise ScenarioError(f"{tag}: {kind} receiver exited with {code}:\n{_tail(log_path)}")
    finally:
        for listener in listeners:
            listener.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for log in logs:
            log.close()
    return {kind: out for kind, _proc, out, _log in receivers}, json.loads(drv_out.read_text())


def _start_vendor_fakes(sc: Scenario, folder: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """bench.vendor_fakes (the three fakes behind TLS proxies) in a process of its own, as a vendor is."""
    from bench.netem import make_certificates

    folder.mkdir(parents=True, exist_ok=True)
    make_certificates(folder)
    args = ["-m", "bench.vendor_fakes", str(folder), str(VENDOR_DELAY), "0.05", str(sc.sessions + 16)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        preexec_fn=_die_with_parent,
    )


def _vendor_ports(proc: subprocess.Popen[bytes], folder: Path) -> dict[str, int]:
    """The proxies' ports, from the first line bench.vendor_fakes prints (bounded wait)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30.0)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise ScenarioError(f"bench.vendor_fakes did not start (see {folder}.log)")
    return {name: int(port) for name, port in json.loads(line)["ports"].items()}


def wait_quiet(settle: float = 1.0, limit_pct: float = 25.0, patience: float = 90.0) -> float:
    """Pause between scenarios, then wait (bounded) until other processes leave the machine quiet.

    The machine is shared (other sessions run tests on it); a scenario started while another
    process keeps a core busy measures that process too. Returns the busy % of one core seen last.
    """
    from bench.recording import machine_jiffies

    time.sleep(settle)
    deadline = time.monotonic() + patience
    busy_pct = 0.0
    while True:
        busy0, total0 = machine_jiffies()
        time.sleep(1.0)
        busy1, total1 = machine_jiffies()
        cores = os.cpu_count() or 1
        busy_pct = 100.0 * cores * (busy1 - busy0) / max(1, total1 - total0)
        if busy_pct < limit_pct or time.monotonic() > deadline:
            return busy_pct
