"""How a speaking ends (the state and half of SpeakingService, supervisor/services/speakings.py, that is not
routes): the stream-end listeners, the one writer per ended speaking that stops its row with the real
end time, retried while the database fails, and the ``speaking_stopped`` announcement, exactly once.
docs/speakings.md, "Every speaking_started gets exactly one speaking_stopped"."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable

import trio

from tts_streamer.actors import events as ev
from tts_streamer.adapters.speaking_schema import SpeakingRows, StoreError, now_utc
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import EventType, Response
from tts_streamer.adapters.voipbin.models import Speaking
from tts_streamer.supervisor.services.speaking_parts import (
    ACTIVE,
    INITIATING,
    EventSink,
    LiveSpeaking,
    SpeakingStats,
    SpeakingStreams,
    StopRetry,
    stopped_at,
    write_stop_with_retries,
)

log = logging.getLogger("tts_streamer.supervisor.services.speakings")  # one logger for the whole service


class SpeakingEnds:
    def __init__(
        self,
        store: SpeakingRows,
        streamings: SpeakingStreams,
        publisher: EventSink,
        nursery: trio.Nursery,
        *,
        pod_id: str,
        stop_on_vendor_error: bool = True,
        stop_retry: StopRetry = StopRetry(),
        clock: Callable[[], dt.datetime] = now_utc,
    ) -> None:
        self.stats = SpeakingStats()
        self.live: dict[uuid.UUID, LiveSpeaking] = {}
        self._store = store
        self._streamings = streamings
        self._publisher = publisher
        self._nursery = nursery
        self._pod_id = pod_id
        self._stop_on_vendor_error = stop_on_vendor_error
        self._stop_retry = stop_retry
        self._clock = clock
        # Ended speakings whose stopped row is not written yet (database failing): id -> end time.
        self.unwritten: dict[uuid.UUID, dt.datetime] = {}
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Shutdown: wait until every ended stream's row is stopped and its event handed to the publisher
        (the daemon bounds this by DRAIN_TIMEOUT, then calls ``report_unwritten``)."""
        while self._pending:
            await self._idle.wait()

    def report_unwritten(self) -> int:
        """Shutdown: name every speaking whose stopped row could not be written (the database failing),
        with the end time it should have had; another pod's sweep closes them (docs/speakings.md)."""
        for speaking_id, ended_at in sorted(self.unwritten.items(), key=lambda item: item[1]):
            log.error(
                "speaking=%s ended at %s but its row is still live: the database failed; "
                "another pod's sweep will close it",
                speaking_id,
                ended_at.isoformat(),
            )
        return len(self.unwritten)

    @property
    def pending(self) -> int:
        return self._pending

    # -- stream ends -----------------------------------------------------------------------------------

    def on_streaming_ended(self, streaming_id: uuid.UUID, reason: str) -> None:
        """StreamingService end listener: whatever ended the stream, its row goes to ``stopped``."""
        live = self.live.get(streaming_id)
        if live is None:
            return
        live.ended = True
        live.ended_at = live.ended_at or self._clock()  # the billing end: now, not when the row is written
        live.end_reason = live.end_reason or reason
        if live.active and not live.stopping:
            # The create route handles streams that end before activation; the stop route its own.
            live.stopping = True
            self._write_stop_soon(live)

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
        live = self.live.get(speaking_id)
        await self._streamings.delete(speaking_id)
        if live is not None:
            self._write_stop_soon(live)

    async def _stop_once(self, speaking_id: uuid.UUID, why: str) -> Response:
        """One compare-and-set for a row whose stream is not here (no retries: the caller sees 500)."""
        try:
            result = await self._store.stop(speaking_id, self._clock())
        except StoreError as exc:
            log.error("speaking=%s stop (%s): store failed: %s", speaking_id, why, exc)
            return envelope.plain_error(500)
        if result.previous == ACTIVE and result.row is not None:
            self._announce_stopped(result.row)
        return envelope.plain_error(404) if result.row is None else envelope.ok(result.row.to_data())

    def _write_stop_soon(self, live: LiveSpeaking) -> trio.Event:
        """Start the one writer of this speaking's stopped row (idempotent); the event it sets when done."""
        if live.written is None:
            live.ended_at = live.ended_at or self._clock()
            live.written = trio.Event()
            self._spawn(lambda _sid: self._write_stop(live), live.speaking_id)
        return live.written

    async def _write_stop(self, live: LiveSpeaking) -> None:
        """The row to ``stopped`` with the real end time, retried while the database fails; announced
        when this write moved it out of ``active``. A write whose commit succeeded but whose answer was
        lost shows on the retry as a row already stopped at exactly our end time: that one was ours."""
        sid, ended_at = live.speaking_id, live.ended_at or self._clock()
        assert live.written is not None

        def failed(_exc: StoreError) -> None:
            self.stats.stop_write_failures += 1
            self.unwritten[sid] = ended_at

        try:
            written = await write_stop_with_retries(
                self._store, sid, ended_at, self._stop_retry, on_failure=failed
            )
            if written is None:
                self.stats.stops_abandoned += 1
                return
            result = written.result
            previous = result.previous
            if previous is None and written.retried and stopped_at(result.row, ended_at):
                previous = ACTIVE if live.active else INITIATING
            if previous == ACTIVE and result.row is not None:
                self._announce_stopped(result.row)
            if written.retried:
                log.warning("speaking=%s stop written after the database came back", sid)
            live.result = result
            self.unwritten.pop(sid, None)
            log.info("speaking=%s stopped (%s)", sid, live.end_reason or "ended")
        finally:
            live.written.set()
            if not live.creating:
                self.live.pop(sid, None)

    def _announce_stopped(self, row: Speaking) -> None:
        live = self.live.get(row.id)
        if live is not None and live.creating and not live.active:
            live.deferred_stop = row  # the create route publishes speaking_started first, then this
            return
        self._publish(EventType.SPEAKING_STOPPED, row)
        self.stats.stopped_events += 1

    def _spawn(self, fn: Callable[[uuid.UUID], Awaitable[None]], speaking_id: uuid.UUID) -> None:
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            self._nursery.start_soon(self._tracked, fn, speaking_id, name=f"speaking-end[{speaking_id}]")
        except RuntimeError:
            # The services are torn down (the daemon failing or killed): nobody is left to write the
            # row here; the next run of this pod, or another pod's sweep, closes it.
            self._pending -= 1
            if not self._pending:
                self._idle.set()
            log.warning("speaking=%s ended after the services stopped: row left to the sweep", speaking_id)

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
