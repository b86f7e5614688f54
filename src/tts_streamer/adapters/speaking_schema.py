"""The speaking table (voipbin's ``tts_manager_speaking``), our pod-liveness table, and what a speaking
store offers the services (``SpeakingRows``: the SQL store in speaking_store.py, and the in-memory fake
the service tests use).

``tts_manager_speaking`` is the Go service's table exactly as voipbin's migrations create it and is never
altered (Go pods share it during a migration). Liveness of our own pods lives in a table of our own,
``tts_streamer_pod`` (docs/speakings.md, "Crash recovery").
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection
from typing import Any, Final, Protocol

import attrs
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Row

from tts_streamer.adapters.voipbin.models import Speaking, SpeakingStatus

TABLE_NAME: Final = "tts_manager_speaking"
POD_TABLE_NAME: Final = "tts_streamer_pod"
LIVE_STATUSES: Final = (SpeakingStatus.INITIATING.value, SpeakingStatus.ACTIVE.value)


class StoreError(Exception):
    """The database failed (unreachable, timed out, refused the statement)."""


# ------------------------------------------------------------------------------------------ column types


class _UUIDBytes(sa.types.TypeDecorator[uuid.UUID]):
    """A UUID as its 16 raw bytes: ``binary(16)`` on MySQL (voipbin's form), a BLOB on SQLite."""

    impl = sa.LargeBinary(16)
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.BINARY(16))
        return dialect.type_descriptor(sa.LargeBinary(16))

    def process_bind_param(self, value: uuid.UUID | None, dialect: sa.Dialect) -> bytes | None:
        return None if value is None else value.bytes

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> uuid.UUID | None:
        return None if value is None else uuid.UUID(bytes=bytes(value))


