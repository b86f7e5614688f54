"""Lightweight chan_websocket receiver for the pacing scenarios: one process, one epoll loop, no Trio.

The Asterisk simulator costs about half a core per 100 calls, which on 2 cores would make it, not
tts-streamer, the bottleneck at 500-1000 sessions. This receiver does only what the measurement needs:
the WebSocket upgrade (offering back ``media``), plain-text MEDIA_START, one caller frame (so the
session sees the leg as bridged, as in production) or, with ``--inbound``, 50 caller frames a second
per connection from then on (as a softmix bridge sends them, chan_websocket.md §8; each connection on
its own 20 ms phase, one frame per write), then per binary message its kernel arrival time
(SO_TIMESTAMPNS), user-space read time, length and first byte into preallocated columns. Text commands
(FLUSH_MEDIA, MARK_MEDIA...) are recorded with their position; PING gets a PONG; a close is echoed.

Each read stops exactly at the end of the current WebSocket frame, so a message's kernel stamp is the
one of the segment that carried its last byte, never that of a later message.

A plain epoll loop rather than Trio: every read costs one syscall and a few lines of Python, with no
task switch per message, which is what lets one process take 50,000 messages/s.

Usage (started by bench/run.py, which passes the listening socket as an inherited fd):
    python -m bench.receiver --listen-fd 3 --out PATH --capacity N --max-seconds S
It stops on "STOP" or EOF on stdin, or after --max-seconds, then writes PATH.npz and PATH.json.

A little over the ~400-line guide: one epoll loop that imports nothing of the project, kept in one
file so the receiver process loads nothing else.
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import heapq
import os
import random
import select
import socket
import sys
import time
from pathlib import Path

from bench.recording import (
    CMSG_SPACE,
    SO_TIMESTAMPNS,
    WS_GUID,
    Recorder,
    kernel_stamp,
    media_start,
    raise_fd_limit,
    server_frame,
)

CALLER_FRAME = server_frame(0x2, b"\xff" * 160)
CALLER_PERIOD = 0.020
SEND_BATCH = 500  # caller-frame writes between two polls
PENDING_LIMIT = 65536  # bytes waiting for a client that does not read; caller frames beyond are dropped
_HEAD, _EXT, _BODY = 0, 1, 2


class Conn:
    __slots__ = (
        "b0",
        "body",
        "ext",
        "fd",
        "head",
        "http",
        "index",
        "length",
        "masked",
        "need",
        "pending",
        "sock",
        "stage",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.index = -1
        self.http = bytearray()
        self.stage = _HEAD
        self.need = 2
        self.head = b""
        self.ext = b""
        self.body = bytearray()
        self.b0 = 0
        self.length = 0
        self.masked = 0
        self.pending = bytearray()  # written when the socket has room again (EPOLLOUT)


class Receiver:
    def __init__(
        self, listener: socket.socket, recorder: Recorder, *, caller_frame: bool, inbound: bool = False
    ) -> None:
        self.listener = listener
        self.rec = recorder
        self.caller_frame = caller_frame or inbound
        self.inbound = inbound
        self.conns: dict[int, Conn] = {}
        # (due, sequence, connection) of the next caller frame of each connection (inbound only).
        self.due: list[tuple[float, int, Conn]] = []
        self._sequence = 0
        self._rng = random.Random(4242)
        self.caller_frames_sent = 0
        self.caller_frames_dropped = 0  # the client did not read: PENDING_LIMIT reached
        self.caller_send_lag_max = 0.0  # how late this process sent a caller frame, worst case
        self.caller_frames_skipped = 0  # this process fell a period or more behind: not sent
        self.ep = select.epoll()
        self.handshakes = 0
        self.rejected = 0
        self.send_failures = 0

    def run(self, max_seconds: float) -> str:
        listener, ep, rec = self.listener, self.ep, self.rec
        listener.setblocking(False)
        ep.register(listener.fileno(), select.EPOLLIN)
        stdin_fd = sys.stdin.fileno()
        ep.register(stdin_fd, select.EPOLLIN)
        deadline = time.monotonic() + max_seconds
        next_sample = time.monotonic()
        monotonic = time.monotonic
        conns = self.conns
        lfd = listener.fileno()
        due = self.due
        while True:
            timeout = 0.05
            if due:
                timeout = min(timeout, max(0.0, due[0][0] - monotonic()))
            events = ep.poll(timeout)
            now = monotonic()
            if due and due[0][0] <= now:
                self._send_caller_frames(now)
            if now >= next_sample:
                rec.sample_cpu()
                next_sample = now + 0.25
            if now >= deadline:
                return "max_seconds"
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is not None:
                    if mask & select.EPOLLOUT:
                        self._flush_pending(conn)
                    if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        continue
                    if conn.index < 0:
                        self._handshake(conn)
                    else:
                        self._read(conn)
                elif fd == lfd:
                    self._accept()
                elif fd == stdin_fd:
                    data = os.read(stdin_fd, 4096)
                    if not data or b"STOP" in data:
                        return "stopped"

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            conn = Conn(sock)
            self.conns[conn.fd] = conn
            self.ep.register(conn.fd, select.EPOLLIN)

    def _handshake(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn, None)
            return
        conn.http += data
        end = conn.http.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.http) > 16384:
                self._drop(conn, None)
            return
        lines = bytes(conn.http[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path = parts[1] if len(parts) > 1 else ""
        key = headers.get("sec-websocket-key", "")
        connection_id = path.partition("?")[0].removeprefix("/media/")
        if parts[0] != "GET" or not key or connection_id in ("", path):
            self.rejected += 1
            self._send(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            self._drop(conn, None)
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n"
            + ("Sec-WebSocket-Protocol: media\r\n" if "media" in offered else "")
            + "\r\n"
        ).encode()
        conn.index = self.rec.new_connection(path)
        self.handshakes += 1
        out = response + server_frame(0x1, media_start(connection_id, conn.index).encode())
        if self.caller_frame:
            out += CALLER_FRAME
            self.caller_frames_sent += 1
        self._send(conn, out)
        if self.inbound:
            self._sequence += 1
            start = time.monotonic() + self._rng.uniform(0.0, CALLER_PERIOD)
            heapq.heappush(self.due, (start, self._sequence, conn))

    def _send_caller_frames(self, now: float) -> None:
        """Every connection whose next caller frame is due gets it, each in a write of its own.

        At most SEND_BATCH writes per call, so reads (and STOP) are served between batches. A frame this
        process could not send within its period is skipped, not sent late in a burst: the next one keeps
        the connection's phase (``caller_frames_skipped`` says the receiver fell behind)."""
        due = self.due
        for _ in range(SEND_BATCH):
            if not due or due[0][0] > now:
                return
            at, sequence, conn = heapq.heappop(due)
            if self.conns.get(conn.fd) is not conn:
                continue  # closed since
            lag = now - at
            self.caller_send_lag_max = max(self.caller_send_lag_max, lag)
            if len(conn.pending) > PENDING_LIMIT:
                self.caller_frames_dropped += 1
            else:
                self.caller_frames_sent += 1
                self._send(conn, CALLER_FRAME)
            behind = int(lag // CALLER_PERIOD)  # whole periods missed
            self.caller_frames_skipped += behind
            heapq.heappush(due, (at + (behind + 1) * CALLER_PERIOD, sequence, conn))

    def _send(self, conn: Conn, data: bytes) -> None:
        if conn.pending:  # keep the byte order: behind what is already waiting
            conn.pending += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.send_failures += 1
            return
        if sent < len(data):
            conn.pending += data[sent:]
            self.ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush_pending(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            return
        except OSError:
            self.send_failures += 1
            conn.pending.clear()
            sent = 0
        del conn.pending[:sent]
        if not conn.pending:
            self.ep.modify(conn.fd, select.EPOLLIN)

    def _drop(self, conn: Conn, code: int | None) -> None:
        if conn.index >= 0 and conn.index not in self.rec.closed:
            self.rec.closed[conn.index] = (time.monotonic(), code)
        self.conns.pop(conn.fd, None)
        try:
            self.ep.unregister(conn.fd)
        except OSError:
            pass
        conn.sock.close()

    def _read(self, conn: Conn) -> None:
        sock = conn.sock
        rec = self.rec
        clock = rec.clock
        monotonic = time.monotonic
        for _ in range(64):  # bounded per wake-up, for fairness between connections
            try:
                data, anc, _flags, _addr = sock.recvmsg(conn.need, CMSG_SPACE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._drop(conn, None)
                return
            if not data:
                self._drop(conn, None)
                return
            got = len(data)
            stage = conn.stage
            if got < conn.need:
                conn.need -= got
                if stage == _HEAD:
                    conn.head += data
                elif stage == _EXT:
                    conn.ext += data
                else:
                    conn.body += data
                continue
            if stage == _HEAD:
                head = conn.head + data
                conn.head = b""
                conn.b0 = head[0]
                length = head[1] & 0x7F
                conn.masked = 4 if head[1] & 0x80 else 0
                if length < 126:
                    conn.length = length
                    conn.need = conn.masked + length
                    conn.stage = _BODY
                    if conn.need:
                        continue
                    body = b""
                else:
                    conn.need = 2 if length == 126 else 8
                    conn.stage = _EXT
                    continue
            elif stage == _EXT:
                ext = conn.ext + data
                conn.ext = b""
                conn.length = int.from_bytes(ext, "big")
                conn.need = conn.masked + conn.length
                conn.stage = _BODY
                if conn.need:
                    continue
                body = b""
            elif conn.body:
                conn.body += data
                body = bytes(conn.body)
                conn.body = bytearray()
            else:
                body = data
            # A whole frame: this read ended exactly at its last byte.
            conn.stage = _HEAD
            conn.need = 2
            t_user = monotonic()
            t_kernel = kernel_stamp(anc, clock) if anc else float("nan")
            if not anc:
                rec.kernel_stamps_missing += 1
            opcode = conn.b0 & 0x0F
            if opcode == 0x2 and conn.b0 & 0x80:
                first = body[4] ^ body[0] if conn.masked and conn.length else (body[0] if body else 0)
                rec.binary(conn.index, t_kernel, t_user, conn.length, first)
                continue
            if not conn.b0 & 0x80 or opcode == 0x0:
                rec.faults.append((conn.index, "fragmented_message"))
                continue
            payload = body[conn.masked :]
            if conn.masked:
                mask = body[:4]
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if opcode == 0x1:
                rec.text(conn.index, t_kernel, t_user, payload.decode("utf-8", "replace"))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self._send(conn, server_frame(0x8, payload[:2]))
                self._drop(conn, code)
                return
            elif opcode == 0x9:
                self._send(conn, server_frame(0xA, payload))
            elif opcode == 0xA:
                rec.faults.append((conn.index, "unsolicited_pong"))
            else:
                rec.faults.append((conn.index, f"opcode_{opcode}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--capacity", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--no-caller-frame", action="store_true")
    parser.add_argument("--inbound", action="store_true", help="50 caller frames/s per connection")
    args = parser.parse_args(argv)
    raise_fd_limit()
    listener = socket.socket(fileno=args.listen_fd)
    recorder = Recorder(args.capacity)
    receiver = Receiver(listener, recorder, caller_frame=not args.no_caller_frame, inbound=args.inbound)
    print("READY", flush=True)
    how = receiver.run(args.max_seconds)
    recorder.sample_cpu()
    for conn in list(receiver.conns.values()):
        receiver._drop(conn, None)
    listener.close()
    recorder.save(
        args.out,
        {
            "kind": "light",
            "ended": how,
            "handshakes": receiver.handshakes,
            "rejected": receiver.rejected,
            "send_failures": receiver.send_failures,
            "caller_frame": not args.no_caller_frame,
            "inbound": args.inbound,
            "caller_frames_sent": receiver.caller_frames_sent,
            "caller_frames_dropped": receiver.caller_frames_dropped,
            "caller_send_lag_max": receiver.caller_send_lag_max,
            "caller_frames_skipped": receiver.caller_frames_skipped,
        },
    )
    print(f"DONE {recorder.count} messages from {receiver.handshakes} connections ({how})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
