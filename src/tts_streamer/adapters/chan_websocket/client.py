"""Trio shell around the chan_websocket protocol: one object, one reader task, one domain exception.

``open_media_connection`` dials the media URI offering the ``media`` subprotocol, waits (bounded) for
MEDIA_START, then runs a reader task that always drains the socket (so pings are answered and Asterisk's
writes never time out), tracks XOFF/XON and the bridge signal, and turns every transport failure into
``MediaSocketError``. A watchdog task per connection bounds every send (``MediaTimeouts.send``):
a cancel scope around each send cost ~20 us per message, the watchdog one wake-up per timeout period.
Leaving the context closes the socket normally (code 1000) under a shielded,
bounded scope, which is what hangs up the external-media leg.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import trio
import trio_websocket

from tts_streamer.adapters.chan_websocket import framing, protocol
from tts_streamer.adapters.chan_websocket.dial import (
    CALLER_AUDIO_READ_INTERVAL,
    CallerAudioStream,
    StreamConnector,
    open_media_websocket,
)
from tts_streamer.adapters.chan_websocket.protocol import (
    MAX_MESSAGE_PAYLOAD,
    Command,
    MediaStart,
)
from tts_streamer.exceptions import first_of, leaves

log = logging.getLogger(__name__)

Dialer = Callable[[str], AbstractAsyncContextManager[trio_websocket.WebSocketConnection]]


class MediaSocketError(Exception):
    """The media WebSocket failed: could not connect, timed out, or was closed."""


class MediaSocketClosed(MediaSocketError):
    """The peer closed the media WebSocket (for Asterisk: the call leg hung up)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"media socket closed by peer (code {code}, reason {reason!r})")
        self.code = code
        self.reason = reason


@attrs.frozen
class MediaTimeouts:
    connect: float = 5.0
    media_start: float = 5.0
    send: float = 2.0
    close: float = 2.0


def websocket_dialer(
    timeouts: MediaTimeouts = MediaTimeouts(),
    caller_audio_read_interval: float = CALLER_AUDIO_READ_INTERVAL,
    *,
    connect: StreamConnector | None = None,
) -> Dialer:
    """The production dialer: a real WebSocket client offering only the ``media`` subprotocol.

    Caller audio never reaches trio-websocket (``dial.CallerAudioStream``): it is counted as read.
    ``connect`` replaces TCP/TLS by another byte stream (the simulator's in-memory one in tests).
    """

    def dial(media_uri: str) -> AbstractAsyncContextManager[trio_websocket.WebSocketConnection]:
        return open_media_websocket(
            media_uri,
            subprotocols=["media"],
            connect_timeout=timeouts.connect,
            disconnect_timeout=timeouts.close,
            # Several control events can arrive back to back (e.g. a mark right after XON).
            message_queue_size=16,
            read_interval=caller_audio_read_interval,
            connect=connect,
        )

    return dial


@attrs.define
class ConnectionStats:
    messages_sent: int = 0
    bytes_sent: int = 0
    commands_sent: int = 0
    caller_frames_received: int = 0
    control_events_received: int = 0
    protocol_errors: int = 0


