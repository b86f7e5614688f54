"""A small HTTP/1.1 server: h11 (the sans-IO state machine) driven by Trio streams, with a route table.

Routes are ``{(method, path): handler}`` of async handlers; the health/metrics server
(supervisor/ops/health.py) and the media server (supervisor/services/media_http.py) are built on it.
Each connection is bounded in time at every step: a new connection must send its whole request head
within ``header`` seconds, a kept-alive one must begin its next request within ``idle``, then the
request must be in within ``request``; the handler and every write are bounded too, and a request body
in size. At the connection limit the longest-idle connection without a complete request (else a write
stalled on a client that does not read) is closed to make room (adapters/http_slots.py), so idle,
trickling or non-reading clients cannot starve the probes. HEAD is answered for every GET route.

Why not hypercorn (issue 18): its trio worker has no connection limit, no write timeout (a client that
does not read holds its connection for good), one keep-alive timer for both the header deadline and
the idle wait, no 408, empty reason phrases, and always speaks HTTP/2 on a plain port; keeping our
limits on it would mean driving its internal per-connection class. Measured in bench/http_limits.py
and bench/http_cost.py.
"""

from __future__ import annotations

import http
import json
import logging
import urllib.parse
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping

import attrs
import h11
import trio

from tts_streamer.adapters.http_slots import ConnectionSlots, Slot
from tts_streamer.adapters.serving import serve_stream_listeners

log = logging.getLogger(__name__)

SERVER_NAME = b"tts-streamer"
_RECEIVE_BYTES = 65536


@attrs.frozen
class HttpRequest:
    method: str
    path: str  # percent-decoded, without the query
    query: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased
    body: bytes = b""
    target: str = ""  # the request target as sent (not decoded), for handlers that decode it themselves

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@attrs.frozen
class HttpResponse:
    """A response; ``body`` may be an async iterable (streamed, chunked unless Content-Length is given)."""

    status: int
    body: bytes | AsyncIterable[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str) -> HttpResponse:
        return cls(status, (text + "\n").encode())

    @classmethod
    def json(cls, status: int, value: object) -> HttpResponse:
        return cls(status, json.dumps(value).encode() + b"\n", "application/json")


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


@attrs.frozen
class HttpTimeouts:
    # A new connection: from accept to the end of the request head (a silent one is closed quietly,
    # a partial head gets 408). A kept-alive connection: from its next request's first byte.
    header: float = 2.0
    idle: float = 5.0  # a kept-alive connection: waiting for the next request's first byte
    request: float = 10.0  # from a request's first byte to its end, body included
    handler: float = 5.0  # producing the response
    write: float = 10.0  # each write to the client
    # At the connection limit, with no idle connection to close, a write blocked this long (its client
    # does not read) is cut to make room: slow readers cannot hold every slot for `write` seconds.
    stalled_write: float = 1.0


class _Close(Exception):
    """End this connection (the client went away, timed out, or broke the protocol)."""


