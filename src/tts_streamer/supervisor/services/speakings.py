"""The ``/v1/speakings`` routes: voipbin's public "speak into this call" API, with its stored row.

Same bodies, codes and JSON as the Go tts-manager (shared/reference/voipbin-wire.md §4.3), built on the
StreamingService: the speaking id is the streaming id (and call-manager's external-media id). The row
lives in ``tts_manager_speaking`` (adapters/speaking_store.py); what billing depends on is fixed here:

* a speaking reaches ``stopped`` with one ``speaking_stopped`` (carrying ``tm_update`` = when its audio
  ended) **whenever** its stream ends: the stop route, hang-up, WebSocket loss, vendor failure, daemon
  shutdown; a crashed pod's rows are closed by the sweep (speaking_recovery.py). Every path ends in the
  store's compare-and-set ``stop``, and only the caller that moved the row out of ``active`` publishes;
  the row's write is retried while the database fails (the stream is ended first, whatever it does);
* two creates for the same customer and reference race in the database, not in memory: exactly one
  inserts its row (see the store), the other answers 500 as Go does for a duplicate.

Ownership: say/flush/stop act on the pod holding the stream. A request that reaches another pod is
forwarded by the command plane; when no pod answers (the owner died), stop still stops the row.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Collection
from typing import Any

import trio

from tts_streamer.actors.commands import CommandError
from tts_streamer.adapters.speaking_schema import SpeakingRows, StoreError, now_utc
from tts_streamer.adapters.voipbin import envelope, models
from tts_streamer.adapters.voipbin.envelope import EventType, Response
from tts_streamer.adapters.voipbin.models import (
    SPEAKING_SAY_MAX_TEXT_BYTES,
    Speaking,
    SpeakingCreate,
    SpeakingSay,
)
from tts_streamer.adapters.voipbin.routes import RouteMatch, RouteName
from tts_streamer.adapters.voipbin.wire import (
    NIL_UUID,
    TextTooLongError,
    WireError,
)
from tts_streamer.supervisor.services.command_plane import Handler, NotOwned
from tts_streamer.supervisor.services.providers import ProviderResolver
from tts_streamer.supervisor.services.route_table import with_body, with_id, with_id_and_body, with_match
from tts_streamer.supervisor.services.speaking_ends import SpeakingEnds
from tts_streamer.supervisor.services.speaking_parts import (
    ACTIVE,
    DEFAULT_PROVIDER,
    INITIATING,
    PAGE_SIZE_MAX,
    STOPPED,
    EventSink,
    LiveSpeaking,
    SpeakingStreams,
    StopRetry,
    check_columns,
    list_filter,
    page_size,
    parse_page_token,
)

__all__ = [
    "DEFAULT_PROVIDER",
    "PAGE_SIZE_MAX",
    "SpeakingService",
    "SpeakingStreams",
    "StopRetry",
    "page_size",
    "parse_page_token",
]

log = logging.getLogger(__name__)


class SpeakingService(SpeakingEnds):
    def __init__(
        self,
        store: SpeakingRows,
        streamings: SpeakingStreams,
        publisher: EventSink,
        nursery: trio.Nursery,
        *,
        pod_id: str,
        engines: Collection[str] = (),
        max_text_bytes: int = SPEAKING_SAY_MAX_TEXT_BYTES,
        stop_on_vendor_error: bool = True,
        stop_retry: StopRetry = StopRetry(),
        clock: Callable[[], dt.datetime] = now_utc,
        providers: ProviderResolver | None = None,
    ) -> None:
        super().__init__(
            store,
            streamings,
            publisher,
            nursery,
            pod_id=pod_id,
            stop_on_vendor_error=stop_on_vendor_error,
            stop_retry=stop_retry,
            clock=clock,
        )
        self._engines = frozenset(engines)
        self._providers = providers or ProviderResolver.of(engines)
        self._max_text_bytes = max_text_bytes

    def routes(self) -> dict[RouteName, Handler]:
        return {
            RouteName.SPEAKING_CREATE: with_body(self.create),
            RouteName.SPEAKING_LIST: with_match(self.list_page),
            RouteName.SPEAKING_GET: with_id(self.get),
            RouteName.SPEAKING_DELETE: with_id(self.delete),
            RouteName.SPEAKING_SAY: with_id_and_body(self.say),
            RouteName.SPEAKING_FLUSH: with_id(self.flush),
            RouteName.SPEAKING_STOP: with_id(self.stop),
        }

    # -- routes --------------------------------------------------------------------------------------

    async def create(self, data: Any) -> Response:
        try:
            request = SpeakingCreate.from_data(data)
            check_columns(request)
        except WireError as exc:
            log.info("speaking create: bad request: %s", exc.reason)
            return envelope.plain_error(400)
        provider = request.provider or DEFAULT_PROVIDER
        speaking = Speaking(
            id=uuid.uuid4(),
            customer_id=request.customer_id,
            reference_type=request.reference_type,
            reference_id=request.reference_id,
            language=request.language,
            provider=provider,
            voice_id=request.voice_id,
            direction=request.direction,
            status=INITIATING,
            pod_id=self._pod_id,
            tm_create=now_utc(),
        )
        sid = speaking.id
        try:
            inserted = await self._store.insert_if_free(speaking)
        except StoreError as exc:
            log.error("speaking create: store failed: %s", exc)
            return envelope.plain_error(500)
        if not inserted:
            self.stats.refused_duplicate += 1
            log.info(
                "speaking create refused: a live speaking holds %s %s",
                request.reference_type,
                request.reference_id,
            )
            return envelope.plain_error(500)
        live = self.live[sid] = LiveSpeaking(sid)
        try:
            return await self._start(live, speaking, request)
        finally:
            live.creating = False
            if not live.active or (live.written is not None and live.written.is_set()):
                self.live.pop(sid, None)

    async def _start(self, live: LiveSpeaking, speaking: Speaking, request: SpeakingCreate) -> Response:
        sid = speaking.id
        started = await self._streamings.start(
            models.StreamingCreate(
                customer_id=request.customer_id,
                reference_type=request.reference_type,
                reference_id=request.reference_id,
                language=request.language,
                gender="neutral",
                direction=request.direction,
            ),
            streaming_id=sid,
            provider=speaking.provider,
            voice_id=speaking.voice_id,
            engine=self._providers.engine_for(speaking.provider, request=f"speaking={sid}"),
            wire_message_id=NIL_UUID,
        )
        row: Speaking | None = None
        if not started.is_error and not live.ended and not live.stopping:
            try:
                row = await self._store.transition(sid, (INITIATING,), ACTIVE)
            except StoreError as exc:
                log.error("speaking=%s create: activation failed: %s", sid, exc)
        if row is None:
            # The stream failed or ended, or a stop got to the row first: nothing was announced. The
            # row's stop is written in the background (retried if the database is failing).
            self.stats.create_failed += 1
            live.stopping = True
            if not started.is_error:
                await self._streamings.delete(sid)
            self._write_stop_soon(live)
            return envelope.plain_error(500)
        live.active = True
        self.stats.created += 1
        self._publish(EventType.SPEAKING_STARTED, row)
        self.stats.started_events += 1
        if live.deferred_stop is not None:
            self._announce_stopped(live.deferred_stop)  # a stop won the race after activation
            self.live.pop(sid, None)
        elif live.ended or live.stopping:
            self._write_stop_soon(live)  # the stream ended while the row was being activated
        return envelope.ok(row.to_data())

    async def list_page(self, match: RouteMatch) -> Response:
        if match.uri_error:
            return envelope.plain_error(400)
        try:
            where = list_filter(match.query)
        except WireError as exc:
            log.info("speaking list: %s", exc.reason)
            return envelope.plain_error(400)
        try:
            rows = await self._store.list_page(where)
        except StoreError as exc:
            log.error("speaking list: store failed: %s", exc)
            return envelope.plain_error(500)
        return envelope.ok([row.to_data() for row in rows])

    async def get(self, speaking_id: uuid.UUID) -> Response:
        try:
            row = await self._store.get(speaking_id)
        except StoreError as exc:
            log.error("speaking=%s get: store failed: %s", speaking_id, exc)
            return envelope.plain_error(500)
        return envelope.plain_error(404) if row is None else envelope.ok(row.to_data())

    async def delete(self, speaking_id: uuid.UUID) -> Response:
        """Soft delete (``tm_delete`` = ``tm_update`` = now, kept on a second delete); audio goes on."""
        try:
            row = await self._store.soft_delete(speaking_id, self._clock())
        except StoreError as exc:
            log.error("speaking=%s delete: store failed: %s", speaking_id, exc)
            return envelope.plain_error(500)
        return envelope.plain_error(404) if row is None else envelope.ok(row.to_data())

    async def say(self, speaking_id: uuid.UUID, data: Any) -> Response:
        try:
            request = SpeakingSay.from_data(data, max_text_bytes=self._max_text_bytes)
        except TextTooLongError as exc:
            log.info("speaking=%s say refused: %s", speaking_id, exc.reason)
            return envelope.plain_error(404)
        except WireError as exc:
            log.info("speaking=%s say: bad request: %s", speaking_id, exc.reason)
            return envelope.plain_error(400)
        row = await self._usable(speaking_id)
        if isinstance(row, Response):
            return row
        try:
            await self._streamings.speak(speaking_id, request.text)
        except CommandError as exc:
            log.info("speaking=%s say refused: %s", speaking_id, exc)
            return envelope.plain_error(404)
        return envelope.ok(row.to_data())

    async def flush(self, speaking_id: uuid.UUID) -> Response:
        row = await self._usable(speaking_id)
        if isinstance(row, Response):
            return row
        try:
            await self._streamings.barge_in(speaking_id)
        except CommandError as exc:
            log.info("speaking=%s flush refused: %s", speaking_id, exc)
            return envelope.plain_error(404)
        return envelope.ok(row.to_data())

    async def stop(self, speaking_id: uuid.UUID) -> Response:
        """The audio ends first, whatever the database does; then the row (retried in the background
        while the database fails: the reply is then 500, and ``speaking_stopped`` follows the write)."""
        answer_by = trio.current_time() + self._stop_retry.reply_within  # callers give up after 3 s
        live = self.live.get(speaking_id)
        if live is None:
            return await self._stop_not_held(speaking_id)
        if not live.stopping:
            live.stopping = True
            # Go's streaming DELETE steps, errors ignored: external media, socket, vendor all end here.
            await self._streamings.delete(speaking_id)
        written = self._write_stop_soon(live)
        with trio.move_on_at(answer_by):
            await written.wait()
        if live.result is None:
            return envelope.plain_error(500)  # audio stopped; the row follows when the database answers
        if live.result.row is None:
            return envelope.plain_error(404)
        return envelope.ok(live.result.row.to_data())

    async def _stop_not_held(self, speaking_id: uuid.UUID) -> Response:
        try:
            row = await self._store.get(speaking_id)
        except StoreError as exc:
            log.error("speaking=%s stop: store failed: %s", speaking_id, exc)
            return envelope.plain_error(500)
        if row is None:
            return envelope.plain_error(404)
        if row.status == STOPPED:
            return envelope.ok(row.to_data())  # unchanged, no event
        if row.pod_id != self._pod_id:
            raise NotOwned(fallback=lambda: self._stop_unowned(speaking_id))
        # Ours but not held: a crashed run's row the startup sweep missed, or a write given up on.
        return await self._stop_once(speaking_id, "not held by this pod")

    async def _stop_unowned(self, speaking_id: uuid.UUID) -> Response:
        """No pod answered for this row's owner: it is gone, and so is its stream. Stop the row."""
        log.warning("speaking=%s: its pod did not answer; stopping the row here", speaking_id)
        return await self._stop_once(speaking_id, "its pod did not answer")

    # -- helpers -----------------------------------------------------------------------------------------

    async def _usable(self, speaking_id: uuid.UUID) -> Speaking | Response:
        """The row of an active speaking whose stream this pod holds, else the route's answer (404; 500
        when the store fails); a live row of another pod raises NotOwned so the plane forwards it."""
        try:
            row = await self._store.get(speaking_id)
        except StoreError as exc:
            log.error("speaking=%s read failed: %s", speaking_id, exc)
            return envelope.plain_error(500)
        live = self.live.get(speaking_id)
        if row is not None and live is None and row.status == ACTIVE and row.pod_id != self._pod_id:
            raise NotOwned(fallback=_not_found)
        if row is None or row.status != ACTIVE or live is None or not live.active or live.ended:
            return envelope.plain_error(404)
        return row


async def _not_found() -> Response:
    return envelope.plain_error(404)
