"""Acks and replies handed from Trio to aio-pika in batches, without a Trio->asyncio crossing each;
and trio-asyncio's loop running the asyncio callbacks queued in one Trio turn (``batch_callbacks``).

Through ``trio_asyncio.aio_as_trio`` every ack and every reply was a crossing of its own (an asyncio
task, a Trio wait, a ``fail_after``) and every reply held its lane until the broker confirmed it: at
450-550 requests/s the daemon spent most of its time in that machinery, not in the requests (py-spy,
bench/amqp_latency.py). Here the Trio side only appends: ``ack`` and ``reply`` are synchronous. The first
append after an idle spell starts one asyncio task (the *flush*) that writes everything queued by then,
acks first, then replies, in the order they were handed over; whatever is appended while it runs goes in
the same task's next round.

- Acks are written without waiting (the broker never answers one), all of a batch's in one write per
  channel, on the channel their deliveries came on; a delivery whose channel is gone was requeued by
  the broker and comes back marked redelivered, which the command plane drops, so an ack lost there
  cannot make a request run twice.
- A reply is published exactly once (no retry: a lost confirm does not mean a lost message) with the
  same frames ``aio_pika.Exchange.publish`` writes (mandatory, transient, ``text/plain``, the
  correlation id copied; tests/test_amqp_outbox.py compares the bytes), and its confirm is awaited in a
  task of its own, so replies are pipelined: none waits for the confirm of another, and no lane waits
  for its reply's confirm before taking up its next request. ``done`` is called with None once the
  broker confirmed, or with the ``AmqpUnavailable``/``AmqpRefused`` that stopped it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import attrs
import trio
from aiormq.abc import AbstractChannel, ChannelFrame

log = logging.getLogger(__name__)

ReplyDone = Callable[[Exception | None], None]
ErrorMapper = Callable[[BaseException], Exception]


def reply_properties(correlation_id: str | None) -> aiormq.spec.Basic.Properties:
    """What ``aio_pika.Message(body, content_type="text/plain", correlation_id=...,
    delivery_mode=NOT_PERSISTENT).properties`` is, without building a Message per reply."""
    return aiormq.spec.Basic.Properties(
        content_type="text/plain",
        correlation_id=correlation_id,
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        headers={},
        priority=0,
    )


@attrs.define(eq=False)
class _Reply:
    routing_key: str
    body: bytes
    correlation_id: str | None
    done: ReplyDone


@attrs.define(eq=False)
class Outbox:
    """Owned by the bridge; ``channel`` returns the channel to publish on (None: none now)."""

    loop: asyncio.AbstractEventLoop
    channel: Callable[[], aio_pika.abc.AbstractChannel | None]
    timeout: float
    map_error: ErrorMapper
    acks_written: int = 0
    flushes: int = 0  # asyncio tasks started: acks_written + replies per flush is the batching achieved
    _acks: list[tuple[AbstractChannel, int]] = attrs.field(factory=list)
    _replies: list[_Reply] = attrs.field(factory=list)
    _flushing: bool = False
    _tasks: set[asyncio.Task[Any]] = attrs.field(factory=set)

    def ack(self, channel: AbstractChannel, delivery_tag: int) -> None:
        self._acks.append((channel, delivery_tag))
        self._kick()

    def reply(self, routing_key: str, body: bytes, correlation_id: str | None, done: ReplyDone) -> None:
        self._replies.append(_Reply(routing_key, body, correlation_id, done))
        self._kick()

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing waiting for a confirm."""
        return not (self._acks or self._replies or self._tasks)

    def _kick(self) -> None:
        if not self._flushing:
            self._flushing = True
            self._start(self._flush())

    def _start(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        self.flushes += 1
        try:
            while self._acks or self._replies:
                acks, self._acks = self._acks, []
                await self._write_acks(acks)
                replies, self._replies = self._replies, []
                channel = await self._underlay() if replies else None
                for reply in replies:
                    if channel is None or channel.is_closed:
                        _call(reply.done, self.map_error(RuntimeError("channel closed")))
                    else:
                        self._start(self._publish(channel, reply))
        finally:
            # No await between the last emptiness check and this: an append after it starts a flush.
            self._flushing = False

    async def _underlay(self) -> AbstractChannel | None:
        channel = self.channel()
        if channel is None or channel.is_closed:
            return None
        try:
            return await channel.get_underlay_channel()  # what aio_pika.Exchange.publish publishes on
        except aiormq.exceptions.ChannelInvalidStateError:
            return None

    async def _write_acks(self, acks: list[tuple[AbstractChannel, int]]) -> None:
        """The batch's acks as one write per channel: the ``basic.ack`` frames ``basic_ack`` would
        write one by one (one socket write and one writer wake-up each), concatenated."""
        by_channel: dict[AbstractChannel, list[int]] = {}
        for channel, tag in acks:
            by_channel.setdefault(channel, []).append(tag)
        for channel, tags in by_channel.items():
            if channel.is_closed:
                log.debug("%d acks dropped: their channel is gone (the broker requeued them)", len(tags))
                continue
            try:
                # aiormq's write queue is bounded (its frame buffer): this waits only while the socket does.
                write_queue: asyncio.Queue[ChannelFrame] | None = getattr(channel, "write_queue", None)
                if write_queue is None:  # not aiormq's Channel as we know it: one write per ack
                    for tag in tags:
                        await channel.basic_ack(tag)
                else:
                    frames = [aiormq.spec.Basic.Ack(delivery_tag=tag) for tag in tags]
                    await write_queue.put(ChannelFrame.marshall(channel_number=channel.number, frames=frames))
                self.acks_written += len(tags)
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
                log.debug("%d acks failed: %s", len(tags), exc)

    async def _publish(self, channel: AbstractChannel, reply: _Reply) -> None:
        try:
            await channel.basic_publish(
                reply.body,
                exchange="",
                routing_key=reply.routing_key,
                properties=reply_properties(reply.correlation_id),
                mandatory=True,
                timeout=self.timeout,
                # Not waiting for the socket to drain: that wait is under the channel's lock, so it
                # made publishes one per writer round-trip of the loop; the confirm says more anyway.
                wait=False,
            )  # type: ignore[call-arg]  # aiormq's Channel has it; its AbstractChannel does not
        except (asyncio.CancelledError, Exception) as exc:
            _call(reply.done, self.map_error(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            _call(reply.done, None)

    def cancel(self) -> None:
        """The bridge is closing: whatever is still waiting for a confirm is given up."""
        for task in list(self._tasks):
            task.cancel()


CALLBACK_BATCH = 100  # asyncio callbacks run per Trio scheduling turn of the loop, at most


def batch_callbacks(loop: asyncio.AbstractEventLoop, budget: int = CALLBACK_BATCH) -> None:
    """Make the trio-asyncio loop run the asyncio callbacks already queued in one Trio turn.

    trio-asyncio's loop task takes one callback per turn (``_main_loop_one``: a cancel scope and a
    channel receive that yields to Trio, so an epoll and a scheduler pass), and an AMQP delivery, ack
    or confirmed publish is a dozen callbacks: that, not aio-pika, was most of the command plane's CPU
    time. Running what is queued now (``budget`` at most, then Trio runs again) with trio-asyncio's
    own ``_main_loop_one(no_wait=True)`` keeps its semantics (timers, Trio-flavoured handles, stop)
    and cut the CPU per confirmed publish about threefold (bench/NOTES.md). ``call_soon`` also skips
    trio-asyncio's per-callback inspection, as asyncio's own loop does outside debug mode.
    """
    if not all(hasattr(loop, name) for name in ("_main_loop_one", "_q_recv", "_stopped")):
        # Internals of trio-asyncio (pinned <0.17): another version runs unbatched, only slower.
        log.warning("this trio-asyncio has other internals: asyncio callbacks not batched")
        return
    one = loop._main_loop_one  # type: ignore[attr-defined]

    async def batched(no_wait: bool = False) -> None:
        await one(no_wait)
        for _ in range(budget):
            if loop._stopped.is_set():  # type: ignore[attr-defined]
                return
            try:
                # Nothing queued: its receive_nowait raises before touching any state.
                await one(no_wait=True)
            except trio.WouldBlock:
                return

    loop._main_loop_one = batched  # type: ignore[attr-defined]

    if hasattr(loop, "_queue_handle"):
        queue_handle = loop._queue_handle

        def call_soon(callback: Callable[..., object], *args: object, context: Any = None) -> asyncio.Handle:
            # trio-asyncio checks every callback with inspect (iscoroutinefunction): asyncio itself
            # does that only in debug mode, and it was ~5 % of the daemon's time under load.
            return queue_handle(asyncio.Handle(callback, args, loop, context=context))  # type: ignore[no-any-return]

        loop.call_soon = call_soon  # type: ignore[method-assign]


def _call(done: ReplyDone, error: Exception | None) -> None:
    try:
        done(error)
    except Exception:
        log.exception("reply callback failed")
