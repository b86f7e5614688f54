"""In-memory stand-ins for what StreamingService talks to, so its races run in virtual time: call-manager's
external medias (legs on an in-memory Asterisk simulator) and the event publisher."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from tests.support import RecordingSink
from tts_streamer.actors.events import SessionEvent
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.call_manager import CallManagerError
from tts_streamer.adapters.voipbin.models import ExternalMedia, ExternalMediaCreate
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig, memory_dialer
from tts_streamer.supervisor.services.streamings import StreamingService
from tts_streamer.supervisor.sessions import Supervisor, open_supervisor


@attrs.define
class FakeExternalMedias:
    """call-manager in memory. A create takes ``create_delay`` and completes even when its caller gave up
    (call-manager's own work goes on); a delete hangs the leg up ``hangup_delay`` later, before it is
    answered, as ARI does (None: the leg is left to the client to close)."""

    sim: AsteriskSimulator
    nursery: trio.Nursery
    create_delay: float = 0.0
    hangup_delay: float | None = 0.009
    answer_delay: float = 0.005
    leg_config: SimConfig | None = None
    register_legs: bool = True  # False: the media_uri leads nowhere (the socket fails after create)
    created: dict[uuid.UUID, str] = attrs.field(factory=dict)  # external media id -> connection id
    deletes: list[tuple[float, uuid.UUID, bool]] = attrs.field(factory=list)  # (time, id, found)

    async def create_external_media(self, request: ExternalMediaCreate) -> ExternalMedia:
        done = trio.Event()
        media: list[ExternalMedia] = []

        async def work() -> None:
            await trio.sleep(self.create_delay)
            connection_id = str(uuid.uuid4())
            if self.register_legs:
                self.sim.expect(connection_id, self.leg_config)
            self.created[request.id] = connection_id
            media.append(
                ExternalMedia(id=request.id, media_uri=f"ws://asterisk.invalid:8088/media/{connection_id}")
            )
            done.set()

        self.nursery.start_soon(work)
        await done.wait()
        return media[0]

    async def delete_external_media(self, media_id: uuid.UUID) -> None:
        found = media_id in self.created and media_id not in {d[1] for d in self.deletes if d[2]}
        self.deletes.append((trio.current_time(), media_id, found))
        if not found:
            raise CallManagerError("call-manager answered 500", envelope.plain_error(500))
        call = self.sim.calls.get(self.created[media_id])
        if call is not None and self.hangup_delay is not None:
            await trio.sleep(self.hangup_delay)
            call.hang_up()
            await trio.sleep(self.answer_delay)  # its answer comes after the hang-up

    def deleted(self, media_id: uuid.UUID) -> bool:
        return any(found and mid == media_id for _, mid, found in self.deletes)

    def leg(self, media_id: uuid.UUID) -> object:
        return self.sim.calls[self.created[media_id]]


@attrs.define
class CollectingPublisher:
    events: list[envelope.Event] = attrs.field(factory=list)

    def publish(self, event: envelope.Event) -> None:
        self.events.append(event)

    def types(self, streaming_id: uuid.UUID | None = None) -> list[str]:
        def mine(event: envelope.Event) -> bool:
            data = event.data or {}
            return streaming_id is None or str(streaming_id) in (data.get("streaming_id"), data.get("id"))

        return [e.type for e in self.events if mine(e)]


@attrs.define
class ServiceSink(RecordingSink):
    """Records session events and hands them to the service, as the daemon's EventBus does."""

    service: StreamingService | None = None

    def emit(self, event: SessionEvent) -> None:
        super().emit(event)
        if self.service is not None:
            self.service.on_session_event(event)


@attrs.define
class ServiceRig:
    service: StreamingService
    supervisor: Supervisor
    media: FakeExternalMedias
    publisher: CollectingPublisher
    sink: ServiceSink
    ended: list[tuple[uuid.UUID, str]]


@asynccontextmanager
async def open_service_rig(
    nursery: trio.Nursery,
    *,
    engine: SyntheticEngine | None = None,
    create_timeout: float = 2.5,
    **media: object,
) -> AsyncIterator[ServiceRig]:
    sim = AsteriskSimulator(seed=7)
    engine = engine or SyntheticEngine(seconds_per_char=0.05, speed=4.0)
    sink = ServiceSink()
    async with (
        open_supervisor(
            engines={engine.name: engine},
            default_engine=engine.name,
            dialer=memory_dialer(sim, nursery),
            events=sink,
            config=SessionConfig(),
        ) as supervisor,
        trio.open_nursery() as services,
    ):
        externals = FakeExternalMedias(sim, nursery, **media)  # type: ignore[arg-type]
        publisher = CollectingPublisher()
        service = StreamingService(
            supervisor, externals, publisher, services, pod_id="pod-test", create_timeout=create_timeout
        )
        sink.service = service
        ended: list[tuple[uuid.UUID, str]] = []
        service.add_end_listener(lambda sid, reason: ended.append((sid, reason)))
        yield ServiceRig(service, supervisor, externals, publisher, sink, ended)
        await service.stop_all("shutdown")
        services.cancel_scope.cancel()
