"""Publishes voipbin events to the fanout exchange; keeps them (bounded) while the broker is away."""

from __future__ import annotations

import collections
import logging

import attrs
import trio

from tts_streamer.adapters.voipbin import envelope
from tts_streamer.supervisor.amqp_bridge import AmqpBridge, AmqpUnavailable

log = logging.getLogger(__name__)

EVENT_EXCHANGE = "bin-manager.tts-manager.event"


@attrs.define
class EventPublisher:
    """``publish`` never blocks; ``serve`` sends in order, retrying the head until the broker takes it."""

    capacity: int = 10_000
    retry_every: float = 0.5
    published: int = 0
    dropped: int = 0
    _queue: collections.deque[bytes] = attrs.field(factory=collections.deque)
    _ready: trio.Event = attrs.field(factory=trio.Event)
    _drained: trio.Event = attrs.field(factory=trio.Event)

    def publish(self, event: envelope.Event) -> None:
        if len(self._queue) >= self.capacity:
            self._queue.popleft()
            self.dropped += 1
            log.error("event buffer full: oldest event dropped (%d dropped so far)", self.dropped)
        self._queue.append(envelope.render_event(event))
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def serve(self, bridge: AmqpBridge) -> None:
        while True:
            while not self._queue:
                self._ready = trio.Event()
                await self._ready.wait()
            try:
                await bridge.publish("", self._queue[0], exchange=EVENT_EXCHANGE)
            except AmqpUnavailable as exc:
                log.warning("event publish failed (%s); %d waiting, retrying", exc, len(self._queue))
                await trio.sleep(self.retry_every)
                continue
            self._queue.popleft()
            self.published += 1
            if not self._queue:
                self._drained.set()

    async def wait_drained(self) -> None:
        """Return once every event handed to ``publish`` so far has been confirmed by the broker."""
        while self._queue:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()
