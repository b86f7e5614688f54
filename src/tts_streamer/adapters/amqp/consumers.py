"""How a broker message becomes a ``Delivery`` for the command plane, on either path.

``aio_pika_consumer`` is the callback given to aio-pika's ``queue.consume`` (it is what the robust
channel restores after a reconnect); ``direct_consumer`` is what ``DirectDeliveries`` (direct.py) calls
inline in aiormq's reader for the same consumer tag, without aio-pika's tasks and ``IncomingMessage``.
Both build the same ``Delivery`` and hand it to the Trio side with ``send_nowait``; a delivery the
buffer cannot take is rejected (not requeued) and its caller times out, as before.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiormq
import attrs
import trio
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage

log = logging.getLogger(__name__)


@attrs.frozen
class Delivery:
    queue: str
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    headers: Mapping[str, Any]
    received_at: float  # trio clock
    redelivered: bool = False
    timestamp: float | None = None  # the AMQP ``timestamp`` property (POSIX seconds), where set
    token: object = attrs.field(default=None, eq=False, repr=False)  # what ack() needs (manual ack)


@attrs.frozen
class AckToken:
    """What acknowledging a manual-ack delivery needs: the aiormq channel it came on and its tag."""

    channel: AbstractChannel
    delivery_tag: int


def direct_consumer(
    queue_name: str,
    deliveries: trio.MemorySendChannel[Delivery],
    *,
    on_delivery: Callable[[], None],
    reject: Callable[[AbstractChannel, int], None],
) -> Callable[[DeliveredMessage], None]:
    """aio-pika's consumer below without its tasks and IncomingMessage (manual ack only)."""

    def on_message(message: DeliveredMessage) -> None:
        frame = message.delivery
        assert isinstance(frame, aiormq.spec.Basic.Deliver)  # direct.py hands over deliveries only
        channel = message.channel
        properties = message.header.properties
        tag = frame.delivery_tag or 0
        on_delivery()
        if not _hand_over(
            queue_name,
            deliveries,
            message.body,
            properties.headers,
            properties.reply_to,
            properties.correlation_id,
            properties.timestamp,
            bool(frame.redelivered),
            AckToken(channel, tag),
        ):
            reject(channel, tag)

    return on_message


def aio_pika_consumer(
    queue_name: str,
    deliveries: trio.MemorySendChannel[Delivery],
    *,
    manual_ack: bool,
    on_delivery: Callable[[], None],
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    async def on_message(message: AbstractIncomingMessage) -> None:
        if not manual_ack:
            # At most once, like the Go service: acked before anything is done with it.
            await message.ack()
        token = (
            AckToken(message.channel, message.delivery_tag)
            if manual_ack and message.delivery_tag is not None
            else None
        )
        stamp = message.timestamp
        on_delivery()
        delivered = _hand_over(
            queue_name,
            deliveries,
            message.body,
            message.headers,
            message.reply_to,
            message.correlation_id,
            stamp if isinstance(stamp, datetime.datetime) else None,
            bool(message.redelivered),
            token,
        )
        if not delivered and manual_ack:
            await message.reject(requeue=False)

    return on_message


def _hand_over(
    queue_name: str,
    deliveries: trio.MemorySendChannel[Delivery],
    body: bytes,
    raw_headers: Mapping[str, Any] | None,
    reply_to: str | None,
    correlation_id: str | None,
    stamp: datetime.datetime | None,
    redelivered: bool,
    token: AckToken | None,
) -> bool:
    """Hand one delivery to the Trio side; False if the buffer was full (the caller rejects it)."""
    headers = dict(raw_headers or {})
    # The broker's own arrival stamp (RabbitMQ >= 3.12 message interceptor), in milliseconds.
    stamp_ms = headers.get("timestamp_in_ms")
    delivery = Delivery(
        queue=queue_name,
        body=body,
        reply_to=reply_to or None,
        correlation_id=correlation_id,
        headers=headers,
        received_at=trio.current_time(),
        redelivered=redelivered,
        timestamp=(
            stamp_ms / 1000
            if isinstance(stamp_ms, int) and not isinstance(stamp_ms, bool)
            else stamp.timestamp()
            if stamp is not None
            else None
        ),
        token=token,
    )
    try:
        deliveries.send_nowait(delivery)
    except trio.WouldBlock:
        # Cannot happen while the prefetch window is smaller than the buffer; never run it
        # late: reject it (not requeued) and let its caller time out.
        log.error("request buffer full on %s: request dropped", queue_name)
        return False
    return True
