"""The one place asyncio lives: aio-pika under trio-asyncio, behind a small Trio API.

``open_amqp_bridge`` keeps a robust connection (reconnecting and re-declaring by itself), consumes the
configured queues into a Trio channel of ``Delivery`` objects, publishes with publisher confirms under a
timeout, and runs request/reply calls over one exclusive reply queue with correlation ids. Every
aio-pika failure surfaces as ``AmqpUnavailable``; nothing else in the daemon imports aio_pika.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika
import attrs
import trio
import trio_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

log = logging.getLogger(__name__)

T = TypeVar("T")


class AmqpUnavailable(Exception):
    """The broker cannot be reached right now (or did not answer in time)."""


@attrs.frozen
class QueueSpec:
    name: str
    durable: bool = True
    auto_delete: bool = False
    arguments: Mapping[str, Any] | None = None
    bind_to: tuple[str, ...] = ()  # exchanges (already declared) to bind with the queue's own name


@attrs.frozen
class ExchangeSpec:
    name: str
    type: str = "fanout"
    durable: bool = True
    arguments: Mapping[str, Any] | None = None


@attrs.frozen
class Topology:
    consume: tuple[QueueSpec, ...] = ()
    exchanges: tuple[ExchangeSpec, ...] = ()
    prefetch: int = 10


@attrs.frozen
class Delivery:
    queue: str
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    headers: Mapping[str, Any]
    received_at: float


@attrs.define
class BridgeStats:
    connects: int = 0
    reconnects: int = 0
    publishes: int = 0
    publish_failures: int = 0
    deliveries: int = 0
    rpc_calls: int = 0


class AmqpBridge:
    def __init__(self, connection: AbstractRobustConnection, timeout: float) -> None:
        self.stats = BridgeStats()
        self.deliveries: trio.MemoryReceiveChannel[Delivery]
        self._connection = connection
        self._timeout = timeout
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._reply_queue: aio_pika.abc.AbstractRobustQueue | None = None
        self._pending: dict[str, tuple[trio.Event, list[bytes]]] = {}
        self._consumer_tags: list[tuple[aio_pika.abc.AbstractRobustQueue, str]] = []
        self._correlation = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]

    @property
    def connected(self) -> bool:
        return not self._connection.is_closed and self._channel is not None and not self._channel.is_closed

    async def _aio(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            with trio.fail_after(self._timeout):
                result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
                return result
        except trio.TooSlowError:
            raise AmqpUnavailable(f"broker did not answer within {self._timeout} s") from None
        except (aio_pika.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            raise AmqpUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        exchange: str = "",
        correlation_id: str | None = None,
        reply_to: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish (transient, text/plain, as voipbin's services do) and wait for the broker's confirm."""
        channel = self._require_channel()
        message = aio_pika.Message(
            body,
            content_type="text/plain",
            correlation_id=correlation_id,
            reply_to=reply_to,
            headers=dict(headers) if headers else None,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        target = channel.default_exchange if not exchange else await self._aio(channel.get_exchange, exchange)
        try:
            await self._aio(target.publish, message, routing_key=routing_key)
        except AmqpUnavailable:
            self.stats.publish_failures += 1
            raise
        self.stats.publishes += 1

    async def rpc(
        self, routing_key: str, body: bytes, *, exchange: str = "", headers: Mapping[str, Any] | None = None
    ) -> bytes:
        """Send a request and wait for its reply (matched by correlation id).

        Waits until cancelled: callers bound it with their own cancel scope.
        """
        if self._reply_queue is None:
            raise AmqpUnavailable("no reply queue")
        correlation_id = f"{self._prefix}-{next(self._correlation)}"
        done, slot = trio.Event(), list[bytes]()
        self._pending[correlation_id] = (done, slot)
        self.stats.rpc_calls += 1
        try:
            await self.publish(
                routing_key,
                body,
                exchange=exchange,
                correlation_id=correlation_id,
                reply_to=self._reply_queue.name,
                headers=headers,
            )
            await done.wait()
            return slot[0]
        finally:
            self._pending.pop(correlation_id, None)

    def _on_reply(self, message: AbstractIncomingMessage) -> None:
        entry = self._pending.get(message.correlation_id or "")
        if entry is None:
            log.debug("unmatched reply %s", message.correlation_id)
            return  # a reply that came after its caller gave up
        done, slot = entry
        slot.append(message.body)
        done.set()

    async def stop_consuming(self) -> None:
        """Cancel the request consumers (drain: callers fail fast instead of timing out here)."""
        for queue, tag in self._consumer_tags:
            try:
                await self._aio(queue.cancel, tag)
            except AmqpUnavailable as exc:
                log.warning("could not cancel consumer on %s: %s", queue.name, exc)
        self._consumer_tags.clear()

    def _require_channel(self) -> aio_pika.abc.AbstractRobustChannel:
        if self._channel is None or self._channel.is_closed:
            raise AmqpUnavailable("channel closed")
        return self._channel

    async def _setup(self, topology: Topology, deliveries: trio.MemorySendChannel[Delivery]) -> None:
        channel = await self._aio(self._connection.channel)
        self._channel = channel
        await self._aio(channel.set_qos, prefetch_count=topology.prefetch)
        for spec in topology.exchanges:
            await self._aio(
                channel.declare_exchange,
                spec.name,
                spec.type,
                durable=spec.durable,
                auto_delete=False,
                arguments=dict(spec.arguments) if spec.arguments else None,
            )
        reply_queue = await self._aio(channel.declare_queue, exclusive=True, auto_delete=True)
        self._reply_queue = reply_queue

        async def on_reply(message: AbstractIncomingMessage) -> None:
            self._on_reply(message)

        await self._aio(reply_queue.consume, on_reply, no_ack=True)
        for queue_spec in topology.consume:
            queue = await self._aio(
                channel.declare_queue,
                queue_spec.name,
                durable=queue_spec.durable,
                auto_delete=queue_spec.auto_delete,
                arguments=dict(queue_spec.arguments) if queue_spec.arguments else None,
            )
            for exchange in queue_spec.bind_to:
                await self._aio(queue.bind, exchange, routing_key=queue_spec.name)
            tag = await self._aio(queue.consume, self._consumer(queue_spec.name, deliveries))
            self._consumer_tags.append((queue, tag))

    def _consumer(
        self, queue_name: str, deliveries: trio.MemorySendChannel[Delivery]
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            # At most once, like the Go service: a request whose caller gave up (3 s) must not be
            # redelivered to another pod later and create an orphan.
            await message.ack()
            self.stats.deliveries += 1
            delivery = Delivery(
                queue=queue_name,
                body=message.body,
                reply_to=message.reply_to or None,
                correlation_id=message.correlation_id,
                headers=dict(message.headers or {}),
                received_at=trio.current_time(),
            )
            try:
                deliveries.send_nowait(delivery)
            except trio.WouldBlock:
                log.error("request backlog full on %s: request dropped", queue_name)

        return on_message


async def _connect(url: str, retry_every: float) -> AbstractRobustConnection:
    while True:
        try:
            with trio.fail_after(10):
                connection = await trio_asyncio.aio_as_trio(aio_pika.connect_robust)(
                    url, reconnect_interval=retry_every, fail_fast=True
                )
            return connection  # type: ignore[no-any-return]
        except (trio.TooSlowError, aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
            log.warning("broker %s unreachable (%s); retrying in %s s", _redact(url), exc, retry_every)
            await trio.sleep(retry_every)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if "@" in rest else url


@asynccontextmanager
async def open_amqp_bridge(
    url: str,
    topology: Topology,
    *,
    broker_timeout: float = 3.0,
    retry_every: float = 1.0,
    backlog: int = 1000,
) -> AsyncIterator[AmqpBridge]:
    """Connect (retrying until it works), declare, consume; the body runs with a live bridge."""
    async with trio_asyncio.open_loop():
        connection = await _connect(url, retry_every)
        bridge = AmqpBridge(connection, broker_timeout)
        bridge.stats.connects += 1

        def on_reconnect(*_args: object) -> None:
            bridge.stats.reconnects += 1
            log.info("reconnected to the broker")

        connection.reconnect_callbacks.add(on_reconnect)
        send, bridge.deliveries = trio.open_memory_channel[Delivery](backlog)
        try:
            await bridge._setup(topology, send)
            yield bridge
        finally:
            send.close()
            with trio.CancelScope(shield=True), trio.move_on_after(broker_timeout):
                try:
                    await trio_asyncio.aio_as_trio(connection.close)()
                except (aio_pika.exceptions.AMQPError, ConnectionError, OSError, asyncio.CancelledError):
                    pass
