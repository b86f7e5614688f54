"""Request deliveries handed to a plain callback in aiormq's channel reader, without aio-pika's tasks.

aio-pika's consumer path costs, per delivery, an asyncio task made by aiormq's reader
(``Channel._on_deliver_frame``: ``create_task(consumer(message))``), a second one made by aio-pika's
``queue.consumer`` around the callback, and an ``IncomingMessage``: at 500 say_add/s that was the
largest single share of the daemon's asyncio time (py-spy, bench/results/2026-12-03-command-plane.md).
The request consumers only copy the message into a ``Delivery`` and hand it to a Trio memory channel
(``send_nowait``), which cannot block, so ``DirectDeliveries`` runs them inline in the reader instead:
the same frames are read the same way (aiormq's own ``__get_content_header`` and ``_read_content``),
the deliveries reach the callback in the broker's order, and nothing is scheduled per delivery.

The consumers themselves stay aio-pika's (``queue.consume``): the robust channel restores them after a
reconnect under the same consumer tag and handles a broker-side cancel, as before. Only the dispatch
of a delivery whose consumer tag is registered here changes, on each aiormq channel that was
``hook``-ed (the bridge hooks the underlay channel at set-up and after every reopen); a delivery on a
channel not hooked yet, or for another tag, takes aio-pika's path, whose consumer builds the same
``Delivery``. A trio-asyncio/aiormq whose internals differ is not hooked (logged once): everything then
runs as before, only slower.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from aiormq.abc import DeliveredMessage

log = logging.getLogger(__name__)

DirectHandler = Callable[[DeliveredMessage], None]

_MARK = "_tts_direct_deliveries"


@attrs.define(eq=False)
class DirectDeliveries:
    handlers: dict[str, DirectHandler] = attrs.field(factory=dict)  # consumer tag -> handler
    direct: int = 0  # deliveries handed over inline (the rest took aio-pika's path)
    _warned: bool = False

    def add(self, consumer_tag: str, handler: DirectHandler) -> None:
        self.handlers[consumer_tag] = handler

    def remove(self, consumer_tag: str) -> None:
        self.handlers.pop(consumer_tag, None)

    def hook(self, channel: Any) -> bool:
        """Dispatch this channel's deliveries for the registered tags inline; False if it cannot be
        (not aiormq's channel as we know it: it keeps aio-pika's path)."""
        if getattr(channel, _MARK, None) is self:
            return True
        original: Callable[[Any], Awaitable[None]] | None = getattr(channel, "_on_deliver_frame", None)
        get_header: Callable[[], Awaitable[Any]] | None = getattr(
            channel, "_Channel__get_content_header", None
        )
        read_content: Callable[[Any, Any], Awaitable[DeliveredMessage]] | None = getattr(
            channel, "_read_content", None
        )
        if original is None or get_header is None or read_content is None or not hasattr(channel, "__dict__"):
            if not self._warned:
                self._warned = True
                log.warning("this aiormq has other internals: deliveries take aio-pika's consumer path")
            return False
        handlers = self.handlers

        async def on_deliver_frame(frame: Any) -> None:
            handler = handlers.get(frame.consumer_tag)
            if handler is None:
                await original(frame)
                return
            # What aiormq's own _on_deliver_frame reads, in the same order, before it makes its task.
            message = await read_content(frame, await get_header())
            self.direct += 1
            try:
                handler(message)
            except Exception:
                # As aiormq logs a failed consumer task: the reader (and the channel) must go on.
                log.exception("delivery handler failed")

        channel._on_deliver_frame = on_deliver_frame
        setattr(channel, _MARK, self)
        return True
