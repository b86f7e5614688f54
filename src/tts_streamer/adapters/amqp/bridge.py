"""The one place asyncio lives: aio-pika under trio-asyncio, behind a small Trio API.

``open_amqp_bridge`` keeps a robust connection (reconnecting and re-declaring by itself), consumes the
configured queues into a Trio channel of ``Delivery`` objects, publishes with publisher confirms under a
timeout, and runs request/reply calls over one exclusive reply queue with correlation ids. Acks and
replies to requests, the per-request traffic, go through ``Outbox`` (adapters/amqp/outbox.py) in
batches instead of one Trio->asyncio crossing each, and request deliveries are handed over inline in
aiormq's reader (adapters/amqp/direct.py) instead of through aio-pika's two tasks each. Every
aio-pika failure surfaces as ``AmqpUnavailable`` (``AmqpRefused`` when the broker took the publish but
refused that message); nothing else in the daemon imports aio_pika.

With ``Topology.manual_ack`` deliveries are not acknowledged on receipt: the consumer of
``deliveries`` calls ``ack`` when it takes one up (it returns at once; the frame follows in the next
batch), so the prefetch window bounds what waits in memory
and everything else waits in the broker (where a queue's message TTL applies).

(Over the ~400 lines of the house rule: the connection, topology, consumers, publishes and RPC are one
resource with one lifetime; the batching that is not about that lifetime lives in outbox.py.)

A declaration the broker refuses because an object of that name exists with other properties (406
PRECONDITION_FAILED) raises ``TopologyConflict``, a ``ConfigError``: re-declaring cannot fix it, so the
daemon stops with the broker's reason instead of retrying.
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

from tts_streamer.adapters.amqp.consumers import AckToken, aio_pika_consumer, direct_consumer
from tts_streamer.adapters.amqp.consumers import Delivery as Delivery  # re-exported: the daemon's type
from tts_streamer.adapters.amqp.direct import DirectDeliveries
from tts_streamer.adapters.amqp.outbox import Outbox, ReplyDone, batch_callbacks
from tts_streamer.adapters.amqp.queue_probe import QueueProbe
from tts_streamer.exceptions import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


class AmqpUnavailable(Exception):
    """The broker cannot be reached right now (or did not answer in time)."""


class AmqpRefused(AmqpUnavailable):
    """The broker is there but refused this one message (a nack, or a channel error caused by the
    message itself, such as a body over its ``max_message_size``): sending it again cannot help."""


class TopologyConflict(ConfigError):
    """The broker refused a declaration: an object of that name exists with other properties."""


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
    prefetch: int = 10  # per consumer (basic.qos global=false: global QoS is denied by RabbitMQ 4.3)
    manual_ack: bool = False  # False: acked on receipt; True: the reader of ``deliveries`` calls ack()


@attrs.define
class BridgeStats:
    connects: int = 0
    reconnects: int = 0
    publishes: int = 0
    publish_failures: int = 0
    deliveries: int = 0
    rpc_calls: int = 0


class AmqpBridge:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        timeout: float,
        probe: QueueProbe | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.stats = BridgeStats()
        # The trio-asyncio loop (open_amqp_bridge passes it); None only for a bridge built outside one.
        self._outbox = (
            None
            if loop is None
            else Outbox(loop, lambda: self._channel, timeout, lambda exc: _unavailable(exc, timeout))
        )
        self._probe = probe
        self._direct = DirectDeliveries()
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
        except (
            aio_pika.exceptions.DeliveryError,
            aio_pika.exceptions.ChannelPreconditionFailed,
            aio_pika.exceptions.AMQPError,
            ConnectionError,
            OSError,
            RuntimeError,
        ) as exc:
            raise _unavailable(exc, self._timeout) from exc

    async def ack(self, delivery: Delivery) -> bool:
        """Acknowledge a manual-ack delivery; False when that is no longer possible (its channel is
        gone, so the broker has requeued it and will redeliver it marked ``redelivered``).

        Returns without waiting: the frame is written with the next batch (``Outbox``)."""
        token = delivery.token
        if not isinstance(token, AckToken):
            return True  # acked on receipt
        channel = token.channel
        if channel.is_closed:
            log.debug("ack on %s failed: its channel is closed", delivery.queue)
            return False
        if self._outbox is None:
            try:
                await self._aio(channel.basic_ack, token.delivery_tag)
            except AmqpUnavailable as exc:
                log.debug("ack on %s failed: %s", delivery.queue, exc)
                return False
            return True
        self._outbox.ack(channel, token.delivery_tag)
        return True

    def reply(self, routing_key: str, body: bytes, *, correlation_id: str | None, done: ReplyDone) -> None:
        """Publish a reply (as ``publish`` would, once) without waiting: ``done(None)`` once the broker
        confirmed it, ``done(error)`` (``AmqpUnavailable``/``AmqpRefused``) if it did not."""
        if self._outbox is None:
            raise RuntimeError("reply() needs the bridge of open_amqp_bridge")
        self._outbox.reply(routing_key, body, correlation_id, self._count_reply(done))

    async def _settle_outbox(self, grace: float) -> None:
        """Closing: let queued acks and replies out and their confirms in (bounded), then give up."""
        outbox = self._outbox
        if outbox is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(grace):
            # Polled: the state is asyncio's (confirm tasks), and this runs once, at close.
            while not outbox.idle and self.connected:  # noqa: ASYNC110
                await trio.sleep(0.005)
        outbox.cancel()

    def _count_reply(self, done: ReplyDone) -> ReplyDone:
        def counted(error: Exception | None) -> None:
            if error is None:
                self.stats.publishes += 1
            else:
                self.stats.publish_failures += 1
            done(error)

        return counted

    async def queue_exists(self, name: str) -> bool | None:
        """Does queue ``name`` exist (e.g. a caller's reply queue)? None when the broker cannot tell.

        Probed on a connection of its own (adapters/amqp/queue_probe.py says why); without one (a bridge
        built by hand) the answer is None.
        """
        return None if self._probe is None else await self._probe.exists(name)

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
            self._direct.remove(tag)
            try:
                await self._aio(queue.cancel, tag)
            except AmqpUnavailable as exc:
                log.warning("could not cancel consumer on %s: %s", queue.name, exc)
        self._consumer_tags.clear()

    def _require_channel(self) -> aio_pika.abc.AbstractRobustChannel:
        if self._channel is None or self._channel.is_closed:
            raise AmqpUnavailable("channel closed")
        return self._channel

    async def _declare(
        self, kind: str, name: str, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any
    ) -> T:
        try:
            return await self._aio(fn, *args, **kw)
        except AmqpRefused as exc:
            cause = exc.__cause__
            if isinstance(cause, aio_pika.exceptions.ChannelPreconditionFailed):
                raise TopologyConflict(
                    f"RabbitMQ refused to declare {kind} {name!r}: {cause}. A {kind} of that name "
                    f"already exists with other properties (a leftover, e.g. of the Go service): "
                    f"delete it (rabbitmqctl delete_{kind} {name}) or use another name"
                ) from None
            raise

    async def _setup(self, topology: Topology, deliveries: trio.MemorySendChannel[Delivery]) -> None:
        channel = await self._aio(self._connection.channel)
        self._channel = channel
        if topology.manual_ack and self._outbox is not None:
            await self._hook_direct(channel)
            reopened = getattr(channel, "reopen_callbacks", None)
            if reopened is not None:  # a robust channel: its new underlay channel after a reconnect
                reopened.add(self._hook_direct)
        # Per consumer (global_=False): global QoS is denied by default from RabbitMQ 4.3.
        await self._aio(channel.set_qos, prefetch_count=topology.prefetch, global_=False)
        for spec in topology.exchanges:
            await self._declare(
                "exchange",
                spec.name,
                channel.declare_exchange,
                spec.name,
                spec.type,
                durable=spec.durable,
                auto_delete=False,
                arguments=dict(spec.arguments) if spec.arguments else None,
            )
        # Exclusive (transient exclusive queues stay allowed in RabbitMQ 4.x; transient non-exclusive
        # ones are denied from 4.3).
        reply_queue = await self._aio(channel.declare_queue, exclusive=True, auto_delete=True)
        self._reply_queue = reply_queue

        async def on_reply(message: AbstractIncomingMessage) -> None:
            self._on_reply(message)

        await self._aio(reply_queue.consume, on_reply, no_ack=True)
        for queue_spec in topology.consume:
            queue = await self._declare(
                "queue",
                queue_spec.name,
                channel.declare_queue,
                queue_spec.name,
                durable=queue_spec.durable,
                auto_delete=queue_spec.auto_delete,
                arguments=dict(queue_spec.arguments) if queue_spec.arguments else None,
            )
            for exchange in queue_spec.bind_to:
                await self._aio(queue.bind, exchange, routing_key=queue_spec.name)
            consumer = aio_pika_consumer(
                queue_spec.name, deliveries, manual_ack=topology.manual_ack, on_delivery=self._count_delivery
            )
            tag = await self._aio(queue.consume, consumer)
            if topology.manual_ack and self._outbox is not None:
                handler = direct_consumer(
                    queue_spec.name, deliveries, on_delivery=self._count_delivery, reject=self._outbox.reject
                )
                self._direct.add(tag, handler)
            self._consumer_tags.append((queue, tag))

    def _count_delivery(self) -> None:
        self.stats.deliveries += 1

    async def _hook_direct(self, channel: Any) -> None:
        """Request deliveries on ``channel``'s current underlay dispatched inline (direct.py)."""
        try:
            underlay = await channel.get_underlay_channel()
        except (aio_pika.exceptions.AMQPError, RuntimeError) as exc:
            log.debug("deliveries not hooked: %s", exc)
            return
        self._direct.hook(underlay)


def _unavailable(exc: BaseException, timeout: float) -> AmqpUnavailable:
    """What an aio-pika failure means to the daemon (``AmqpRefused`` is one kind)."""
    if isinstance(exc, aio_pika.exceptions.DeliveryError | aio_pika.exceptions.ChannelPreconditionFailed):
        # A nack, or a 406 the message itself caused: the broker is up and said no to this message.
        return AmqpRefused(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError):
        return AmqpUnavailable(f"broker did not answer within {timeout} s")
    return AmqpUnavailable(f"{type(exc).__name__}: {exc}")


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
    """Connect (retrying until it works), declare, consume; the body runs with a live bridge.

    Raises ``TopologyConflict`` (bare, outside the asyncio loop's exception groups) when the broker
    refuses a declaration.
    """
    conflict: TopologyConflict | None = None
    async with trio_asyncio.open_loop() as loop:
        batch_callbacks(loop)
        connection = await _connect(url, retry_every)
        probe = QueueProbe(url, broker_timeout)
        bridge = AmqpBridge(connection, broker_timeout, probe, loop)
        bridge.stats.connects += 1

        def on_reconnect(*_args: object) -> None:
            bridge.stats.reconnects += 1
            log.info("reconnected to the broker")

        connection.reconnect_callbacks.add(on_reconnect)
        send, bridge.deliveries = trio.open_memory_channel[Delivery](backlog)
        try:
            try:
                await bridge._setup(topology, send)
            except TopologyConflict as exc:
                conflict = exc
            else:
                await probe.open()
                yield bridge
        finally:
            send.close()
            await bridge._settle_outbox(broker_timeout)
            await probe.aclose()
            with trio.CancelScope(shield=True), trio.move_on_after(broker_timeout):
                try:
                    await trio_asyncio.aio_as_trio(connection.close)()
                except (aio_pika.exceptions.AMQPError, ConnectionError, OSError, asyncio.CancelledError):
                    pass
    if conflict is not None:
        raise conflict
