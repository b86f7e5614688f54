"""ElevenLabs ``multi-stream-input`` WebSocket, spoken directly with trio-websocket, ``ulaw_8000`` output.

**One socket per call, one context per utterance.** ``open_session`` (entered when the call's session
starts) connects in the background, so the first utterance finds the socket open; a failed connect does
not fail the session start: the next utterance connects again and reports the VoiceError if that fails
too (the fallback chain then moves on). Each utterance opens context ``c<n>`` (unique per socket) with
``{"text":" "}``; each text goes out ending in a space, with ``flush`` when it ends a sentence;
``end_input`` sends ``flush``, and the utterance is complete when the character alignment (requested with
``sync_alignment``) covers everything sent, or at the context's ``isFinal``. Leaving the stream, normally
or by a flush, marks the context dead (audio still arriving for it is dropped by id) and sends
``close_context``; the context counts against the 5-per-socket limit until its ``isFinal``, and a new
context waits up to ``close_timeout`` for room, else moves to a fresh socket. A session has its own
socket, so one call's flush cannot touch another call's contexts.

While idle for ``keepalive_interval`` (below ``inactivity_timeout``) the socket keeps a standby context
alive with empty text (opened on the first idle keep-alive; the next utterance adopts it). When the
vendor closes the socket anyway (idle timeout, error), the next utterance reconnects; an utterance in
progress when it drops fails as before. All sends go through the socket's writer task (a cancelled send
would corrupt a shared socket); its reader drains all the time (trio-websocket answers pings only while
messages are read). Leaving the session sends ``close_socket`` and closes the socket, bounded by
``close_timeout``, under a shield so the handshake finishes even when the session is cancelled.
``open_stream(voice)`` without a session is a session of one utterance (one socket, as before).
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, connect_websocket_url

from tts_streamer.adapters.elevenlabs_stream import (
    ElevenLabsSocket,
    ElevenLabsStream,
    closed_error,
    error_of,
    parse,
)
from tts_streamer.adapters.vendor_stream import background_nursery, guarded
from tts_streamer.adapters.voice import VoiceError, VoiceSpec
from tts_streamer.adapters.voices import select_voice

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "wss://api.elevenlabs.io"
DEFAULT_MODEL = "eleven_flash_v2_5"
MAX_CONTEXTS = 5  # per socket, closing ones included until their isFinal


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
        max_contexts: int = MAX_CONTEXTS,
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
        self.max_contexts = max_contexts
        self.connects = 0  # WebSocket handshakes completed, over the engine's life
        self._open = 0
        self._sessions = 0

    @property
    def open_streams(self) -> int:
        return self._open

    @property
    def open_sessions(self) -> int:
        """Sessions holding (or reconnecting) a socket (tests assert this returns to 0)."""
        return self._sessions

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
    async def open_session(
        self, voice: VoiceSpec, *, connect: bool = True
    ) -> AsyncIterator[ElevenLabsSession]:
        """One call: its socket connects now in the background (``connect``) and lives until the end."""
        session = ElevenLabsSession(self, voice)
        self._sessions += 1
        try:
            async with background_nursery("elevenlabs-session") as nursery:
                session._nursery = nursery
                try:
                    if connect:
                        session._new_socket()
                    yield session
                finally:
                    session._begin_close()
        finally:
            self._sessions -= 1

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[ElevenLabsStream]:
        """One utterance on a socket of its own, for callers without a session."""
        async with self.open_session(voice, connect=False) as session, session.open_stream() as stream:
            yield stream

    async def _connect(self, nursery: trio.Nursery, url: str) -> WebSocketConnection:
        try:
            with trio.fail_after(self.connect_timeout):
                ws = await connect_websocket_url(
                    nursery,
                    url,
                    self.ssl_context,
                    extra_headers=[(b"xi-api-key", self.api_key.encode())],
                    message_queue_size=64,
                    max_message_size=16 * 2**20,
                )
        except trio.TooSlowError:
            text = f"elevenlabs: connect timed out after {self.connect_timeout:g} s"
            raise VoiceError(text, kind="timeout") from None
        except HandshakeError as exc:
            raise VoiceError(f"elevenlabs: handshake failed: {exc}", kind="connection") from None
        except OSError as exc:
            raise VoiceError(f"elevenlabs: cannot connect: {exc}", kind="connection") from None
        self.connects += 1
        return ws


class ElevenLabsSession:
    """One call on ElevenLabs: its socket (reconnected when lost) and one context per utterance."""

    def __init__(self, engine: ElevenLabsEngine, voice: VoiceSpec) -> None:
        self._engine = engine
        resolved = select_voice("elevenlabs", voice)
        self.voice_id = resolved.voice_id
        self.url = engine.url_for(resolved.voice_id, resolved.language)
        self.speed = min(1.2, max(0.7, voice.speaking_rate or 1.0))
        self.sockets: list[ElevenLabsSocket] = []  # every socket this session opened, in order
        self.late_chunks_dropped = 0  # audio of closed contexts, dropped by id
        self._socket: ElevenLabsSocket | None = None
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def open_stream(self) -> AsyncIterator[ElevenLabsStream]:
        engine = self._engine
        stream = ElevenLabsStream(self.speed, engine.response_timeout)
        engine._open += 1
        try:
            async with background_nursery("elevenlabs") as nursery:
                try:
                    stream.attach(await self._socket_with_room())
                    nursery.start_soon(guarded, stream.pipe, stream.run, "elevenlabs", name="elevenlabs-run")
                    yield stream
                finally:
                    stream.release()
        finally:
            engine._open -= 1
            stream.pipe.close()

    async def _socket_with_room(self) -> ElevenLabsSocket:
        """The session's socket, (re)connected, with room for one more context."""
        engine = self._engine
        sock = self._socket
        # A socket the vendor sent an error on is about to be closed by it: do not start on it.
        if sock is None or sock.dead or sock.error is not None or sock.close_requested.is_set():
            sock = self._new_socket()
        await sock.ready.wait()  # bounded by connect_timeout in its task
        if len(sock.closing) + 1 > engine.max_contexts:
            with trio.move_on_after(engine.close_timeout):
                while not sock.dead and len(sock.closing) + 1 > engine.max_contexts:
                    await sock.changed.wait()
            if not sock.dead and len(sock.closing) + 1 > engine.max_contexts:
                log.info("elevenlabs: %d contexts still closing; moving to a new socket", len(sock.closing))
                sock.request_close(engine.close_timeout)
                sock = self._new_socket()
                await sock.ready.wait()
        if sock.dead:
            raise sock.error or VoiceError("elevenlabs: connection closed", kind="connection")
        return sock

    def _new_socket(self) -> ElevenLabsSocket:
        assert self._nursery is not None
        sock = ElevenLabsSocket(len(self.sockets) + 1)
        self.sockets.append(sock)
        self._socket = sock
        self._nursery.start_soon(self._hold, sock, name=f"elevenlabs-socket-{sock.number}")
        return sock

    def _begin_close(self) -> None:
        for sock in self.sockets:
            if not sock.dead:
                sock.request_close(self._engine.close_timeout)

    # --- a socket's tasks ---

    async def _hold(self, sock: ElevenLabsSocket) -> None:
        """Own one socket; only request_close (with its deadline) ends it. Shielded from the start: a
        cancelled connect leaves trio-websocket's TCP stream open until garbage collection, so a close
        during the connect waits for it (up to the close deadline) and then closes properly."""
        try:
            with trio.CancelScope(shield=True) as scope:
                sock.scope = scope
                if sock.close_requested.is_set():
                    return
                async with trio.open_nursery() as ws_nursery:
                    try:
                        ws = await self._engine._connect(ws_nursery, self.url)
                    except VoiceError as exc:
                        log.info("elevenlabs socket %d: %s", sock.number, exc)
                        sock.end(exc)
                        return
                    sock.ws = ws
                    sock.ready.set()
                    try:
                        async with trio.open_nursery() as tasks:
                            tasks.start_soon(self._write, sock, ws)
                            tasks.start_soon(self._keepalive, sock)
                            tasks.start_soon(self._close_on_request, sock, ws)
                            await self._read(sock, ws)
                            tasks.cancel_scope.cancel()
                    finally:
                        ws_nursery.cancel_scope.cancel()
        finally:
            sock.end(VoiceError("elevenlabs: connection closed", kind="connection"))
            if self._socket is sock:
                self._socket = None

    async def _read(self, sock: ElevenLabsSocket, ws: WebSocketConnection) -> None:
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as exc:
                sock.end(None if sock.close_requested.is_set() else sock.error or closed_error(exc))
                return
            try:
                self._dispatch(sock, parse(raw))
            except VoiceError as exc:  # malformed: nothing on this socket can be trusted any more
                sock.end(exc)
                with trio.move_on_after(self._engine.close_timeout):
                    await ws.aclose(1002)
                return

    def _dispatch(self, sock: ElevenLabsSocket, msg: dict[str, object]) -> None:
        if msg.get("error"):
            error = error_of(msg)
            sock.error = sock.error or error  # the vendor closes the socket next
            if sock.stream is not None:
                sock.stream.fail(error)
            else:
                log.info("elevenlabs socket %d (idle): %s", sock.number, error)
            return
        context = msg.get("contextId", msg.get("context_id"))
        final = bool(msg.get("isFinal") or msg.get("is_final"))
        stream = sock.stream
        if stream is not None and context in (None, stream.context_id):
            stream.on_message(msg)
        elif isinstance(context, str) and context in sock.closing:
            if final:
                del sock.closing[context]
                sock.notify()
            elif msg.get("audio"):
                self.late_chunks_dropped += 1
        elif final and context == sock.standby:
            sock.standby = None  # the vendor ended it; the next keep-alive opens another

    async def _write(self, sock: ElevenLabsSocket, ws: WebSocketConnection) -> None:
        try:
            async for msg in sock.outbox[1]:
                await ws.send_message(json.dumps(msg))
        except ConnectionClosed:
            pass  # the reader reports it, after any error message the server sent before closing

    async def _keepalive(self, sock: ElevenLabsSocket) -> None:
        """Below the inactivity timeout: empty text on the live context, or on a standby one while idle."""
        engine = self._engine
        while True:
            await trio.sleep_until(sock.last_sent + engine.keepalive_interval)
            if sock.close_requested.is_set():
                return
            if trio.current_time() < sock.last_sent + engine.keepalive_interval:
                continue
            if sock.stream is not None:
                sock.post(context_id=sock.stream.context_id, text="")
            elif sock.standby is not None:
                sock.post(context_id=sock.standby, text="")
            elif len(sock.closing) + 1 <= engine.max_contexts:
                sock.standby = sock.new_context_id()
                sock.post(text=" ", context_id=sock.standby, voice_settings={"speed": self.speed})
            else:
                await trio.sleep(engine.keepalive_interval)  # full of closing contexts: let them drain

    async def _close_on_request(self, sock: ElevenLabsSocket, ws: WebSocketConnection) -> None:
        await sock.close_requested.wait()
        sock.post(close_socket=True)  # after any close_context already queued
        sock.outbox[0].close()
        with trio.move_on_after(self._engine.close_timeout / 2):
            await sock.ended.wait()  # the vendor drains and closes 1000
        await ws.aclose(1000)
