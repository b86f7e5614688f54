"""CPU per message and per session-second of the pacing path alone (``python -m bench.pacing_cpu``).

N MediaSockets in this process, each on its own real WebSocket (the production dialer) to the
lightweight receiver in another process, each fed by a task that pushes 100 ms chunks into an
AudioChannel (the vendor's back-pressure, without a vendor). CPU is ``getrusage(RUSAGE_SELF)`` over a
steady window while every socket is speaking.

With ``--virtual`` (the default) the window runs on Trio's MockClock with autojump: the sockets are
real and every send is a real system call, but time jumps whenever every task waits, so the pacer
does exactly the work of N sessions whatever else loads the machine (a starved real-time run falls
behind, restarts timelines and batches more frames, which changes the work itself). Connections are
made in real time first (handshake timeouts would fire under autojump).

Used for the A/B of each pacing lever (bench/NOTES.md); not part of `make bench`'s table.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
import trio.testing

from bench.procs import ROOT
from bench.recording import cpu_seconds, raise_fd_limit, rss_bytes
from tts_streamer.actors.audio import AudioChannel, AudioChunk
from tts_streamer.actors.media_socket import MediaSocket, PacingConfig
from tts_streamer.adapters.chan_websocket.client import open_media_connection, websocket_dialer
from tts_streamer.supervisor.gc_tuning import tune_gc


class _Quiet:
    def on_first_frame(self, utterance: int) -> None:
        pass

    def on_frames_sent(self, utterance: int, frames: int) -> None:
        pass

    def on_utterance_played(self, utterance: int) -> None:
        pass


def _callgrind(on: bool) -> None:
    """Under ``valgrind --tool=callgrind --instr-atstart=no``: count instructions in the window only."""
    if os.environ.get("PACING_CPU_CALLGRIND"):
        flag = "on" if on else "off"
        subprocess.run(["callgrind_control", "-i", flag, str(os.getpid())], check=True, capture_output=True)


async def measure(
    port: int, n: int, seconds: float, pacing: PacingConfig, clock: trio.testing.MockClock | None
) -> dict[str, float]:
    medias: list[MediaSocket] = []
    connected = trio.Event()
    chunk = AudioChunk(0, bytes(range(16, 176)) * 5)  # 100 ms

    async def one(i: int, gate: trio.Semaphore) -> None:
        await gate.acquire()  # at most 16 handshakes at a time
        async with open_media_connection(f"ws://127.0.0.1:{port}/media/p{i}", websocket_dialer()) as conn:
            gate.release()
            audio = AudioChannel(1000)
            media = MediaSocket(conn, audio, _Quiet(), pacing)
            medias.append(media)
            if len(medias) == n:
                connected.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(media.serve)
                await connected.wait()
                await trio.sleep(0.5 * i / n)  # calls do not share one phase
                while True:
                    await audio.send(chunk)

    result: dict[str, float] = {}
    rss0 = rss_bytes()
    async with trio.open_nursery() as nursery:
        gate = trio.Semaphore(16)
        for i in range(n):
            nursery.start_soon(one, i, gate)
        await connected.wait()
        gc.collect()
        if clock is not None:
            clock.rate = 0.0  # from here on time moves only by jumps
            clock.autojump_threshold = 0.0
        await trio.sleep(1.5)  # every socket started, past its lead
        frames0 = sum(m.stats.frames_sent for m in medias)
        messages0 = sum(m.stats.messages_sent for m in medias)
        gc0 = gc.get_stats()[2]["collections"]
        sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        _callgrind(True)
        cpu0, t0 = cpu_seconds(), trio.current_time()
        await trio.sleep(seconds)
        cpu, wall = cpu_seconds() - cpu0, trio.current_time() - t0
        _callgrind(False)
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0
        messages = sum(m.stats.messages_sent for m in medias) - messages0
        frames = sum(m.stats.frames_sent for m in medias) - frames0
        result = {
            "cpu_pct": 100 * cpu / wall,
            "us_per_message": 1e6 * cpu / max(1, messages),
            "us_per_session_second": 1e6 * cpu / (n * wall),
            "system_share": system / cpu if cpu else 0.0,
            "frames_per_s_ratio": frames / (n * wall * 50),
            "lateness_p99_ms": max(m.stats.lateness.percentile(99) for m in medias) * 1000,
            "restarts": sum(m.stats.timeline_restarts for m in medias),
            "rss_kib_per_session": (rss_bytes() - rss0) / 1024 / n,
            "gen2_collections": gc.get_stats()[2]["collections"] - gc0,
        }
        nursery.cancel_scope.cancel()
    return result


@contextmanager
def light_receiver(*, max_seconds: int, capacity: int) -> Iterator[int]:
    """bench/receiver.py in a process of its own on a loopback port (yielded); stopped on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        port = listener.getsockname()[1]
        cmd = [sys.executable, "-m", "bench.receiver", "--listen-fd", str(listener.fileno())]
        cmd += [
            "--out",
            str(Path(tmp) / "cpu"),
            "--max-seconds",
            str(max_seconds),
            "--capacity",
            str(capacity),
        ]
        receiver = subprocess.Popen(
            cmd, cwd=ROOT, pass_fds=[listener.fileno()], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        listener.close()
        try:
            time.sleep(0.3)
            yield port
        finally:
            assert receiver.stdin is not None
            receiver.stdin.write(b"STOP\n")
            receiver.stdin.close()
            receiver.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pacing_cpu", description=__doc__)
    p.add_argument("--sessions", default="200,500")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--lead", type=int, default=PacingConfig().lead_frames)
    p.add_argument("--fpm", type=int, default=PacingConfig().frames_per_message)
    p.add_argument("--real-time", action="store_true", help="no MockClock: the loop on the wall clock")
    args = p.parse_args(argv)
    raise_fd_limit()
    tune_gc()
    pacing = PacingConfig(lead_frames=args.lead, frames_per_message=args.fpm, bridge_timeout=0.0)
    with light_receiver(max_seconds=600, capacity=4_000_000) as port:
        for n in [int(x) for x in args.sessions.split(",")]:
            clock = None if args.real_time else trio.testing.MockClock(rate=1.0)
            r = trio.run(measure, port, n, args.seconds, pacing, clock, clock=clock)
            print(
                f"N={n} L={args.lead} F={args.fpm}: {r['us_per_message']:.1f} us/message, "
                f"{r['us_per_session_second']:.0f} us CPU per session-second "
                f"({r['cpu_pct']:.0f}% of a core, {100 * r['system_share']:.0f}% of it in the kernel), "
                f"frames {r['frames_per_s_ratio']:.3f} of real time, sender lateness p99 "
                f"{r['lateness_p99_ms']:.1f} ms, {r['restarts']} restarts, "
                f"{r['gen2_collections']} gen2 GCs",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
