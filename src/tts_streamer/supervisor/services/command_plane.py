"""The AMQP command plane: requests in, exactly one reply out for every request with a ``reply_to``.

Requests are parsed once, routed, and dispatched synchronously into a per-streaming *lane* (a task and
a channel), so commands for one streaming apply in arrival order while different streamings proceed
concurrently (the Go service's 10 workers per queue reordered them). A lane ends when it runs dry.

A request is acknowledged when it is *taken up* (its lane reaches it, or its task starts), not on
receipt: unacknowledged deliveries are what the prefetch window counts, so at most ``AMQP_PREFETCH``
per queue wait in memory and the rest wait in the broker, where the per-pod queue's message TTL
applies. At take-up a request is started only if its caller can still be waiting (``RequestDeadlines``;
for creates, only if the caller's reply queue still exists), and never twice: a redelivered request
(its first delivery may have been taken up somewhere) is dropped. Requests not started are counted by
reason in ``PlaneStats.not_started``.

DELETE arrives on the shared queue, so it may land on a pod that does not own the streaming. Such a pod
forwards the request once over a fanout control exchange that every pod's per-pod queue is bound to,
waits (bounded) for the owner's reply, and relays it; with no owner answering it replies the typed 404.
"""

from __future__ import annotations

import collections
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import attrs
import trio

from tts_streamer.actors.stats import LatenessRecorder
from tts_streamer.adapters.amqp.bridge import AmqpUnavailable, Delivery
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Request, Response
from tts_streamer.adapters.voipbin.routes import RouteMatch, RouteName, match_route
from tts_streamer.adapters.voipbin.wire import WireError
from tts_streamer.supervisor.services.delivery_source import CREATE_ROUTES, DeliverySource, RequestDeadlines

log = logging.getLogger(__name__)

CONTROL_EXCHANGE = "tts-streamer.control"
FORWARDED_HEADER = "x-tts-streamer-forwarded-by"
NOT_STARTED_LOG_INTERVAL = 10.0

_Work = tuple[Delivery, Request, RouteMatch]


class NotOwned(Exception):
    """Raised by a handler when another pod owns the resource: the plane forwards the request.

    ``fallback`` answers instead when no pod answers the forward in time (the owner is gone); without
    one the caller gets the typed 404.
    """

    def __init__(self, fallback: Callable[[], Awaitable[Response]] | None = None) -> None:
        super().__init__()
        self.fallback = fallback


@attrs.frozen
class RouteCall:
    """What a route handler gets: the parsed request, its route match and where it came from."""

    request: Request
    match: RouteMatch
    delivery: Delivery

    @property
    def id(self) -> uuid.UUID:
        assert self.match.id is not None, "route has no id"
        return self.match.id

    @property
    def data(self) -> Any:
        return self.request.data


Handler = Callable[[RouteCall], Awaitable[Response | None]]


@attrs.define
class PlaneStats:
    requests: int = 0
    replies: int = 0
    reply_failures: int = 0
    forwarded: int = 0
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    # requests taken off the broker but never started: timeout, timestamp, caller_gone,
    # caller_unknown, redelivered, ack_failed
    not_started: collections.Counter[str] = attrs.field(factory=collections.Counter)
    latency: LatenessRecorder = attrs.field(factory=lambda: LatenessRecorder(capacity=10_000))


