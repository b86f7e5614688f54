"""Per-operation CPU costs behind the pacing figures, on this machine (``python -m bench.micro``).

Each line is CPU time of this process per operation, with the lightweight receiver in another
process draining the sockets:

- ``ws.send_message``: trio-websocket's send of one 160-byte binary message (wsproto framing and
  masking, trio's SocketStream.send_all, the send syscall);
- ``MediaConnection.send_audio``: the same through tts-streamer's connection wrapper (a fail_after
  cancel scope per send, counters);
- ``sleep_until wake-up``: one task sleeping to an absolute deadline and waking (Trio implements a
  sleep as a cancel-scope deadline; waking delivers and catches a Cancelled);
- ``caller frame``: CPU of this process per caller frame read while 100 connections each receive 50
  a second (a softmix bridge), through trio-websocket alone (every frame a message, as before
  2026-12-03) and through the shipped dialer (counted and dropped in ``CallerAudioStream``, reads
  paced). Real time: 4 s windows, so the machine's load shows in it.

Bounded: a few seconds in all; loopback only.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio
import trio_websocket

from bench.procs import ROOT
from bench.recording import cpu_seconds
from tts_streamer.adapters.chan_websocket.client import (
    Dialer,
    MediaConnection,
    open_media_connection,
    websocket_dialer,
)

TASKS = 100


async def _sends(port: int, messages: int, wrapped: bool) -> float:
    conns: list[MediaConnection] = []
    ready, go, done = trio.Event(), trio.Event(), trio.Event()
    finished = 0

    async def one(i: int) -> None:
        nonlocal finished
        async with open_media_connection(f"ws://127.0.0.1:{port}/media/m{i}", websocket_dialer()) as conn:
            conns.append(conn)
            if len(conns) == TASKS:
                ready.set()
            await go.wait()
            payload = b"\x10" * 160
            for _ in range(messages):
                if wrapped:
                    await conn.send_audio(payload)
                else:
                    await conn._ws.send_message(payload)
            finished += 1
            if finished == TASKS:
                done.set()
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        for i in range(TASKS):
            nursery.start_soon(one, i)
        await ready.wait()
        cpu = cpu_seconds()
        go.set()
        await done.wait()
        return (cpu_seconds() - cpu) / (TASKS * messages)


def _plain_trio_websocket(media_uri: str) -> AbstractAsyncContextManager[trio_websocket.WebSocketConnection]:
    """The dialer as it was before the caller-audio filter: every caller frame a message."""
    return trio_websocket.open_websocket_url(media_uri, subprotocols=["media"], message_queue_size=16)


async def _caller_frames(port: int, dialer: Dialer, seconds: float = 4.0) -> float:
    conns: list[MediaConnection] = []
    ready = trio.Event()

    async def one(i: int) -> None:
        async with open_media_connection(f"ws://127.0.0.1:{port}/media/i{i}", dialer) as conn:
            conns.append(conn)
            if len(conns) == TASKS:
                ready.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for i in range(TASKS):
            nursery.start_soon(one, i)
        await ready.wait()
        await trio.sleep(1.0)  # every connection's caller audio has started
        frames = sum(c.stats.caller_frames_received for c in conns)
        cpu = cpu_seconds()
        await trio.sleep(seconds)
        used = cpu_seconds() - cpu
        frames = sum(c.stats.caller_frames_received for c in conns) - frames
        nursery.cancel_scope.cancel()
    return used / max(1, frames)


def _with_receiver(tmp: str, inbound: bool) -> tuple[int, subprocess.Popen[bytes]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    args = [sys.executable, "-m", "bench.receiver", "--listen-fd", str(listener.fileno())]
    args += ["--out", str(Path(tmp) / f"micro-{int(inbound)}"), "--max-seconds", "60", "--capacity", "200000"]
    args += ["--inbound"] if inbound else []
    receiver = subprocess.Popen(
        args, cwd=ROOT, pass_fds=[listener.fileno()], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    listener.close()
    time.sleep(0.3)
    return port, receiver


def _stop(receiver: subprocess.Popen[bytes]) -> None:
    assert receiver.stdin is not None
    receiver.stdin.write(b"STOP\n")
    receiver.stdin.close()
    receiver.wait(timeout=30)


async def _sleeps(wakes: int) -> float:
    async def one() -> None:
        deadline = trio.current_time()
        for _ in range(wakes):
            deadline += 0.002
            await trio.sleep_until(deadline)

    cpu = cpu_seconds()
    async with trio.open_nursery() as nursery:
        for _ in range(TASKS):
            nursery.start_soon(one)
    return (cpu_seconds() - cpu) / (TASKS * wakes)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        port, receiver = _with_receiver(tmp, inbound=False)
        try:
            raw = trio.run(_sends, port, 300, False)
            wrapped = trio.run(_sends, port, 300, True)
            wake = trio.run(_sleeps, 300)
        finally:
            _stop(receiver)
        port, receiver = _with_receiver(tmp, inbound=True)
        try:
            plain = trio.run(_caller_frames, port, _plain_trio_websocket)
            filtered = trio.run(_caller_frames, port, websocket_dialer())
        finally:
            _stop(receiver)
    print(f"ws.send_message (160 B):            {raw * 1e6:6.1f} us CPU per message")
    print(f"MediaConnection.send_audio (160 B): {wrapped * 1e6:6.1f} us CPU per message")
    print(f"trio.sleep_until wake-up:           {wake * 1e6:6.1f} us CPU per wake-up ({TASKS} tasks)")
    calls = f"({TASKS} calls, 50/s each)"
    print(f"caller frame, trio-websocket alone: {plain * 1e6:6.1f} us CPU per frame {calls}")
    print(f"caller frame, the shipped dialer:   {filtered * 1e6:6.1f} us CPU per frame {calls}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
