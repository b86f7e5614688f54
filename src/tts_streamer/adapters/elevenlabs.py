"""ElevenLabs ``multi-stream-input`` WebSocket, spoken directly with trio-websocket, ``ulaw_8000`` output.

**One socket per stream (utterance), one context on it.** The voice id is part of the URL, and the
VoiceEngine contract has no session lifetime to hang a shared socket on (no engine-owned nursery), so
each ``open_stream`` connects, opens context ``c<n>``, and closes both when left. The cost is one
WebSocket (and, against the real service, TLS) handshake per utterance: 2-3 ms on loopback, roughly one
to two round trips to the vendor otherwise (unmeasured here). It keeps the 5-context limit trivially
respected and makes a flush unable to disturb another call. Sharing one socket per session would need
an engine nursery owning the sockets; the per-context bookkeeping below (live id, dropping audio of dead
ids) is what that would build on.

Flow: the context opens with ``{"text":" "}``; each text goes out ending in a space, with ``flush`` when it
ends a sentence; ``end_input`` sends ``flush`` and ``close_socket``, and the server drains and closes 1000,
which ends ``audio()``. A keepalive (empty text) goes out when no text was sent for
``keepalive_interval`` (below ``inactivity_timeout``). A reader task drains the socket all the time
(trio-websocket answers pings only while messages are read). Leaving the stream marks the context dead
(later audio for it is dropped), sends ``close_context`` and closes the socket, bounded by
``close_timeout``; the socket's own reader runs in a shielded scope so that close handshake can finish
even when the stream is left by cancellation.
"""

from __future__ import annotations

import base64
import binascii
import collections
import itertools
import json
import logging
import math
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, connect_websocket_url

from tts_streamer.adapters.vendor_stream import AudioPipe, background_nursery, guarded, non_space_len
from tts_streamer.adapters.voice import VoiceError, VoiceSpec
from tts_streamer.adapters.voices import select_voice
from tts_streamer.exceptions import first_of

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "wss://api.elevenlabs.io"
DEFAULT_MODEL = "eleven_flash_v2_5"
_SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
_ERROR_KINDS = {
    "max_active_conversations": "capacity",
    "invalid_api_key": "auth",
    "unauthorized": "auth",
    "quota_exceeded": "throttled",
    "rate_limited": "throttled",
    "input_timeout_exceeded": "timeout",
}
_ids = itertools.count(1)


class ElevenLabsEngine:
    name = "elevenlabs"

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        model_id: str = DEFAULT_MODEL,
        inactivity_timeout: int = 20,
        keepalive_interval: float = 10.0,
        connect_timeout: float = 5.0,
        close_timeout: float = 1.0,
        response_timeout: float = 10.0,
        send_language_code: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if keepalive_interval >= inactivity_timeout:
            raise ValueError("keepalive_interval must be below inactivity_timeout")
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id
        self.inactivity_timeout = inactivity_timeout
        self.keepalive_interval = keepalive_interval
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.response_timeout = response_timeout
        self.send_language_code = send_language_code
        self.ssl_context = ssl_context
        if ssl_context is None and self.base_url.startswith("wss:"):
            self.ssl_context = ssl.create_default_context()
        self._open = 0

    @property
    def open_streams(self) -> int:
        return self._open

    def url_for(self, voice_id: str, language: str) -> str:
        query = {
            "model_id": self.model_id,
            "output_format": "ulaw_8000",
            "inactivity_timeout": str(self.inactivity_timeout),
            "sync_alignment": "true",
        }
        if self.send_language_code and language:
            query["language_code"] = language.split("-")[0]
        path = f"/v1/text-to-speech/{urllib.parse.quote(voice_id)}/multi-stream-input"
        return f"{self.base_url}{path}?{urllib.parse.urlencode(query)}"

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[ElevenLabsStream]:
        stream = ElevenLabsStream(self, voice)
        self._open += 1
        try:
            async with background_nursery("elevenlabs") as nursery:
                try:
                    await nursery.start(stream._hold_connection, name="elevenlabs-socket")
                    nursery.start_soon(guarded, stream.pipe, stream._run, "elevenlabs", name="elevenlabs-run")
                    yield stream
                finally:
                    stream._begin_close()
        finally:
            self._open -= 1
            stream.pipe.close()


