"""Orphaned speakings: who closes the rows of a pod that died without stopping them, and with which end.

Every tts-streamer pod heartbeats its ``pod_id`` into ``tts_streamer_pod`` (a table of our own; the Go
table is never altered) every ``heartbeat_every`` seconds. A live speaking whose owner is in that table
and has not been seen for ``owner_timeout`` is an orphan; **any** pod closes it:

* the row goes to ``stopped`` with ``tm_update`` = the owner's last heartbeat (never earlier than the
  row's ``tm_create``). The owner was provably alive then, and its audio died with it within one
  heartbeat interval after, so this under-bills by at most ``heartbeat_every`` and never bills the
  downtime (the time of the sweep would bill the whole ``owner_timeout`` and more);
* ``speaking_stopped`` is published for rows that were ``active`` (one per ``speaking_started``: the
  close is the store's compare-and-set, so of several pods sweeping at once exactly one wins),
  ``streaming_deleted`` for the speaking's streaming, and call-manager is asked to DELETE the external
  media (the speaking id is the external-media id) so it tears down the snoop and bridge it made.

A pod sweeps only once its own heartbeats have succeeded for a whole ``owner_timeout``: after an
outage of the database every pod looks stale, and a pod that came back first must not close the calls
of pods that simply have not written their next heartbeat yet. Rows whose pod_id never heartbeats here
(Go tts-manager pods sharing the table during a migration) are never swept: nothing says they are dead.

A pod restarting under its own name closes its earlier run's rows at once (``recover_own``), with that
run's last heartbeat as the end time.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable
from typing import Final, Protocol

import attrs
import trio

from tts_streamer.adapters.speaking_schema import SpeakingRows, StoreError, now_utc
from tts_streamer.adapters.voipbin import envelope, models
from tts_streamer.adapters.voipbin.call_manager import CallManagerError
from tts_streamer.adapters.voipbin.envelope import EventType
from tts_streamer.adapters.voipbin.models import Speaking
from tts_streamer.adapters.voipbin.wire import NIL_UUID
from tts_streamer.supervisor.services.speaking_parts import ACTIVE, EventSink

log = logging.getLogger(__name__)

_MEDIA_DELETE_TIMEOUT: Final = 3.0


class MediaDeleter(Protocol):
    """call-manager's external-media DELETE (adapters/voipbin/call_manager.CallManager; a fake in tests)."""

    async def delete_external_media(self, media_id: uuid.UUID) -> None: ...


@attrs.frozen
class LivenessConfig:
    heartbeat_every: float = 5.0  # SPEAKING_HEARTBEAT_INTERVAL
    owner_timeout: float = 60.0  # SPEAKING_OWNER_TIMEOUT
    forget_pods_after: float = 7 * 86400.0  # pod rows with no live speaking, not seen for a week


@attrs.define
class RecoveryStats:
    heartbeats: int = 0
    heartbeat_failures: int = 0
    recovered_own: int = 0  # rows of an earlier run of this pod
    swept: int = 0  # rows of other pods that stopped heartbeating
    media_deleted: int = 0
    media_delete_failed: int = 0


def streaming_of(row: Speaking) -> models.Streaming:
    """The streaming a speaking ran on, as StreamingService published it (for ``streaming_deleted``)."""
    return models.Streaming(
        id=row.id,
        customer_id=row.customer_id,
        pod_id=row.pod_id,
        activeflow_id=NIL_UUID,
        reference_type=row.reference_type,
        reference_id=row.reference_id,
        language=row.language,
        gender="neutral",
        provider=row.provider,
        voice_id=row.voice_id,
        direction=row.direction,
        message_id=NIL_UUID,
    )


