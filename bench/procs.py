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


class ScenarioError(RuntimeError):
    pass


@attrs.frozen
class Scenario:
    kind: str  # pacing | baseline | baseline-go | crosscheck | flush | speed-inf | sweep
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

    @property
    def ramp(self) -> float:
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
        return text

    @property
    def speech_seconds(self) -> float:
        if self.flush:
            return self.flush_after + self.flush_spread + 5.0 + self.new_seconds
        return self.duration


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
    budget = 30.0 + sc.sessions * 0.03 + sc.idle_seconds + sc.ramp + sc.speech_seconds * 1.25 + 30.0
    messages = int(sc.sessions * (sc.speech_seconds + 5) * 50 / sc.frames_per_message * 1.1) + 1024
    cfg: dict[str, Any] = {
        "ports": [],
        "sessions": sc.sessions,
        "duration": sc.duration if not sc.flush else sc.flush_after + sc.flush_spread + 5.0,
        "speed": sc.speed,
        "lead_frames": sc.lead_frames,
        "frames_per_message": sc.frames_per_message,
        # The simulator sends no caller audio, so it never signals "bridged": do not wait for it.
        # The lightweight receiver sends one caller frame after MEDIA_START, as a bridged leg would.
        "bridge_timeout": 0.0 if "sim" in kinds else 0.5,
        "mode": sc.mode,
        "flush": sc.flush,
        "flush_after": sc.flush_after,
        "flush_spread": sc.flush_spread,
        "new_seconds": sc.new_seconds,
        "idle_seconds": sc.idle_seconds,
        "speak_ramp": sc.ramp,
        "connect_concurrency": sc.connect_concurrency,
        "gc": sc.gc,
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
            proc = _spawn(args, logs[-1], stdin=subprocess.PIPE, pass_fds=[listener.fileno()])
            procs.append(proc)
            receivers.append((kind, proc, out, log_path))
            listener.close()
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
