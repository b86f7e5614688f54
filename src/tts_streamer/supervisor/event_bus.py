"""Fan-out of session events to the daemon's consumers (AMQP publisher, console followers, metrics).

``emit`` never blocks: each subscriber has its own bounded buffer, and a subscriber that falls behind
loses its own oldest events (counted), never anyone else's, and never stalls a session.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import attrs
import trio

from tts_streamer.actors.events import SessionEvent


@attrs.define(eq=False)
class Subscription:
    name: str
    capacity: int
    dropped: int = 0
    _buffer: collections.deque[SessionEvent] = attrs.field(factory=collections.deque)
    _ready: trio.Event = attrs.field(factory=trio.Event)
    _closed: bool = False

    def _put(self, event: SessionEvent) -> None:
        if len(self._buffer) >= self.capacity:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(event)
        self._ready.set()

    def _close(self) -> None:
        self._closed = True
        self._ready.set()

    async def receive(self) -> SessionEvent:
        """The next event; raises trio.EndOfChannel once unsubscribed and drained."""
        while not self._buffer:
            if self._closed:
                raise trio.EndOfChannel
            self._ready = trio.Event()
            await self._ready.wait()
        return self._buffer.popleft()

    def __aiter__(self) -> AsyncIterator[SessionEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SessionEvent]:
        while True:
            try:
                yield await self.receive()
            except trio.EndOfChannel:
                return


@attrs.define
class EventBus:
    """An EventSink for sessions; synchronous listeners run inline, subscribers get buffered copies."""

    emitted: int = 0
    _subscriptions: list[Subscription] = attrs.field(factory=list)
    _listeners: list[Callable[[SessionEvent], None]] = attrs.field(factory=list)

    def emit(self, event: SessionEvent) -> None:
        self.emitted += 1
        for listener in self._listeners:
            listener(event)
        for subscription in self._subscriptions:
            subscription._put(event)

    def add_listener(self, listener: Callable[[SessionEvent], None]) -> None:
        """Call ``listener`` inline for every event (it must be cheap and must not raise)."""
        self._listeners.append(listener)

    @contextmanager
    def subscribe(self, name: str, capacity: int = 1000) -> Iterator[Subscription]:
        subscription = Subscription(name, capacity)
        self._subscriptions.append(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.remove(subscription)
            subscription._close()

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)
