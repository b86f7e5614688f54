"""Idle and trickling clients cannot starve the HTTP servers (issue 14, §7).

Over loopback: 100 connections that never send anything, then a probe: with timeouts far longer than
the test, only closing idle connections to make room can explain the probe's answer. A slowloris that
trickles its request head is cut at the header deadline. In virtual time: who is closed to make room,
and that a connection being answered never is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from tests.test_console import idle_supervisor
from tts_streamer.adapters.http_serving import HttpRequest, HttpResponse, HttpServer, HttpTimeouts
from tts_streamer.adapters.http_slots import ConnectionSlots
from tts_streamer.supervisor.ops.health import Readiness, serve_http
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.services.media_http import MediaHttpServer

# Far longer than any test here: an answer cannot come from an idle connection timing out.
PATIENT = HttpTimeouts(header=120.0, idle=120.0, request=120.0, handler=5.0, write=5.0)


async def http_get(port: int, path: str) -> bytes:
    """One GET on a new connection; everything the server sent until it closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        while data := await stream.receive_some(65536):
            received += data
        return bytes(received)


@asynccontextmanager
async def idle_connections(port: int, count: int) -> AsyncIterator[list[trio.SocketStream]]:
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]
    try:
        yield streams
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def closed_by_server(streams: list[trio.SocketStream], wait: float) -> int:
    """How many of ``streams`` the server has closed (EOF or reset seen within ``wait``)."""
    closed = 0

    async def check(stream: trio.SocketStream) -> None:
        nonlocal closed
        with trio.move_on_after(wait):
            try:
                if await stream.receive_some(1) == b"":
                    closed += 1
            except trio.BrokenResourceError:
                closed += 1

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(check, stream)
    return closed


@pytest.mark.realtime
async def test_idle_connections_cannot_starve_the_liveness_probe(nursery):
    supervisor, bus = idle_supervisor(nursery)
    metrics = Metrics()
    metrics.attach(bus, supervisor)
    port = await nursery.start(
        partial(serve_http, supervisor, Readiness(), metrics, host="127.0.0.1", port=0, timeouts=PATIENT)
    )
    async with idle_connections(port, 100) as idle:
        with trio.fail_after(10):  # the kubelet's limit is 3 s; before the fix this waited 120 s
            reply = await http_get(port, "/health/live")
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok\n")
        # The limit still holds: of 100 idle connections at least the 36 beyond 64 were closed.
        assert await closed_by_server(idle, wait=1.0) >= 100 - 64


@pytest.mark.realtime
async def test_idle_connections_cannot_starve_the_media_server(nursery, tmp_path: Path):
    (tmp_path / "a.wav").write_bytes(b"RIFF-a")
    server = MediaHttpServer(tmp_path, timeouts=PATIENT)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    async with idle_connections(port, 100) as idle:
        with trio.fail_after(10):
            reply = await http_get(port, "/a.wav")
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"RIFF-a")
        assert await closed_by_server(idle, wait=1.0) >= 100 - 64


@pytest.mark.realtime
async def test_a_full_server_closes_nobody_until_another_client_comes(nursery):
    """Room is made for a client that is there, not in advance: the accept loop used to take the next
    slot right after an accept and so closed a connection at once, even one whose request was on its way
    (the liveness probe, on a starved machine: an empty reply)."""

    async def live(_request: HttpRequest) -> HttpResponse:
        return HttpResponse.text(200, "ok")

    server = HttpServer({("GET", "/health/live"): live}, timeouts=PATIENT, max_connections=2)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    async with idle_connections(port, 2) as idle:
        assert await closed_by_server(idle, wait=0.5) == 0
        assert server.slots.shed_total == 0
        with trio.fail_after(10):
            reply = await http_get(port, "/health/live")  # a third client: now one idle one makes room
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert server.slots.shed_total == 1


@pytest.mark.realtime
async def test_a_slowloris_is_cut_at_the_header_deadline(nursery):
    supervisor, _bus = idle_supervisor(nursery)
    timeouts = HttpTimeouts(header=0.5, idle=120.0, request=120.0)
    port = await nursery.start(
        partial(serve_http, supervisor, Readiness(), Metrics(), host="127.0.0.1", port=0, timeouts=timeouts)
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    trickle = b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 1000 + b"\r\n\r\n"
    reply = bytearray()
    cut = trio.Event()

    async def read() -> None:
        try:
            while data := await stream.receive_some(65536):
                reply.extend(data)
        except trio.BrokenResourceError:
            pass
        cut.set()

    async with stream:
        nursery.start_soon(read)
        with trio.fail_after(60):
            for byte in trickle[:-4]:  # one byte every 20 ms: 20 s for the head, never completed
                if cut.is_set():
                    break
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.02)
            assert cut.is_set(), "the trickled head was still being read after all of it was sent"
    assert not reply or reply.startswith(b"HTTP/1.1 408 ")


# -- virtual time, memory streams ---------------------------------------------------------------------


def gated_server(limit: int, gate: trio.Event) -> HttpServer:
    async def live(_request: HttpRequest) -> HttpResponse:
        return HttpResponse.text(200, "ok")

    async def held(_request: HttpRequest) -> HttpResponse:
        await gate.wait()
        return HttpResponse.text(200, "released")

    return HttpServer(
        {("GET", "/live"): live, ("GET", "/held"): held},
        timeouts=HttpTimeouts(header=100.0, idle=100.0, request=100.0, handler=100.0, write=100.0),
        max_connections=limit,
    )


