"""An in-memory broker for ``CommandPlane``: queues with a message TTL, a prefetch window, replies.

``FakeBroker`` implements ``DeliverySource`` the way RabbitMQ behaves for the daemon: a message waits in
its queue until the consumer has room in its prefetch window (unacknowledged deliveries per queue); a
queue with a TTL discards a message that reaches the head older than that, never delivering it; an ack
frees a slot. Callers are modelled by their reply queues (``callers``): a caller that gave up has none.
Everything runs on the Trio clock, so tests use the autojump clock.
"""

from __future__ import annotations

import collections
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from tts_streamer.adapters.amqp.bridge import AmqpUnavailable, Delivery
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response


@attrs.define
class Sent:
    """A request as published by a caller."""

    queue: str
    body: bytes
    reply_to: str | None
    published_at: float
    timestamp: float | None = None
    redelivered: bool = False


@attrs.define
class FakeBroker:
    prefetch: int = 10
    ttl: Mapping[str, float] = attrs.field(factory=dict)  # queue -> x-message-ttl in seconds
    callers: set[str] = attrs.field(factory=set)  # reply queues that exist
    probe_fails: bool = False  # queue_exists cannot tell
    ack_fails: bool = False
    replies: list[tuple[str, Response, float]] = attrs.field(factory=list)  # (reply_to, reply, time)
    expired_in_broker: int = 0
    acked: int = 0
    max_unacked: int = 0
    _waiting: dict[str, collections.deque[Sent]] = attrs.field(factory=dict)
    _unacked: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _send: trio.MemorySendChannel[Delivery] = attrs.field(init=False)
    deliveries: trio.MemoryReceiveChannel[Delivery] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self.deliveries = trio.open_memory_channel[Delivery](math.inf)

    # -- the caller's side ---------------------------------------------------------------------------

    def publish_request(
        self,
        queue: str,
        uri: str,
        method: str = "POST",
        data: Any = None,
        *,
        reply: bool = True,
        timestamp: float | None = None,
        redelivered: bool = False,
    ) -> str | None:
        """Enqueue a request as Go's client sends it; its reply queue name (now existing), or None."""
        reply_to = f"amq.gen-{uuid.uuid4().hex}" if reply else None
        if reply_to is not None:
            self.callers.add(reply_to)
        body = envelope.render_request(envelope.make_request(uri, method, data, publisher="test"))
        sent = Sent(queue, body, reply_to, trio.current_time(), timestamp, redelivered)
        self._waiting.setdefault(queue, collections.deque()).append(sent)
        self._poke()
        return reply_to

    def give_up(self, reply_to: str) -> None:
        """The caller timed out: its exclusive, auto-delete reply queue is gone."""
        self.callers.discard(reply_to)

    def replies_to(self, reply_to: str | None) -> list[Response]:
        return [r for to, r, _ in self.replies if to == reply_to]

    # -- the broker ----------------------------------------------------------------------------------

    def _poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver while the prefetch window has room (per queue); expire at the head past the TTL."""
        while True:
            moved = False
            for queue, waiting in self._waiting.items():
                while waiting and self._unacked[queue] < self.prefetch:
                    sent = waiting.popleft()
                    ttl = self.ttl.get(queue)
                    if ttl is not None and trio.current_time() - sent.published_at >= ttl:
                        self.expired_in_broker += 1
                        continue
                    self._unacked[queue] += 1
                    self.max_unacked = max(self.max_unacked, self._unacked[queue])
                    self._send.send_nowait(
                        Delivery(
                            queue=queue,
                            body=sent.body,
                            reply_to=sent.reply_to,
                            correlation_id=None,
                            headers={},
                            received_at=trio.current_time(),
                            redelivered=sent.redelivered,
                            timestamp=sent.timestamp,
                            token=sent,
                        )
                    )
                    moved = True
            if not moved:
                self._wake = trio.Event()
                # TTLs are checked when a message reaches the head: wake at least every 10 ms.
                with trio.move_on_after(0.01):
                    await self._wake.wait()

    # -- DeliverySource --------------------------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> bool:
        await trio.lowlevel.checkpoint()
        if self.ack_fails:
            return False
        self._unacked[delivery.queue] -= 1
        self.acked += 1
        self._poke()
        return True

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
        await trio.lowlevel.checkpoint()
        self.replies.append((routing_key, envelope.parse_response(body), trio.current_time()))

    def reply(
        self,
        routing_key: str,
        body: bytes,
        *,
        correlation_id: str | None,
        done: Callable[[Exception | None], None],
    ) -> None:
        self.replies.append((routing_key, envelope.parse_response(body), trio.current_time()))
        done(None)

    async def rpc(
        self, routing_key: str, body: bytes, *, exchange: str = "", headers: Mapping[str, Any] | None = None
    ) -> bytes:
        await trio.lowlevel.checkpoint()
        raise AmqpUnavailable("no other pods in the fake")

    async def queue_exists(self, name: str) -> bool | None:
        await trio.sleep(0.001)  # a broker round trip
        if self.probe_fails:
            return None
        return name in self.callers
