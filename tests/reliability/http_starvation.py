"""Reliability scenario: idle-connection starvation of the HTTP servers (issue 14, §7).

A real ``tts-streamer serve`` in a child process. Against both of its HTTP ports (HTTP_PORT: health and
metrics; MEDIA_HTTP_PORT: speech files) attackers hold many connections that send nothing, reopening
each one the server closes, and slowloris clients trickle a request head one byte at a time, reopening
when cut; meanwhile the kubelet's probes (a new connection each, 3 s timeout) and Asterisk's fetches of a
speech file run every half second.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile

import attrs
import trio

from tests.fakes.daemon_process import free_port, open_daemon_process
from tests.fakes.voipbin_client import open_voipbin_caller
from tests.reliability.common import Row, Settings, broker_url

PROBE_TIMEOUT = 3.0  # the shipped liveness and readiness probes' timeoutSeconds
PROBE_EVERY = 0.5
TRICKLE_EVERY = 0.3
RECONNECT_AFTER = 0.5  # an attacker whose connection was closed opens another this much later
SPEECH_FILE = "0123456789abcdef0123456789abcdef01234567.wav"
SPEECH_BYTES = b"RIFF" + bytes(2000)


@attrs.define
class Tally:
    probes: int = 0
    answered: int = 0
    late: list[str] = attrs.field(factory=list)
    latencies: list[float] = attrs.field(factory=list)
    idle_opened: int = 0
    idle_closed_by_server: int = 0
    slowloris_opened: int = 0
    slowloris_cut: int = 0


async def _get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        while data := await stream.receive_some(65536):
            received += data
        return bytes(received)


async def _probe(tally: Tally, name: str, port: int, path: str, expect: bytes) -> None:
    tally.probes += 1
    started = trio.current_time()
    reply = b""
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            reply = await _get(port, path)
        except (OSError, trio.BrokenResourceError) as exc:
            tally.late.append(f"{name}: {exc!r}"[:120])
            return
    if reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(expect):
        tally.answered += 1
        tally.latencies.append(trio.current_time() - started)
    else:
        tally.late.append(f"{name}: {'no answer within 3 s' if not reply else reply[:40]!r}")


async def _idle_attacker(tally: Tally, port: int) -> None:
    """One connection that never sends a byte; reopened whenever the server closes it."""
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.1)
            continue
        tally.idle_opened += 1
        async with stream:
            try:
                while await stream.receive_some(1):
                    pass
            except trio.BrokenResourceError:
                pass
        tally.idle_closed_by_server += 1
        await trio.sleep(RECONNECT_AFTER)


async def _slowloris(tally: Tally, port: int) -> None:
    """A request head trickled a byte at a time, never finished; reopened whenever cut."""
    head = b"GET /health/live HTTP/1.1\r\nHost: pod\r\nX-Padding: " + b"a" * 10_000
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.1)
            continue
        tally.slowloris_opened += 1
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_watch_cut, tally, stream, nursery.cancel_scope)
            try:
                for byte in head:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(TRICKLE_EVERY)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.sleep(RECONNECT_AFTER)


async def _watch_cut(tally: Tally, stream: trio.SocketStream, trickling: trio.CancelScope) -> None:
    """Until the server answers (408) or closes the connection; then the trickle stops."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass
    tally.slowloris_cut += 1
    trickling.cancel()


