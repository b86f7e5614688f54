"""The speaking store's statements: each runs inside one transaction, in a worker thread
(speaking_store.SpeakingStore runs them). Concurrency rules: see speaking_store.py and docs/speakings.md."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tts_streamer.adapters.speaking_schema import (
    LIVE_STATUSES,
    ListFilter,
    Orphan,
    StopResult,
    pod_table,
    row_values,
    speaking_table,
    to_model,
)
from tts_streamer.adapters.voipbin.models import Speaking, SpeakingStatus

_c = speaking_table.c
_p = pod_table.c

# ------------------------------------------------------------------------ statements (sync, in a thread)


def insert_if_free(conn: Connection, speaking: Speaking) -> bool:
    """Insert ``speaking`` unless a live, undeleted row holds the same customer and reference."""
    taken = (
        sa.select(sa.literal(1))
        .select_from(speaking_table)
        .where(
            _c.customer_id == speaking.customer_id,
            _c.reference_type == speaking.reference_type,
            _c.reference_id == speaking.reference_id,
            _c.status.in_(LIVE_STATUSES),
            _c.tm_delete.is_(None),
        )
        .exists()
    )
    values = row_values(speaking)
    row = sa.select(
        *[sa.literal(values[c.name], type_=c.type).label(c.name) for c in speaking_table.columns]
    ).where(~taken)
    result = conn.execute(speaking_table.insert().from_select(list(values), row))
    return result.rowcount == 1


def get(conn: Connection, speaking_id: uuid.UUID) -> Speaking | None:
    row = conn.execute(sa.select(speaking_table).where(_c.id == speaking_id)).first()
    return None if row is None else to_model(row)


def transition(
    conn: Connection, speaking_id: uuid.UUID, from_: Collection[str], to: str, now: dt.datetime
) -> Speaking | None:
    """Compare-and-set the status; the row after the change, or None when this call changed nothing."""
    result = conn.execute(
        sa.update(speaking_table)
        .where(_c.id == speaking_id, _c.status.in_(list(from_)))
        .values(status=to, tm_update=now)
    )
    if result.rowcount != 1:
        return None
    return get(conn, speaking_id)


def stop(conn: Connection, speaking_id: uuid.UUID, ended_at: dt.datetime) -> StopResult:
    """Move a live row to ``stopped`` with ``tm_update`` = ``ended_at`` (when its audio ended, which may be
    well before this write: a retried write after a database outage, a sweep after a crash), telling
    which status it left: only ``active`` ones were announced with ``speaking_started``, so only those
    get a ``speaking_stopped``."""
    current = conn.execute(sa.select(_c.status).where(_c.id == speaking_id).with_for_update()).first()
    if current is None:
        return StopResult(None, None)
    if current.status not in LIVE_STATUSES:
        return StopResult(None, get(conn, speaking_id))
    conn.execute(
        sa.update(speaking_table)
        .where(_c.id == speaking_id, _c.status == current.status)
        .values(status=SpeakingStatus.STOPPED.value, tm_update=ended_at)
    )
    return StopResult(current.status, get(conn, speaking_id))


def list_rows(conn: Connection, where: ListFilter) -> list[Speaking]:
    query = (
        sa.select(speaking_table)
        .where(_c.tm_delete.is_(None), _c.tm_create < where.before)
        .order_by(_c.tm_create.desc(), _c.id.desc())
        .limit(where.limit)
    )
    if where.customer_id is not None:
        query = query.where(_c.customer_id == where.customer_id)
    if where.reference_type is not None:
        query = query.where(_c.reference_type == where.reference_type)
    if where.reference_id is not None:
        query = query.where(_c.reference_id == where.reference_id)
    if where.status is not None:
        query = query.where(_c.status == where.status)
    return [to_model(row) for row in conn.execute(query)]


def soft_delete(conn: Connection, speaking_id: uuid.UUID, now: dt.datetime) -> Speaking | None:
    """Set ``tm_delete`` (and ``tm_update``) once; the row afterwards, or None if there is no such row."""
    conn.execute(
        sa.update(speaking_table)
        .where(_c.id == speaking_id, _c.tm_delete.is_(None))
        .values(tm_delete=now, tm_update=now)
    )
    return get(conn, speaking_id)


def live_rows_of_pod(conn: Connection, pod_id: str) -> list[Speaking]:
    rows = conn.execute(
        sa.select(speaking_table)
        .where(_c.pod_id == pod_id, _c.status.in_(LIVE_STATUSES))
        .order_by(_c.tm_create)
    )
    return [to_model(row) for row in rows]


def last_seen(conn: Connection, pod_id: str) -> dt.datetime | None:
    value: Any = conn.execute(sa.select(_p.last_seen).where(_p.pod_id == pod_id)).scalar()
    return value if isinstance(value, dt.datetime) else None


def heartbeat(conn: Connection, pod_id: str, now: dt.datetime) -> dt.datetime | None:
    """Upsert without dialect syntax: one pod writes its own row, so update-else-insert cannot race."""
    previous = last_seen(conn, pod_id)
    if previous is None:
        conn.execute(sa.insert(pod_table).values(pod_id=pod_id, last_seen=now))
    else:
        conn.execute(sa.update(pod_table).where(_p.pod_id == pod_id).values(last_seen=now))
    return previous


def orphans(conn: Connection, seen_before: dt.datetime, exclude_pod: str, limit: int) -> list[Orphan]:
    """Live rows whose owner is one of our pods and has not heartbeated since ``seen_before``. The join
    on the pod table is what keeps Go pods' rows out: their pod_id never heartbeats here."""
    query = (
        sa.select(speaking_table, _p.last_seen.label("owner_last_seen"))
        .join(pod_table, _p.pod_id == _c.pod_id)
        .where(_c.status.in_(LIVE_STATUSES), _p.last_seen < seen_before, _c.pod_id != exclude_pod)
        .order_by(_c.tm_create)
        .limit(limit)
    )
    return [Orphan(to_model(row), row._mapping["owner_last_seen"]) for row in conn.execute(query)]


def forget_pods(conn: Connection, seen_before: dt.datetime) -> int:
    owns_live = (
        sa.select(sa.literal(1))
        .select_from(speaking_table)
        .where(_c.pod_id == _p.pod_id, _c.status.in_(LIVE_STATUSES))
        .exists()
    )
    result = conn.execute(sa.delete(pod_table).where(_p.last_seen < seen_before, ~owns_live))
    return int(result.rowcount)
