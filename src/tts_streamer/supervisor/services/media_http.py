"""Serves the speeches media directory over HTTP (GET/HEAD, single byte ranges), on its own port.

It is the daemon's h11 server (adapters/http_serving.py) with one fallback handler for every path; Asterisk
fetches ``sound:http://<pod>/<sha1>.wav`` through it (res_http_media_cache).

Only names directly in the directory are served: a path with more than one segment, a ``.`` or ``..``
segment (also percent-encoded), a backslash, a NUL, a hidden name, or anything that resolves outside the
directory (a symlink pointing out) is 404, as is anything that is not a regular file. Every wait is
bounded: the request head (2 s from accept), idle keep-alive, receiving a request, each write; a
client that stops reading is dropped, and at the connection limit an idle connection makes room for a
new one (adapters/http_slots.py).
"""

from __future__ import annotations

import email.utils
import logging
import os
import stat
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import attrs
import trio

from tts_streamer.adapters.http_serving import HttpRequest, HttpResponse, HttpServer, HttpTimeouts

log = logging.getLogger(__name__)

CONTENT_TYPES: Final = {".wav": "audio/wav"}
CHUNK: Final = 65536


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


class MediaHttpServer:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        on_access: Callable[[str], object] | None = None,
        timeouts: HttpTimeouts = HttpTimeouts(),
        max_connections: int = 64,
    ) -> None:
        self.root = Path(root)
        self.served = 0
        self._on_access = on_access
        self._limiter = trio.CapacityLimiter(4)
        self._server = HttpServer(
            {},
            fallback=self.answer,
            timeouts=timeouts,
            max_body_bytes=0,
            max_connections=max_connections,
            name="media-http",
        )

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self._server.serve(host or "", port, task_status=task_status)

    async def answer(self, request: HttpRequest) -> HttpResponse:
        base = (("accept-ranges", "bytes"),)
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"method not allowed\n", headers=(*base, ("allow", "GET, HEAD")))
        try:
            info = await trio.to_thread.run_sync(resolve, self.root, request.target, limiter=self._limiter)
        except UnicodeDecodeError:
            info = None
        if info is None:
            return HttpResponse(404, b"not found\n", headers=base)
        common = (*base, ("last-modified", info.last_modified), ("etag", info.etag))
        range_header = request.header("range")
        if_range = request.header("if-range")
        if if_range is not None and if_range.strip() not in (info.etag, info.last_modified):
            range_header = None  # the client's copy is stale: send the whole new file
        try:
            span = parse_range(range_header, info.size)
        except Unsatisfiable:
            return HttpResponse(416, b"", headers=(*base, ("content-range", f"bytes */{info.size}")))
        if self._on_access is not None and request.method == "GET":
            await trio.to_thread.run_sync(self._on_access, info.name, limiter=self._limiter)
        self.served += 1
        status, extra = 200, tuple[tuple[str, str], ...]()
        if span is None:
            span = (0, info.size - 1)
        else:
            status, extra = 206, (("content-range", f"bytes {span[0]}-{span[1]}/{info.size}"),)
        length = span[1] - span[0] + 1
        if length <= 0 or request.method == "HEAD":
            body: bytes | AsyncIterator[bytes] = b""
        else:
            body = _read_span(info.path, *span)
        headers = (*common, *extra, ("content-length", str(length)))
        return HttpResponse(status, body, info.content_type, headers)


async def _read_span(path: Path, first: int, last: int) -> AsyncIterator[bytes]:
    """The bytes ``first..last`` of ``path``; fails (cutting the response) if the file changed under us."""
    async with await trio.open_file(path, "rb") as file:
        await file.seek(first)
        left = last - first + 1
        while left > 0:
            chunk = await file.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path.name} shrank while being sent")
            left -= len(chunk)
            yield chunk
