"""Dialing a chan_websocket media URI: trio-websocket over a stream that keeps caller audio out of it.

trio-websocket parses every message Asterisk sends and queues it for a reader task: ~110 us for
each caller frame, and a leg in a mixing bridge gets 50 a second (5.5 ms of CPU per call-second,
more than the whole outbound pipeline). ``CallerAudioStream`` sits between the socket and
trio-websocket: caller audio is counted and dropped as it is read (``caller_audio``), and while it
flows the socket is read at most once per ``read_interval`` so that one read takes several frames
from the kernel rather than waking the loop 50 times a second per call. Everything else reaches
trio-websocket unchanged: a close, a ping or a control message waits at most ``read_interval``
while caller audio flows, and not at all on a leg that gets none (voipbin's snoop bridge). While a
MEDIA_MARK_PROCESSED is awaited (``read_promptly``: the connection has a mark outstanding) reads are
not paced, so a play-finished report keeps its accuracy (bench/lead_sweep.py allows 40 ms).

``open_media_websocket`` is ``trio_websocket.open_websocket_url`` with that stream under it
(``wrap_client_stream`` is trio-websocket's public hook for a stream of one's own).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from tts_streamer.adapters.chan_websocket.caller_audio import CallerAudioFilter
from tts_streamer.exceptions import sole_error
from tts_streamer.pacer_clock import Alarm

# How long caller audio may gather in the kernel between reads: 10 frames at 20 ms (bench.micro: 6.6 us
# of CPU per caller frame at 100 ms, 3.8-4.1 at 200 ms). It is also the longest a close or a ping waits
# on a leg that receives caller audio (a hang-up is seen up to 200 ms late); marks are read at once.
CALLER_AUDIO_READ_INTERVAL = 0.2
_READ_BYTES = 65536

# How a byte stream to the media URI's host is opened: TCP (and TLS for wss://) in production; the
# Asterisk simulator's in-memory streams in tests, so that they run the production client over them.
StreamConnector = Callable[[str], Awaitable[trio.abc.Stream]]


class CallerAudioStream(trio.abc.Stream):
    """A stream that hands on everything its inner stream delivers except caller audio."""

    def __init__(self, inner: trio.abc.Stream, read_interval: float) -> None:
        self.inner = inner
        self.caller_audio = CallerAudioFilter()
        # Set by the first caller frame: Asterisk sends none until the leg is bridged.
        self.first_frame = trio.Event()
        self._read_interval = read_interval
        self._ready = b""
        self._next_read = -math.inf
        # The pacers' clock, not trio.sleep_until: a sleep is a cancel scope and a Cancelled per wake-up,
        # which cost as much as the read itself (py-spy, 500 calls with caller audio).
        self._alarm = Alarm()
        self._prompt = False

    def read_promptly(self, prompt: bool) -> None:
        """While ``prompt``, read as soon as anything arrives (a mark is awaited: its report is a
        playout time); otherwise pace reads while caller audio flows."""
        self._prompt = prompt
        if prompt:
            self._next_read = -math.inf
            self._alarm.wake()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._ready:
            if not self._prompt and self._next_read > trio.current_time():
                await self._alarm.wait_until(self._next_read)
            before = self.caller_audio.frames
            data = await self.inner.receive_some(_READ_BYTES)
            if not data:
                self._ready = self.caller_audio.finish()
                if not self._ready:
                    return b""
                break
            self._ready = self.caller_audio.feed(bytes(data) if type(data) is not bytes else data)
            if self.caller_audio.frames != before:
                self.first_frame.set()
                # Caller audio comes at 50 frames a second for as long as the leg is bridged.
                if not self._prompt:
                    self._next_read = trio.current_time() + self._read_interval
        if max_bytes is None or len(self._ready) <= max_bytes:
            out, self._ready = self._ready, b""
        else:
            out, self._ready = self._ready[:max_bytes], self._ready[max_bytes:]
        return out


@attrs.frozen
class MediaURL:
    host: str
    port: int
    resource: str
    secure: bool

    @classmethod
    def parse(cls, url: str) -> MediaURL:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise trio_websocket.HandshakeError(f"not a ws:// or wss:// URL: {url!r}")
        secure = parts.scheme == "wss"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError as exc:
            raise trio_websocket.HandshakeError(f"bad port in {url!r}") from exc
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, resource, secure)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.secure else 80) else f"{host}:{self.port}"


async def _open_stream(target: MediaURL, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    if not target.secure:
        return await trio.open_tcp_stream(target.host, target.port)
    context = ssl_context or ssl.create_default_context()
    return await trio.open_ssl_over_tcp_stream(
        target.host, target.port, ssl_context=context, https_compatible=True
    )


@asynccontextmanager
async def open_media_websocket(
    url: str,
    *,
    subprotocols: Sequence[str],
    connect_timeout: float,
    disconnect_timeout: float,
    message_queue_size: int,
    read_interval: float = CALLER_AUDIO_READ_INTERVAL,
    ssl_context: ssl.SSLContext | None = None,
    connect: StreamConnector | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Connect (handshake included) within ``connect_timeout``; on exit close within ``disconnect_timeout``.

    Raises trio-websocket's own errors, as ``open_websocket_url`` does: ``HandshakeError`` (its
    ``ConnectionTimeout``, ``ConnectionRejected``) for a failed connect, else what the body raised.
    """
    target = MediaURL.parse(url)
    stream: trio.abc.Stream | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout):
                    if connect is None:
                        stream = await _open_stream(target, ssl_context)
                    else:
                        stream = await connect(url)
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        CallerAudioStream(stream, read_interval),  # type: ignore[arg-type]
                        target.host_header,
                        target.resource,
                        subprotocols=subprotocols,
                        message_queue_size=message_queue_size,
                    )
            except trio.TooSlowError:
                raise trio_websocket.ConnectionTimeout from None
            except OSError as exc:
                raise trio_websocket.HandshakeError(str(exc)) from exc
            try:
                yield ws
            finally:
                with trio.move_on_after(disconnect_timeout):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise sole_error(group) from None
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
