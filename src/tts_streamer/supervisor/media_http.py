"""Serves the speeches media directory over HTTP (GET/HEAD, single byte ranges), on its own port.

The health server (supervisor/health.py) routes exact paths only, so the files get this small h11 server
of their own. Asterisk fetches ``sound:http://<pod>/<sha1>.wav`` through it (res_http_media_cache).

Only names directly in the directory are served: a path with more than one segment, a ``.`` or ``..``
segment (also percent-encoded), a backslash, a NUL, a hidden name, or anything that resolves outside the
directory (a symlink pointing out) is 404, as is anything that is not a regular file. Every wait is
bounded: idle keep-alive, receiving a request, each write; a client that stops reading is dropped.
"""

from __future__ import annotations

import email.utils
import http
import logging
import os
import stat
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import h11
import trio

from tts_streamer.supervisor.serving import serve_stream_listeners

log = logging.getLogger(__name__)

SERVER: Final = "tts-streamer"
CONTENT_TYPES: Final = {".wav": "audio/wav"}
CHUNK: Final = 65536
_RECEIVE: Final = 16384


@attrs.frozen
class MediaHttpTimeouts:
    idle: float = 30.0  # a kept-alive connection waiting for its next request
    request: float = 10.0  # from a request's first byte to its end
    write: float = 10.0  # each write to the client


@attrs.frozen
class FileInfo:
    path: Path
    name: str
    size: int
    mtime: float

    @property
    def etag(self) -> str:
        return f'"{self.size:x}-{int(self.mtime * 1000):x}"'

    @property
    def last_modified(self) -> str:
        return email.utils.formatdate(self.mtime, usegmt=True)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(os.path.splitext(self.name)[1].lower(), "application/octet-stream")


