"""The AMQP command plane: requests in, exactly one reply out for every request with a ``reply_to``.

Requests are parsed once, routed, and dispatched synchronously into a per-streaming *lane* (a task and
a channel), so commands for one streaming apply in arrival order while different streamings proceed
concurrently (the Go service's 10 workers per queue reordered them). A lane ends when it runs dry.

DELETE arrives on the shared queue, so it may land on a pod that does not own the streaming. Such a pod
forwards the request once over a fanout control exchange that every pod's per-pod queue is bound to,
waits (bounded) for the owner's reply, and relays it; with no owner answering it replies the typed 404.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from tts_streamer.actors.stats import LatenessRecorder
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Request, Response
from tts_streamer.adapters.voipbin.routes import RouteMatch, RouteName, match_route
from tts_streamer.adapters.voipbin.wire import WireError
from tts_streamer.supervisor.amqp_bridge import AmqpBridge, AmqpUnavailable, Delivery

log = logging.getLogger(__name__)

CONTROL_EXCHANGE = "tts-streamer.control"
FORWARDED_HEADER = "x-tts-streamer-forwarded-by"
LANE_CAPACITY = 256

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
    latency: LatenessRecorder = attrs.field(factory=lambda: LatenessRecorder(capacity=10_000))


class CommandPlane:
    def __init__(
        self,
        bridge: AmqpBridge,
        routes: Mapping[RouteName, Handler],
        *,
        pod_id: str,
        forward_timeout: float = 1.0,
    ) -> None:
        self.stats = PlaneStats()
        self._bridge = bridge
        self._routes = dict(routes)
        self._pod_id = pod_id
        self._forward_timeout = forward_timeout
        self._lanes: dict[uuid.UUID, trio.MemorySendChannel[_Work]] = {}
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
            self._nursery.start_soon(self._reply, delivery, response)
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
            self._nursery.start_soon(self._reply, delivery, envelope.plain_error(404))
            return
        if match.id is None:
            self._nursery.start_soon(
                self._handle, delivery, request, match, name=f"request[{match.name.value}]"
            )
            return
        lane = self._lanes.get(match.id)
        if lane is None:
            lane, lane_recv = trio.open_memory_channel[_Work](LANE_CAPACITY)
            self._lanes[match.id] = lane
            self._nursery.start_soon(self._serve_lane, match.id, lane_recv, name=f"lane[{match.id}]")
        try:
            lane.send_nowait((delivery, request, match))
        except trio.WouldBlock:
            self.stats.errors["lane_full"] += 1
            busy = envelope.typed_error("RESOURCE_EXHAUSTED", "TOO_MANY_REQUESTS", "too many queued requests")
            self._nursery.start_soon(self._reply, delivery, busy)

    async def _serve_lane(self, streaming_id: uuid.UUID, lane: trio.MemoryReceiveChannel[_Work]) -> None:
        while True:
            try:
                work = lane.receive_nowait()
            except trio.WouldBlock:
                # No checkpoint between the empty check and the removal: the dispatcher either saw
                # this lane (and its item is already queued) or will open a new one.
                del self._lanes[streaming_id]
                return
            await self._handle(*work)

    async def _handle(self, delivery: Delivery, request: Request, match: RouteMatch) -> None:
        try:
            response = await self._route(delivery, request, match)
        except Exception:
            log.exception("request %s %s failed", request.method, request.uri)
            self.stats.errors["internal"] += 1
            response = envelope.plain_error(500)
        if response is not None:
            await self._reply(delivery, response)

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

    async def _reply(self, delivery: Delivery, response: Response) -> None:
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
        try:
            await self._bridge.publish(
                delivery.reply_to, envelope.render_response(response), correlation_id=delivery.correlation_id
            )
        except AmqpUnavailable as exc:
            self.stats.reply_failures += 1
            log.warning("reply to %s lost: %s", delivery.reply_to, exc)
            return
        self.stats.replies += 1
        self.stats.latency.record(trio.current_time() - delivery.received_at)
