"""The ``/v1/speakings`` routes: voipbin's public "speak into this call" API, with its stored row.

Same bodies, codes and JSON as the Go tts-manager (shared/reference/voipbin-wire.md §4.3), built on the
StreamingService: the speaking id is the streaming id (and call-manager's external-media id). The row
lives in ``tts_manager_speaking`` (adapters/speaking_store.py); what billing depends on is fixed here:

* a speaking reaches ``stopped`` with one ``speaking_stopped`` (carrying ``tm_update``) **whenever** its
  stream ends: the stop route, hang-up, WebSocket loss, vendor failure, daemon shutdown, and on startup
  for rows a crashed run of this pod left live. Every path ends in the store's compare-and-set ``stop``,
  and only the caller that moved the row out of ``active`` publishes, so each ``speaking_started`` gets
  exactly one ``speaking_stopped`` and a row that never became active gets none;
* two creates for the same customer and reference race in the database, not in memory: exactly one
  inserts its row (see the store), the other answers 500 as Go does for a duplicate.

Ownership: say/flush/stop act on the pod holding the stream. A request that reaches another pod is
forwarded by the command plane; when no pod answers (the owner died), stop still stops the row.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

import attrs
import trio

from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import CommandError
from tts_streamer.adapters.speaking_store import ListFilter, SpeakingStore, StopResult, StoreError, now_utc
from tts_streamer.adapters.voipbin import envelope, models
from tts_streamer.adapters.voipbin.envelope import EventType, Response
from tts_streamer.adapters.voipbin.models import (
    SPEAKING_SAY_MAX_TEXT_BYTES,
    Speaking,
    SpeakingCreate,
    SpeakingSay,
    SpeakingStatus,
)
from tts_streamer.adapters.voipbin.routes import RouteMatch, RouteName
from tts_streamer.adapters.voipbin.wire import (
    NIL_UUID,
    TextTooLongError,
    WireError,
    parse_timestamp,
    uuid_from_string_or_nil,
)
from tts_streamer.supervisor.command_plane import Handler, NotOwned
from tts_streamer.supervisor.event_publisher import EventPublisher
from tts_streamer.supervisor.providers import ProviderResolver
from tts_streamer.supervisor.streamings import StreamingService

log = logging.getLogger(__name__)

DEFAULT_PROVIDER: Final = "elevenlabs"
PAGE_SIZE_MAX: Final = 100
_LEGACY_TOKEN: Final = "%Y-%m-%d %H:%M:%S.%f"  # voipbin's pre-2026 timestamp text
_STOP_RETRIES: Final = 3

ACTIVE: Final = SpeakingStatus.ACTIVE.value
INITIATING: Final = SpeakingStatus.INITIATING.value
STOPPED: Final = SpeakingStatus.STOPPED.value


@attrs.define(eq=False)
class _Live:
    """A speaking whose stream this pod holds (from its create until its row is stopped)."""

    speaking_id: uuid.UUID
    creating: bool = True  # the create route has not finished yet
    active: bool = False  # speaking_started has been published
    ended: bool = False  # the stream is gone
    end_reason: str = ""
    stopping: bool = False  # a stop (route or vendor failure) is ending it
    deferred_stop: Speaking | None = None  # stopped before create announced it: create publishes it


@attrs.define
class SpeakingStats:
    created: int = 0
    refused_duplicate: int = 0
    create_failed: int = 0
    started_events: int = 0
    stopped_events: int = 0
    recovered: int = 0


def parse_page_token(token: str) -> dt.datetime:
    """A page token is a ``tm_create`` (``YYYY-MM-DDTHH:MM:SS.ffffffZ``, or voipbin's older text form)."""
    try:
        return parse_timestamp(token)
    except WireError:
        pass
    try:
        return dt.datetime.strptime(token, _LEGACY_TOKEN).replace(tzinfo=dt.UTC)
    except ValueError:
        raise WireError(f"invalid page_token {token[:40]!r}") from None


def page_size(raw: str | None) -> int:
    """Go: an unparsable size is ignored (100); 0 or over 100 becomes 100."""
    size = int(raw) if raw and raw.isascii() and raw.isdigit() else PAGE_SIZE_MAX
    return PAGE_SIZE_MAX if size == 0 or size > PAGE_SIZE_MAX else size


class SpeakingService:
    def __init__(
        self,
        store: SpeakingStore,
        streamings: StreamingService,
        publisher: EventPublisher,
        nursery: trio.Nursery,
        *,
        pod_id: str,
        engines: Collection[str] = (),
        max_text_bytes: int = SPEAKING_SAY_MAX_TEXT_BYTES,
        stop_on_vendor_error: bool = True,
        providers: ProviderResolver | None = None,
    ) -> None:
        self.stats = SpeakingStats()
        self.live: dict[uuid.UUID, _Live] = {}
        self._store = store
        self._streamings = streamings
        self._publisher = publisher
        self._nursery = nursery
        self._pod_id = pod_id
        self._engines = frozenset(engines)
        self._providers = providers or ProviderResolver.of(engines)
        self._max_text_bytes = max_text_bytes
        self._stop_on_vendor_error = stop_on_vendor_error
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    def routes(self) -> dict[RouteName, Handler]:
        return {
            RouteName.SPEAKING_CREATE: lambda call: self.create(call.data),
            RouteName.SPEAKING_LIST: lambda call: self.list_page(call.match),
            RouteName.SPEAKING_GET: lambda call: self.get(call.id),
            RouteName.SPEAKING_DELETE: lambda call: self.delete(call.id),
            RouteName.SPEAKING_SAY: lambda call: self.say(call.id, call.data),
            RouteName.SPEAKING_FLUSH: lambda call: self.flush(call.id),
            RouteName.SPEAKING_STOP: lambda call: self.stop(call.id),
        }

    # -- lifecycle -----------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Startup: stop the rows a crashed run of this pod left live (their streams died with it) and
        publish ``speaking_stopped`` for those that had been announced. Returns how many were stopped."""
        ids = await self._store.live_ids_of_pod(self._pod_id)
        for speaking_id in ids:
            result = await self._store.stop(speaking_id)
            if result.previous == ACTIVE and result.row is not None:
                self._announce_stopped(result.row)
        if ids:
            log.warning("pod=%s stopped %d speaking(s) left live by an earlier run", self._pod_id, len(ids))
        self.stats.recovered += len(ids)
        return len(ids)

    async def drain(self) -> None:
        """Shutdown: wait until every ended stream's row is stopped and its event handed to the publisher."""
        while self._pending:
            await self._idle.wait()

    @property
    def pending(self) -> int:
        return self._pending

    # -- routes --------------------------------------------------------------------------------------

    async def create(self, data: Any) -> Response:
        try:
            request = SpeakingCreate.from_data(data)
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
        live = self.live[sid] = _Live(sid)
        try:
            return await self._start(live, speaking, request)
        finally:
            live.creating = False
            if not live.active:
                self.live.pop(sid, None)

    async def _start(self, live: _Live, speaking: Speaking, request: SpeakingCreate) -> Response:
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
            # The stream failed or ended, or a stop got to the row first: nothing was announced.
            self.stats.create_failed += 1
            if not started.is_error:
                await self._streamings.delete(sid)
            await self._stop_row(sid)
            return envelope.plain_error(500)
        live.active = True
        self.stats.created += 1
        self._publish(EventType.SPEAKING_STARTED, row)
        self.stats.started_events += 1
        if live.deferred_stop is not None:
            self._announce_stopped(live.deferred_stop)  # a stop won the race after activation
            self.live.pop(sid, None)
        elif live.ended or live.stopping:
            self._spawn(self._finish, sid)  # the stream ended while the row was being activated
        return envelope.ok(row.to_data())

    async def list_page(self, match: RouteMatch) -> Response:
        if match.uri_error:
            return envelope.plain_error(400)
        query = match.query
        token = query.get("page_token", "")
        try:
            before = parse_page_token(token) if token else now_utc()
        except WireError as exc:
            log.info("speaking list: %s", exc.reason)
            return envelope.plain_error(400)
        customer_id, reference_id = query.get("customer_id"), query.get("reference_id")
        where = ListFilter(
            before=before,
            limit=page_size(query.get("page_size")),
            # Go: FromStringOrNil, so a malformed id filters on the nil UUID.
            customer_id=uuid_from_string_or_nil(customer_id) if customer_id else None,
            reference_type=query.get("reference_type") or None,
            reference_id=uuid_from_string_or_nil(reference_id) if reference_id else None,
            status=query.get("status") or None,
        )
        try:
            rows = await self._store.list_page(where)
        except StoreError as exc:
            log.error("speaking list: store failed: %s", exc)
            return envelope.plain_error(500)
        return envelope.ok([row.to_data() for row in rows])

    async def get(self, speaking_id: uuid.UUID) -> Response:
        row = await self._read(speaking_id)
        return envelope.plain_error(404) if row is None else envelope.ok(row.to_data())

    async def delete(self, speaking_id: uuid.UUID) -> Response:
        """Soft delete (``tm_delete`` = ``tm_update`` = now, kept on a second delete); audio goes on."""
        try:
            row = await self._store.soft_delete(speaking_id)
        except StoreError as exc:
            log.error("speaking=%s delete: store failed: %s", speaking_id, exc)
            return envelope.plain_error(404)
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
        row = await self._read(speaking_id)
        if row is None:
            return envelope.plain_error(404)
        if row.status == STOPPED:
            return envelope.ok(row.to_data())  # unchanged, no event
        live = self.live.get(speaking_id)
        if live is None and row.pod_id != self._pod_id:
            raise NotOwned(fallback=lambda: self._stop_unowned(speaking_id))
        if live is not None:
            live.stopping = True
            # Go's streaming DELETE steps, errors ignored: external media, socket, vendor all end here.
            await self._streamings.delete(speaking_id)
        result = await self._stop_row(speaking_id)
        if live is not None and not live.creating:
            self.live.pop(speaking_id, None)
        if result is None or result.row is None:
            return envelope.plain_error(404)
        return envelope.ok(result.row.to_data())

    # -- stream ends -----------------------------------------------------------------------------------

    def on_streaming_ended(self, streaming_id: uuid.UUID, reason: str) -> None:
        """StreamingService end listener: whatever ended the stream, its row goes to ``stopped``."""
        live = self.live.get(streaming_id)
        if live is None:
            return
        live.ended = True
        live.end_reason = live.end_reason or reason
        if live.active and not live.stopping:
            # The create route handles streams that end before activation; the stop route its own.
            live.stopping = True
            self._spawn(self._finish, streaming_id)

    def on_session_event(self, event: ev.SessionEvent) -> None:
        """Event-bus listener: a vendor failure ends the speaking (nothing else would tell the caller)."""
        if not (self._stop_on_vendor_error and isinstance(event, ev.SessionError)):
            return
        if not event.kind.startswith("vendor_"):
            return
        try:
            live = self.live.get(uuid.UUID(event.call_id))
        except ValueError:
            return
        if live is None or not live.active or live.ended or live.stopping:
            return
        log.warning("speaking=%s vendor failed (%s): stopping it", live.speaking_id, event.reason)
        live.stopping = True
        live.end_reason = event.kind
        self._spawn(self._end_stream, live.speaking_id)

    async def _end_stream(self, speaking_id: uuid.UUID) -> None:
        await self._streamings.delete(speaking_id)
        await self._finish(speaking_id)

    async def _finish(self, speaking_id: uuid.UUID) -> None:
        live = self.live.get(speaking_id)
        result = await self._stop_row(speaking_id)
        if live is not None and result is not None:
            log.info("speaking=%s stopped (%s)", speaking_id, live.end_reason or "ended")
        self.live.pop(speaking_id, None)

    async def _stop_unowned(self, speaking_id: uuid.UUID) -> Response:
        """No pod answered for this row's owner: it is gone, and so is its stream. Stop the row."""
        log.warning("speaking=%s: its pod did not answer; stopping the row here", speaking_id)
        result = await self._stop_row(speaking_id)
        if result is None or result.row is None:
            return envelope.plain_error(404)
        return envelope.ok(result.row.to_data())

    async def _stop_row(self, speaking_id: uuid.UUID) -> StopResult | None:
        """Compare-and-set the row to ``stopped``; announce it when this call moved it out of
        ``active``. A database hiccup is retried briefly; after that the startup sweep has it."""
        for attempt in range(1, _STOP_RETRIES + 1):
            try:
                result = await self._store.stop(speaking_id)
            except StoreError as exc:
                log.error("speaking=%s stop: store failed (try %d): %s", speaking_id, attempt, exc)
                if attempt < _STOP_RETRIES:
                    await trio.sleep(0.2 * attempt)
                continue
            if result.previous == ACTIVE and result.row is not None:
                self._announce_stopped(result.row)
            return result
        return None

    def _announce_stopped(self, row: Speaking) -> None:
        live = self.live.get(row.id)
        if live is not None and live.creating and not live.active:
            live.deferred_stop = row  # the create route publishes speaking_started first, then this
            return
        self._publish(EventType.SPEAKING_STOPPED, row)
        self.stats.stopped_events += 1

    # -- helpers -----------------------------------------------------------------------------------------

    async def _read(self, speaking_id: uuid.UUID) -> Speaking | None:
        try:
            return await self._store.get(speaking_id)
        except StoreError as exc:
            log.error("speaking=%s read failed: %s", speaking_id, exc)
            return None

    async def _usable(self, speaking_id: uuid.UUID) -> Speaking | Response:
        """The row of an active speaking whose stream this pod holds, else the route's answer (404); a
        live row of another pod raises NotOwned so the plane forwards the request to it."""
        row = await self._read(speaking_id)
        live = self.live.get(speaking_id)
        if row is not None and live is None and row.status == ACTIVE and row.pod_id != self._pod_id:
            raise NotOwned(fallback=_not_found)
        if row is None or row.status != ACTIVE or live is None or not live.active or live.ended:
            return envelope.plain_error(404)
        return row

    def _spawn(self, fn: Callable[[uuid.UUID], Awaitable[None]], speaking_id: uuid.UUID) -> None:
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        self._nursery.start_soon(self._tracked, fn, speaking_id, name=f"speaking-end[{speaking_id}]")

    async def _tracked(self, fn: Callable[[uuid.UUID], Awaitable[None]], speaking_id: uuid.UUID) -> None:
        try:
            await fn(speaking_id)
        except Exception:
            log.exception("speaking=%s ending failed", speaking_id)
        finally:
            self._pending -= 1
            if not self._pending:
                self._idle.set()

    def _publish(self, event_type: EventType, row: Speaking) -> None:
        self._publisher.publish(envelope.make_event(event_type, row.to_data()))


async def _not_found() -> Response:
    return envelope.plain_error(404)
