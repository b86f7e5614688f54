"""What the command plane reads requests from and answers through, and when a request is too old to start.

``DeliverySource`` is the small interface ``CommandPlane`` needs: the AMQP bridge implements it over
RabbitMQ, ``tests/fake_deliveries.py`` in memory (so staleness, flow control and lanes are autojump
tests).

``RequestDeadlines`` decides, when a request is taken up for work, whether its caller can still be
waiting. voipbin's callers give up after ``caller_timeout`` (3 s; call-manager's speech requests after
10 s) counted from their publish, which the request does not carry (Go's client sets no timestamp and
no expiration). What is known:

- the AMQP ``timestamp`` property, where a caller set it (whole seconds);
- the time of receipt here;
- how long the broker may have held it: a queue with a message TTL never delivers an older message,
  so on the per-pod queue at most ``PER_POD_MESSAGE_TTL_MS``; on the shared queue (declared as Go
  declares it, no TTL) anything.

- what cannot be measured: the delivery may sit in the socket and the client library for a while
  before the daemon sees it, when the process is busy (``delivery_allowance``, 0.5 s).

So a request is started only if ``now - received < caller_timeout - broker_wait(queue) -
delivery_allowance`` (and its timestamp, if any, is younger than ``caller_timeout``): on the per-pod
queue that keeps its start before its caller's deadline. A broker that stamps messages on arrival
(RabbitMQ >= 3.12: ``message_interceptors.incoming.set_header_timestamp.overwrite = false`` adds the
``timestamp_in_ms`` header) makes the first rule exact, whatever the queue.

On the shared queue the receipt bound alone cannot, so creates there (the
requests whose late execution does harm) also ask the broker whether the caller's reply queue still
exists (server-named, exclusive, auto-delete: it goes away when the caller gives up).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import attrs
import trio

from tts_streamer.adapters.amqp.bridge import Delivery
from tts_streamer.adapters.amqp.event_publisher import Sink
from tts_streamer.adapters.voipbin.routes import RouteName
from tts_streamer.supervisor.config import DELIVERY_ALLOWANCE

# Creating a streaming dials a call leg and makes call-manager create an external media: run late, for
# a caller that gave up, it makes an orphan nobody deletes. These routes check their caller is there.
CREATE_ROUTES: Final = frozenset({RouteName.STREAMING_CREATE, RouteName.SPEAKING_CREATE})
SPEECH_CALLER_TIMEOUT: Final = 10.0  # call-manager's talk action waits 10 s for POST /v1/speeches


class DeliverySource(Sink, Protocol):
    """Requests in, replies and forwarded requests out (``AmqpBridge`` is one); ``publish`` is the
    event publisher's ``Sink``."""

    deliveries: trio.MemoryReceiveChannel[Delivery]

    async def ack(self, delivery: Delivery) -> bool:
        """Acknowledge a delivery when it is taken up; False if that is no longer possible."""
        ...

    def reply(
        self,
        routing_key: str,
        body: bytes,
        *,
        correlation_id: str | None,
        done: Callable[[Exception | None], None],
    ) -> None:
        """Publish a reply once, without waiting; ``done(None)`` when the broker took it,
        ``done(AmqpUnavailable)`` when it did not."""
        ...

    async def rpc(
        self, routing_key: str, body: bytes, *, exchange: str = "", headers: Mapping[str, Any] | None = None
    ) -> bytes: ...

    async def queue_exists(self, name: str) -> bool | None:
        """Whether a queue (a caller's reply queue) exists; None when it cannot be told."""
        ...


@attrs.frozen
class RequestDeadlines:
    caller_timeout: float = 3.0
    # queue name -> the longest the broker may have held a request on it (its x-message-ttl)
    broker_wait: Mapping[str, float] = attrs.field(factory=dict)
    route_timeouts: Mapping[RouteName, float] = attrs.field(
        factory=lambda: {RouteName.SPEECH_CREATE: SPEECH_CALLER_TIMEOUT}
    )
    delivery_allowance: float = DELIVERY_ALLOWANCE
    wall_clock: Callable[[], float] = time.time

    def timeout(self, route: RouteName | None) -> float:
        return self.route_timeouts.get(route, self.caller_timeout) if route else self.caller_timeout

    def local_budget(self, delivery: Delivery, route: RouteName | None) -> float:
        """How long the request may wait here, after receipt, before it must not be started."""
        return self.timeout(route) - self.broker_wait.get(delivery.queue, 0.0) - self.delivery_allowance

    def expired(self, delivery: Delivery, route: RouteName | None, now: float) -> str | None:
        """Why the request's caller can no longer be waiting (``timestamp``, ``timeout``), or None."""
        if delivery.timestamp is not None and self.wall_clock() - delivery.timestamp >= self.timeout(route):
            return "timestamp"
        if now - delivery.received_at >= self.local_budget(delivery, route):
            return "timeout"
        return None