async def http_starvation(settings: Settings) -> Row:
    """Against both HTTP ports of a child ``serve``: ``idle`` connections per port that send nothing
    (each reopened when the server closes it: far past the 64-connection limit, sustained) and
    ``loris`` slowloris clients per port trickling a request head every 0.3 s (reopened when cut),
    while a liveness probe, a readiness probe and a fetch of a speech file start every 0.5 s.

    lost = probes (``/health/live``, ``/health/ready``, ``GET /<file>.wav``) not answered 200 with the
    expected body within 3 s, the shipped probes' timeout; + a daemon that did not stay up.
    """
    idle = 100 if settings.quick else 400
    loris = 10 if settings.quick else 50
    seconds = 6.0 if settings.quick else 30.0
    row = Row(
        "idle-connection starvation of the HTTP servers",
        f"{idle} idle + {loris} slowloris connections on each of HTTP_PORT and MEDIA_HTTP_PORT "
        f"for {seconds:g} s",
    )
    media_dir = tempfile.mkdtemp(prefix="tts-streamer-starve-")
    tally = Tally()
    try:
        await trio.Path(media_dir, SPEECH_FILE).write_bytes(SPEECH_BYTES)
        media_port = free_port()
        env = {"MEDIA_HTTP_PORT": str(media_port), "MEDIA_DIR": media_dir}
        with trio.fail_after(seconds + 90):
            async with (
                open_voipbin_caller(broker_url()) as caller,
                open_daemon_process(broker_url(), caller, env=env) as daemon,
            ):
                # The attackers run in a process of their own, as they would on other machines: the
                # probes' timing must not include the harness's own scheduling of 900 attacker tasks.
                attack_seconds = seconds + 1.0
                attacker = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        __name__,
                        json.dumps([daemon.http_port, media_port, idle, loris, attack_seconds]),
                    ],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                )
                try:
                    await trio.sleep(1.0)  # let the flood fill both servers before probing
                    async with trio.open_nursery() as probes:
                        end = trio.current_time() + seconds
                        while trio.current_time() < end:
                            probes.start_soon(
                                _probe, tally, "live", daemon.http_port, "/health/live", b"ok\n"
                            )
                            probes.start_soon(
                                _probe, tally, "ready", daemon.http_port, "/health/ready", b"}\n"
                            )
                            probes.start_soon(
                                _probe, tally, "media", media_port, f"/{SPEECH_FILE}", SPEECH_BYTES
                            )
                            await trio.sleep(PROBE_EVERY)
                    assert attacker.stdout is not None
                    output = bytearray()
                    while chunk := await attacker.stdout.receive_some(65536):
                        output += chunk
                    await attacker.wait()
                    counts = json.loads(output.decode() or "{}")
                    for key, value in counts.items():
                        setattr(tally, key, value)
                finally:
                    if attacker.returncode is None:
                        attacker.kill()
                        with trio.CancelScope(shield=True):
                            await attacker.wait()
                if daemon.process.returncode is not None:
                    row.lose(f"the daemon exited ({daemon.process.returncode})")
    finally:
        shutil.rmtree(media_dir, ignore_errors=True)
    row.sessions = tally.probes
    if tally.late:
        row.lose(f"probes not answered within {PROBE_TIMEOUT:g} s: {tally.late[:3]}", len(tally.late))
    latency = "no probe answered"
    if tally.latencies:
        p50, worst = statistics.median(tally.latencies) * 1000, max(tally.latencies) * 1000
        latency = f"probe p50 {p50:.0f} ms, max {worst:.0f} ms"
    row.figures = (
        f"{tally.answered}/{tally.probes} probes answered; {latency}; {tally.idle_opened} idle connections "
        f"opened, {tally.idle_closed_by_server} closed by the server to make room; "
        f"{tally.slowloris_opened} slowloris connections, {tally.slowloris_cut} cut"
    )
    return row


async def _attack(http_port: int, media_port: int, idle: int, loris: int, seconds: float) -> Tally:
    tally = Tally()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as attack:
            for port in (http_port, media_port):
                for _ in range(idle):
                    attack.start_soon(_idle_attacker, tally, port)
                for _ in range(loris):
                    attack.start_soon(_slowloris, tally, port)
    return tally


def main() -> None:
    """The attacker process: ``[http_port, media_port, idle, loris, seconds]``; prints its counts."""
    http_port, media_port, idle, loris, seconds = json.loads(sys.argv[1])
    tally = trio.run(_attack, http_port, media_port, idle, loris, seconds)
    fields = ("idle_opened", "idle_closed_by_server", "slowloris_opened", "slowloris_cut")
    print(json.dumps({name: getattr(tally, name) for name in fields}))


if __name__ == "__main__":
    main()
