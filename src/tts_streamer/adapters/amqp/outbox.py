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
  correlation id copied, a random message id; tests/test_amqp_outbox.py and test_amqp_direct.py
  compare them). All of a round's replies, after the acks of their channel, go out in one socket write
  (``_publish_batch``: aiormq's ``basic_publish`` bookkeeping for many messages under one hold of the
  channel lock), and each reply's confirm is watched by a callback on aiormq's confirmation future,
  not a task: replies are pipelined, none waits for the confirm of another, and no lane waits for its
  reply's confirm before taking up its next request. ``done`` is called once per reply: with None
  once the broker confirmed it, or with the ``AmqpUnavailable``/``AmqpRefused`` that stopped it (a
  nack, the channel closing, no confirm within ``timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import attrs
import trio
from aiormq.abc import AbstractChannel, ChannelFrame
from pamqp.header import ContentHeader

from tts_streamer.adapters.amqp.reply_frames import ack_frames, message_id, reply_frames

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
    reply_writes: int = 0  # socket writes of replies (one per flush round with replies, when batched)
    _acks: list[tuple[AbstractChannel, int]] = attrs.field(factory=list)
    _replies: list[_Reply] = attrs.field(factory=list)
    _flushing: bool = False
    _tasks: set[asyncio.Task[Any]] = attrs.field(factory=set)
    _unconfirmed: set[asyncio.Future[Any]] = attrs.field(factory=set)
    # Batches by deadline, oldest first, and the one timer that expires them (armed for the oldest):
    # a timer per batch was ~1 % of the daemon's time (trio-asyncio's call_at and cancel).
    _deadlines: collections.deque[tuple[float, list[asyncio.Future[Any]]]] = attrs.field(
        factory=collections.deque
    )
    _timer: asyncio.TimerHandle | None = None

    def ack(self, channel: AbstractChannel, delivery_tag: int) -> None:
        self._acks.append((channel, delivery_tag))
        self._kick()

    def reply(self, routing_key: str, body: bytes, correlation_id: str | None, done: ReplyDone) -> None:
        self._replies.append(_Reply(routing_key, body, correlation_id, done))
        self._kick()

    def reject(self, channel: AbstractChannel, delivery_tag: int) -> None:
        """Reject (not requeued) a delivery that could not be handed over; rare, so a task of its own."""
        self._start(self._reject(channel, delivery_tag))

    async def _reject(self, channel: AbstractChannel, delivery_tag: int) -> None:
        try:
            await channel.basic_reject(delivery_tag, requeue=False)
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            log.debug("reject failed: %s", exc)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing waiting for a confirm."""
        return not (self._acks or self._replies or self._tasks or self._unconfirmed)

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
                replies, self._replies = self._replies, []
                channel = await self._underlay() if replies else None
                if channel is not None and not channel.is_closed and _can_batch(channel):
                    # The acks of the replies' channel (all of them, as a rule) go in the same write.
                    along = [tag for ack_channel, tag in acks if ack_channel is channel]
                    await self._write_acks([ack for ack in acks if ack[0] is not channel])
                    await self._publish_batch(channel, replies, along)
                    continue
                await self._write_acks(acks)
                if channel is None or channel.is_closed:
                    for reply in replies:
                        _call(reply.done, self.map_error(RuntimeError("channel closed")))
                else:  # not aiormq's Channel as we know it: one publish (and task) per reply
                    for reply in replies:
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

    async def _publish_batch(self, channel: Any, replies: list[_Reply], acks: list[int]) -> None:
        """The replies as one socket write (after ``acks``, the delivery tags to ack on the same
        channel), each reply's confirm watched by a callback, not a task.

        What ``aiormq.Channel.basic_publish`` does for one message, for all of them under one hold of
        the channel's lock (which orders the delivery tags with aio-pika's own publishes: events, RPC):
        a delivery tag and a confirmation future each, registered where the channel's reader settles
        them (``confirmations``; ``message_id_delivery_tag`` for a returned, mandatory reply), the
        frames it would write (a random message id, as it sets one), then one put on its write queue.
        Not written (the lock, the queue or the timeout failed): the tags are given back, as aiormq
        does, and every reply of the batch is failed once. Written: ``done`` is called once per reply
        when the broker acks or nacks it, when the channel closes (aiormq fails its futures), or after
        ``timeout``, whichever comes first. If nothing was written, the acks still are, on their own.
        """
        watched: list[_Watched] = []
        try:
            # The timeout bounds a wait for the lock (another publish holds it) or for room in the
            # write queue; with neither, nothing below waits, and its timer is ~1 % of the daemon.
            bounded = _may_wait(channel)
            async with asyncio.timeout(self.timeout) if bounded else contextlib.nullcontext(), channel.lock:
                first = channel.delivery_tag
                try:
                    payload = _frames(channel, replies, acks, watched)
                    await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
                except BaseException:
                    # The broker has seen none of them: their tags are reused by the next publish.
                    channel.delivery_tag = first
                    for confirmation, _, message_id, tag in watched:
                        channel.confirmations.pop(tag, None)
                        if channel.message_id_delivery_tag.get(message_id) == tag:
                            channel.message_id_delivery_tag.pop(message_id)
                        confirmation.cancel()
                    raise
        except (asyncio.CancelledError, Exception) as exc:
            error = self.map_error(exc)
            for reply in replies:
                _call(reply.done, error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            # E.g. the lock held past the timeout by another publish: the deliveries were still worked.
            await self._write_acks([(channel, tag) for tag in acks])
            return
        self.reply_writes += 1
        self.acks_written += len(acks)
        self._deadlines.append(
            (self.loop.time() + self.timeout, [confirmation for confirmation, *_ in watched])
        )
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadlines[0][0], self._expire_due)
        for confirmation, reply, message_id, tag in watched:
            self._unconfirmed.add(confirmation)
            confirmation.add_done_callback(
                functools.partial(self._confirmed, channel, reply, message_id, tag)
            )

    def _expire_due(self) -> None:
        """Give up the confirms of the batches past their deadline; re-arm for the next one."""
        self._timer = None
        now = self.loop.time() + 0.001  # asyncio may run a timer up to its clock resolution early
        while self._deadlines and self._deadlines[0][0] <= now:
            for confirmation in self._deadlines.popleft()[1]:
                if not confirmation.done():
                    confirmation.cancel()
        if self._deadlines:
            self._timer = self.loop.call_at(self._deadlines[0][0], self._expire_due)

    def _confirmed(
        self,
        channel: Any,
        reply: _Reply,
        message_id: str,
        tag: int,
        confirmation: asyncio.Future[Any],
    ) -> None:
        self._unconfirmed.discard(confirmation)
        if channel.message_id_delivery_tag.get(message_id) == tag:  # what aiormq's forget_message_id does
            channel.message_id_delivery_tag.pop(message_id)
        if confirmation.cancelled():  # _expire_due, or cancel() at close
            error: Exception | None = self.map_error(TimeoutError())
        else:
            exc = confirmation.exception()
            error = None if exc is None else self.map_error(exc)
        _call(reply.done, error)

    def cancel(self) -> None:
        """The bridge is closing: whatever is still waiting for a confirm is given up."""
        for task in list(self._tasks):
            task.cancel()
        for confirmation in list(self._unconfirmed):
            confirmation.cancel()
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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


_Watched = tuple[asyncio.Future[Any], _Reply, str, int]  # confirmation, reply, message id, delivery tag


def _frames(channel: Any, replies: list[_Reply], acks: list[int], watched: list[_Watched]) -> bytes:
    """The acks' and the replies' frames, registering each reply's confirmation (under the lock)."""
    number = channel.number
    parts = [ack_frames(number, acks)]
    for reply in replies:
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        msg_id = message_id()
        confirmation = channel.create_future()
        channel.confirmations[tag] = confirmation
        channel.message_id_delivery_tag[msg_id] = tag
        watched.append((confirmation, reply, msg_id, tag))
        raw = reply_frames(
            number, reply.routing_key, reply.body, reply.correlation_id, msg_id, channel.max_content_size
        )
        if raw is None:  # a field over a short string's limit: pamqp's marshalling (and its refusal)
            properties = reply_properties(reply.correlation_id)
            properties.message_id = msg_id
            frames: list[Any] = [
                aiormq.spec.Basic.Publish(exchange="", routing_key=reply.routing_key, mandatory=True),
                ContentHeader(properties=properties, body_size=len(reply.body)),
                *channel._split_body(reply.body),
            ]
            raw = ChannelFrame.marshall(channel_number=number, frames=frames).payload
        parts.append(raw)
    return b"".join(parts)


_BATCH_NEEDS = (
    "lock",
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "_split_body",
    "max_content_size",
    "create_future",
    "number",
)


def _can_batch(channel: Any) -> bool:
    """aiormq's Channel as outbox._publish_batch knows it, with publisher confirms on."""
    return all(hasattr(channel, name) for name in _BATCH_NEEDS) and bool(
        getattr(channel, "publisher_confirms", False)
    )


def _may_wait(channel: Any) -> bool:
    """Could taking aiormq's channel lock or putting on its write queue wait now? (True if unknown.)"""
    lock = getattr(channel, "_Channel__lock", None)
    return not isinstance(lock, asyncio.Lock) or lock.locked() or channel.write_queue.full()


def _call(done: ReplyDone, error: Exception | None) -> None:
    try:
        done(error)
    except Exception:
        log.exception("reply callback failed")
