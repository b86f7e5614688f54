"""What a receiver records, shared by the lightweight receiver and the simulator-based one.

Every binary message gets one row in preallocated columns: connection index, kernel arrival time,
user-space read time, payload length and first payload byte (the synthetic vendor's pattern byte tells
old audio from new after a flush). Text messages (FLUSH_MEDIA, MARK_MEDIA...) are kept in a list with
their position in the connection's binary sequence, which is what the flush criterion needs: TCP keeps
order, so no old-audio message may come after the FLUSH_MEDIA text on the same connection.

All times are CLOCK_MONOTONIC seconds (``time.monotonic()``), which is one clock for every process on
Linux. Kernel arrival times come from SO_TIMESTAMPNS (CLOCK_REALTIME, stamped when loopback delivers
the segment, i.e. inside the sender's write) and are shifted onto the monotonic clock; they do not
depend on how quickly the receiver gets round to reading, so a busy receiver does not inflate lateness.
"""

from __future__ import annotations

import array
import json
import os
import resource
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # SO_TIMESTAMPNS_OLD on Linux x86-64/arm64
_TIMESPEC = struct.Struct("qq")
CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, all cores, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class MonotonicFromRealtime:
    """Maps CLOCK_REALTIME kernel stamps onto CLOCK_MONOTONIC (same rate; only a step would move it)."""

    def __init__(self) -> None:
        self.offset_start = self.measure()
        self._base = int(time.clock_gettime(time.CLOCK_REALTIME))
        # monotonic = (realtime - base) + shift, kept small for float precision.
        self._shift = self._base - self.offset_start

    @staticmethod
    def measure() -> float:
        """realtime - monotonic, from the tightest of a few back-to-back readings."""
        best: tuple[float, float] | None = None
        for _ in range(5):
            m0 = time.monotonic()
            r = time.clock_gettime(time.CLOCK_REALTIME)
            m1 = time.monotonic()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, r - (m0 + m1) / 2)
        assert best is not None
        return best[1]

    def convert(self, cmsg_data: bytes) -> float:
        sec, nsec = _TIMESPEC.unpack_from(cmsg_data)
        return float((sec - self._base) + nsec * 1e-9 + self._shift)


def kernel_stamp(ancdata: list[tuple[int, int, bytes]], clock: MonotonicFromRealtime) -> float:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            return clock.convert(data)
    return float("nan")