class OrphanSweeper:
    def __init__(
        self,
        store: SpeakingRows,
        publisher: EventSink,
        call_manager: MediaDeleter | None,
        *,
        pod_id: str,
        config: LivenessConfig = LivenessConfig(),
        is_held: Callable[[uuid.UUID], bool] = lambda _sid: False,
        clock: Callable[[], dt.datetime] = now_utc,
    ) -> None:
        self.stats = RecoveryStats()
        self.config = config
        self.recovered = False
        self.healthy_since: float | None = None  # trio time of the first heartbeat of this healthy spell
        self._store = store
        self._publisher = publisher
        self._call_manager = call_manager
        self._pod_id = pod_id
        self._is_held = is_held
        self._clock = clock

    async def recover_own(self) -> int:
        """Close the rows an earlier run of this pod left live (before this run's first heartbeat, which
        would overwrite the earlier run's last one). Raises StoreError; ``serve`` retries it."""
        last_seen = await self._store.last_seen(self._pod_id)
        rows = [row for row in await self._store.live_rows_of_pod(self._pod_id) if not self._is_held(row.id)]
        closed = 0
        for row in rows:
            # Without a heartbeat on record (rows from before this table existed) now is all we know.
            closed += await self._close(row, last_seen or self._clock())
        if rows:
            log.warning(
                "pod=%s closed %d speaking(s) left live by an earlier run (end time: its last heartbeat %s)",
                self._pod_id,
                closed,
                last_seen.isoformat() if last_seen else "unknown, so now",
            )
        self.stats.recovered_own += closed
        self.recovered = True
        return closed

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat (and sweep) every ``heartbeat_every`` seconds; call ``beat`` once first."""
        task_status.started()
        while True:
            await trio.sleep(self.config.heartbeat_every)
            await self.beat()

    async def beat(self) -> None:
        """One round: recover (until it has worked once), heartbeat, and sweep when trusted to."""
        try:
            if not self.recovered:
                await self.recover_own()
            await self._store.heartbeat(self._pod_id, self._clock())
        except StoreError as exc:
            if self.healthy_since is not None or self.stats.heartbeat_failures == 0:
                log.error("pod=%s heartbeat failed (database): %s", self._pod_id, exc)
            self.stats.heartbeat_failures += 1
            self.healthy_since = None
            return
        self.stats.heartbeats += 1
        now = trio.current_time()
        if self.healthy_since is None:
            self.healthy_since = now
        if now - self.healthy_since >= self.config.owner_timeout:
            try:
                await self.sweep()
            except StoreError as exc:
                log.error("pod=%s orphan sweep failed: %s", self._pod_id, exc)

    async def sweep(self) -> int:
        """Close the live rows of our pods not seen for ``owner_timeout``. Raises StoreError."""
        cutoff = self._clock() - dt.timedelta(seconds=self.config.owner_timeout)
        closed = 0
        for orphan in await self._store.orphans(cutoff, exclude_pod=self._pod_id):
            if await self._close(orphan.row, orphan.owner_last_seen):
                closed += 1
                log.warning(
                    "speaking=%s of pod %s (not seen since %s) closed by pod %s",
                    orphan.row.id,
                    orphan.row.pod_id,
                    orphan.owner_last_seen.isoformat(),
                    self._pod_id,
                )
        self.stats.swept += closed
        forget = self._clock() - dt.timedelta(seconds=self.config.forget_pods_after)
        await self._store.forget_pods(forget)
        return closed

    async def _close(self, row: Speaking, owner_last_seen: dt.datetime) -> int:
        ended_at = max(owner_last_seen, row.tm_create) if row.tm_create else owner_last_seen
        result = await self._store.stop(row.id, ended_at)
        if result.previous is None or result.row is None:
            return 0  # closed meanwhile by its owner, a stop or another sweeper: theirs to announce
        if result.previous == ACTIVE:
            self._publisher.publish(envelope.make_event(EventType.SPEAKING_STOPPED, result.row.to_data()))
        self._publisher.publish(envelope.make_event(EventType.STREAMING_DELETED, streaming_of(row).to_data()))
        await self._delete_media(row.id)
        return 1

    async def _delete_media(self, media_id: uuid.UUID) -> None:
        if self._call_manager is None:
            return
        with trio.move_on_after(_MEDIA_DELETE_TIMEOUT) as scope:
            try:
                await self._call_manager.delete_external_media(media_id)
                self.stats.media_deleted += 1
                return
            except CallManagerError as exc:
                # 500 for an id call-manager no longer has: the leg hung up when our socket died.
                log.info("speaking=%s external media not deleted: %s", media_id, exc)
        if scope.cancelled_caught:
            log.info("speaking=%s external media DELETE unanswered", media_id)
        self.stats.media_delete_failed += 1
