"""Which of our HTTP servers' limits hypercorn keeps: the same probes against both (issue 18).

Each probe runs over loopback against the h11 servers (adapters/http_serving.py, supervisor/ops/health.py,
supervisor/services/media_http.py) and the same endpoints on ``hypercorn.trio.serve``
(bench/http_cost.py's ASGI apps), and prints what it saw:

- idle: 300 connections that send nothing; how many the server still holds after 1 s and after 3 s;
- trickle: a request head sent one byte every 50 ms; when the server cut it, and what it answered;
- slow readers: 20 clients ask for a 16 MB file and never read; how many are still held after 15 s;
- HTTP/2: a prior-knowledge preface (``PRI * HTTP/2.0``) on the plain port; what comes back;
- the status line and server header of a 200.

Usage: ``python -m bench.http_limits`` (about a minute).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from bench.http_cost import FILE_NAME, make_media_root
from bench.http_servers import start_servers

BIG = "big.wav"


async def held_after(port: int, count: int, waits: tuple[float, ...]) -> list[int]:
    """Open ``count`` silent connections; how many are still open (no EOF, no reset) after each wait."""
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]
    closed: set[int] = set()

    async def watch(index: int, stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        closed.add(index)

    held = []
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for index, stream in enumerate(streams):
            nursery.start_soon(watch, index, stream)
        for wait in waits:
            await trio.sleep_until(started + wait)
            held.append(count - len(closed))
        nursery.cancel_scope.cancel()
    for stream in streams:
        await trio.aclose_forcefully(stream)
    return held


async def trickle(port: int) -> tuple[float, bytes]:
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reply = bytearray()
    start = trio.current_time()
    cut_at = None
    cut = trio.Event()

    async def read() -> None:
        nonlocal cut_at
        try:
            while data := await stream.receive_some(65536):
                reply.extend(data)
        except trio.BrokenResourceError:
            pass
        cut_at = trio.current_time()
        cut.set()

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        with trio.move_on_after(30):
            for byte in head[:-4]:
                if cut_at is not None:
                    break
                try:
                    await stream.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                await trio.sleep(0.05)
        with trio.move_on_at(start + 30):
            await cut.wait()
        nursery.cancel_scope.cancel()
    return (cut_at or trio.current_time()) - start, bytes(reply[:40])


async def slow_readers(port: int, count: int, wait: float) -> int:
    streams = []
    for _ in range(count):
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.send_all(f"GET /{BIG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        streams.append(stream)
    await trio.sleep(wait)
    held = 0
    for stream in streams:
        # Drain what is buffered: a stream the server closed ends (EOF or reset) once drained.
        try:
            with trio.move_on_after(2.0) as scope:
                while await stream.receive_some(1 << 20):
                    pass
            held += scope.cancelled_caught
        except trio.BrokenResourceError:
            pass
        await trio.aclose_forcefully(stream)
    return held


async def first_bytes(port: int, raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        with trio.move_on_after(3):
            return bytes(await stream.receive_some(200))
    return b"(nothing within 3 s)"


async def probe(kind: str, root: Path) -> None:
    async with trio.open_nursery() as nursery:
        health, media = await start_servers(kind, nursery, root)
        print(f"## {kind}", flush=True)
        held = await held_after(health, 300, (1.0, 3.0))
        print(f"idle: 300 silent connections, still held after 1 s, 3 s: {held}")
        seconds, reply = await trickle(health)
        print(f"trickle: cut after {seconds:.1f} s, answer {reply!r}")
        print(f"slow readers: of 20, still held after 15 s: {await slow_readers(media, 20, 15.0)}")
        h2 = await first_bytes(health, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        print(f"HTTP/2 preface: answer {h2[:40]!r}")
        ok = await first_bytes(health, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, *headers = ok.split(b"\r\n\r\n")[0].split(b"\r\n")
        server = [h for h in headers if h.lower().startswith(b"server:")]
        print(f"200: status line {status!r}, {server}", flush=True)
        nursery.cancel_scope.cancel()


async def main_async(kinds: list[str]) -> None:
    root = make_media_root()
    with (root / BIG).open("wb") as file:
        file.truncate(16 << 20)
    assert (root / FILE_NAME).exists()
    for kind in kinds:
        await probe(kind, root)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    trio.run(main_async, argv or ["h11", "hypercorn"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
