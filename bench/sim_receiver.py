"""The real Asterisk simulator as the receiver, for cross-checking the lightweight one at small N.

Serves ``AsteriskSimulator(SimConfig(send_caller_audio=False, record_frames=False), accept_any=True)`` on
the inherited listening socket. Each accepted stream is wrapped in a ``TimingTap`` that reads with
``recvmsg`` (kernel arrival stamps, SO_TIMESTAMPNS) and parses the client's WebSocket frames into the
same columns the lightweight receiver writes, so one analysis serves both. With ``--inbound`` the legs
are ``SimConfig.softmix()`` (50 caller frames/s from 8 ms after the join, chan_websocket.md §8). trio-
websocket reads up to 4 KiB at a time, so when the simulator lags, several messages share the stamp of
the read that completed them (the lightweight receiver never reads past a frame). No caller audio is
sent, so the driver sets ``bridge_timeout=0`` for these runs. At the end the simulator's own per-call
counters (frames played, underruns from its 50 Hz playout clock, flushes) are saved too."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import attrs
import trio

from bench.recording import (
    CMSG_SPACE,
    SO_TIMESTAMPNS,
    FrameParser,
    Recorder,
    kernel_stamp,
    raise_fd_limit,
)
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig


class TimingTap(trio.abc.Stream):
    def __init__(self, inner: trio.SocketStream, recorder: Recorder) -> None:
        self.inner = inner
        self.rec = recorder
        self.index = -1
        self._http = bytearray()
        self._parser = FrameParser()
        inner.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data, anc, _flags, _addr = await self.inner.socket.recvmsg(max_bytes or 65536, CMSG_SPACE)
        except OSError as exc:  # as SocketStream.receive_some would report it
            raise trio.BrokenResourceError(exc) from exc
        t_user = time.monotonic()
        if data:
            self._observe(data, anc, t_user)
        return data

    def _observe(self, data: bytes, anc: list[tuple[int, int, bytes]], t_user: float) -> None:
        rec = self.rec
        if self.index < 0:
            self._http += data
            end = self._http.find(b"\r\n\r\n")
            if end < 0:
                return
            request_line = bytes(self._http[: self._http.find(b"\r\n")]).decode("latin-1")
            parts = request_line.split(" ")
            self.index = rec.new_connection(parts[1] if len(parts) > 1 else "")
            data = bytes(self._http[end + 4 :])
            self._http.clear()
        t_kernel = kernel_stamp(anc, rec.clock) if anc else float("nan")
        if not anc:
            rec.kernel_stamps_missing += 1
        for opcode, fin, first, length, payload in self._parser.feed(data):
            if opcode == 0x2 and fin:
                rec.binary(self.index, t_kernel, t_user, length, max(first, 0))
            elif opcode == 0x1 and fin:
                rec.text(self.index, t_kernel, t_user, payload.decode("utf-8", "replace"))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                rec.closed.setdefault(self.index, (t_user, code))


async def serve(
    listener: socket.socket, recorder: Recorder, max_seconds: float, inbound: bool = False
) -> tuple[str, AsteriskSimulator]:
    # Bridged at the connection: these runs send at once (bridge_timeout=0) and measure pacing only.
    legs = SimConfig(send_caller_audio=inbound, bridge_delay=0.0, record_frames=False)
    sim = AsteriskSimulator(legs, accept_any=True, seed=7)
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(listener))]

    async def handler(stream: trio.SocketStream) -> None:
        await sim.serve_stream(TimingTap(stream, recorder))

    async def sample() -> None:
        while True:
            recorder.sample_cpu()
            await trio.sleep(0.25)

    how = "max_seconds"
    with trio.move_on_after(max_seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            nursery.start_soon(sample)
            print("READY", flush=True)
            stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
            while True:
                data = await stdin.receive_some(4096)
                if not data or b"STOP" in data:
                    how = "stopped"
                    break
            nursery.cancel_scope.cancel()
    return how, sim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--capacity", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--inbound", action="store_true", help="softmix legs: 50 caller frames/s")
    args = parser.parse_args(argv)
    raise_fd_limit()
    listener = socket.socket(fileno=args.listen_fd)
    recorder = Recorder(args.capacity)
    how, sim = trio.run(serve, listener, recorder, args.max_seconds, args.inbound)
    recorder.sample_cpu()
    calls = {}
    for connection_id, call in sim.calls.items():
        fields = attrs.asdict(call, recurse=False)
        calls["/media/" + connection_id] = {
            k: v
            for k, v in fields.items()
            if isinstance(v, int | float | str | bool) and not isinstance(v, type)
        } | {"client_faults": len(call.client_faults), "gaps": len(call.gaps)}
    recorder.save(args.out, {"kind": "sim", "ended": how, "sim_calls": calls})
    print(f"DONE {recorder.count} messages from {len(sim.calls)} connections ({how})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
