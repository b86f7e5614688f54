"""Deliveries handed over inline (adapters/amqp/direct.py) and replies written in batches with their
confirms watched by callbacks (``Outbox._publish_batch``).

What they must keep: every delivery reaches the command plane once and in the broker's order, acks
only for what was handed to them, each reply published exactly once and settled (``done``) exactly
once, whether the broker acks it, nacks it, the channel goes away mid-batch or no confirm comes in
time; and on the wire the same frames as aiormq's ``basic_publish`` (checked against the broker).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq
import pamqp.frame
import pytest
import trio
import trio_asyncio
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from tests.amqp_vhost import private_amqp_url
from tests.services import require_rabbitmq
from tts_streamer.adapters.amqp import reply_frames
from tts_streamer.adapters.amqp.bridge import (
    AmqpRefused,
    AmqpUnavailable,
    QueueSpec,
    Topology,
    open_amqp_bridge,
)
from tts_streamer.adapters.amqp.direct import DirectDeliveries
from tts_streamer.adapters.amqp.outbox import Outbox, _Reply, reply_properties
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.adapters.voipbin.routes import RouteName
from tts_streamer.supervisor.services.command_plane import CommandPlane, RouteCall

__all__ = ["private_amqp_url"]

QUEUE = "tts-direct-test.requests"


# -- DirectDeliveries on a stand-in for aiormq's channel ------------------------------------------------


class ReaderChannel:
    """The three things of aiormq's Channel that ``DirectDeliveries.hook`` uses."""

    def __init__(self) -> None:
        self.frames: collections.deque[Any] = collections.deque()
        self.slow: list[Any] = []  # what aiormq's own _on_deliver_frame got

    async def _on_deliver_frame(self, frame: Any) -> None:
        # aiormq's own: reads the header and the body, then makes its task (not modelled).
        self.frames.popleft()
        self.frames.popleft()
        self.slow.append(frame)

    async def _Channel__get_content_header(self) -> Any:  # aiormq's name, mangled
        return self.frames.popleft()

    async def _read_content(self, frame: Any, header: Any) -> aiormq.abc.DeliveredMessage:
        channel: Any = self
        return aiormq.abc.DeliveredMessage(
            delivery=frame, header=header, body=self.frames.popleft(), channel=channel
        )


def test_registered_consumers_get_their_deliveries_inline_in_order_others_keep_aiormqs_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = ReaderChannel()
    direct = DirectDeliveries()
    got: list[bytes] = []

    def handler(message: aiormq.abc.DeliveredMessage) -> None:
        if message.body == b"boom":
            raise ValueError("handler bug")
        got.append(message.body)

    direct.add("ours", handler)
    assert direct.hook(channel) and direct.hook(channel), "hooking twice must be harmless"

    async def read(tag: str, delivery_tag: int, body: bytes) -> None:
        channel.frames.extend([ContentHeader(body_size=len(body)), body])
        await channel._on_deliver_frame(spec.Basic.Deliver(consumer_tag=tag, delivery_tag=delivery_tag))

    async def main() -> None:
        await read("ours", 1, b"a")
        await read("theirs", 2, b"x")
        await read("ours", 3, b"boom")  # a failing handler is logged; the reader goes on
        await read("ours", 4, b"b")
        direct.remove("ours")
        await read("ours", 5, b"c")  # cancelled consumer: aiormq's path again

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert got == [b"a", b"b"]
    assert [frame.delivery_tag for frame in channel.slow] == [2, 5]
    assert direct.direct == 3
    assert "delivery handler failed" in caplog.text
    assert not channel.frames, "a frame was left unread: the reader would be out of step"


def test_a_channel_without_those_internals_is_left_alone() -> None:
    class Other:
        __slots__ = ("_on_deliver_frame",)

    other = Other()
    assert not DirectDeliveries().hook(other)


# -- Outbox._publish_batch on a stand-in for aiormq's channel ------------------------------------------


class PublishChannel:
    """What ``_publish_batch`` uses of aiormq's Channel, its write queue kept for inspection."""

    number = 3
    publisher_confirms = True
    is_closed = False
    max_content_size = 100
    _split_body = aiormq.Channel._split_body

    def __init__(self, fail: str | None = None) -> None:
        self.delivery_tag = 41  # publishes before this batch (events, RPC) used the tags up to 41
        self.confirmations: dict[int, asyncio.Future[Any]] = {}
        self.message_id_delivery_tag: dict[str, int] = {}
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue()
        self.fail = fail  # "write": the connection is lost under the write; "lock": it cannot be had
        if fail == "write":
            self.write_queue.put = self._refuse  # type: ignore[method-assign,assignment]

    async def _refuse(self, _frame: Any) -> None:
        raise aiormq.exceptions.ChannelInvalidStateError("connection lost")

    @property
    @asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        if self.fail == "lock":
            raise TimeoutError  # what asyncio.timeout raises while another publish holds the lock
        yield

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()