class Client:
    """One connection served as the accept loop serves it: a slot first, released at the end."""

    def __init__(self, server: HttpServer, nursery: trio.Nursery) -> None:
        self.stream, server_end = trio.testing.memory_stream_pair()
        self.received = bytearray()
        self.closed = trio.Event()
        self.admitted = trio.Event()
        nursery.start_soon(self._serve, server, server_end)
        nursery.start_soon(self._read)

    async def _serve(self, server: HttpServer, server_end: trio.abc.Stream) -> None:
        await server.slots.acquire()
        self.admitted.set()
        try:
            await server.handle_connection(server_end)
        finally:
            server.slots.release()

    async def _read(self) -> None:
        while data := await self.stream.receive_some(65536):
            self.received += data
        self.closed.set()

    async def get(self, path: str) -> None:
        await self.stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def test_at_the_limit_the_longest_idle_connection_makes_room(nursery, autojump_clock):
    gate = trio.Event()
    server = gated_server(3, gate)
    busy = Client(server, nursery)
    await busy.admitted.wait()
    await busy.get("/held")  # being answered: never closed to make room
    await trio.sleep(1)
    oldest = Client(server, nursery)
    await trio.sleep(1)
    trickling = Client(server, nursery)
    await trickling.admitted.wait()
    await trickling.stream.send_all(b"GET /live HTTP/1.1\r\nHo")  # a head begun, not finished
    await trio.sleep(1)
    assert server.slots.taken == 3 and not oldest.closed.is_set()

    newcomer = Client(server, nursery)
    await oldest.closed.wait()  # the longest waiting without a complete request
    await newcomer.admitted.wait()
    await newcomer.get("/live")
    await trio.sleep(1)
    assert b"HTTP/1.1 200 " in newcomer.received
    assert oldest.received == b"" and not busy.closed.is_set() and not trickling.closed.is_set()

    another = Client(server, nursery)
    await trickling.closed.wait()  # next in line; the busy one still is not
    await another.admitted.wait()
    assert not busy.closed.is_set() and server.slots.shed_total == 2 and server.slots.high_water == 3
    gate.set()
    await trio.sleep(1)
    assert busy.received.endswith(b"released\n")


async def test_when_every_connection_is_being_answered_a_new_one_waits(nursery, autojump_clock):
    gate = trio.Event()
    server = gated_server(2, gate)
    first, second = Client(server, nursery), Client(server, nursery)
    await first.admitted.wait()
    await second.admitted.wait()
    await first.get("/held")
    await second.get("/held")
    await trio.sleep(1)  # both requests read: both connections are being answered
    waiting = Client(server, nursery)
    await trio.sleep(50)
    assert not waiting.admitted.is_set() and server.slots.shed_total == 0
    gate.set()  # both answer; kept alive, they are idle again, and one makes room
    await waiting.admitted.wait()
    assert first.received.endswith(b"released\n") and second.received.endswith(b"released\n")
    assert server.slots.taken == 2 and server.slots.shed_total == 1


async def test_a_write_stalled_past_the_grace_makes_room_when_nothing_is_idle(nursery, autojump_clock):
    gate = trio.Event()
    server = gated_server(2, gate)  # write timeout 100 s; the stall grace is 1 s
    # A client that never reads: its response write blocks (a lockstep stream buffers nothing).
    stalled, stalled_end = trio.testing.lockstep_stream_pair()
    stalled_done = trio.Event()

    async def serve_stalled() -> None:
        await server.slots.acquire()
        try:
            await server.handle_connection(stalled_end)
        finally:
            server.slots.release()
            stalled_done.set()

    nursery.start_soon(serve_stalled)
    await stalled.send_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    held = Client(server, nursery)
    await held.admitted.wait()
    await held.get("/held")  # busy in its handler: never closed to make room
    await trio.sleep(0.5)
    start = trio.current_time()
    newcomer = Client(server, nursery)
    await newcomer.admitted.wait()
    assert stalled_done.is_set() and not held.closed.is_set()
    assert trio.current_time() - start == pytest.approx(0.5)  # the stall reached the 1 s grace
    await newcomer.get("/live")
    await trio.sleep(1)
    assert b"HTTP/1.1 200 " in newcomer.received
    gate.set()
    await trio.sleep(1)
    assert held.received.endswith(b"released\n")


@pytest.mark.realtime
async def test_clients_that_do_not_read_cannot_starve_the_probe(nursery):
    """64+ clients ask for a big response and never read it: their writes stall, and are cut."""
    big = b"x" * (16 << 20)  # more than the kernel buffers on both sides can hold

    async def live(_request: HttpRequest) -> HttpResponse:
        return HttpResponse.text(200, "ok")

    async def huge(_request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, big)

    timeouts = attrs.evolve(PATIENT, write=120.0)  # only cutting stalled writes can explain an answer
    server = HttpServer({("GET", "/health/live"): live, ("GET", "/big"): huge}, timeouts=timeouts)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    readers = []
    for _ in range(80):
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)  # before connect: a small window
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(stream)
    try:
        with trio.fail_after(20):  # before: the write timeout (120 s) of 64 stalled writes
            reply = await http_get(port, "/health/live")
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok\n")
        assert server.slots.shed_total >= 1 and server.slots.high_water <= 64
    finally:
        for stream in readers:
            await trio.aclose_forcefully(stream)


async def test_connection_slots_refuse_a_zero_limit():
    with pytest.raises(ValueError):
        ConnectionSlots(0)