class HttpServer:
    """Routes are ``{(method, path): handler}``; HEAD uses the GET handler without sending the body.

    ``fallback`` answers every path no route names (any method, HEAD included); without it they are 404.
    """

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Handler],
        *,
        fallback: Handler | None = None,
        timeouts: HttpTimeouts = HttpTimeouts(),
        max_body_bytes: int = 65536,
        max_connections: int = 64,
        name: str = "http",
    ) -> None:
        self.routes = dict(routes)
        self.fallback = fallback
        self.timeouts = timeouts
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.name = name
        self.slots = ConnectionSlots(max_connections, name=name, stall_grace=timeouts.stalled_write)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await serve_stream_listeners(
            listeners,
            self.handle_connection,
            name=self.name,
            max_connections=self.max_connections,
            slots=self.slots,
        )

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve requests on one connection until it closes, idles out or misbehaves; then close it."""
        with self.slots.connection() as slot:
            await self._serve_connection(stream, slot)

    async def _serve_connection(self, stream: trio.abc.Stream, slot: Slot) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        fresh = True
        try:
            while True:
                request: HttpRequest | None = None
                with slot.receiving():  # closing this connection to make room cancels the wait
                    request = await self._receive_request(conn, stream, slot, fresh=fresh)
                if request is None or slot.shed:
                    return
                fresh = False
                response = await self._respond_to(request)
                await self._send_response(conn, stream, slot, request, response)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # Connection: close, HTTP/1.0, or a body we did not read
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not slot.shed:
                self.slots.busy(slot)  # answering (bounded by the write timeout), not idle
                await self._send_error(conn, stream, slot, exc.error_status_hint, str(exc))
        except h11.LocalProtocolError:
            # A handler's response broke HTTP (e.g. a body on a 304): nothing sane can follow on it.
            log.exception("http: invalid response; closing the connection")
        except _Close:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _receive_request(
        self, conn: h11.Connection, stream: trio.abc.Stream, slot: Slot, *, fresh: bool
    ) -> HttpRequest | None:
        """The next complete request, or None when the client closed or went quiet before one."""
        self.slots.waiting(slot)
        timeouts = self.timeouts
        now = trio.current_time()
        # Bytes of a pipelined request may already be buffered: then the next request has begun.
        received = bool(conn.trailing_data[0])
        # A new connection's head is timed from accept; a kept-alive one's from its first byte.
        begun_at: float | None = now if fresh or received else None
        idle_deadline = now + timeouts.idle
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if begun_at is None:
                    deadline, quiet = idle_deadline, True
                elif head is None:
                    deadline, quiet = begun_at + timeouts.header, not received
                else:
                    deadline, quiet = begun_at + max(timeouts.request, timeouts.header), False
                data = await self._receive(stream, deadline, quiet=quiet)
                if begun_at is None:
                    begun_at = trio.current_time()
                received = True
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body_bytes:
                    self.slots.busy(slot)
                    await self._send_error(conn, stream, slot, 413, "request body too large")
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self.slots.busy(slot)
                return _to_request(head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            else:  # pragma: no cover - h11 has no other server-side events
                return None

    async def _receive(self, stream: trio.abc.Stream, deadline: float, *, quiet: bool) -> bytes | bytearray:
        with trio.move_on_at(deadline):
            try:
                return await stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Close from None
        if quiet:
            raise _Close  # a connection that never began a request: just close it
        raise h11.RemoteProtocolError("request timed out", error_status_hint=408)

    async def _respond_to(self, request: HttpRequest) -> HttpResponse:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler is None and self.fallback is not None and all(p != request.path for _m, p in self.routes):
            handler = self.fallback
        if handler is None:
            if any(path == request.path for _method, path in self.routes):
                allowed = sorted({m for m, p in self.routes if p == request.path} | {"HEAD"})
                return HttpResponse(405, b"method not allowed\n", headers=(("allow", ", ".join(allowed)),))
            return HttpResponse.text(404, "not found")
        try:
            with trio.fail_after(self.timeouts.handler):
                return await handler(request)
        except trio.TooSlowError:
            log.warning(
                "http: %s %s took longer than %.1f s", request.method, request.path, self.timeouts.handler
            )
            return HttpResponse.text(503, "handler timed out")
        except Exception:
            log.exception("http: %s %s failed", request.method, request.path)
            return HttpResponse.text(500, "internal error")

    async def _send_response(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        slot: Slot,
        request: HttpRequest,
        response: HttpResponse,
    ) -> None:
        headers = [("server", SERVER_NAME.decode()), ("content-type", response.content_type)]
        headers += response.headers
        # A handler may set the length itself (e.g. HEAD of a file, whose body it does not produce).
        if isinstance(response.body, bytes) and not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("content-length", str(len(response.body))))
        await self._send(conn, stream, slot, _response_head(response.status, headers))
        if request.method != "HEAD":
            if isinstance(response.body, bytes):
                if response.body:
                    await self._send(conn, stream, slot, h11.Data(data=response.body))
            else:
                try:
                    async for chunk in response.body:
                        if chunk:
                            await self._send(conn, stream, slot, h11.Data(data=chunk))
                except _Close:
                    raise
                except Exception:
                    # The head is out: a body that fails midway can only be cut off.
                    log.exception("http: %s %s: response body failed", request.method, request.path)
                    raise _Close from None
        await self._send(conn, stream, slot, h11.EndOfMessage())

    async def _send_error(
        self, conn: h11.Connection, stream: trio.abc.Stream, slot: Slot, status: int, text: str
    ) -> None:
        body = (text + "\n").encode()
        headers = [
            ("server", SERVER_NAME.decode()),
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        try:
            await self._send(conn, stream, slot, _response_head(status, headers))
            await self._send(conn, stream, slot, h11.Data(data=body))
            await self._send(conn, stream, slot, h11.EndOfMessage())
        except (_Close, h11.LocalProtocolError):
            pass

    async def _send(
        self, conn: h11.Connection, stream: trio.abc.Stream, slot: Slot, event: h11.Event
    ) -> None:
        data = conn.send(event)
        if not data:
            return
        with trio.move_on_after(self.timeouts.write):
            # A write that stalls (the client does not read) may be cut at the limit to make room.
            with self.slots.sending(slot):
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise _Close from None
            if not slot.shed:
                return
        raise _Close  # a client that does not read its response is not waited for


def _response_head(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return h11.Response(status_code=status, headers=headers, reason=reason)


def _to_request(head: h11.Request, body: bytes) -> HttpRequest:
    target = head.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    return HttpRequest(
        method=head.method.decode("ascii", "replace"),
        path=urllib.parse.unquote(path),
        query=query,
        headers=tuple(
            (name.decode("ascii", "replace"), value.decode("latin-1")) for name, value in head.headers
        ),
        body=body,
        target=target,
    )