def unmarshal_all(payload: bytes) -> list[Any]:
    frames = []
    while payload:
        consumed, channel, frame = pamqp.frame.unmarshal(payload)
        assert channel == PublishChannel.number
        frames.append(frame)
        payload = payload[consumed:]
    return frames


def outbox_for(loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> Outbox:
    return Outbox(loop, lambda: None, timeout, lambda exc: AmqpUnavailable(f"{type(exc).__name__}: {exc}"))


def test_a_reply_batch_is_one_write_with_its_acks_and_each_reply_settles_exactly_once() -> None:
    outcomes: dict[str, list[Exception | None]] = collections.defaultdict(list)
    bodies = {f"q{n}": (b"%d" % n) * (1 + 60 * n) for n in range(4)}  # q2, q3: over one body frame
    replies = [_Reply(key, body, f"c-{key}", outcomes[key].append) for key, body in bodies.items()]

    async def main() -> PublishChannel:
        channel = PublishChannel()
        outbox = outbox_for(asyncio.get_running_loop())
        await outbox._publish_batch(channel, replies, [7, 9])
        assert channel.write_queue.qsize() == 1, "not one write"
        frames = unmarshal_all(channel.write_queue.get_nowait().payload)
        assert [type(f) for f in frames[:2]] == [spec.Basic.Ack, spec.Basic.Ack]
        assert [f.delivery_tag for f in frames[:2]] == [7, 9] and not any(f.multiple for f in frames[:2])
        published: list[tuple[str, str | None, str | None, bytes]] = []
        rest = frames[2:]
        while rest:
            publish, header, *rest = rest
            assert isinstance(publish, spec.Basic.Publish) and isinstance(header, ContentHeader)
            assert publish.exchange == "" and publish.mandatory and not publish.immediate
            body = b""
            while len(body) < header.body_size:
                part, *rest = rest
                assert isinstance(part, ContentBody)
                body += part.value
            props = header.properties
            assert props.content_type == "text/plain" and props.delivery_mode == 1
            published.append((publish.routing_key, props.correlation_id, props.message_id, body))
        assert [(key, cid, body) for key, cid, _, body in published] == [
            (key, f"c-{key}", body) for key, body in bodies.items()
        ]
        message_ids = [mid or "" for *_, mid, _ in published]
        assert all(mid and len(mid) == 32 for mid in message_ids) and len(set(message_ids)) == 4
        # Registered where aiormq's reader settles them: the next four delivery tags.
        assert sorted(channel.confirmations) == [42, 43, 44, 45] and channel.delivery_tag == 45
        assert {channel.message_id_delivery_tag[mid] for mid in message_ids} == {42, 43, 44, 45}
        assert not any(outcomes.values()) and not outbox.idle
        # The broker: q0 acked, q1 nacked, then the channel closes (aiormq fails what is left).
        channel.confirmations.pop(42).set_result(spec.Basic.Ack(delivery_tag=42))
        channel.confirmations.pop(43).set_exception(aiormq.exceptions.DeliveryError(None, spec.Basic.Nack()))
        for confirmation in channel.confirmations.values():
            confirmation.set_exception(aiormq.exceptions.ChannelInvalidStateError("connection lost"))
        await asyncio.sleep(0)
        assert outbox.idle and outbox.acks_written == 2 and outbox.reply_writes == 1
        return channel

    channel = asyncio.run(main())
    assert {key: len(got) for key, got in outcomes.items()} == dict.fromkeys(bodies, 1), "settled twice"
    assert outcomes["q0"] == [None]
    assert all(isinstance(outcomes[key][0], AmqpUnavailable) for key in ("q1", "q2", "q3"))
    assert not channel.message_id_delivery_tag, "message ids left behind (aiormq forgets them too)"


async def test_each_batch_expires_at_its_own_deadline_with_one_timer(autojump_clock: trio.abc.Clock) -> None:
    """On trio-asyncio's loop (as in the daemon), so the autojump clock drives the timeout."""
    outcomes: dict[str, list[Exception | None]] = collections.defaultdict(list)
    aio = trio_asyncio.aio_as_trio
    async with trio_asyncio.open_loop() as loop:
        channel = PublishChannel()
        outbox = outbox_for(loop, timeout=1.0)
        await aio(outbox._publish_batch)(channel, [_Reply("a", b"{}", None, outcomes["a"].append)], [])
        await trio.sleep(0.5)
        await aio(outbox._publish_batch)(channel, [_Reply("b", b"{}", None, outcomes["b"].append)], [])
        await trio.sleep(0.6)  # a's deadline has passed, b's has not
        assert len(outcomes["a"]) == 1 and isinstance(outcomes["a"][0], AmqpUnavailable)
        assert not outcomes["b"] and not outbox.idle
        channel.confirmations[43].set_result(spec.Basic.Ack(delivery_tag=43))
        await trio.sleep(0.01)  # the done-callback runs on the asyncio loop's next turn
        assert outcomes["b"] == [None]
        await trio.sleep(2)  # b's deadline: nothing more is called, and no timer is left armed
        assert outcomes == {"a": outcomes["a"], "b": [None]} and outbox.idle and outbox._timer is None


def test_a_batch_whose_confirms_do_not_come_fails_after_the_timeout_once_and_ignores_a_late_one() -> None:
    outcomes: list[Exception | None] = []

    async def main() -> None:
        channel = PublishChannel()
        outbox = outbox_for(asyncio.get_running_loop(), timeout=0.05)
        await outbox._publish_batch(channel, [_Reply("q", b"{}", None, outcomes.append)], [])
        await asyncio.sleep(0.2)
        assert outcomes and outbox.idle
        late = channel.confirmations.pop(42)
        assert late.cancelled()  # aiormq's reader then drops the broker's ack, as after its own timeout
        await asyncio.sleep(0)

    asyncio.run(main())
    assert len(outcomes) == 1 and isinstance(outcomes[0], AmqpUnavailable)
    assert "did not answer" in str(outcomes[0]) or "Timeout" in str(outcomes[0])


@pytest.mark.parametrize("fail", ["write", "lock"])
def test_a_batch_the_broker_never_saw_gives_its_tags_back_and_fails_each_reply_once(fail: str) -> None:
    outcomes: list[Exception | None] = []

    async def main() -> tuple[PublishChannel, Outbox]:
        channel = PublishChannel(fail=fail)
        outbox = outbox_for(asyncio.get_running_loop())
        replies = [_Reply(f"q{n}", b"{}", None, outcomes.append) for n in range(3)]
        await outbox._publish_batch(channel, replies, [5, 6])
        assert outbox.idle
        return channel, outbox

    channel, outbox = asyncio.run(main())
    assert len(outcomes) == 3 and all(isinstance(o, AmqpUnavailable) for o in outcomes)
    assert channel.delivery_tag == 41 and not channel.confirmations and not channel.message_id_delivery_tag
    if fail == "lock":
        # The channel is fine, only busy: the deliveries were worked, so their acks go out on their own.
        frames = unmarshal_all(channel.write_queue.get_nowait().payload)
        assert [(type(f), f.delivery_tag) for f in frames] == [(spec.Basic.Ack, 5), (spec.Basic.Ack, 6)]
        assert outbox.acks_written == 2
    else:
        assert outbox.acks_written == 0


def test_a_nack_is_refused() -> None:
    """A nack maps to ``AmqpRefused`` through the bridge's own mapper (the daemon's accounting)."""
    from tts_streamer.adapters.amqp.bridge import _unavailable

    outcomes: list[Exception | None] = []

    async def main() -> None:
        channel = PublishChannel()
        outbox = Outbox(asyncio.get_running_loop(), lambda: None, 5.0, lambda exc: _unavailable(exc, 5.0))
        await outbox._publish_batch(channel, [_Reply("q", b"{}", None, outcomes.append)], [])
        channel.confirmations.pop(42).set_exception(aiormq.exceptions.DeliveryError(None, spec.Basic.Nack()))
        await asyncio.sleep(0)

    asyncio.run(main())
    assert len(outcomes) == 1 and isinstance(outcomes[0], AmqpRefused)


# -- the bridge against the broker --------------------------------------------------------------------


@pytest.fixture
def broker() -> None:
    require_rabbitmq()


@pytest.mark.realtime
@pytest.mark.usefixtures("broker")
async def test_a_burst_goes_inline_batched_and_each_reply_is_what_aio_pika_would_have_published(
    private_amqp_url: str,
) -> None:
    sid = uuid.uuid4()

    async def get(call: RouteCall) -> Response:
        await trio.lowlevel.checkpoint()
        return envelope.ok({"id": str(call.id)})

    topology = Topology(
        consume=(QueueSpec(QUEUE, durable=False, auto_delete=True),), prefetch=20, manual_ack=True
    )
    aio = trio_asyncio.aio_as_trio
    count = 200
    replies: list[AbstractIncomingMessage] = []
    with trio.fail_after(60):
        async with open_amqp_bridge(private_amqp_url, topology) as bridge, trio.open_nursery() as nursery:
            plane = CommandPlane(bridge, {RouteName.STREAMING_GET: get}, pod_id="direct-test")
            await nursery.start(plane.serve)
            connection = await aio(aio_pika.connect)(private_amqp_url)
            try:
                channel = await aio(connection.channel)(publisher_confirms=False)
                reply_queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
                all_in = trio.Event()

                async def on_reply(message: AbstractIncomingMessage) -> None:
                    replies.append(message)
                    if len(replies) == count + 1:
                        all_in.set()

                await aio(reply_queue.consume)(on_reply, no_ack=True)
                body = envelope.render_request(envelope.make_request(f"/v1/streamings/{sid}", "GET"))
                for index in range(count):
                    message = aio_pika.Message(
                        body, content_type="text/plain", reply_to=reply_queue.name, correlation_id=str(index)
                    )
                    await aio(channel.default_exchange.publish)(message, routing_key=QUEUE)
                while len(replies) < count:  # noqa: ASYNC110 (filled by an asyncio consumer)
                    await trio.sleep(0.01)
                # The reference: the same reply through aio-pika's Exchange.publish (AmqpBridge.publish).
                await bridge.publish(
                    reply_queue.name,
                    envelope.render_response(envelope.ok({"id": str(sid)})),
                    correlation_id="ref",
                )
                await all_in.wait()
                await trio.sleep(0.3)  # room for a duplicate
            finally:
                await aio(connection.close)()
            outbox = bridge._outbox
            assert outbox is not None
            direct, reply_writes = bridge._direct.direct, outbox.reply_writes
            nursery.cancel_scope.cancel()
    reference = replies.pop()
    assert reference.correlation_id == "ref"
    assert collections.Counter(m.correlation_id for m in replies) == {str(n): 1 for n in range(count)}
    assert direct == count, "deliveries took aio-pika's path"
    assert reply_writes < count, "replies were written one at a time"
    assert plane.stats.replies == count and plane.stats.reply_failures == 0

    def wire(message: AbstractIncomingMessage) -> dict[str, Any]:
        info: dict[str, Any] = dict(message.info())
        for key in ("message_id", "correlation_id", "delivery_tag", "consumer_tag", "routing_key"):
            info.pop(key, None)
        return info | {"body": message.body}

    assert all(wire(message) == wire(reference) for message in replies)
    assert len({m.message_id for m in replies} | {reference.message_id}) == count + 1


# -- reply_frames: pamqp's bytes, written directly ----------------------------------------------------------


@pytest.mark.parametrize("body_size", [0, 1, 49, 50, 51, 100, 149])
@pytest.mark.parametrize("correlation_id", [None, "", "7f3c-12", "é" * 20, "x" * 255])
def test_reply_frames_are_the_bytes_channel_frame_marshall_writes(
    body_size: int, correlation_id: str | None
) -> None:
    class Split:
        max_content_size = 50

    body = bytes(range(256))[:body_size] if body_size <= 256 else b""
    msg_id = reply_frames.message_id()
    properties = reply_properties(correlation_id)
    properties.message_id = msg_id
    frames: list[Any] = [
        spec.Basic.Publish(exchange="", routing_key="amq.gen-Xy_1", mandatory=True),
        ContentHeader(properties=properties, body_size=len(body)),
        *aiormq.Channel._split_body(Split(), body),  # type: ignore[arg-type]
    ]
    expected = ChannelFrame.marshall(channel_number=7, frames=frames).payload
    assert reply_frames.reply_frames(7, "amq.gen-Xy_1", body, correlation_id, msg_id, 50) == expected


def test_reply_frames_leave_an_over_long_short_string_to_pamqp_and_acks_are_pamqps_too() -> None:
    assert reply_frames.reply_frames(1, "q", b"{}", "x" * 256, reply_frames.message_id(), 100) is None
    assert reply_frames.reply_frames(1, "é" * 128, b"{}", None, reply_frames.message_id(), 100) is None
    tags = [1, 2, 2**40]
    expected = ChannelFrame.marshall(channel_number=9, frames=[spec.Basic.Ack(delivery_tag=t) for t in tags])
    assert reply_frames.ack_frames(9, tags) == expected.payload


def test_message_ids_are_aiormqs_uuid4_hex() -> None:
    for seed in range(200):
        random.seed(seed)
        ours = reply_frames.message_id()
        random.seed(seed)
        assert ours == uuid.UUID(int=random.getrandbits(128), version=4).hex
