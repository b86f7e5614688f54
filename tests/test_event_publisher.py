"""The event publisher never lets one unpublishable event block the rest (issue 14 §5).

"Broker unavailable" is retried in order; "broker refused this message" (a nack, a 406 the message
caused) is dropped and counted; an event over ``max_bytes`` is refused before it is queued. Autojump
tests with a fake sink, and one against the real broker, whose refusal is a ``reject-publish`` queue.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import aio_pika
import attrs
import pytest
import trio
import trio_asyncio

from tests.amqp_vhost import private_vhost
from tests.services import require_rabbitmq
from tts_streamer.adapters.amqp.bridge import AmqpRefused, AmqpUnavailable, Topology, open_amqp_bridge
from tts_streamer.adapters.amqp.event_publisher import EVENT_EXCHANGE, EventPublisher
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.supervisor.ops.metrics import Metrics


def event(kind: str, text: str = "") -> envelope.Event:
    return envelope.make_event(kind, {"id": str(uuid.uuid4()), "total_message": text})


@attrs.define
class FakeSink:
    """Refuses bodies containing ``refuse``; is unavailable while ``down``."""

    refuse: bytes = b"POISON"
    down: bool = False
    sent: list[bytes] = attrs.field(factory=list)
    attempts: int = 0

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
        self.attempts += 1
        await trio.sleep(0.001)
        if self.down:
            raise AmqpUnavailable("connection lost")
        if self.refuse in body:
            raise AmqpRefused("PRECONDITION_FAILED - message size 17000000 is larger than max size")
        self.sent.append(body)


def kinds(sink: FakeSink) -> list[str]:
    return [envelope.parse_event(body).type for body in sink.sent]


async def test_a_refused_event_is_dropped_and_the_next_ones_go_out(autojump_clock: Any) -> None:
    publisher = EventPublisher()
    sink = FakeSink()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.serve, sink)
        publisher.publish(event("message_play_finished", "POISON"))
        publisher.publish(event("speaking_stopped"))
        with trio.fail_after(5):
            await publisher.wait_drained()
        nursery.cancel_scope.cancel()
    assert kinds(sink) == ["speaking_stopped"]
    assert publisher.refused == {("message_play_finished", "broker_refused"): 1}
    assert publisher.published == 1
    assert sink.attempts == 2  # the refused one was not retried


async def test_an_unavailable_broker_is_retried_in_order(autojump_clock: Any) -> None:
    publisher = EventPublisher(retry_every=0.5)
    sink = FakeSink(down=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.serve, sink)
        for kind in ("streaming_created", "message_initiated", "streaming_deleted"):
            publisher.publish(event(kind))
        await trio.sleep(3)
        assert sink.sent == [] and publisher.pending == 3
        sink.down = False
        with trio.fail_after(5):
            await publisher.wait_drained()
        nursery.cancel_scope.cancel()
    assert kinds(sink) == ["streaming_created", "message_initiated", "streaming_deleted"]
    assert not publisher.refused


async def test_an_event_over_max_bytes_is_refused_before_it_is_queued(autojump_clock: Any) -> None:
    publisher = EventPublisher(max_bytes=4096)
    sink = FakeSink()
    metrics = Metrics()
    metrics.attach_broker(None, publisher)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.serve, sink)
        publisher.publish(event("message_play_finished", "x" * 5000))
        assert publisher.pending == 0
        publisher.publish(event("speaking_stopped"))
        with trio.fail_after(5):
            await publisher.wait_drained()
        nursery.cancel_scope.cancel()
    assert kinds(sink) == ["speaking_stopped"]
    assert publisher.refused == {("message_play_finished", "too_large"): 1}
    exposed = metrics.render()[0].decode()
    assert 'tts_streamer_events_refused_total{reason="too_large",type="message_play_finished"} 1.0' in exposed


async def test_the_real_broker_refusing_one_event_does_not_stall_the_rest() -> None:
    """The event exchange is bound to a full ``x-overflow: reject-publish`` queue, so the broker nacks
    the second event; once room is made, the third goes out."""
    require_rabbitmq()
    with private_vhost() as url, trio.fail_after(30):
        async with open_amqp_bridge(url, Topology(), broker_timeout=5) as bridge:
            # Inside the bridge's asyncio loop: a second connection, as a consumer of the events.
            aio = trio_asyncio.aio_as_trio
            connection = await aio(aio_pika.connect)(url)
            try:
                channel = await aio(connection.channel)()
                exchange = await aio(channel.declare_exchange)(EVENT_EXCHANGE, "fanout", durable=True)
                queue = await aio(channel.declare_queue)(
                    exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
                )
                await aio(queue.bind)(exchange)
                publisher = EventPublisher()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publisher.serve, bridge)
                    publisher.publish(event("speaking_started"))
                    publisher.publish(event("message_play_finished", "refused"))
                    await publisher.wait_drained()
                    assert publisher.refused == {("message_play_finished", "broker_refused"): 1}
                    await aio(queue.purge)()
                    publisher.publish(event("speaking_stopped"))
                    await publisher.wait_drained()
                    nursery.cancel_scope.cancel()
                assert publisher.published == 2
                got = []
                while (message := await aio(queue.get)(no_ack=True, fail=False)) is not None:
                    got.append(envelope.parse_event(message.body).type)
                assert got == ["speaking_stopped"]
            finally:
                await aio(connection.close)()


@pytest.mark.parametrize("size", [1 << 20])
def test_default_bound_is_documented(size: int) -> None:
    assert EventPublisher().max_bytes == size
    with open("docs/configuration.md") as docs:
        assert "`EVENT_MAX_BYTES` | `1048576`" in docs.read()
