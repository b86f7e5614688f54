"""Publishes voipbin events to the fanout exchange; keeps them (bounded) while the broker is away.

Events leave in order, one at a time, with publisher confirms. Two kinds of failure are told apart:

- the broker is *unavailable* (no connection, no confirm in time): the head event is retried, in order,
  until the broker takes it, so an outage delays events but loses none (up to ``capacity``);
- the broker *refused this message* (a nack, or a channel error the message caused, e.g. a body over
  the broker's ``max_message_size``, 16 MiB by default in RabbitMQ 4.x): sending it again cannot help,
  so it is dropped, logged with its type and counted, and the next event goes out. Nothing one event
  contains can stall the ones behind it (billing's ``speaking_stopped`` included).

An event whose rendered body is over ``max_bytes`` (``EVENT_MAX_BYTES``) is refused before it is queued,
with the same accounting.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import trio

from tts_streamer.adapters.amqp.bridge import AmqpRefused, AmqpUnavailable
from tts_streamer.adapters.voipbin import envelope

log = logging.getLogger(__name__)

EVENT_EXCHANGE = "bin-manager.tts-manager.event"
DEFAULT_MAX_BYTES = 1 << 20


class Sink(Protocol):
    """Where events go (``AmqpBridge``)."""

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        exchange: str = "",
        correlation_id: str | None = None,
        reply_to: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> None: ...


@attrs.define
class EventPublisher:
    """``publish`` never blocks; ``serve`` sends in order, retrying the head while the broker is away
    and dropping (counted) what the broker refuses."""

    capacity: int = 10_000
    retry_every: float = 0.5
    max_bytes: int = DEFAULT_MAX_BYTES
    published: int = 0
    dropped: int = 0  # the buffer was full (an outage longer than ``capacity`` events)
    # (event type, reason) -> count; reason: too_large (over max_bytes), broker_refused
    refused: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter)
    _queue: collections.deque[tuple[str, bytes]] = attrs.field(factory=collections.deque)
    _ready: trio.Event = attrs.field(factory=trio.Event)
    _drained: trio.Event = attrs.field(factory=trio.Event)

    def publish(self, event: envelope.Event) -> None:
        body = envelope.render_event(event)
        if len(body) > self.max_bytes:
            self._refuse(event.type, "too_large", f"{len(body)} bytes, over EVENT_MAX_BYTES={self.max_bytes}")
            return
        if len(self._queue) >= self.capacity:
            self._queue.popleft()
            self.dropped += 1
            log.error("event buffer full: oldest event dropped (%d dropped so far)", self.dropped)
        self._queue.append((event.type, body))
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _refuse(self, event_type: str, reason: str, detail: str) -> None:
        self.refused[(event_type, reason)] += 1
        log.error("event %s dropped (%s): %s", event_type, reason, detail)

    async def serve(self, bridge: Sink) -> None:
        while True:
            while not self._queue:
                self._ready = trio.Event()
                await self._ready.wait()
            event_type, body = self._queue[0]
            try:
                await bridge.publish("", body, exchange=EVENT_EXCHANGE)
            except AmqpRefused as exc:
                self._queue.popleft()
                self._refuse(event_type, "broker_refused", f"{len(body)} bytes: {exc}")
            except AmqpUnavailable as exc:
                log.warning("event publish failed (%s); %d waiting, retrying", exc, len(self._queue))
                await trio.sleep(self.retry_every)
                continue
            else:
                self._queue.popleft()
                self.published += 1
            if not self._queue:
                self._drained.set()

    async def wait_drained(self) -> None:
        """Return once every event handed to ``publish`` so far has been confirmed (or refused)."""
        while self._queue:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()
