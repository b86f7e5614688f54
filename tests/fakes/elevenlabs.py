"""A loopback ElevenLabs ``multi-stream-input`` WebSocket server (trio-websocket), for tests and benches.

It routes ``/v1/text-to-speech/{voice_id}/multi-stream-input`` (anything else: 404), checks the
``xi-api-key`` header (wrong: an error message, then close 1008), buffers text per context following the
chunk schedule, ``flush`` and ``auto_mode``, and runs one generator per context that sends base64 mu-law
(bytes identify the text, see ``fake_fill_byte``) with character alignment. ``close_context`` stops a
context after ``late_chunks`` in-flight chunks, then ``isFinal``; at most 5 contexts per socket count
(closed ones until their ``isFinal``), a 6th gets ``max_active_conversations`` and close 1008; a context
idle for ``inactivity_timeout`` is closed with an error; ``close_socket`` drains every context and closes
1000. Every inbound message is logged. Faults come from ``faults``, one per context.

Start it with ``port = await nursery.start(fake.serve)``; point the adapter at ``fake.base_url``.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.parse
from typing import Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_server_stream,
)

from tests.fakes.vendor_faults import Fault, FaultQueue, PaceLog, fake_fill_byte
from tts_streamer.exceptions import first_of

PATH_PREFIX, PATH_SUFFIX = "/v1/text-to-speech/", "/multi-stream-input"
MAX_CONTEXTS = 5
MAX_CONTEXTS_TEXT = (
    f"Maximum simultaneous contexts per WebSocket connection exceeded ({MAX_CONTEXTS}). "
    "Please close an existing context before opening a new one."
)
BYTES_PER_SECOND = 8000


@attrs.define(eq=False)
class ContextRecord:
    context_id: str
    opened_at: float
    texts: list[str] = attrs.field(factory=list)
    generated: list[str] = attrs.field(factory=list)
    flushes: int = 0
    bytes_sent: int = 0
    late_chunks_sent: int = 0
    closed_at: float | None = None  # close_context received
    final_at: float | None = None  # isFinal sent
    outcome: str = ""  # closed | drained | timeout | fault:<kind> | disconnected
    fault: Fault | None = None
    buffer: str = ""
    queue: list[str] = attrs.field(factory=list)
    wake: trio.Event = attrs.field(factory=trio.Event)
    keepalives: int = 0
    busy: bool = False
    last_input_at: float = 0.0


@attrs.define(eq=False)
class ConnectionRecord:
    number: int
    path: str
    voice_id: str
    query: dict[str, str]
    opened_at: float
    closed_at: float | None = None
    close_code: int | None = None  # as seen by the fake: 1000 clean, 1006 abnormal...
    contexts: dict[str, ContextRecord] = attrs.field(factory=dict)
    inbound: list[dict[str, Any]] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)


class ElevenLabsFake:
    def __init__(
        self,
        *,
        api_key: str = "test-key",
        seconds_per_char: float = 0.05,
        chunk_bytes: int = 800,
        chunk_interval: float = 0.01,
        first_audio_delay: float = 0.08,
        late_chunks: int = 2,
        schedule: tuple[int, ...] = (120, 160, 250, 290),
    ) -> None:
        self.api_key = api_key
        self.seconds_per_char = seconds_per_char
        self.chunk_bytes = chunk_bytes
        self.chunk_interval = chunk_interval
        self.first_audio_delay = first_audio_delay
        self.late_chunks = late_chunks
        self.schedule = schedule
        self.faults = FaultQueue()
        self.pace = PaceLog()
        self.connections: list[ConnectionRecord] = []
        self.rejected: list[tuple[str, int]] = []
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> list[ConnectionRecord]:
        return [c for c in self.connections if c.closed_at is None]

    @property
    def contexts(self) -> list[ContextRecord]:
        return [ctx for conn in self.connections for ctx in conn.contexts.values()]

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(self._listen)
            self.port = server.port
            task_status.started(self.port)

    async def _listen(self, *, task_status: trio.TaskStatus[Any]) -> None:
        await serve_websocket(
            self._handle,
            "127.0.0.1",
            0,
            None,
            max_message_size=16 * 2**20,
            message_queue_size=64,
            connect_timeout=5,
            disconnect_timeout=2,
            task_status=task_status,
        )

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """One connection on a stream already open in this process (``DelayProxy(local=...)``): the
        proxy hands its decrypted stream over instead of relaying it through a second loopback socket."""
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(5) as handshake:
                request = await wrap_server_stream(
                    nursery, stream, message_queue_size=64, max_message_size=16 * 2**20
                )
            if handshake.cancelled_caught:
                nursery.cancel_scope.cancel()
                return
            try:
                await self._handle(request)
            finally:
                with trio.move_on_after(2) as cleanup:
                    cleanup.shield = True
                    await request._connection.aclose()  # as serve_websocket does after its handler
                nursery.cancel_scope.cancel()

    async def _handle(self, request: WebSocketRequest) -> None:
        path, _, raw_query = request.path.partition("?")
        if not (path.startswith(PATH_PREFIX) and path.endswith(PATH_SUFFIX)):
            self.rejected.append((request.path, 404))
            await request.reject(404, body=b'{"detail":"Not Found"}')
            return
        voice_id = path[len(PATH_PREFIX) : -len(PATH_SUFFIX)]
        query = dict(urllib.parse.parse_qsl(raw_query))
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        ws = await request.accept()
        conn = ConnectionRecord(len(self.connections) + 1, request.path, voice_id, query, trio.current_time())
        self.connections.append(conn)
        try:
            if headers.get("xi-api-key") != self.api_key:
                await self._error(ws, "invalid_api_key", "Invalid API key", 1008)
                return
            await self._serve_connection(ws, conn)
        except* ConnectionClosed as group:
            closed = first_of(group, ConnectionClosed)
            conn.close_code = closed.reason.code if closed and closed.reason else None
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.close_code = 1006
        finally:
            conn.closed_at = trio.current_time()
            if conn.close_code is None and ws.closed is not None:
                conn.close_code = ws.closed.code
            for ctx in conn.contexts.values():
                ctx.outcome = ctx.outcome or ("closed" if ctx.closed_at is not None else "disconnected")

    async def _serve_connection(self, ws: WebSocketConnection, conn: ConnectionRecord) -> None:
        timeout = float(conn.query.get("inactivity_timeout", "20"))
        auto_mode = conn.query.get("auto_mode") == "true"
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_after(timeout) as idle:
                    raw = await ws.get_message()
                if idle.cancelled_caught:
                    for expired in conn.contexts.values():
                        expired.outcome = expired.outcome or "timeout"
                    await self._error(ws, "input_timeout_exceeded", f"No input for {timeout:g} s", 1008)
                    nursery.cancel_scope.cancel()
                    return
                msg = json.loads(raw)
                conn.inbound.append(msg)
                if msg.get("close_socket"):
                    await self._drain(ws, conn)
                    nursery.cancel_scope.cancel()
                    return
                cid = msg.get("context_id") or msg.get("contextId") or "default"
                ctx = conn.contexts.get(cid)
                if ctx is None or ctx.final_at is not None:
                    live = [c for c in conn.contexts.values() if c.final_at is None]
                    if len(live) >= MAX_CONTEXTS:
                        await self._error(ws, "max_active_conversations", MAX_CONTEXTS_TEXT, 1008)
                        nursery.cancel_scope.cancel()
                        return
                    ctx = conn.contexts[cid] = ContextRecord(
                        cid, trio.current_time(), fault=self.faults.next()
                    )
                    nursery.start_soon(self._generate, ws, conn, ctx)
                ctx.last_input_at = trio.current_time()
                if msg.get("close_context"):
                    ctx.closed_at = trio.current_time()
                    ctx.wake.set()
                    continue
                text = msg.get("text")
                if text == "":
                    ctx.keepalives += 1
                elif text is not None and text != " ":
                    ctx.texts.append(text)
                    ctx.buffer += text
                if msg.get("flush"):
                    ctx.flushes += 1
                if ctx.buffer.strip() and (
                    msg.get("flush") or auto_mode or len(ctx.buffer) >= self.schedule[0]
                ):
                    ctx.queue.append(ctx.buffer)
                    ctx.buffer = ""
                    ctx.wake.set()

    async def _generate(self, ws: WebSocketConnection, conn: ConnectionRecord, ctx: ContextRecord) -> None:
        fault = ctx.fault
        delay = self.first_audio_delay + (fault.delay if fault and fault.kind == "slow_first_byte" else 0.0)
        try:
            while True:
                while not ctx.queue and ctx.closed_at is None:
                    await ctx.wake.wait()
                    ctx.wake = trio.Event()
                if ctx.closed_at is not None:
                    break
                text = ctx.queue.pop(0)
                ctx.generated.append(text)
                ctx.busy = True
                late = 0
                # Paced by deadline: a chunk the loop could not send on time goes out at once, as a
                # vendor's own generation does not slow down with this machine's load.
                due = plays_at = trio.current_time()
                for chunk, alignment in self._chunks(text):
                    due += delay
                    plays_at = max(plays_at, due)
                    delay = self.chunk_interval
                    if due > trio.current_time():
                        await trio.sleep_until(due)
                    if ctx.closed_at is not None:
                        if late >= self.late_chunks:
                            break
                        late += 1
                        ctx.late_chunks_sent += 1
                    elif fault and fault.kind != "slow_first_byte" and ctx.bytes_sent >= fault.after_bytes:
                        await self._fault(ws, ctx, fault)
                        return
                    ctx.bytes_sent += len(chunk)
                    message = {
                        "audio": base64.b64encode(chunk).decode(),
                        "contextId": ctx.context_id,
                        "alignment": alignment,
                        "normalizedAlignment": alignment,
                    }
                    await ws.send_message(json.dumps(message))
                    self.pace.sent(due, plays_at, trio.current_time())
                    plays_at += len(chunk) / BYTES_PER_SECOND
                ctx.busy = False
                conn.changed.set()
                if ctx.closed_at is not None:
                    break
            ctx.outcome = ctx.outcome or "closed"
            await self._final(ws, ctx)
        except ConnectionClosed:
            pass
        finally:
            ctx.busy = False
            conn.changed.set()

    def _chunks(self, text: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Audio for ``text`` in chunks, each with the alignment of the characters starting in it."""
        total = max(1, round(len(text.strip()) * self.seconds_per_char * BYTES_PER_SECOND))
        audio = bytes([fake_fill_byte(text)]) * total
        per_char_ms = total / BYTES_PER_SECOND * 1000 / max(1, len(text))
        out = []
        for start in range(0, total, self.chunk_bytes):
            end = min(total, start + self.chunk_bytes)
            t0, t1 = start / 8, end / 8  # ms
            first = math.ceil(t0 / per_char_ms) if start else 0
            last = math.ceil(t1 / per_char_ms) if end < total else len(text)
            chars = list(text[first:last])
            starts = [round(i * per_char_ms - t0) for i in range(first, last)]
            out.append(
                (
                    audio[start:end],
                    {
                        "chars": chars,
                        "charStartTimesMs": starts,
                        "charDurationsMs": [round(per_char_ms)] * len(chars),
                    },
                )
            )
        return out

    async def _fault(self, ws: WebSocketConnection, ctx: ContextRecord, fault: Fault) -> None:
        ctx.outcome = f"fault:{fault.kind}"
        if fault.kind == "stall":
            await trio.sleep_forever()
        elif fault.kind == "error":
            await self._error(ws, "internal_error", "An internal server error occurred.", 1011)
        elif fault.kind == "malformed":
            await ws.send_message('{"audio": "%%% not base64 %%%", "contextId": ')
        elif fault.kind == "drop":
            await ws._close_stream()  # the TCP connection vanishes: no close frame

    async def _final(self, ws: WebSocketConnection, ctx: ContextRecord) -> None:
        if ctx.final_at is None:
            ctx.final_at = trio.current_time()
            await ws.send_message(json.dumps({"isFinal": True, "contextId": ctx.context_id}))

    async def _drain(self, ws: WebSocketConnection, conn: ConnectionRecord) -> None:
        """close_socket: generate what is buffered, let every generator finish, then close 1000."""
        for ctx in conn.contexts.values():
            if ctx.buffer.strip():
                ctx.queue.append(ctx.buffer)
                ctx.buffer = ""
            ctx.wake.set()
        # A stalled context stalls the drain too, as a stuck generation would, until the client leaves.
        while ws.closed is None and any(
            c.queue or c.busy for c in conn.contexts.values() if c.closed_at is None
        ):
            with trio.move_on_after(0.02):
                await conn.changed.wait()
                conn.changed = trio.Event()
        for ctx in conn.contexts.values():
            ctx.outcome = ctx.outcome or "drained"
        conn.close_code = 1000
        await ws.aclose(1000)

    @staticmethod
    async def _error(ws: WebSocketConnection, error: str, message: str, code: int) -> None:
        await ws.send_message(json.dumps({"message": message, "error": error, "code": code}))
        await ws.aclose(code, message[:120])