class Recorder:
    def __init__(self, capacity: int) -> None:
        capacity = max(1024, capacity)
        self.count = 0
        self.capacity = capacity
        self.conn = array.array("i", bytes(4 * capacity))
        self.t_kernel = array.array("d", bytes(8 * capacity))
        self.t_user = array.array("d", bytes(8 * capacity))
        self.length = array.array("i", bytes(4 * capacity))
        self.first = array.array("B", bytes(capacity))
        self.paths: list[str] = []
        self.connected_at: list[float] = []
        self.closed: dict[int, tuple[float, int | None]] = {}
        # (connection, binary messages before it, kernel time, user time, text)
        self.texts: list[tuple[int, int, float, float, str]] = []
        self.binary_seen: list[int] = []
        self.faults: list[tuple[int, str]] = []
        self.cpu: list[tuple[float, float, int]] = []
        self.clock = MonotonicFromRealtime()
        self.started = time.monotonic()
        self.kernel_stamps_missing = 0

    def new_connection(self, path: str) -> int:
        self.paths.append(path)
        self.connected_at.append(time.monotonic())
        self.binary_seen.append(0)
        return len(self.paths) - 1

    def binary(self, conn: int, t_kernel: float, t_user: float, length: int, first: int) -> None:
        i = self.count
        if i == self.capacity:
            self._grow()
        self.conn[i] = conn
        self.t_kernel[i] = t_kernel
        self.t_user[i] = t_user
        self.length[i] = length
        self.first[i] = first
        self.count = i + 1
        self.binary_seen[conn] += 1

    def text(self, conn: int, t_kernel: float, t_user: float, text: str) -> None:
        self.texts.append((conn, self.binary_seen[conn], t_kernel, t_user, text))

    def sample_cpu(self) -> None:
        self.cpu.append((time.monotonic(), cpu_seconds(), rss_bytes()))

    def _grow(self) -> None:
        for name in ("conn", "t_kernel", "t_user", "length", "first"):
            column: array.array[Any] = getattr(self, name)
            column.extend(array.array(column.typecode, bytes(column.itemsize * self.capacity)))
        self.capacity *= 2

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        n = self.count
        np.savez(
            path,
            conn=np.frombuffer(self.conn, dtype=np.int32)[:n],
            t_kernel=np.frombuffer(self.t_kernel, dtype=np.float64)[:n],
            t_user=np.frombuffer(self.t_user, dtype=np.float64)[:n],
            length=np.frombuffer(self.length, dtype=np.int32)[:n],
            first=np.frombuffer(self.first, dtype=np.uint8)[:n],
        )
        meta = {
            "paths": self.paths,
            "connected_at": self.connected_at,
            "closed": {str(k): v for k, v in self.closed.items()},
            "texts": self.texts,
            "faults": self.faults,
            "cpu": self.cpu,
            "clock_offset_start": self.clock.offset_start,
            "clock_offset_end": MonotonicFromRealtime.measure(),
            "kernel_stamps_missing": self.kernel_stamps_missing,
            "pid": os.getpid(),
            **extra,
        }
        path.with_suffix(".json").write_text(json.dumps(meta))


class FrameParser:
    """Client-to-server WebSocket frames (RFC 6455, masked), enough for chan_websocket traffic.

    ``feed`` returns complete frames as (opcode, fin, first payload byte or -1, payload length,
    unmasked payload for control and text frames, else b""). Binary payloads are never unmasked
    beyond their first byte: the receiver only needs length and pattern byte.
    """

    def __init__(self) -> None:
        self.buf = bytearray()

    def needed(self) -> int:
        """Bytes to read so the next read ends exactly at a frame boundary (never past it)."""
        buf = self.buf
        if len(buf) < 2:
            return 2 - len(buf)
        length = buf[1] & 0x7F
        header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
        if len(buf) < header:
            return header - len(buf)
        if length >= 126:
            length = int.from_bytes(buf[2:header], "big")
        total = header + (4 if buf[1] & 0x80 else 0) + length
        return total - len(buf)

    def feed(self, data: bytes) -> list[tuple[int, bool, int, int, bytes]]:
        buf = self.buf
        buf += data
        frames: list[tuple[int, bool, int, int, bytes]] = []
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            length = b1 & 0x7F
            pos = 2
            if length == 126:
                pos = 4
            elif length == 127:
                pos = 10
            if len(buf) < pos:
                break
            if pos > 2:
                length = int.from_bytes(buf[2:pos], "big")
            masked = b1 & 0x80
            mask = bytes(buf[pos : pos + 4]) if masked else b"\x00\x00\x00\x00"
            pos += 4 if masked else 0
            if len(buf) < pos + length:
                break
            opcode = b0 & 0x0F
            first = buf[pos] ^ mask[0] if length else -1
            payload = b""
            if opcode != 0x2:
                raw = bytes(buf[pos : pos + length])
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(raw)) if masked else raw
            frames.append((opcode, bool(b0 & 0x80), first, length, payload))
            del buf[: pos + length]
        return frames


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, unfragmented server-to-client frame."""
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, n])
    elif n < 65536:
        header = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return header + payload


def media_start(connection_id: str, index: int) -> str:
    return (
        f"MEDIA_START connection_id:{connection_id} channel:WebSocket/{connection_id}/0x{index:08x} "
        f"channel_id:bench.{index} format:ulaw optimal_frame_size:160 ptime:20"
    )
