"""A fake voipbin flow-manager: answers ``GET /v1/variables/<activeflow_id>`` over the real broker.

It consumes ``bin-manager.flow-manager.request`` and replies as flow-manager does (voipbin-wire.md
§6.4): ``{"id":"<activeflow>","variables":{...}}``. Modes let tests make it fail (plain 500, a typed
error, a body that is not variables), answer late, or not at all.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from tts_streamer.adapters.amqp.bridge import AmqpBridge, Delivery, QueueSpec, Topology, open_amqp_bridge
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.adapters.voipbin.flow_manager import FLOW_MANAGER_QUEUE
from tts_streamer.adapters.voipbin.wire import WireError

MODES = ("ok", "error500", "typed_error", "garbage", "slow", "silent")


@attrs.define
class FakeFlowManager:
    # activeflow id -> its variables; an unknown activeflow gets 404, as flow-manager's not-found.
    variables: dict[uuid.UUID, dict[str, str]] = attrs.field(factory=dict)
    mode: str = "ok"
    slow_delay: float = 3.5
    requests: list[envelope.Request] = attrs.field(factory=list)

    async def handle(self, bridge: AmqpBridge, delivery: Delivery) -> None:
        try:
            request = envelope.parse_request(delivery.body)
        except WireError:
            response: Response | None = envelope.plain_error(400)
        else:
            self.requests.append(request)
            response = await self._answer(request)
        if response is not None and delivery.reply_to:
            await bridge.publish(
                delivery.reply_to, envelope.render_response(response), correlation_id=delivery.correlation_id
            )

    async def _answer(self, request: envelope.Request) -> Response | None:
        if self.mode == "silent":
            return None
        if self.mode == "slow":
            await trio.sleep(self.slow_delay)
        if self.mode == "error500":
            return envelope.plain_error(500)
        if self.mode == "typed_error":
            return envelope.typed_error(
                "NOT_FOUND", "ACTIVEFLOW_NOT_FOUND", "The activeflow was not found.", domain="flow-manager"
            )
        prefix = "/v1/variables/"
        path = request.uri.partition("?")[0]
        if request.method != "GET" or not path.startswith(prefix):
            return envelope.plain_error(404)
        try:
            activeflow_id = uuid.UUID(path.removeprefix(prefix))
        except ValueError:
            return envelope.plain_error(404)
        if self.mode == "garbage":
            return envelope.ok({"id": str(activeflow_id), "variables": ["not", "a", "map"]})
        found = self.variables.get(activeflow_id)
        if found is None:
            return envelope.plain_error(404)
        return envelope.ok({"id": str(activeflow_id), "variables": found})


@asynccontextmanager
async def open_fake_flow_manager(url: str) -> AsyncIterator[FakeFlowManager]:
    fake = FakeFlowManager()
    topology = Topology(consume=(QueueSpec(FLOW_MANAGER_QUEUE),), prefetch=50)
    async with open_amqp_bridge(url, topology) as bridge, trio.open_nursery() as nursery:

        async def serve() -> None:
            async with trio.open_nursery() as handlers:
                async for delivery in bridge.deliveries:
                    handlers.start_soon(fake.handle, bridge, delivery)

        nursery.start_soon(serve, name="fake-flow-manager")
        yield fake
        nursery.cancel_scope.cancel()