class ElevenLabsStream:
    def __init__(self, engine: ElevenLabsEngine, voice: VoiceSpec) -> None:
        self._engine = engine
        resolved = select_voice("elevenlabs", voice)
        self.voice_id = resolved.voice_id
        self.url = engine.url_for(resolved.voice_id, resolved.language)
        self.context_id = f"c{next(_ids)}"
        self.speed = min(1.2, max(0.7, voice.speaking_rate or 1.0))
        self.pipe = AudioPipe()
        self.late_chunks_dropped = 0
        self._ws: WebSocketConnection | None = None
        self._live = True
        self._closing = trio.Event()
        self._shield: trio.CancelScope | None = None
        self._texts_send, self._texts = trio.open_memory_channel[str](math.inf)
        self._input_chars: list[int] = []  # cumulative non-space characters per input
        self._sent_chars = 0
        self._aligned = 0  # non-space characters whose audio audio() has yielded
        self._chunk_chars: collections.deque[int] = collections.deque()
        self._seen_alignment = False
        self._input_ended = False
        self._context_done = False  # its isFinal or the drained close arrived: no close_context needed

    @property
    def inputs_spoken(self) -> int:
        """How many ``send_text`` inputs have had all their audio yielded (by ElevenLabs' alignment)."""
        return sum(1 for end in self._input_chars if end <= self._aligned)

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        self._texts_send.send_nowait(text)
        self._sent_chars += non_space_len(text)
        self._input_chars.append(self._sent_chars)

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()
        self._input_ended = True
        self._texts_send.close()

    async def audio(self) -> AsyncGenerator[bytes, None]:
        async for chunk in self.pipe.audio():
            if self._chunk_chars:
                self._aligned += self._chunk_chars.popleft()
            yield chunk

    # --- background tasks ---

    async def _hold_connection(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the socket; its reader task lives under a shield so the close handshake can finish."""
        with trio.CancelScope() as scope:
            self._shield = scope
            async with trio.open_nursery() as ws_nursery:
                ws = await self._connect(ws_nursery)
                self._ws = ws
                scope.shield = True  # from here on only _begin_close (with its deadline) ends us
                task_status.started()
                try:
                    await self._closing.wait()
                    if not self._context_done and ws.closed is None:
                        self._context_done = True
                        await _send(ws, context_id=self.context_id, close_context=True)
                    await ws.aclose(1000)
                except ConnectionClosed:
                    pass
                finally:
                    ws_nursery.cancel_scope.cancel()

    async def _connect(self, nursery: trio.Nursery) -> WebSocketConnection:
        engine = self._engine
        try:
            with trio.fail_after(engine.connect_timeout):
                return await connect_websocket_url(
                    nursery,
                    self.url,
                    engine.ssl_context,
                    extra_headers=[(b"xi-api-key", engine.api_key.encode())],
                    message_queue_size=64,
                    max_message_size=16 * 2**20,
                )
        except trio.TooSlowError:
            text = f"elevenlabs: connect timed out after {engine.connect_timeout:g} s"
            raise VoiceError(text, kind="timeout") from None
        except HandshakeError as exc:
            raise VoiceError(f"elevenlabs: handshake failed: {exc}", kind="connection") from None
        except OSError as exc:
            raise VoiceError(f"elevenlabs: cannot connect: {exc}", kind="connection") from None

    def _begin_close(self) -> None:
        """Leaving the stream: the context is dead from now on; the socket closes within close_timeout."""
        self._live = False
        self._input_ended = True
        self._closing.set()
        self._texts_send.close()
        if self._shield is not None:
            limit = trio.current_time() + self._engine.close_timeout
            self._shield.deadline = min(self._shield.deadline, limit)

    async def _run(self) -> None:
        ws = self._ws
        assert ws is not None
        opening = {"text": " ", "context_id": self.context_id, "voice_settings": {"speed": self.speed}}
        try:
            await ws.send_message(json.dumps(opening))
            async with trio.open_nursery() as nursery:
                reader_scope = trio.CancelScope()
                nursery.start_soon(self._write, ws, reader_scope, name="elevenlabs-write")
                await self._read(ws, reader_scope)
                nursery.cancel_scope.cancel()
        except* ConnectionClosed as group:
            closed = first_of(group, ConnectionClosed)
            assert closed is not None
            raise _closed_error(closed) from None

    async def _write(self, ws: WebSocketConnection, reader_scope: trio.CancelScope) -> None:
        try:
            await self._write_texts(ws, reader_scope)
        except ConnectionClosed:
            pass  # the reader reports it, after any error message the server sent before closing

    async def _write_texts(self, ws: WebSocketConnection, reader_scope: trio.CancelScope) -> None:
        engine = self._engine
        while True:
            with trio.move_on_after(engine.keepalive_interval) as idle:
                try:
                    text = await self._texts.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    break
            if idle.cancelled_caught:
                await _send(ws, context_id=self.context_id, text="")
                continue
            text = text.strip()
            if not text:
                continue
            flush = text.endswith(_SENTENCE_ENDS)
            await _send(ws, text=text + " ", context_id=self.context_id, flush=flush)
            if reader_scope.deadline == math.inf:
                reader_scope.deadline = trio.current_time() + engine.response_timeout
        if self._live:
            await _send(ws, context_id=self.context_id, flush=True)
            await _send(ws, close_socket=True)
            reader_scope.deadline = min(reader_scope.deadline, trio.current_time() + engine.response_timeout)

    async def _read(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    raw = await ws.get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
                    if reason is not None and reason.code == 1000 and self._input_ended:
                        self._context_done = True
                        self._check_complete()
                        return
                    raise _closed_error(exc) from None
                if self._handle(raw):
                    return
                if self._input_ended:
                    scope.deadline = trio.current_time() + self._engine.response_timeout
                else:
                    scope.deadline = math.inf  # audio flowing; the next text sets a deadline again
        raise VoiceError(f"elevenlabs: no audio for {self._engine.response_timeout:g} s", kind="timeout")

    def _handle(self, raw: str | bytes) -> bool:
        """Process one server message; True when this stream's audio is complete."""
        try:
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError:
            raise VoiceError(f"elevenlabs: malformed message {str(raw)[:80]!r}", kind="protocol") from None
        if msg.get("error"):
            kind = _ERROR_KINDS.get(str(msg["error"]), "vendor_error")
            raise VoiceError(f"elevenlabs: {msg['error']}: {msg.get('message', '')}", kind=kind)
        context = msg.get("contextId", msg.get("context_id"))
        if context not in (None, self.context_id) or not self._live:
            self.late_chunks_dropped += 1 if msg.get("audio") else 0
            return False
        if msg.get("isFinal") or msg.get("is_final"):
            self._context_done = True
            self._check_complete()
            return True
        audio = msg.get("audio")
        if isinstance(audio, str) and audio:
            try:
                chunk = base64.b64decode(audio, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise VoiceError("elevenlabs: audio is not base64", kind="protocol") from None
            if not chunk:
                return False
            alignment = msg.get("alignment") or {}
            chars = alignment.get("chars") if isinstance(alignment, dict) else None
            if isinstance(chars, list):
                self._seen_alignment = True
            self._chunk_chars.append(sum(1 for c in chars or [] if isinstance(c, str) and not c.isspace()))
            self.pipe.put(chunk)
        return False

    def _check_complete(self) -> None:
        """At the end, alignment (when the server sends it) must cover every character sent."""
        aligned = self._aligned + sum(self._chunk_chars)
        if self._seen_alignment and aligned < self._sent_chars:
            raise VoiceError(
                f"elevenlabs: stream ended with {aligned} of {self._sent_chars} characters spoken",
                kind="truncated",
            )


def _closed_error(exc: ConnectionClosed) -> VoiceError:
    reason: Any = exc.reason
    code = getattr(reason, "code", None)
    text = f"elevenlabs: connection closed ({code} {getattr(reason, 'reason', '') or ''})"
    return VoiceError(text.replace(" )", ")"), kind="connection")


async def _send(ws: WebSocketConnection, **fields: object) -> None:
    await ws.send_message(json.dumps(fields))