class _UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """An aware UTC datetime stored naive in UTC: ``datetime(6)`` on MySQL, ISO text on SQLite."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("speaking times must be timezone-aware")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC)


metadata = sa.MetaData()


def _varchar(name: str, length: int) -> sa.Column[str]:
    return sa.Column(name, sa.String(length), nullable=False, server_default="")


speaking_table = sa.Table(
    TABLE_NAME,
    metadata,
    sa.Column("id", _UUIDBytes(), primary_key=True, nullable=False),
    sa.Column("customer_id", _UUIDBytes(), nullable=False),
    _varchar("reference_type", 32),
    sa.Column("reference_id", _UUIDBytes(), nullable=False),
    _varchar("language", 16),
    _varchar("provider", 32),
    _varchar("voice_id", 255),
    _varchar("direction", 8),
    _varchar("status", 16),
    _varchar("pod_id", 64),
    sa.Column("tm_create", _UTCDateTime(), nullable=True),
    sa.Column("tm_update", _UTCDateTime(), nullable=True),
    sa.Column("tm_delete", _UTCDateTime(), nullable=True),
    sa.Index("idx_tts_manager_speaking_customer_id", "customer_id"),
    sa.Index("idx_tts_manager_speaking_reference", "reference_type", "reference_id"),
    sa.Index("idx_tts_manager_speaking_status", "status"),
    # Added by voipbin's second migration for the duplicate check; our create's check walks it too.
    sa.Index(
        "idx_tts_manager_speaking_ref_status", "customer_id", "reference_type", "reference_id", "status"
    ),
    mysql_engine="InnoDB",
    mysql_charset="utf8",
)

# The Go service's DDL, verbatim from voipbin's two alembic migrations (tests create MySQL tables with it).
GO_MYSQL_DDL: Final = (
    f"""CREATE TABLE {TABLE_NAME} (
    id binary(16) NOT NULL,
    customer_id binary(16) NOT NULL,
    reference_type varchar(32) NOT NULL DEFAULT '',
    reference_id binary(16) NOT NULL,
    language varchar(16) NOT NULL DEFAULT '',
    provider varchar(32) NOT NULL DEFAULT '',
    voice_id varchar(255) NOT NULL DEFAULT '',
    direction varchar(8) NOT NULL DEFAULT '',
    status varchar(16) NOT NULL DEFAULT '',
    pod_id varchar(64) NOT NULL DEFAULT '',
    tm_create datetime(6) DEFAULT NULL,
    tm_update datetime(6) DEFAULT NULL,
    tm_delete datetime(6) DEFAULT NULL,
    PRIMARY KEY (id),
    INDEX idx_tts_manager_speaking_customer_id (customer_id),
    INDEX idx_tts_manager_speaking_reference (reference_type, reference_id),
    INDEX idx_tts_manager_speaking_status (status)
) ENGINE=InnoDB DEFAULT CHARSET=utf8""",
    f"""CREATE INDEX idx_tts_manager_speaking_ref_status
    ON {TABLE_NAME} (customer_id, reference_type, reference_id, status)""",
)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def to_model(row: Row[Any]) -> Speaking:
    m = row._mapping
    return Speaking(
        id=m["id"],
        customer_id=m["customer_id"],
        reference_type=m["reference_type"],
        reference_id=m["reference_id"],
        language=m["language"],
        provider=m["provider"],
        voice_id=m["voice_id"],
        direction=m["direction"],
        status=m["status"],
        pod_id=m["pod_id"],
        tm_create=m["tm_create"],
        tm_update=m["tm_update"],
        tm_delete=m["tm_delete"],
    )


def row_values(speaking: Speaking) -> dict[str, Any]:
    return {column.name: getattr(speaking, column.name) for column in speaking_table.columns}


# Our own table (never the Go one): one row per tts-streamer pod, heartbeated while the pod can reach
# the database. A speaking whose pod_id is here with a stale last_seen is an orphan any pod may close;
# a pod_id that is not here (a Go pod) is never touched by the sweep.
pod_table = sa.Table(
    POD_TABLE_NAME,
    metadata,
    sa.Column("pod_id", sa.String(64), primary_key=True, nullable=False),
    sa.Column("last_seen", _UTCDateTime(), nullable=False),
    mysql_engine="InnoDB",
    mysql_charset="utf8",
)


def column_lengths() -> dict[str, int]:
    """The varchar bound of each text column of the Go table (what a request may carry into it)."""
    return {
        column.name: column.type.length
        for column in speaking_table.columns
        if isinstance(column.type, sa.String) and column.type.length
    }


@attrs.frozen
class StopResult:
    """``previous`` is the status this call moved the row out of (None: it changed nothing, the row was
    already stopped or does not exist); ``row`` is the row afterwards (None: no such row)."""

    previous: str | None
    row: Speaking | None


@attrs.frozen(kw_only=True)
class ListFilter:
    before: dt.datetime  # rows with tm_create strictly before this (the page token)
    limit: int = 100
    customer_id: uuid.UUID | None = None
    reference_type: str | None = None
    reference_id: uuid.UUID | None = None
    status: str | None = None


@attrs.frozen
class Orphan:
    """A live speaking whose owner pod stopped heartbeating; ``owner_last_seen`` is its last heartbeat."""

    row: Speaking
    owner_last_seen: dt.datetime


class SpeakingRows(Protocol):
    """What the speaking services need from a store. Every method raises StoreError on failure."""

    async def insert_if_free(self, speaking: Speaking) -> bool: ...

    async def get(self, speaking_id: uuid.UUID) -> Speaking | None: ...

    async def transition(
        self, speaking_id: uuid.UUID, from_: Collection[str], to: str, now: dt.datetime | None = None
    ) -> Speaking | None: ...

    async def stop(self, speaking_id: uuid.UUID, ended_at: dt.datetime) -> StopResult: ...

    async def list_page(self, where: ListFilter) -> list[Speaking]: ...

    async def soft_delete(
        self, speaking_id: uuid.UUID, now: dt.datetime | None = None
    ) -> Speaking | None: ...

    async def live_rows_of_pod(self, pod_id: str) -> list[Speaking]: ...

    async def heartbeat(self, pod_id: str, now: dt.datetime) -> dt.datetime | None:
        """Record that ``pod_id`` is alive at ``now``; returns its previous heartbeat (None: first)."""
        ...

    async def last_seen(self, pod_id: str) -> dt.datetime | None: ...

    async def orphans(self, seen_before: dt.datetime, *, exclude_pod: str, limit: int = 100) -> list[Orphan]:
        """Live rows whose owner is in the pod table with ``last_seen`` older than ``seen_before``."""
        ...

    async def forget_pods(self, seen_before: dt.datetime) -> int:
        """Drop pod rows not seen since ``seen_before`` that own no live speaking; how many."""
        ...
