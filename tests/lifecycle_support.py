"""Test doubles for session-lifecycle races: a media stream whose peer stops reading, a voice engine
whose stream release is slow (or fails), in virtual time."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

from tts_streamer.adapters.synthetic import SyntheticEngine, SyntheticStream
from tts_streamer.adapters.voice import VoiceSpec
from tts_streamer.simulator.asterisk import AsteriskSimulator, Dialer


class StallableStream(trio.abc.Stream):
    """A byte stream whose writes block for good once ``stall()`` is called: the peer's receive buffer
    is full (it stopped reading), as a TCP socket's would be."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner
        self.stalled = False
        self.blocked_writes = 0

    def stall(self) -> None:
        self.stalled = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stalled:
            self.blocked_writes += 1
            await trio.sleep_forever()
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


def stalling_dialer(
    sim: AsteriskSimulator, nursery: trio.Nursery, streams: dict[str, StallableStream]
) -> Dialer:
    """Like ``memory_dialer``, but each client stream is a StallableStream, kept in ``streams`` by
    connection id."""

    @asynccontextmanager
    async def dial(media_uri: str, **_ignored: object) -> AsyncIterator[WebSocketConnection]:
        url = urllib.parse.urlsplit(media_uri)
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(sim.serve_stream, server_end)
        stream = streams[url.path.removeprefix("/media/")] = StallableStream(client_end)
        async with trio.open_nursery() as conn_nursery:
            ws = await wrap_client_stream(
                conn_nursery, cast(trio.SocketStream, stream), url.netloc, url.path, subprotocols=["media"]
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(1):
                    await ws.aclose()
                conn_nursery.cancel_scope.cancel()

    return dial


class SlowReleaseEngine(SyntheticEngine):
    """A synthetic voice whose stream takes ``release_delay`` to release (shielded, as a vendor's close
    handshake is), then optionally raises ``release_error`` (an adapter bug)."""

    def __init__(
        self, release_delay: float = 1.0, release_error: Exception | None = None, **kwargs: object
    ) -> None:
        super().__init__(name="slow-release", **kwargs)  # type: ignore[arg-type]
        self.release_delay = release_delay
        self.release_error = release_error
        self.released_at: list[float] = []

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[SyntheticStream]:
        try:
            async with super().open_stream(voice) as stream:
                yield stream
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.release_delay)
            self.released_at.append(trio.current_time())
            if self.release_error is not None:
                raise self.release_error