class MediaConnection:
    """A connected chan_websocket leg after MEDIA_START. Created by ``open_media_connection``."""

    def __init__(
        self, ws: trio_websocket.WebSocketConnection, media_start: MediaStart, timeouts: MediaTimeouts
    ) -> None:
        self.media_start = media_start
        # When MEDIA_START arrived (Trio's clock): the leg cannot join its bridge before this.
        self.started_at = trio.current_time()
        self._stats = ConnectionStats()
        self._ws = ws
        self._timeouts = timeouts
        # Set by the first caller frame: Asterisk sends none while unbridged. Its absence proves
        # nothing (voipbin's snoop bridge never sends any), so waiting on it must be bounded.
        self.bridged = trio.Event()
        # Under the production dialer caller audio is counted by the stream and never becomes a
        # message; a test double's WebSocketConnection delivers it as messages, counted below.
        stream = getattr(ws, "_stream", None)
        self._caller_audio = stream if isinstance(stream, CallerAudioStream) else None
        if self._caller_audio is not None:
            self.bridged = self._caller_audio.first_frame
        self._resumed = trio.Event()
        self._resumed.set()
        self._mark_handlers: dict[str, Callable[[], None]] = {}
        # Start times of the sends in progress, oldest first (trio-websocket's stream lock is FIFO).
        self._sending_since: list[float] = []
        self._masking_keys = framing.MaskingKeys()
        # Audio frames are built here and written under trio-websocket's own stream lock (so they
        # never interleave with its pongs or close frame); anything else that looks like a
        # WebSocketConnection (a test double) gets them through send_message.
        self._raw = isinstance(getattr(ws, "_stream_lock", None), trio.StrictFIFOLock) and hasattr(
            ws, "_stream"
        )

    @property
    def stats(self) -> ConnectionStats:
        if self._caller_audio is not None:
            self._stats.caller_frames_received = self._caller_audio.caller_audio.frames
        return self._stats

    @property
    def paused(self) -> bool:
        """True between MEDIA_XOFF and MEDIA_XON: Asterisk's queue is near its drop limit."""
        return not self._resumed.is_set()

    async def wait_resumed(self) -> None:
        await self._resumed.wait()

    def on_mark(self, mark_id: str, handler: Callable[[], None]) -> None:
        """Call ``handler`` when Asterisk reports MEDIA_MARK_PROCESSED for ``mark_id``."""
        self._mark_handlers[mark_id] = handler
        self._marks_changed()

    def forget_marks(self) -> None:
        """FLUSH_MEDIA drops queued marks: they will never be reported."""
        self._mark_handlers.clear()
        self._marks_changed()

    def _marks_changed(self) -> None:
        # A mark's report is a playout time: read it as it comes, not at the caller-audio read pace.
        if self._caller_audio is not None:
            self._caller_audio.read_promptly(bool(self._mark_handlers))

    async def send_audio(self, payload: bytes) -> None:
        if len(payload) > MAX_MESSAGE_PAYLOAD:
            raise ValueError(f"audio message of {len(payload)} bytes exceeds {MAX_MESSAGE_PAYLOAD}")
        if self._raw:
            await self._send_frame(framing.binary_frame(payload, self._masking_keys.next()))
        else:
            await self._send(payload)
        self._stats.messages_sent += 1
        self._stats.bytes_sent += len(payload)

    async def send_command(self, command: Command) -> None:
        await self._send(protocol.render_command(command, self.media_start.control_format))
        self._stats.commands_sent += 1

    async def _send(self, message: bytes | str) -> None:
        started = trio.current_time()
        self._sending_since.append(started)
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None
        finally:
            self._sending_since.remove(started)

    async def _send_frame(self, frame: bytes) -> None:
        """Write one pre-built frame as trio-websocket's own ``_send`` would (its checks, its lock).

        When the stream lock is free and the stream is a real socket, the frame goes to the
        (non-blocking) socket at once: no scheduler round trip for the lock or for trio's send_all.
        Only what the kernel did not take is then written the usual way, still under the lock, so
        nothing can come between a frame's two parts. The caller's loop has its own checkpoint.
        """
        ws = self._ws
        if ws._close_reason:  # set before trio-websocket writes its close frame; data never follows it
            raise _closed(trio_websocket.ConnectionClosed(ws._close_reason))
        lock = ws._stream_lock
        sock = _raw_socket(ws._stream)
        if sock is None or lock.locked():
            await self._send_frame_locked(frame, 0)
            return
        lock.acquire_nowait()
        try:
            try:
                sent = sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = -1
            if sent < len(frame):
                # The kernel's buffer is full (or the socket failed): trio's send_all waits or raises.
                await self._send_frame_locked(frame, max(0, sent), locked=True)
        finally:
            lock.release()

    async def _send_frame_locked(self, frame: bytes, offset: int, *, locked: bool = False) -> None:
        ws = self._ws
        started = trio.current_time()
        self._sending_since.append(started)
        try:
            if locked:
                await ws._stream.send_all(memoryview(frame)[offset:])
            else:
                async with ws._stream_lock:
                    await ws._stream.send_all(memoryview(frame)[offset:])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise _closed(trio_websocket.ConnectionClosed(ws._close_reason)) from None
        finally:
            self._sending_since.remove(started)

    async def serve_send_watchdog(self) -> None:
        """Raise MediaSocketError once a send has been in progress for the send timeout.

        Raised in the connection's nursery, it cancels the stalled send with everything else inside
        the connection and leaves ``open_media_connection`` as that error, as a failed send would.
        A send seen at one check is caught at exactly its deadline: checks are at most ``limit`` apart.
        """
        limit = self._timeouts.send
        while True:
            now = trio.current_time()
            if not self._sending_since:
                await trio.sleep_until(now + limit)
                continue
            deadline = self._sending_since[0] + limit
            if now >= deadline:
                raise MediaSocketError(f"send blocked for more than {limit} s")
            await trio.sleep_until(deadline)

    async def serve_reader(self) -> None:
        """Drain the socket until it closes; raises MediaSocketClosed when the peer ends it."""
        try:
            while True:
                message = await self._ws.get_message()
                if isinstance(message, bytes):
                    self._stats.caller_frames_received += 1
                    # Asterisk sends caller media only once the leg is bridged (chan_websocket.md §8).
                    self.bridged.set()
                else:
                    self._handle_text(message)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    def _handle_text(self, text: str) -> None:
        try:
            event = protocol.parse_event(text)
        except protocol.ProtocolError as exc:
            self._stats.protocol_errors += 1
            log.warning("conn=%s unparsable control message %r: %s", self.connection_id, text[:80], exc)
            return
        if isinstance(event, MediaStart):
            log.warning("conn=%s second MEDIA_START ignored", self.connection_id)
            return
        self._stats.control_events_received += 1
        if event.name == "MEDIA_XOFF":
            self._resumed = trio.Event()
        elif event.name == "MEDIA_XON":
            self._resumed.set()
        elif event.name == "MEDIA_MARK_PROCESSED":
            handler = self._mark_handlers.pop(event.argument, None)
            if handler is not None:
                self._marks_changed()
                handler()
        elif event.name == "ERROR":
            log.warning("conn=%s Asterisk reported an error: %s", self.connection_id, event.argument)

    @property
    def connection_id(self) -> str:
        return self.media_start.connection_id


