"""The real daemon in a child process, for measurements that must not share a process with the harness.

A soak measures the daemon's RSS and task count: in the harness's process those would include the
simulator, the fake call-manager and the AMQP caller (aio-pika keeps a little of every channel it ever
opened), and the harness's GC pauses would stall the daemon. So the child runs ``tts-streamer serve``
exactly (``cli.serve``: configuration from the environment, the same GC tuning), optionally with the
synthetic voice registered, which ``serve`` alone cannot offer:

    python -m tests.fakes.daemon_process      # SYNTHETIC_SECONDS_PER_CHAR, SYNTHETIC_SPEED

``open_daemon_process`` starts it, waits until it answers on its pod queue, reads its ``/metrics``, and
stops it with SIGTERM (a graceful drain), killing it only if that takes too long.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.voipbin_client import VoipbinCaller

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_TIMEOUT = 30.0  # import, broker connection, queue declarations, on a loaded machine
STOP_TIMEOUT = 20.0  # longer than the drain the environment sets


def parse_samples(exposition: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition by name, labelled ones summed per name."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the child binds it a moment later; loopback, so a race is rare)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def daemon_env(
    url: str, pod_id: str, workdir: str, *, engine: str = "synthetic", http_port: int = 0
) -> dict[str, str]:
    """The environment of a daemon on ``url`` that keeps its files in ``workdir`` and off fixed ports.
    The caller's own TTS_* and RABBITMQ_* settings are left out: they must not configure the child."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TTS_", "RABBITMQ_"))}
    env.update(
        {
            # ``python -m tests.fakes.daemon_process`` from any working directory: this module is test
            # code, outside the installed package.
            "PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH")))),
            "RABBITMQ_ADDRESS": url,
            "POD_ID": pod_id,
            "DEFAULT_ENGINE": engine,
            "ADMIN_SOCKET": os.path.join(workdir, "admin.sock"),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(http_port),
            "MEDIA_HTTP_HOST": "127.0.0.1",
            "MEDIA_HTTP_PORT": "0",
            "MEDIA_DIR": os.path.join(workdir, "media"),
            "SQLITE_PATH": os.path.join(workdir, "speakings.sqlite3"),
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "text",
            "XDG_RUNTIME_DIR": workdir,
            "XDG_STATE_HOME": workdir,
            "XDG_CACHE_HOME": workdir,
        }
    )
    return env


def synthetic_env(seconds_per_char: float, speed: float) -> dict[str, str]:
    """The environment that gives the child (``main``) a SyntheticEngine of this pace."""
    return {"SYNTHETIC_SECONDS_PER_CHAR": repr(seconds_per_char), "SYNTHETIC_SPEED": repr(speed)}


def daemon_command(engine: str = "synthetic") -> list[str]:
    """``tts-streamer serve``, or this module (the same serve) when the voice is the synthetic one."""
    if engine == "synthetic":
        return [sys.executable, "-m", "tests.fakes.daemon_process"]
    script = shutil.which("tts-streamer", path=os.path.dirname(sys.executable))
    return [script, "serve"] if script else [sys.executable, "-m", "tts_streamer.cli", "serve"]


CONSOLE_TIMEOUT = 30.0  # ``memory`` collects the whole heap: seconds on a loaded machine


