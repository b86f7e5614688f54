"""A fake voipbin call-manager: answers external-media create/delete over the real broker.

It consumes ``bin-manager.call-manager.request`` and, for each created external media, registers a
leg on the Asterisk simulator and hands out its ``media_uri`` (see voipbin-wire.md §6.3); deleting one
hangs its leg up at the simulator a few ms later, as ARI does. Modes let tests make it fail (plain 500,
a typed error) or answer late.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from tts_streamer.adapters.amqp.bridge import (
    AmqpBridge,
    AmqpUnavailable,
    Delivery,
    QueueSpec,
    Topology,
    open_amqp_bridge,
)
from tts_streamer.adapters.voipbin import envelope, models
from tts_streamer.adapters.voipbin.call_manager import CALL_MANAGER_QUEUE
from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.adapters.voipbin.wire import WireError
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig

log = logging.getLogger(__name__)

REQUIRED = {
    "external_host": "INCOMING",
    "encapsulation": "none",
    "transport": "websocket",
    "connection_type": "server",
}


@attrs.define
class FakeCallManager:
    sim: AsteriskSimulator
    media_host: str
    media_port: int
    mode: str = "ok"  # ok | error500 | typed_error | slow
    slow_delay: float = 3.5
    leg_config: SimConfig | None = None  # how the simulated legs behave (faults, control format)
    # As the real call-manager: deleting an external media hangs its channel up (ARI), so Asterisk
    # closes the socket this long after the DELETE arrived, before call-manager answers it. None: the
    # leg is left to the client to close.
    hangup_delay: float | None = 0.009
    answer_delay: float = 0.005
    created: dict[uuid.UUID, str] = attrs.field(factory=dict)  # external media id -> connection id
    requests: list[envelope.Request] = attrs.field(factory=list)
    deleted: list[uuid.UUID] = attrs.field(factory=list)
    replies_lost: int = 0

    async def handle(self, bridge: AmqpBridge, delivery: Delivery) -> None:
        try:
            request = envelope.parse_request(delivery.body)
        except WireError:
            response = envelope.plain_error(400)
        else:
            self.requests.append(request)
            response = await self._answer(request)
        if delivery.reply_to:
            try:
                await bridge.publish(
                    delivery.reply_to,
                    envelope.render_response(response),
                    correlation_id=delivery.correlation_id,
                )
            except AmqpUnavailable as exc:
                # A reply the broker did not take in time (a busy machine) is lost, as call-manager's
                # would be: the daemon's request times out. It must not end the fake and the whole rig.
                self.replies_lost += 1
                log.warning("fake call-manager: reply lost: %s", exc)

    async def _answer(self, request: envelope.Request) -> Response:
        path = request.uri.partition("?")[0]
        if request.method == "POST" and path == "/v1/external-medias":
            return await self._create(request)
        if request.method == "DELETE" and path.startswith("/v1/external-medias/"):
            try:
                media_id = uuid.UUID(path.rsplit("/", 1)[1])
            except ValueError:
                return envelope.plain_error(404)
            if media_id not in self.created or media_id in self.deleted:
                return envelope.plain_error(500)  # as CM does for ids it no longer has
            self.deleted.append(media_id)
            call = self.sim.calls.get(self.created[media_id])
            if call is not None and self.hangup_delay is not None:
                await trio.sleep(self.hangup_delay)
                call.hang_up()
                await trio.sleep(self.answer_delay)  # its answer comes after the hang-up
            return envelope.ok({"id": str(media_id), "status": "terminating"})
        return envelope.plain_error(404)

    async def _create(self, request: envelope.Request) -> Response:
        if self.mode == "error500":
            return envelope.plain_error(500)
        if self.mode == "typed_error":
            return envelope.typed_error(
                "NOT_FOUND", "CALL_NOT_FOUND", "The call was not found.", domain="call-manager"
            )
        if self.mode == "slow":
            await trio.sleep(self.slow_delay)
        try:
            body = models.ExternalMediaCreate.from_data(request.data)
        except WireError as exc:
            return envelope.typed_error("INVALID_ARGUMENT", "BAD_REQUEST", exc.reason, domain="call-manager")
        data = body.to_data()
        for key, expected in REQUIRED.items():
            if data.get(key) != expected:
                return envelope.typed_error(
                    "INVALID_ARGUMENT", "BAD_REQUEST", f"{key} must be {expected}", domain="call-manager"
                )
        connection_id = str(uuid.uuid4())
        self.sim.expect(connection_id, self.leg_config)
        self.created[body.id] = connection_id
        return envelope.ok(
            {
                "id": str(body.id),
                "asterisk_id": "42:01:0a:a4:00:05",
                "channel_id": str(uuid.uuid4()),
                "reference_type": body.reference_type,
                "reference_id": str(body.reference_id),
                "status": "running",
                "external_host": "INCOMING",
                "encapsulation": "none",
                "transport": "websocket",
                "media_uri": f"ws://{self.media_host}:{self.media_port}/media/{connection_id}",
                "connection_type": "server",
                "format": body.format,
                "direction_speak": body.direction_speak,
            }
        )


@asynccontextmanager
async def open_fake_call_manager(
    url: str, sim: AsteriskSimulator, media_host: str, media_port: int
) -> AsyncIterator[FakeCallManager]:
    fake = FakeCallManager(sim, media_host, media_port)
    topology = Topology(consume=(QueueSpec(CALL_MANAGER_QUEUE),), prefetch=50)
    async with open_amqp_bridge(url, topology) as bridge, trio.open_nursery() as nursery:

        async def serve() -> None:
            async with trio.open_nursery() as handlers:
                async for delivery in bridge.deliveries:
                    handlers.start_soon(fake.handle, bridge, delivery)

        nursery.start_soon(serve, name="fake-call-manager")
        yield fake
        nursery.cancel_scope.cancel()