def _raw_socket(stream: object) -> socket.socket | None:
    """The stdlib socket under a plain trio SocketStream (None for TLS, memory streams, doubles)."""
    if isinstance(stream, CallerAudioStream):
        stream = stream.inner
    if type(stream) is not trio.SocketStream:
        return None
    raw = getattr(stream.socket, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


def _closed(exc: trio_websocket.ConnectionClosed) -> MediaSocketClosed:
    reason = exc.reason
    return MediaSocketClosed(getattr(reason, "code", None), getattr(reason, "reason", None))


def _single_media_error(group: BaseExceptionGroup[BaseException]) -> MediaSocketError | None:
    """The MediaSocketError a nursery group carries, if nothing but it (and Cancelled) is inside."""
    found = leaves(group)
    if not all(isinstance(e, MediaSocketError | trio.Cancelled) for e in found):
        return None
    return first_of(group, MediaSocketError)


# When we close because a caller's deadline cancelled us (e.g. a create overrunning its budget), the
# cancellation also reached trio-websocket's own reader: Asterisk's close reply can never be read, so
# the close frame goes out (Asterisk hangs up on it) and we wait only this long, not the close timeout.
CANCELLED_CLOSE_WAIT = 0.05


def _close_wait(timeouts: MediaTimeouts) -> float:
    cancelled = trio.current_effective_deadline() == -math.inf
    return min(timeouts.close, CANCELLED_CLOSE_WAIT) if cancelled else timeouts.close


async def _close_draining(ws: trio_websocket.WebSocketConnection) -> None:
    """Send a normal close (1000) and read until the handshake completes (no-op if already closed)."""

    async def drain() -> None:
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await ws.aclose(1000)
        nursery.cancel_scope.cancel()


async def _await_media_start(ws: trio_websocket.WebSocketConnection) -> MediaStart:
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes):
            continue  # Asterisk may send audio before MEDIA_START (#1712); not an error.
        try:
            event = protocol.parse_event(message)
        except protocol.ProtocolError as exc:
            raise MediaSocketError(f"bad first control message {message[:80]!r}: {exc}") from None
        if isinstance(event, MediaStart):
            return event
        log.warning("control event %s before MEDIA_START ignored", event.name)


@asynccontextmanager
async def open_media_connection(
    media_uri: str, dialer: Dialer, timeouts: MediaTimeouts = MediaTimeouts()
) -> AsyncIterator[MediaConnection]:
    """Dial ``media_uri``, wait for MEDIA_START, and keep a reader running while the body runs."""
    try:
        async with dialer(media_uri) as ws:
            try:
                with trio.fail_after(timeouts.media_start):
                    media_start = await _await_media_start(ws)
                if media_start.optimal_frame_size <= 0 or media_start.ptime <= 0:
                    raise MediaSocketError(f"unusable MEDIA_START framing: {media_start}")
                conn = MediaConnection(ws, media_start, timeouts)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.serve_reader, name=f"media-reader[{media_start.connection_id}]")
                    nursery.start_soon(
                        conn.serve_send_watchdog, name=f"media-watchdog[{media_start.connection_id}]"
                    )
                    try:
                        yield conn
                    finally:
                        nursery.cancel_scope.cancel(reason="media connection closing")
            except trio.TooSlowError:
                raise MediaSocketError(
                    f"no MEDIA_START within {timeouts.media_start} s from {media_uri}"
                ) from None
            except trio_websocket.ConnectionClosed as exc:
                raise _closed(exc) from None
            finally:
                # The one close, on every path. Cancelling inside open_websocket_url would make Asterisk
                # see 1006, so close cleanly; our reader is gone by now, so the close brings its own
                # drain (with unread caller audio queued, trio-websocket would never see the reply).
                wait = _close_wait(timeouts)  # before the shield, which hides cancellation
                with trio.CancelScope(shield=True), trio.move_on_after(wait):
                    await _close_draining(ws)
    except BaseExceptionGroup as group:
        single = _single_media_error(group)
        if single is None:
            raise
        raise single from None
    except (trio_websocket.HandshakeError, OSError) as exc:
        raise MediaSocketError(f"cannot connect to {media_uri}: {exc}") from exc
