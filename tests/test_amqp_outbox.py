"""Acks and replies in batches (adapters/amqp/outbox.py) and trio-asyncio's callbacks per Trio turn.

The bridge no longer crosses from Trio to asyncio once per ack and once per reply, and a lane no longer
waits for its reply's confirm: these check that what the batching changes keeps what the command plane
guarantees (issue 14): every request answered exactly once, in order per streaming, acks written (the
broker holds nothing unacknowledged afterwards), a stale request in the middle of a burst answered
REQUEST_EXPIRED, and replies byte-identical to what aio-pika's ``Exchange.publish`` wrote.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import uuid
from typing import Any

import aio_pika
import pamqp.frame
import pytest
import trio
import trio_asyncio
from aio_pika.abc import AbstractIncomingMessage
from pamqp.header import ContentHeader

from tests.amqp_vhost import private_amqp_url
from tests.services import require_rabbitmq
from tts_streamer.adapters.amqp.bridge import (
    AmqpUnavailable,
    QueueSpec,
    Topology,
    open_amqp_bridge,
)
from tts_streamer.adapters.amqp.outbox import batch_callbacks, reply_properties
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.adapters.voipbin.routes import RouteName
from tts_streamer.supervisor.services.command_plane import CommandPlane, RouteCall

__all__ = ["private_amqp_url"]

QUEUE = "tts-outbox-test.requests"


def header_bytes(properties: Any, body_size: int) -> bytes:
    return pamqp.frame.marshal(ContentHeader(0, body_size, properties), 1)


@pytest.mark.parametrize("correlation_id", [None, "", "7f3c-12"])
def test_reply_header_is_the_one_aio_pika_wrote(correlation_id: str | None) -> None:
    """The content header of a reply, byte for byte, as ``AmqpBridge.publish`` (an aio-pika Message)
    builds it; the method frame (default exchange, the reply queue, mandatory) is the same call."""
    message = aio_pika.Message(
        b"{}",
        content_type="text/plain",
        correlation_id=correlation_id,
        reply_to=None,
        headers=None,
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
    )
    assert header_bytes(reply_properties(correlation_id), 2) == header_bytes(message.properties, 2)


async def test_queued_asyncio_callbacks_run_in_one_trio_turn_but_bounded() -> None:
    """Without the batching each asyncio callback costs a Trio turn (a jump of 1 per checkpoint here);
    with it a turn runs what is queued, at most ``budget``, and Trio tasks still run in between."""
    async with trio_asyncio.open_loop() as loop:
        batch_callbacks(loop, budget=50)
        ran: list[int] = []
        for index in range(400):
            loop.call_soon(ran.append, index)
        fired = trio.Event()
        loop.call_later(0.01, fired.set)  # timers keep working
        seen = [0]
        while len(ran) < 400:
            await trio.lowlevel.checkpoint()
            seen.append(len(ran))
        jumps = [b - a for a, b in itertools.pairwise(seen)]
        assert ran == list(range(400)), "callbacks ran out of order or twice"
        # Trio orders each batch of runnable tasks at random, so the loop may take two turns between
        # two of ours: one callback per turn shows as jumps of 1 or 2, a budget of 50 as 102 at most.
        assert max(jumps) > 2, "one callback per Trio turn: not batched"
        assert max(jumps) <= 2 * 51, "a turn ran more than its budget: Trio tasks would starve"
        with trio.fail_after(2):
            await fired.wait()


@pytest.fixture
def broker() -> None:
    require_rabbitmq()


@pytest.mark.realtime
@pytest.mark.usefixtures("broker")
async def test_a_burst_is_answered_once_each_in_order_per_streaming_and_all_acked(
    private_amqp_url: str,
) -> None:
    streamings = [uuid.uuid4() for _ in range(4)]
    handled: dict[uuid.UUID, list[int]] = collections.defaultdict(list)

    async def get(call: RouteCall) -> Response:
        handled[call.id].append(int(call.delivery.correlation_id or "-1"))
        await trio.lowlevel.checkpoint()  # others run meanwhile: order must come from the lane, not luck
        return envelope.ok({"id": str(call.id)})

    topology = Topology(
        consume=(QueueSpec(QUEUE, durable=False, auto_delete=False),), prefetch=25, manual_ack=True
    )
    aio = trio_asyncio.aio_as_trio
    replies: list[tuple[str, int, AbstractIncomingMessage]] = []
    count = 300
    stale = 137  # its AMQP timestamp is older than the caller's timeout: REQUEST_EXPIRED, never run
    with trio.fail_after(60):
        async with (
            open_amqp_bridge(private_amqp_url, topology) as bridge,
            trio.open_nursery() as nursery,
        ):
            plane = CommandPlane(bridge, {RouteName.STREAMING_GET: get}, pod_id="outbox-test")
            await nursery.start(plane.serve)
            connection = await aio(aio_pika.connect)(private_amqp_url)
            try:
                channel = await aio(connection.channel)(publisher_confirms=False)
                reply_queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
                all_in = trio.Event()

                async def on_reply(message: AbstractIncomingMessage) -> None:
                    status = envelope.parse_response(message.body).status_code
                    replies.append((message.correlation_id or "", status, message))
                    if len(replies) == count:
                        all_in.set()

                await aio(reply_queue.consume)(on_reply, no_ack=True)
                publish = aio(channel.default_exchange.publish)
                old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=30)
                for index in range(count):
                    sid = streamings[index % len(streamings)]
                    body = envelope.render_request(envelope.make_request(f"/v1/streamings/{sid}", "GET"))
                    message = aio_pika.Message(
                        body,
                        content_type="text/plain",
                        reply_to=reply_queue.name,
                        correlation_id=str(index),
                        timestamp=old if index == stale else None,
                    )
                    await publish(message, routing_key=QUEUE)
                await all_in.wait()
                await trio.sleep(0.3)  # room for a duplicate to show up
            finally:
                await aio(connection.close)()
            nursery.cancel_scope.cancel()
        # After the bridge closed: whatever it left unacknowledged would be back in the queue.
        async with trio_asyncio.open_loop():
            connection = await aio(aio_pika.connect)(private_amqp_url)
            try:
                channel = await aio(connection.channel)()
                queue = await aio(channel.declare_queue)(QUEUE, passive=True)
                left = queue.declaration_result.message_count
                await aio(queue.delete)(if_unused=False, if_empty=False)
            finally:
                await aio(connection.close)()
    by_id = collections.Counter(cid for cid, _, _ in replies)
    assert len(replies) == count and set(by_id.values()) == {1}, "a request answered twice or never"
    statuses = {int(cid): status for cid, status, _ in replies}
    assert statuses[stale] == 503
    assert all(status == 200 for index, status in statuses.items() if index != stale)
    assert stale not in [n for ran in handled.values() for n in ran], "an expired request was run"
    for sid, ran in handled.items():
        assert ran == sorted(ran), f"streaming {sid} handled out of order"
    for sid in streamings:  # replies leave in the order their lane produced them
        answered = [int(cid) for cid, _, message in replies if str(sid) in message.body.decode()]
        assert answered == sorted(answered)
    assert plane.stats.replies == count and plane.stats.reply_failures == 0
    assert plane.stats.not_started["timestamp"] == 1
    assert left == 0, f"{left} deliveries were never acknowledged"
    first = replies[0][2]
    assert first.content_type == "text/plain" and first.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT


@pytest.mark.realtime
@pytest.mark.usefixtures("broker")
async def test_a_reply_with_no_channel_fails_once_and_is_counted(private_amqp_url: str) -> None:
    outcomes: list[Exception | None] = []
    with trio.fail_after(20):
        async with open_amqp_bridge(private_amqp_url, Topology()) as bridge:
            assert bridge._channel is not None
            await trio_asyncio.aio_as_trio(bridge._channel.close)()
            bridge.reply("nowhere", b"{}", correlation_id="1", done=outcomes.append)
            while not outcomes:  # noqa: ASYNC110 (a callback from asyncio, not a Trio event)
                await trio.sleep(0.01)
            await trio.sleep(0.1)
    assert len(outcomes) == 1 and isinstance(outcomes[0], AmqpUnavailable)
    assert bridge.stats.publish_failures == 1 and bridge.stats.publishes == 0