class CommandPlane:
    def __init__(
        self,
        bridge: DeliverySource,
        routes: Mapping[RouteName, Handler],
        *,
        pod_id: str,
        forward_timeout: float = 1.0,
        deadlines: RequestDeadlines | None = None,
    ) -> None:
        self.stats = PlaneStats()
        self._bridge = bridge
        self._deadlines = deadlines or RequestDeadlines()
        self._last_warned = -math.inf
        self._routes = dict(routes)
        self._pod_id = pod_id
        self._forward_timeout = forward_timeout
        self._lanes: dict[uuid.UUID, collections.deque[_Work]] = {}
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for delivery in self._bridge.deliveries:
                self._dispatch(delivery)

    def _dispatch(self, delivery: Delivery) -> None:
        assert self._nursery is not None
        self.stats.requests += 1
        try:
            request = envelope.parse_request(delivery.body)
        except WireError as exc:
            self.stats.errors["bad_envelope"] += 1
            log.warning("unparsable request on %s: %s", delivery.queue, exc.reason)
            response = envelope.typed_error("INVALID_ARGUMENT", "BAD_ENVELOPE", exc.reason)
            self._nursery.start_soon(self._answer, delivery, None, response)
            return
        match = match_route(request.method, request.uri)
        log.debug(
            "pod=%s %s %s on %s%s",
            self._pod_id,
            request.method,
            request.uri,
            delivery.queue,
            " (forwarded)" if FORWARDED_HEADER in delivery.headers else "",
        )
        if match is None:
            self.stats.errors["no_route"] += 1
            self._nursery.start_soon(self._answer, delivery, None, envelope.plain_error(404))
            return
        if delivery.headers.get(FORWARDED_HEADER) == self._pod_id:
            # Our own forward, back through the fanout: we forwarded it because we do not own the id
            # (and its lane is busy waiting for the owner), so it could only be answered with silence.
            self._nursery.start_soon(self._bridge.ack, delivery)
            return
        if match.id is None:
            self._nursery.start_soon(
                self._take_up_and_handle, delivery, request, match, name=f"request[{match.name.value}]"
            )
            return
        lane = self._lanes.get(match.id)
        if lane is None:
            # Unbounded here because bounded upstream: what waits in lanes is not yet acknowledged,
            # so the prefetch window caps it (Go has no limit either, so no 429 of our own). A deque,
            # not a memory channel: a lane is opened for most requests (it closes once empty), and
            # only its own task reads it.
            lane = collections.deque()
            self._lanes[match.id] = lane
            self._nursery.start_soon(self._serve_lane, match.id, lane, name=f"lane[{match.id}]")
        lane.append((delivery, request, match))

    async def _serve_lane(self, streaming_id: uuid.UUID, lane: collections.deque[_Work]) -> None:
        while lane:
            await self._take_up_and_handle(*lane.popleft())
        # No checkpoint between the empty check and the removal: the dispatcher either saw this lane
        # (and its item is already queued) or will open a new one.
        del self._lanes[streaming_id]

    async def _answer(self, delivery: Delivery, match: RouteMatch | None, response: Response) -> None:
        """A reply known without running anything (bad envelope, no route)."""
        if await self._take_up(delivery, match):
            self._reply(delivery, response)

    async def _take_up_and_handle(self, delivery: Delivery, request: Request, match: RouteMatch) -> None:
        if await self._take_up(delivery, match):
            await self._handle(delivery, request, match)

    async def _take_up(self, delivery: Delivery, match: RouteMatch | None) -> bool:
        """Acknowledge the delivery; whether to start it (its caller can still be waiting)."""
        if delivery.redelivered:
            # Acked before work everywhere (here and in Go), so a redelivered request may already have
            # run on the pod that had it: at most once means not again.
            await self._bridge.ack(delivery)
            return self._not_started(delivery, "redelivered")
        if not await self._bridge.ack(delivery):
            return self._not_started(delivery, "ack_failed")  # requeued: it comes back redelivered
        route = match.name if match is not None else None
        reason = self._deadlines.expired(delivery, route, trio.current_time())
        if reason is not None:
            # A reply nobody reads is harmless (its reply queue is gone); one that is read says why.
            self._reply_expired(delivery)
            return self._not_started(delivery, reason)
        if route in CREATE_ROUTES and delivery.reply_to:
            exists = await self._bridge.queue_exists(delivery.reply_to)
            if exists is False:
                return self._not_started(delivery, "caller_gone")  # nobody to answer either
            if exists is None:
                self._reply_expired(delivery)
                return self._not_started(delivery, "caller_unknown")
        return True

    def _reply_expired(self, delivery: Delivery) -> None:
        self._reply(delivery, envelope.request_expired())

    def _not_started(self, delivery: Delivery, reason: str) -> bool:
        self.stats.not_started[reason] += 1
        now = trio.current_time()
        # An overload sheds hundreds a second: one WARNING per interval, the metric has every one.
        warn = now - self._last_warned >= NOT_STARTED_LOG_INTERVAL
        log.log(
            logging.WARNING if warn else logging.DEBUG,
            "request on %s not started (%s): received %.3f s ago; %d not started so far %s",
            delivery.queue,
            reason,
            now - delivery.received_at,
            sum(self.stats.not_started.values()),
            dict(self.stats.not_started),
        )
        if warn:
            self._last_warned = now
        return False

    async def _handle(self, delivery: Delivery, request: Request, match: RouteMatch) -> None:
        try:
            response = await self._route(delivery, request, match)
        except Exception:
            log.exception("request %s %s failed", request.method, request.uri)
            self.stats.errors["internal"] += 1
            response = envelope.plain_error(500)
        if response is not None:
            self._reply(delivery, response)

    async def _route(self, delivery: Delivery, request: Request, match: RouteMatch) -> Response | None:
        handler = self._routes.get(match.name)
        if handler is None:
            self.stats.errors["not_served"] += 1
            return envelope.plain_error(404)
        try:
            return await handler(RouteCall(request, match, delivery))
        except NotOwned as not_owned:
            if FORWARDED_HEADER in delivery.headers:
                return None  # not ours either; the forwarding pod answers the caller
            assert match.id is not None
            answer = await self._forward(request, match.id)
            if answer is not None:
                return answer
            if not_owned.fallback is not None:
                return await not_owned.fallback()
            return envelope.streaming_not_found()

    async def _forward(self, request: Request, streaming_id: uuid.UUID) -> Response | None:
        """Ask the pod that owns ``streaming_id`` to handle ``request``; its answer, or None if none came."""
        self.stats.forwarded += 1
        with trio.move_on_after(self._forward_timeout):
            try:
                raw = await self._bridge.rpc(
                    "",
                    envelope.render_request(request),
                    exchange=CONTROL_EXCHANGE,
                    headers={FORWARDED_HEADER: self._pod_id},
                )
                return envelope.parse_response(raw)
            except (AmqpUnavailable, WireError) as exc:
                log.warning("streaming=%s DELETE forward failed: %s", streaming_id, exc)
        return None

    def _reply(self, delivery: Delivery, response: Response) -> None:
        """Hand the reply to the source and go on: its confirm is counted when it comes
        (``_replied``), and the lane is free for its next request meanwhile."""
        log.debug(
            "pod=%s reply %s to %s (%s)",
            self._pod_id,
            response.status_code,
            delivery.reply_to,
            delivery.correlation_id,
        )
        if not delivery.reply_to:
            return
        if response.status_code >= 300:
            self.stats.errors[f"status_{response.status_code}"] += 1
        self._bridge.reply(
            delivery.reply_to,
            envelope.render_response(response),
            correlation_id=delivery.correlation_id,
            done=partial(self._replied, delivery),
        )

    def _replied(self, delivery: Delivery, error: Exception | None) -> None:
        if error is not None:
            self.stats.reply_failures += 1
            log.warning("reply to %s lost: %s", delivery.reply_to, error)
            return
        self.stats.replies += 1
        self.stats.latency.record(trio.current_time() - delivery.received_at)
