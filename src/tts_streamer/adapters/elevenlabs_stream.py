"""One ElevenLabs socket's bookkeeping and one utterance (context) on it; the tasks are in elevenlabs.py.

Every message to the vendor goes through the socket's outbox, written by the socket's own (shielded)
writer task: a stream left by cancellation (a flush) never leaves half a frame on a socket the next
utterance still uses. The socket's reader hands each message to the stream whose context it names.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import math
from collections.abc import AsyncGenerator
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tts_streamer.adapters.vendor_stream import AudioPipe, non_space_len
from tts_streamer.adapters.voice import VoiceError

SENTENCE_ENDS = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
ERROR_KINDS = {
    "max_active_conversations": "capacity",
    "invalid_api_key": "auth",
    "unauthorized": "auth",
    "quota_exceeded": "throttled",
    "rate_limited": "throttled",
    "input_timeout_exceeded": "timeout",
}


def closed_error(exc: ConnectionClosed) -> VoiceError:
    reason: Any = exc.reason
    code = getattr(reason, "code", None)
    text = f"elevenlabs: connection closed ({code} {getattr(reason, 'reason', '') or ''})"
    return VoiceError(text.replace(" )", ")"), kind="connection")


def parse(raw: str | bytes) -> dict[str, Any]:
    try:
        msg = json.loads(raw)
        if not isinstance(msg, dict):
            raise ValueError("not an object")
    except ValueError:
        raise VoiceError(f"elevenlabs: malformed message {str(raw)[:80]!r}", kind="protocol") from None
    return msg


def error_of(msg: dict[str, Any]) -> VoiceError:
    kind = ERROR_KINDS.get(str(msg["error"]), "vendor_error")
    return VoiceError(f"elevenlabs: {msg['error']}: {msg.get('message', '')}", kind=kind)


@attrs.define(eq=False)
class ElevenLabsSocket:
    """One WebSocket of a session: at most one live context (``stream`` or ``standby``) plus closing ones."""

    number: int
    ws: WebSocketConnection | None = None
    ready: trio.Event = attrs.Factory(trio.Event)  # connected, or failed to
    ended: trio.Event = attrs.Factory(trio.Event)
    error: VoiceError | None = None
    stream: ElevenLabsStream | None = None
    standby: str | None = None  # a context opened while idle (to keep the socket alive), for the next stream
    closing: dict[str, float] = attrs.Factory(dict)  # close_context sent, no isFinal yet (they count)
    changed: trio.Event = attrs.Factory(trio.Event)
    close_requested: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope | None = None
    last_sent: float = attrs.Factory(trio.current_time)
    contexts_opened: int = 0
    outbox: tuple[trio.MemorySendChannel[dict[str, Any]], trio.MemoryReceiveChannel[dict[str, Any]]] = (
        attrs.Factory(lambda: trio.open_memory_channel[dict[str, Any]](math.inf))
    )

    @property
    def dead(self) -> bool:
        return self.ended.is_set()

    def new_context_id(self) -> str:
        self.contexts_opened += 1
        return f"c{self.contexts_opened}"

    def post(self, **fields: object) -> None:
        """Queue a message for the writer; dropped once the socket is closing or gone."""
        try:
            self.outbox[0].send_nowait(dict(fields))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        self.last_sent = trio.current_time()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def end(self, error: VoiceError | None) -> None:
        """The socket is gone (``error``: why, None for our own clean close); its live stream fails."""
        if self.dead:
            return
        self.error = self.error or error
        self.ended.set()
        self.ready.set()
        self.outbox[0].close()
        if self.stream is not None:
            self.stream.fail(self.error or VoiceError("elevenlabs: connection closed", kind="connection"))
        self.notify()

    def request_close(self, within: float) -> None:
        """Close within ``within`` seconds: the connect in progress, close_socket, the close handshake."""
        self.close_requested.set()
        if self.scope is not None:
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + within)


class ElevenLabsStream:
    """One utterance: one context on the session's socket (``attach``), until it is left (``release``)."""

    def __init__(self, speed: float, response_timeout: float) -> None:
        self.speed = speed
        self.response_timeout = response_timeout
        self.context_id = ""
        self.pipe = AudioPipe()
        self.late_chunks_dropped = 0
        self._sock: ElevenLabsSocket | None = None
        self._live = True
        self._done = trio.Event()
        self._error: VoiceError | None = None
        self._deadline = trio.CancelScope()
        self._texts_send, self._texts = trio.open_memory_channel[str](math.inf)
        self._input_chars: list[int] = []  # cumulative non-space characters per input
        self._sent_chars = 0
        self._aligned = 0  # non-space characters whose audio audio() has yielded
        self._chunk_chars: collections.deque[int] = collections.deque()
        self._seen_alignment = False
        self._input_ended = False
        self._context_done = False  # its isFinal arrived: no close_context needed

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

    # --- on the socket ---

    def attach(self, sock: ElevenLabsSocket) -> None:
        """Take the socket's live context: its standby one, else a new ``c<n>``."""
        self._sock = sock
        sock.stream = self
        if sock.standby is not None:
            self.context_id, sock.standby = sock.standby, None
        else:
            self.context_id = sock.new_context_id()
            sock.post(text=" ", context_id=self.context_id, voice_settings={"speed": self.speed})

    def release(self) -> None:
        """Leaving the stream: the context is dead from now on (late audio dropped), close_context goes
        out unless the vendor already ended it, and it counts against the limit until its isFinal."""
        self._live = False
        self._input_ended = True
        self._texts_send.close()
        sock = self._sock
        if sock is None:
            return
        if sock.stream is self:
            sock.stream = None
        if not self._context_done and not sock.dead:
            sock.closing[self.context_id] = trio.current_time()
            sock.post(context_id=self.context_id, close_context=True)

    def fail(self, error: VoiceError) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    def on_message(self, msg: dict[str, Any]) -> None:
        """A message for this stream's context, from the socket's reader."""
        if not self._live:
            self.late_chunks_dropped += 1 if msg.get("audio") else 0
            return
        try:
            self._handle(msg)
        except VoiceError as exc:
            self.fail(exc)
            return
        if self._input_ended:
            self._deadline.deadline = trio.current_time() + self.response_timeout
        else:
            self._deadline.deadline = math.inf  # audio flowing; the next text sets a deadline again

    def _handle(self, msg: dict[str, Any]) -> None:
        if msg.get("isFinal") or msg.get("is_final"):
            self._context_done = True
            self._check_complete()
            self._done.set()
            return
        audio = msg.get("audio")
        if not isinstance(audio, str) or not audio:
            return
        try:
            chunk = base64.b64decode(audio, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise VoiceError("elevenlabs: audio is not base64", kind="protocol") from None
        if not chunk:
            return
        alignment = msg.get("alignment") or {}
        chars = alignment.get("chars") if isinstance(alignment, dict) else None
        if isinstance(chars, list):
            self._seen_alignment = True
        self._chunk_chars.append(sum(1 for c in chars or [] if isinstance(c, str) and not c.isspace()))
        self.pipe.put(chunk)
        self._maybe_complete()

    def _received_aligned(self) -> int:
        return self._aligned + sum(self._chunk_chars)

    def _maybe_complete(self) -> None:
        """The context stays open after its audio on a shared socket: the end is when the alignment
        covers every character sent (requested with ``sync_alignment``)."""
        if self._input_ended and (
            self._sent_chars == 0 or (self._seen_alignment and self._received_aligned() >= self._sent_chars)
        ):
            self._done.set()

    def _check_complete(self) -> None:
        """At the end, alignment (when the server sends it) must cover every character sent."""
        aligned = self._received_aligned()
        if self._seen_alignment and aligned < self._sent_chars:
            raise VoiceError(
                f"elevenlabs: stream ended with {aligned} of {self._sent_chars} characters spoken",
                kind="truncated",
            )

    # --- the stream's task ---

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, name="elevenlabs-write")
            with self._deadline:
                await self._done.wait()
            nursery.cancel_scope.cancel()
        if self._error is not None:
            raise self._error
        if not self._done.is_set():
            raise VoiceError(f"elevenlabs: no audio for {self.response_timeout:g} s", kind="timeout")

    async def _write(self) -> None:
        sock = self._sock
        assert sock is not None
        async for text in self._texts:
            text = text.strip()
            if not text:
                continue
            flush = text.endswith(SENTENCE_ENDS)
            sock.post(text=text + " ", context_id=self.context_id, flush=flush)
            if self._deadline.deadline == math.inf:
                self._deadline.deadline = trio.current_time() + self.response_timeout
        if self._live:
            sock.post(context_id=self.context_id, flush=True)
            limit = trio.current_time() + self.response_timeout
            self._deadline.deadline = min(self._deadline.deadline, limit)
            self._maybe_complete()
