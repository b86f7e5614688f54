"""The ``/v1/streamings`` routes: voipbin's streaming sessions on top of the session supervisor.

Replies and status codes follow the Go tts-manager (see shared/reference/voipbin-wire.md §4.2), minus
its bugs: a failed create is rolled back and reported (``streaming_deleted``); every streaming that was
created gets exactly one ``streaming_deleted`` whatever ended it; ``message_play_started`` is sent at the
first frame; each say_init starts a new message; say_stop completes before the next command runs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import attrs
import trio

from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import (
    CommandError,
    SayAdd,
    SayFinish,
    SayFlush,
    SayInit,
    validate_text,
)
from tts_streamer.actors.session import Session, SessionStartError
from tts_streamer.adapters.voice import VoiceSpec
from tts_streamer.adapters.voipbin import envelope, models
from tts_streamer.adapters.voipbin.call_manager import (
    CallManagerError,
    ExternalMedias,
    stop_external_media_quietly,
)
from tts_streamer.adapters.voipbin.envelope import EventType, Response
from tts_streamer.adapters.voipbin.flow_manager import FlowManager, look_up_flow_voice
from tts_streamer.adapters.voipbin.routes import RouteName
from tts_streamer.adapters.voipbin.wire import NIL_UUID, WireError
from tts_streamer.supervisor.services.command_plane import Handler, NotOwned, RouteCall
from tts_streamer.supervisor.services.route_table import with_body, with_id
from tts_streamer.supervisor.services.streaming_says import (
    Said,
    read_say_add,
    read_say_finish,
    read_say_flush,
    read_say_init,
    read_say_stop,
)
from tts_streamer.supervisor.sessions import Supervisor

log = logging.getLogger(__name__)

REAP_DELAYS = (1.0, 3.0, 10.0)  # seconds between DELETEs of an external media whose create was abandoned


# Go's client lets a typed error body win over the status code and api-manager answers the body's
# ``status``: so where Go answers a plain status we answer exactly that, and the cause goes to the log.


def bad_request(reason: str, status_code: int = 500) -> Response:
    """An undecodable streaming body: Go answers a plain 500."""
    log.info("request refused (%d): %s", status_code, reason)
    return envelope.plain_error(status_code)


def command_failed(error: CommandError) -> Response:
    """A session refused the command: Go answers a plain 500."""
    log.info("command refused by the session (%s): %s", error.kind, error)
    return envelope.plain_error(500)


def refused(kind: str, reason: str) -> Response:
    """Refused before the session (e.g. a stale message id): Go answers a plain 500."""
    log.info("request refused (%s): %s", kind, reason)
    return envelope.plain_error(500)


def plain_500() -> Response:
    return envelope.plain_error(500)


@attrs.define
class StreamingState:
    model: models.Streaming
    session: Session | None = None
    open_messages: dict[str, models.Message] = attrs.field(factory=dict)
    deleting: bool = False
    # Set for speakings: message_* events carry this id (the nil UUID, as Go's speakings) instead of the
    # session's per-message id, which stays unique internally.
    wire_message_id: uuid.UUID | None = None


class EventPublishing(Protocol):
    """Where voipbin events go (the EventPublisher; a collecting fake in the tests): must not block."""

    def publish(self, event: envelope.Event) -> None: ...


# Called once when a streaming ends, whatever ended it: (streaming id, reason).
EndListener = Callable[[uuid.UUID, str], None]


class StreamingService:
    def __init__(
        self,
        supervisor: Supervisor,
        call_manager: ExternalMedias,
        publisher: EventPublishing,
        nursery: trio.Nursery,
        *,
        pod_id: str,
        create_timeout: float = 2.5,
        flow_manager: FlowManager | None = None,
    ) -> None:
        self.streamings: dict[uuid.UUID, StreamingState] = {}
        self._flow_manager = flow_manager
        self._supervisor = supervisor
        self._call_manager = call_manager
        self._publisher = publisher
        self._nursery = nursery
        self._pod_id = pod_id
        self._create_timeout = create_timeout
        self._end_listeners: list[EndListener] = []

    def add_end_listener(self, listener: EndListener) -> None:
        """``listener(streaming_id, reason)`` runs (synchronously, must not block) once per streaming
        that ends: deleted, hung up, socket lost, shutdown, or rolled back during create."""
        self._end_listeners.append(listener)

    def _refuse(self, kind: str) -> Response:
        """A stale or foreign message id (Go: 500 "message ID mismatch"), counted like any refusal."""
        self._supervisor.refused(kind)
        return refused(kind, "message ID mismatch")

    def owns(self, streaming_id: uuid.UUID) -> bool:
        return streaming_id in self.streamings

    def routes(self) -> dict[RouteName, Handler]:
        # The unknown-streaming answers are Go's: a plain 500 for say_init and say_stop, else the typed 404.
        not_found = envelope.streaming_not_found
        return {
            RouteName.STREAMING_CREATE: with_body(self.create),
            RouteName.STREAMING_GET: with_id(self.get),
            RouteName.STREAMING_DELETE: self._delete_or_forward,
            RouteName.STREAMING_SAY_INIT: partial(self.say, read_say_init, unknown=plain_500),
            RouteName.STREAMING_SAY_ADD: partial(self.say, read_say_add, unknown=not_found),
            RouteName.STREAMING_SAY_STOP: partial(self.say, read_say_stop, unknown=plain_500),
            RouteName.STREAMING_SAY_FINISH: partial(self.say, read_say_finish, unknown=not_found),
            RouteName.STREAMING_SAY_FLUSH: partial(self.say, read_say_flush, unknown=not_found),
        }

    # -- routes ------------------------------------------------------------------------------------

    async def create(self, data: Any) -> Response:
        try:
            request = models.StreamingCreate.from_data(data)
        except WireError as exc:
            return bad_request(exc.reason)
        return await self.start(request)

    async def start(
        self,
        request: models.StreamingCreate,
        *,
        streaming_id: uuid.UUID | None = None,
        provider: str = "",
        voice_id: str = "",
        engine: str | None = None,
        wire_message_id: uuid.UUID | None = None,
    ) -> Response:
        """Create a streaming (the body of POST /v1/streamings); speakings pass their own id, provider,
        voice and engine. The reply is the route's: 200 with the Streaming, or the failure to relay."""
        streaming_id = streaming_id or uuid.uuid4()
        model = models.Streaming(
            id=streaming_id,
            customer_id=request.customer_id,
            pod_id=self._pod_id,
            activeflow_id=request.activeflow_id,
            reference_type=request.reference_type,
            reference_id=request.reference_id,
            language=request.language,
            gender=request.gender,
            provider=provider,
            voice_id=voice_id,
            direction=request.direction,
            message_id=NIL_UUID,
        )
        state = StreamingState(model, wire_message_id=wire_message_id)
        self.streamings[streaming_id] = state
        self._event(EventType.STREAMING_CREATED, model)
        flow_voice = look_up_flow_voice(  # concurrently with call-manager's create
            self._nursery,
            self._flow_manager,
            streaming_id,
            request.activeflow_id,
            voice_id,
            self._supervisor.engines.get(engine or self._supervisor.default_engine),
        )
        media_created = False
        call_manager_unanswered = True  # until it answers, it may still create the external media
        failure: Response = envelope.plain_error(500)
        with trio.move_on_after(self._create_timeout) as budget:
            try:
                media = await self._call_manager.create_external_media(
                    models.ExternalMediaCreate(
                        id=streaming_id,
                        reference_type=request.reference_type,
                        reference_id=request.reference_id,
                        external_host=models.EXTERNAL_HOST_INCOMING,
                        encapsulation=models.ENCAPSULATION_NONE,
                        transport=models.TRANSPORT_WEBSOCKET,
                        connection_type=models.CONNECTION_TYPE_SERVER,
                        # We always send 8 kHz mu-law, whatever the vendor (Go asked slin16 for ElevenLabs).
                        format="ulaw",
                        direction_speak=request.direction,
                    ),
                )
                media_created, call_manager_unanswered = True, False
                voice = VoiceSpec(
                    language=request.language or "en-US",
                    gender=request.gender,
                    voice_id=voice_id or await flow_voice.get(),
                )
                state.session = await self._supervisor.start_session(
                    str(streaming_id), media.media_uri, voice=voice, engine=engine
                )
                return envelope.ok(model.to_data())
            except CallManagerError as exc:
                log.warning("streaming=%s create failed at call-manager: %s", streaming_id, exc)
                failure = exc.response
                call_manager_unanswered = exc.unanswered
            except (SessionStartError, CommandError) as exc:
                log.warning("streaming=%s create failed at the media socket: %s", streaming_id, exc)
        if budget.cancelled_caught:
            log.warning("streaming=%s create overran %s s: rolled back", streaming_id, self._create_timeout)
        # Roll back whatever was done: no orphaned external media, nothing left in memory.
        if media_created:
            await stop_external_media_quietly(self._call_manager, streaming_id)
        elif call_manager_unanswered:
            self._nursery.start_soon(self._reap_late_external_media, streaming_id)
        if state.session is None:
            self._end(streaming_id, "create_failed")
        return failure

    async def _reap_late_external_media(self, streaming_id: uuid.UUID) -> None:
        """A create abandoned before call-manager answered may still complete there: delete it then.

        A DELETE that comes before the late create only gets call-manager's 500, so retry a few
        times over the span in which call-manager's own work (ARI, up to 10 s) can finish.
        """
        for delay in REAP_DELAYS:
            await trio.sleep(delay)
            try:
                await self._call_manager.delete_external_media(streaming_id)
            except CallManagerError:
                continue  # not there (yet), or call-manager unreachable: try again later
            log.info(
                "streaming=%s external media created after its create was abandoned: deleted", streaming_id
            )
            return

    async def get(self, streaming_id: uuid.UUID) -> Response:
        state = self.streamings.get(streaming_id)
        return envelope.streaming_not_found() if state is None else envelope.ok(state.model.to_data())

    async def delete(self, streaming_id: uuid.UUID) -> Response | None:
        """Stop a local streaming; None when this pod does not own it (the caller forwards)."""
        state = self.streamings.get(streaming_id)
        if state is None:
            return None
        model = state.model
        await self._stop(state, "deleted")
        return envelope.ok(model.to_data())

    async def _delete_or_forward(self, call: RouteCall) -> Response:
        response = await self.delete(call.id)
        if response is None:
            raise NotOwned
        return response

    async def say(
        self, read: Callable[[Any], Said], call: RouteCall, *, unknown: Callable[[], Response]
    ) -> Response:
        """Every say_* route: look the streaming up, read the body, check the message, tell the session."""
        state = self.streamings.get(call.id)
        if state is None or state.session is None:
            return unknown()
        try:
            said = read(call.data)
        except WireError as exc:
            return bad_request(exc.reason)
        if said.for_message is not None and said.for_message != state.model.message_id:
            return self._refuse("message_id_mismatch")
        try:
            await self._supervisor.call(str(call.id), said.command)
        except CommandError as exc:
            return command_failed(exc)
        if said.sets_message is not None:
            state.model = attrs.evolve(state.model, message_id=said.sets_message)
        return envelope.ok(state.model.to_data()) if said.reply_streaming else envelope.ok()

    async def speak(self, streaming_id: uuid.UUID, text: str) -> None:
        """One whole utterance as its own message (a speaking's say): init, add, finish. Its audio
        queues behind earlier utterances. Raises CommandError."""
        # The session's own check, made before a message is opened rather than half-way through.
        validate_text(text, self._supervisor.config.max_text_bytes)
        call_id = str(streaming_id)
        await self._supervisor.call(call_id, SayInit(str(uuid.uuid4())))
        await self._supervisor.call(call_id, SayAdd(text))
        await self._supervisor.call(call_id, SayFinish())

    async def barge_in(self, streaming_id: uuid.UUID) -> None:
        """Silence now (a speaking's flush): the vendor is cancelled, queued audio dropped and
        FLUSH_MEDIA sent; the call stays up. Raises CommandError."""
        await self._supervisor.call(str(streaming_id), SayFlush(end_message=True))

    async def stop_all(self, reason: ev.StopReason) -> None:
        """Shutdown: stop every streaming through the normal path (external media, socket, events)."""
        async with trio.open_nursery() as nursery:
            for state in list(self.streamings.values()):
                nursery.start_soon(self._stop, state, reason)

    async def _stop(self, state: StreamingState, reason: ev.StopReason) -> None:
        state.deleting = True
        if state.session is not None:
            # call-manager hangs the leg up, so Asterisk may close the socket before we stop the
            # session: that close is this stop's doing, not a hang-up.
            state.session.prepare_stop(reason)
        await stop_external_media_quietly(self._call_manager, state.model.id)
        if state.session is not None:
            await state.session.stop(reason)

    # -- session events -> voipbin events ------------------------------------------------------------

    def on_session_event(self, event: ev.SessionEvent) -> None:
        try:
            streaming_id = uuid.UUID(event.call_id)
        except ValueError:
            return  # a session this service did not create (e.g. from the console)
        state = self.streamings.get(streaming_id)
        if state is None:
            return
        if isinstance(event, ev.Initiated):
            message = models.Message(
                id=state.wire_message_id or uuid.UUID(event.message_id),
                customer_id=state.model.customer_id,
                streaming_id=streaming_id,
            )
            state.open_messages[event.message_id] = message
            self._event(EventType.MESSAGE_INITIATED, message)
        elif isinstance(event, ev.PlayStarted) and event.message_id in state.open_messages:
            self._event(EventType.MESSAGE_PLAY_STARTED, state.open_messages[event.message_id])
        elif isinstance(event, ev.PlayFinished) and event.message_id in state.open_messages:
            message = state.open_messages.pop(event.message_id)
            finished = attrs.evolve(
                message,
                total_message=event.text,
                total_count=event.texts_added,
                message_finish=event.completed,
            )
            self._event(EventType.MESSAGE_PLAY_FINISHED, finished)
        elif isinstance(event, ev.Stopped):
            for message in state.open_messages.values():
                self._event(EventType.MESSAGE_PLAY_FINISHED, message)
            state.open_messages.clear()
            if not state.deleting:
                # Hang-up or media failure: the leg is gone; tell call-manager so it forgets it too. The
                # sessions run inside the services' scope (services/wiring.py), so this nursery is open.
                self._nursery.start_soon(stop_external_media_quietly, self._call_manager, streaming_id)
            self._end(streaming_id, event.reason)

    def _end(self, streaming_id: uuid.UUID, reason: str) -> None:
        state = self.streamings.pop(streaming_id, None)
        if state is not None:
            self._event(EventType.STREAMING_DELETED, state.model)
            for listener in self._end_listeners:
                try:
                    listener(streaming_id, reason)
                except Exception:
                    log.exception("streaming=%s end listener failed", streaming_id)

    def _event(self, event_type: EventType, model: models.WireModel) -> None:
        self._publisher.publish(envelope.make_event(event_type, model.to_data()))
