"""In-memory stand-ins for the speaking service's collaborators, so its races run under the autojump
clock: a ``SpeakingRows`` store with injectable outages (and lost commit acknowledgements), a streaming
service whose streams end when told, an event sink, and a call-manager that records DELETEs.

The store follows the SQL store's semantics (tests/test_speaking_store.py pins those on SQLite and
MariaDB): conditional insert, compare-and-set transitions, ``stop`` with the caller's end time, the pod
liveness table."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Collection
from typing import Any

import attrs
import trio

from tts_streamer.adapters.speaking_schema import (
    LIVE_STATUSES,
    ListFilter,
    Orphan,
    StopResult,
    StoreError,
)
from tts_streamer.adapters.voipbin import envelope, models
from tts_streamer.adapters.voipbin.envelope import Event, Response
from tts_streamer.adapters.voipbin.models import Speaking

BASE_TIME = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)


def virtual_clock() -> dt.datetime:
    """Wall time that follows Trio's (virtual) clock: end times become checkable under autojump."""
    return BASE_TIME + dt.timedelta(seconds=trio.current_time())


class FakeSpeakingStore:
    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, Speaking] = {}
        self.pods: dict[str, dt.datetime] = {}
        self.down = False  # every call raises StoreError, as against an unreachable database
        self.down_until: float | None = None  # ... until this trio time
        self.lose_stop_acks = 0  # this many stops commit, then raise (the answer lost on the wire)
        self.calls: list[str] = []

    def outage(self, seconds: float) -> None:
        self.down_until = trio.current_time() + seconds

    async def _enter(self, name: str) -> None:
        self.calls.append(name)
        await trio.sleep(0.001)  # a round trip: lets racing tasks interleave
        if self.down or (self.down_until is not None and trio.current_time() < self.down_until):
            raise StoreError("OperationalError: (2003) Can't connect to MySQL server")

    async def insert_if_free(self, speaking: Speaking) -> bool:
        await self._enter("insert_if_free")
        for row in self.rows.values():
            same = (row.customer_id, row.reference_type, row.reference_id) == (
                speaking.customer_id,
                speaking.reference_type,
                speaking.reference_id,
            )
            if same and row.status in LIVE_STATUSES and row.tm_delete is None:
                return False
        self.rows[speaking.id] = speaking
        return True

    async def get(self, speaking_id: uuid.UUID) -> Speaking | None:
        await self._enter("get")
        return self.rows.get(speaking_id)

    async def transition(
        self, speaking_id: uuid.UUID, from_: Collection[str], to: str, now: dt.datetime | None = None
    ) -> Speaking | None:
        await self._enter("transition")
        row = self.rows.get(speaking_id)
        if row is None or row.status not in from_:
            return None
        row = self.rows[speaking_id] = attrs.evolve(row, status=to, tm_update=now or virtual_clock())
        return row

    async def stop(self, speaking_id: uuid.UUID, ended_at: dt.datetime) -> StopResult:
        await self._enter("stop")
        row = self.rows.get(speaking_id)
        if row is None:
            return StopResult(None, None)
        if row.status not in LIVE_STATUSES:
            return StopResult(None, row)
        self.rows[speaking_id] = attrs.evolve(row, status="stopped", tm_update=ended_at)
        if self.lose_stop_acks:
            self.lose_stop_acks -= 1
            raise StoreError("OperationalError: (2013) Lost connection to MySQL server during query")
        return StopResult(row.status, self.rows[speaking_id])

    async def list_page(self, where: ListFilter) -> list[Speaking]:
        await self._enter("list_page")
        rows = [
            r
            for r in self.rows.values()
            if r.tm_delete is None and r.tm_create and r.tm_create < where.before
        ]
        return sorted(rows, key=lambda r: r.tm_create or BASE_TIME, reverse=True)[: where.limit]

    async def soft_delete(self, speaking_id: uuid.UUID, now: dt.datetime | None = None) -> Speaking | None:
        await self._enter("soft_delete")
        row = self.rows.get(speaking_id)
        if row is not None and row.tm_delete is None:
            now = now or virtual_clock()
            row = self.rows[speaking_id] = attrs.evolve(row, tm_delete=now, tm_update=now)
        return row

    async def live_rows_of_pod(self, pod_id: str) -> list[Speaking]:
        await self._enter("live_rows_of_pod")
        return [r for r in self.rows.values() if r.pod_id == pod_id and r.status in LIVE_STATUSES]

    async def heartbeat(self, pod_id: str, now: dt.datetime) -> dt.datetime | None:
        await self._enter("heartbeat")
        previous = self.pods.get(pod_id)
        self.pods[pod_id] = now
        return previous

    async def last_seen(self, pod_id: str) -> dt.datetime | None:
        await self._enter("last_seen")
        return self.pods.get(pod_id)

    async def orphans(self, seen_before: dt.datetime, *, exclude_pod: str, limit: int = 100) -> list[Orphan]:
        await self._enter("orphans")
        found = [
            Orphan(row, self.pods[row.pod_id])
            for row in self.rows.values()
            if row.status in LIVE_STATUSES
            and row.pod_id != exclude_pod
            and row.pod_id in self.pods
            and self.pods[row.pod_id] < seen_before
        ]
        return found[:limit]

    async def forget_pods(self, seen_before: dt.datetime) -> int:
        await self._enter("forget_pods")
        owners = {r.pod_id for r in self.rows.values() if r.status in LIVE_STATUSES}
        gone = [p for p, seen in self.pods.items() if seen < seen_before and p not in owners]
        for pod_id in gone:
            del self.pods[pod_id]
        return len(gone)


@attrs.define
class FakeEvents:
    events: list[Event] = attrs.field(factory=list)

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def of(self, event_type: str, speaking_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
        return [
            e.data
            for e in self.events
            if e.type == event_type and (speaking_id is None or e.data.get("id") == str(speaking_id))
        ]


class FakeStreams:
    """Streams that start at once and end when deleted or hung up (end listeners called as the real
    StreamingService calls them, synchronously)."""

    def __init__(self) -> None:
        self.live: set[uuid.UUID] = set()
        self.deleted: list[uuid.UUID] = []
        self.said: list[tuple[uuid.UUID, str]] = []
        self.end_listeners: list[Callable[[uuid.UUID, str], None]] = []
        self.fail_start = False

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
        await trio.sleep(0.01)
        assert streaming_id is not None
        if self.fail_start:
            return envelope.plain_error(500)
        self.live.add(streaming_id)
        return envelope.ok({"id": str(streaming_id)})

    async def delete(self, streaming_id: uuid.UUID) -> Response | None:
        if streaming_id not in self.live:
            return None
        await trio.sleep(0.005)
        self.deleted.append(streaming_id)
        self.hang_up(streaming_id, "deleted")
        return envelope.ok({"id": str(streaming_id)})

    def hang_up(self, streaming_id: uuid.UUID, reason: str = "hangup") -> None:
        if streaming_id in self.live:
            self.live.discard(streaming_id)
            for listener in self.end_listeners:
                listener(streaming_id, reason)

    async def speak(self, streaming_id: uuid.UUID, text: str) -> None:
        self.said.append((streaming_id, text))

    async def barge_in(self, streaming_id: uuid.UUID) -> None:
        pass


@attrs.define
class FakeCallManager:
    deleted: list[uuid.UUID] = attrs.field(factory=list)

    async def delete_external_media(self, media_id: uuid.UUID) -> None:
        await trio.sleep(0.002)
        self.deleted.append(media_id)
