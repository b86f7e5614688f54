"""A voipbin service as a caller of tts-manager: requests exactly the way the Go callers send them.

Per call a new channel and a server-named exclusive reply queue, publish to the default exchange with
``reply_to``, **no correlation id**, ``text/plain``; the first message on the reply queue is the answer.
It also records every event on ``bin-manager.tts-manager.event`` through its own bound queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import attrs
import trio
import trio_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Event, Response

log = logging.getLogger(__name__)

SHARED_QUEUE = "bin-manager.tts-manager.request"
EVENT_EXCHANGE = "bin-manager.tts-manager.event"
CHANNEL_CLOSE_TIMEOUT = 30.0


def aio(fn: Callable[..., Any]) -> Callable[..., Any]:
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


@attrs.define
class VoipbinCaller:
    connection: AbstractRobustConnection
    events: list[Event] = attrs.field(factory=list)
    latencies: list[float] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def call(
        self, queue: str, uri: str, method: str, data: Any = None, *, wait: float = 3.0, reply: bool = True
    ) -> Response | None:
        """One RPC as Go's client makes it. Returns None when ``reply`` is False or on a 3 s timeout."""
        return await self.send_raw(
            queue,
            envelope.render_request(envelope.make_request(uri, method, data, publisher="test")),
            wait,
            reply,
        )

    async def send_raw(
        self, queue: str, body: bytes, wait: float = 3.0, reply: bool = True
    ) -> Response | None:
        channel = await aio(self.connection.channel)()
        try:
            reply_to = None
            replies: trio.MemorySendChannel[bytes]
            replies, received = trio.open_memory_channel[bytes](1)
            if reply:
                reply_queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)

                async def on_reply(message: AbstractIncomingMessage) -> None:
                    try:
                        replies.send_nowait(message.body)
                    except trio.WouldBlock:
                        log.error("a second reply arrived for one request")

                await aio(reply_queue.consume)(on_reply, no_ack=True)
                reply_to = reply_queue.name
            started = time.monotonic()
            message = aio_pika.Message(body, content_type="text/plain", reply_to=reply_to)
            await aio(channel.default_exchange.publish)(message, routing_key=queue)
            if not reply:
                return None
            with trio.move_on_after(wait):
                raw = await received.receive()
                self.latencies.append(time.monotonic() - started)
                return envelope.parse_response(raw)
            return None
        finally:
            # Generous: a Channel.Close cut short makes aiormq send a second Close for that channel, the
            # broker answers that with CHANNEL_ERROR and closes the whole connection (seen at load 10,
            # where a close could take over 2 s, ending the soak in its first minutes).
            with trio.CancelScope(shield=True), trio.move_on_after(CHANNEL_CLOSE_TIMEOUT):
                await aio(channel.close)()

    def record(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, *types: str) -> list[Event]:
        return [e for e in self.events if e.type in types]

    async def wait_event(self, event_type: str, where: Callable[[Event], bool] = lambda e: True) -> Event:
        while True:
            for event in self.events:
                if event.type == event_type and where(event):
                    return event
            await self._changed.wait()


@asynccontextmanager
async def open_voipbin_caller(url: str) -> AsyncIterator[VoipbinCaller]:
    async with trio_asyncio.open_loop():
        connection = await aio(aio_pika.connect_robust)(url)
        caller = VoipbinCaller(connection)
        try:
            channel = await aio(connection.channel)()
            exchange = await aio(channel.declare_exchange)(EVENT_EXCHANGE, "fanout", durable=True)
            queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
            await aio(queue.bind)(exchange)

            async def on_event(message: AbstractIncomingMessage) -> None:
                caller.record(envelope.parse_event(message.body))

            await aio(queue.consume)(on_event, no_ack=True)
            yield caller
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await aio(connection.close)()
