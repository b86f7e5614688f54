"""The servers bench/http_cost.py and http_limits.py compare: ours (h11) and hypercorn's trio worker.

``start_servers(kind, ...)`` starts a health/metrics server and a media server of that kind and returns
their ports. The hypercorn side is a small ASGI app per server with our routes, statuses and bodies,
served by ``hypercorn.trio.serve`` with the settings closest to ours (keep-alive 5 s, 16 KB heads).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tts_streamer.supervisor.ops.health import Readiness, serve_http
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.services.media_http import MediaHttpServer, Unsatisfiable, parse_range, resolve

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# -- the hypercorn side: the two ASGI apps ---------------------------------------------------------------


async def _reply(
    send: Send, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", *extra: Any
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop; hypercorn wants the lifespan protocol answered all the same."""
    while True:
        message = await receive()
        kind = message["type"].rpartition(".")[2]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


def health_app(readiness: Readiness, metrics: Metrics) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path not in ("/health/live", "/health/ready", "/metrics"):
            await _reply(send, 404, b"not found\n")
        elif method not in ("GET", "HEAD"):
            await _reply(
                send, 405, b"method not allowed\n", "text/plain; charset=utf-8", ("allow", "GET, HEAD")
            )
        elif path == "/health/live":
            await _reply(send, 200, b"ok\n")
        elif path == "/health/ready":
            reasons = readiness.reasons()
            value = {"ready": not reasons, "reasons": reasons, "vendors_unavailable": {}}
            await _reply(
                send, 503 if reasons else 200, json.dumps(value).encode() + b"\n", "application/json"
            )
        else:
            body, content_type = metrics.render()
            await _reply(send, 200, body, content_type)

    return app


def media_app(root: Path) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    limiter = trio.CapacityLimiter(4)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await lifespan(receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _reply(send, 405, b"method not allowed\n", "text/plain", ("allow", "GET, HEAD"))
            return
        target = scope["raw_path"].decode("ascii", "replace")
        info = await trio.to_thread.run_sync(resolve, root, target, limiter=limiter)
        if info is None:
            await _reply(send, 404, b"not found\n")
            return
        headers = dict((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
        try:
            span = parse_range(headers.get("range"), info.size)
        except Unsatisfiable:
            await _reply(send, 416, b"", "text/plain", ("content-range", f"bytes */{info.size}"))
            return
        status = 200 if span is None else 206
        first, last = span or (0, info.size - 1)
        extra = [("accept-ranges", "bytes"), ("etag", info.etag), ("last-modified", info.last_modified)]
        if span is not None:
            extra.append(("content-range", f"bytes {first}-{last}/{info.size}"))
        length = last - first + 1
        out = [(b"content-type", info.content_type.encode()), (b"content-length", str(length).encode())]
        out += [(k.encode(), v.encode()) for k, v in extra]
        await send({"type": "http.response.start", "status": status, "headers": out})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        async with await trio.open_file(info.path, "rb") as file:
            await file.seek(first)
            left = length
            while left > 0:
                chunk = await file.read(min(65536, left))
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})

    return app


async def serve_hypercorn(app: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = 5.0
    config.h11_max_incomplete_size = 16384
    config.accesslog = None
    config.errorlog = None
    await serve(app, config, task_status=_PortStatus(task_status))


class _PortStatus:
    """hypercorn reports its binds as URLs; the caller wants the port."""

    def __init__(self, outer: Any) -> None:
        self.outer = outer

    def started(self, binds: list[str]) -> None:
        self.outer.started(int(binds[0].rsplit(":", 1)[1]))


async def start_servers(kind: str, nursery: trio.Nursery, media_root: Path) -> tuple[int, int]:
    readiness, metrics = Readiness(command_plane_connected=True), Metrics()
    if kind == "h11":
        serve = partial(serve_http, None, readiness, metrics, host="127.0.0.1", port=0)
        health = await nursery.start(serve)
        media = await nursery.start(MediaHttpServer(media_root).serve, "127.0.0.1", 0)
        return health, media
    health = await nursery.start(serve_hypercorn, health_app(readiness, metrics))
    media = await nursery.start(serve_hypercorn, media_app(media_root))
    return health, media