def resolve(root: Path, target: str) -> FileInfo | None:
    """The file a request target names inside ``root``, or None (-> 404). Blocking: call in a thread."""
    path = target.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        return None  # absolute-form or garbage
    name = urllib.parse.unquote(path[1:], errors="strict") if "%" in path else path[1:]
    if (
        not name
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
        or any(ord(ch) < 0x20 for ch in name)
    ):
        return None
    try:
        base = root.resolve(strict=True)
        real = (base / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if real.parent != base:  # a symlink leading out of the directory (or into a subdirectory)
        return None
    try:
        info = os.stat(real, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return FileInfo(real, name, info.st_size, info.st_mtime)


class Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (first, last) inclusive; None = send the whole file (no header, a form we
    ignore as RFC 9110 allows, e.g. several ranges). Raises Unsatisfiable for a range past the end."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    first_text, last_text = first_text.strip(), last_text.strip()
    if not (first_text.isdigit() or first_text == "") or not (last_text.isdigit() or last_text == ""):
        return None
    if first_text == "":
        if last_text == "":
            return None
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # syntactically invalid: ignored
    if first >= size:
        raise Unsatisfiable
    last = int(last_text) if last_text else size - 1
    return first, min(last, size - 1)


class _Close(Exception):
    """End this connection."""


@attrs.frozen
class _Reply:
    status: int
    headers: list[tuple[str, str]]
    file: FileInfo | None = None
    span: tuple[int, int] | None = None  # inclusive byte range of ``file`` to send
    body: bytes = b""


class MediaHttpServer:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        on_access: Callable[[str], object] | None = None,
        timeouts: MediaHttpTimeouts = MediaHttpTimeouts(),
        max_connections: int = 64,
    ) -> None:
        self.root = Path(root)
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.served = 0
        self._on_access = on_access
        self._limiter = trio.CapacityLimiter(4)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        task_status.started(listeners[0].socket.getsockname()[1])
        await serve_stream_listeners(
            listeners, self.handle_connection, name="media-http", max_connections=self.max_connections
        )

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            while True:
                request = await self._receive_request(conn, stream)
                if request is None:
                    return
                reply = await self._answer(request)
                await self._send_reply(conn, stream, request, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send_simple(conn, stream, exc.error_status_hint, close=True)
        except (_Close, h11.LocalProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _receive_request(self, conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
        begun = bool(conn.trailing_data[0])
        deadline = trio.current_time() + (self.timeouts.request if begun else self.timeouts.idle)
        head: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_at(deadline):
                    try:
                        data = await stream.receive_some(_RECEIVE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise _Close from None
                    if data and not begun:
                        begun = True
                        deadline = trio.current_time() + self.timeouts.request
                    conn.receive_data(bytes(data))
                    continue
                if not begun:
                    raise _Close  # idle keep-alive connection
                raise h11.RemoteProtocolError("request timed out", error_status_hint=408)
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.EndOfMessage):
                return head
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            # h11.Data: a body on GET/HEAD means nothing to us; it is read and dropped.

    async def _answer(self, request: h11.Request) -> _Reply:
        method = request.method.decode("ascii", "replace")
        base = [("server", SERVER), ("accept-ranges", "bytes")]
        if method not in ("GET", "HEAD"):
            return _Reply(405, [*base, ("allow", "GET, HEAD")], body=b"method not allowed\n")
        target = request.target.decode("latin-1")
        try:
            info = await trio.to_thread.run_sync(resolve, self.root, target, limiter=self._limiter)
        except UnicodeDecodeError:
            info = None
        if info is None:
            return _Reply(404, base, body=b"not found\n")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        common = [
            *base,
            ("content-type", info.content_type),
            ("last-modified", info.last_modified),
            ("etag", info.etag),
        ]
        range_header = headers.get("range")
        if_range = headers.get("if-range")
        if if_range is not None and if_range.strip() not in (info.etag, info.last_modified):
            range_header = None  # the client's copy is stale: send the whole new file
        try:
            span = parse_range(range_header, info.size)
        except Unsatisfiable:
            return _Reply(416, [*base, ("content-range", f"bytes */{info.size}")], body=b"")
        if self._on_access is not None and method == "GET":
            await trio.to_thread.run_sync(self._on_access, info.name, limiter=self._limiter)
        if span is None:
            return _Reply(200, common, file=info, span=(0, info.size - 1) if info.size else None)
        first, last = span
        return _Reply(
            206, [*common, ("content-range", f"bytes {first}-{last}/{info.size}")], file=info, span=span
        )

    async def _send_reply(
        self, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request, reply: _Reply
    ) -> None:
        length = (reply.span[1] - reply.span[0] + 1) if reply.span is not None else len(reply.body)
        if reply.file is not None and reply.span is None:
            length = 0  # an empty file
        headers = [*reply.headers, ("content-length", str(length))]
        if reply.file is None:
            headers.append(("content-type", "text/plain; charset=utf-8"))
        await self._send(conn, stream, _head(reply.status, headers))
        if request.method != b"HEAD":
            if reply.file is not None and reply.span is not None:
                await self._send_file(conn, stream, reply.file.path, *reply.span)
            elif reply.body:
                await self._send(conn, stream, h11.Data(data=reply.body))
        await self._send(conn, stream, h11.EndOfMessage())
        self.served += 1

    async def _send_file(
        self, conn: h11.Connection, stream: trio.abc.Stream, path: Path, first: int, last: int
    ) -> None:
        try:
            file = await trio.open_file(path, "rb")
        except OSError:
            raise _Close from None  # removed (evicted) since it was resolved: nothing sane to send
        async with file:
            await file.seek(first)
            left = last - first + 1
            while left > 0:
                chunk = await file.read(min(CHUNK, left))
                if not chunk:
                    raise _Close  # the file shrank under us: the length we announced is now a lie
                left -= len(chunk)
                await self._send(conn, stream, h11.Data(data=chunk))

    async def _send_simple(
        self, conn: h11.Connection, stream: trio.abc.Stream, status: int, *, close: bool = False
    ) -> None:
        body = f"{status}\n".encode()
        headers = [
            ("server", SERVER),
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
        ]
        if close:
            headers.append(("connection", "close"))
        try:
            await self._send(conn, stream, _head(status, headers))
            await self._send(conn, stream, h11.Data(data=body))
            await self._send(conn, stream, h11.EndOfMessage())
        except (_Close, h11.LocalProtocolError):
            pass

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, event: h11.Event) -> None:
        data = conn.send(event)
        if not data:
            return
        with trio.move_on_after(self.timeouts.write):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Close from None
            return
        raise _Close


def _head(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return h11.Response(status_code=status, headers=headers, reason=reason)