@attrs.define
class DaemonProcess:
    process: trio.Process
    pod_id: str
    http_port: int
    admin_socket: str = ""

    @property
    def pod_queue(self) -> str:
        return f"bin-manager.tts-manager.request.{self.pod_id}"

    def rss_kib(self) -> int:
        """VmRSS of the daemon process."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.process.pid}")

    async def metrics(self) -> dict[str, float]:
        """Unlabelled samples of the daemon's /metrics (labelled ones summed per name)."""
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", self.http_port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.0\r\nHost: daemon\r\n\r\n")
                raw = bytearray()
                while chunk := await stream.receive_some(65536):
                    raw += chunk
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"/metrics answered {head[:80]!r}")
        return parse_samples(body.decode())

    async def console(self, command: str) -> list[dict[str, Any]]:
        """One admin console command with ``--json`` (docs/operations.md): its rows, parsed."""
        with trio.fail_after(CONSOLE_TIMEOUT):
            stream = await trio.open_unix_socket(self.admin_socket)
            async with stream:
                buffer = bytearray()

                async def response() -> list[str]:
                    while b"\n\n" not in buffer:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise RuntimeError(f"console closed after {bytes(buffer)[:200]!r}")
                        buffer.extend(chunk)
                    end = buffer.index(b"\n\n")
                    text = buffer[:end].decode()
                    del buffer[: end + 2]
                    return text.split("\n")

                await response()  # the greeting
                await stream.send_all(f"{command} --json\nquit\n".encode())
                rows = [json.loads(row) for row in await response()]
        errors = [row for row in rows if "error" in row]
        if errors:
            raise RuntimeError(f"console {command!r} answered {errors[0]}")
        return rows

    async def wait_serving(self, caller: VoipbinCaller) -> None:
        """Until the daemon answers a request on its pod queue (a GET of an unknown streaming)."""
        probe = f"/v1/streamings/{uuid.uuid4()}"
        with trio.fail_after(SERVE_TIMEOUT):
            while await caller.call(self.pod_queue, probe, "GET", wait=0.5) is None:
                if self.process.returncode is not None:
                    raise RuntimeError(f"the daemon exited with status {self.process.returncode}")

    async def stop(self) -> int:
        """SIGTERM (graceful drain), then SIGKILL after STOP_TIMEOUT; the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
        return await self.process.wait()


@asynccontextmanager
async def open_daemon_process(
    url: str, caller: VoipbinCaller, *, engine: str = "synthetic", env: dict[str, str] | None = None
) -> AsyncIterator[DaemonProcess]:
    """A serving daemon process on ``url``; stopped (drained) on exit, its files removed."""
    pod_id = f"child-{uuid.uuid4().hex[:8]}"
    workdir = tempfile.mkdtemp(prefix="tts-streamer-child-")
    try:
        port = free_port()
        full_env = daemon_env(url, pod_id, workdir, engine=engine, http_port=port)
        full_env.update(env or {})
        process = await trio.lowlevel.open_process(
            daemon_command(engine), env=full_env, stdin=subprocess.DEVNULL
        )
        daemon = DaemonProcess(process, pod_id, port, full_env["ADMIN_SOCKET"])
        try:
            await daemon.wait_serving(caller)
            yield daemon
        finally:
            with trio.CancelScope(shield=True):
                await daemon.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# Read here only: the daemon itself has no leak hook. The number of records each ended session leaks.
LEAK_ENV = "TEST_INJECTED_LEAK_RECORDS"


def inject_leak(records: int) -> list[object]:
    """Make every ended session leak ``records`` small records (the soak's check must see it:
    tests/reliability/soak_memory.py). A record is what a forgotten per-session entry in some registry
    would be: a dict with the call id, the reason, a float and 1 KiB of payload, 1.2 KiB in five
    blocks. Returns the list that keeps them for ever."""
    from tts_streamer.actors import events as ev
    from tts_streamer.supervisor.event_bus import EventBus

    leaked: list[object] = []
    emit = EventBus.emit

    def leaky_emit(self: EventBus, event: ev.SessionEvent) -> None:
        if isinstance(event, ev.Stopped):
            for _ in range(records):
                record = {"call_id": event.call_id, "reason": event.reason, "at": 0.5 + len(leaked)}
                leaked.append(record | {"payload": bytes(1024)})
        emit(self, event)

    EventBus.emit = leaky_emit  # type: ignore[method-assign]
    return leaked


def main() -> int:
    """``tts-streamer serve`` with the synthetic voice registered (and default unless DEFAULT_ENGINE
    says otherwise); with TEST_INJECTED_LEAK_BYTES, a daemon that leaks (``inject_leak``)."""
    from tts_streamer.adapters.synthetic import SyntheticEngine
    from tts_streamer.cli import serve

    if int(os.environ.get(LEAK_ENV) or 0):
        inject_leak(int(os.environ[LEAK_ENV]))

    seconds_per_char = float(os.environ.get("SYNTHETIC_SECONDS_PER_CHAR", "0.05"))
    speed = float(os.environ.get("SYNTHETIC_SPEED", "inf"))
    engine = SyntheticEngine(seconds_per_char=seconds_per_char, speed=speed if speed > 0 else math.inf)
    return serve(engines={engine.name: engine})


if __name__ == "__main__":
    sys.exit(main())
