"""Speaking rows (voipbin's ``tts_manager_speaking``) through SQLAlchemy Core.

Two backends behind one class:

* an embedded **SQLite** file (the default, so the daemon runs with no database server), whose table is
  created when missing;
* **MySQL/MariaDB** via ``DATABASE_DSN`` (PyMySQL, pure Python), on the Go tts-manager's table exactly as
  voipbin's migrations create it (binary(16) UUIDs, varchar columns, datetime(6) times, four indexes,
  no unique key), so both services can share it while migrating.

The engine is synchronous and every call runs in a worker thread (``trio.to_thread.run_sync``) under the
store's own ``CapacityLimiter``, sized to the connection pool: the Trio thread never blocks on the
database, and a burst of requests queues on the limiter instead of piling threads onto a full pool.
Each wait is bounded by the driver (connect/read/write timeouts, InnoDB lock wait, SQLite busy timeout)
and by the pool checkout timeout, because a thread cannot be abandoned half-way through a transaction.

Concurrency rules (see docs/speakings.md):

* **create** is one conditional statement, ``INSERT ... SELECT ... WHERE NOT EXISTS (a live row for the
  same customer and reference)``, in a transaction the database serialises: ``BEGIN IMMEDIATE`` on
  SQLite (the write lock is taken before the check), ``SERIALIZABLE`` on InnoDB (the check takes
  next-key locks on the reference's index range, so a second insert into that range waits or is chosen
  as a deadlock victim; the victim is retried and then sees the winner's row). Exactly one of two
  concurrent creates inserts; the other inserts nothing and is told so.
* **status changes** are compare-and-set (``UPDATE ... WHERE id = ? AND status IN (...)``); the caller
  whose update changed the row is the one that publishes the event, so ``speaking_stopped`` goes out
  exactly once however many paths (stop, hang-up, shutdown, a restarted pod's sweep) race for it.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import attrs
import sqlalchemy as sa
import trio
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL, Connection, Engine, Row

from tts_streamer.adapters.voipbin.models import Speaking, SpeakingStatus

log = logging.getLogger(__name__)

TABLE_NAME: Final = "tts_manager_speaking"
LIVE_STATUSES: Final = (SpeakingStatus.INITIATING.value, SpeakingStatus.ACTIVE.value)

# MySQL error numbers after which the whole transaction is safely retried.
_MYSQL_DEADLOCK: Final = 1213
_MYSQL_LOCK_WAIT_TIMEOUT: Final = 1205
_RETRIES: Final = 5

_T = TypeVar("_T")


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

_c = speaking_table.c

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


def _to_model(row: Row[Any]) -> Speaking:
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


def _values(speaking: Speaking) -> dict[str, Any]:
    return {column.name: getattr(speaking, column.name) for column in speaking_table.columns}


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
    values = _values(speaking)
    row = sa.select(
        *[sa.literal(values[c.name], type_=c.type).label(c.name) for c in speaking_table.columns]
    ).where(~taken)
    result = conn.execute(speaking_table.insert().from_select(list(values), row))
    return result.rowcount == 1


def get(conn: Connection, speaking_id: uuid.UUID) -> Speaking | None:
    row = conn.execute(sa.select(speaking_table).where(_c.id == speaking_id)).first()
    return None if row is None else _to_model(row)


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


@attrs.frozen
class StopResult:
    """``previous`` is the status this call moved the row out of (None: it changed nothing, the row was
    already stopped or does not exist); ``row`` is the row afterwards (None: no such row)."""

    previous: str | None
    row: Speaking | None


def stop(conn: Connection, speaking_id: uuid.UUID, now: dt.datetime) -> StopResult:
    """Move a live row to ``stopped``, telling which status it left: only ``active`` ones were announced
    with ``speaking_started``, so only those get a ``speaking_stopped``."""
    current = conn.execute(sa.select(_c.status).where(_c.id == speaking_id).with_for_update()).first()
    if current is None:
        return StopResult(None, None)
    if current.status not in LIVE_STATUSES:
        return StopResult(None, get(conn, speaking_id))
    conn.execute(
        sa.update(speaking_table)
        .where(_c.id == speaking_id, _c.status == current.status)
        .values(status=SpeakingStatus.STOPPED.value, tm_update=now)
    )
    return StopResult(current.status, get(conn, speaking_id))


@attrs.frozen(kw_only=True)
class ListFilter:
    before: dt.datetime  # rows with tm_create strictly before this (the page token)
    limit: int = 100
    customer_id: uuid.UUID | None = None
    reference_type: str | None = None
    reference_id: uuid.UUID | None = None
    status: str | None = None


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
    return [_to_model(row) for row in conn.execute(query)]


def soft_delete(conn: Connection, speaking_id: uuid.UUID, now: dt.datetime) -> Speaking | None:
    """Set ``tm_delete`` (and ``tm_update``) once; the row afterwards, or None if there is no such row."""
    conn.execute(
        sa.update(speaking_table)
        .where(_c.id == speaking_id, _c.tm_delete.is_(None))
        .values(tm_delete=now, tm_update=now)
    )
    return get(conn, speaking_id)


def live_ids_of_pod(conn: Connection, pod_id: str) -> list[uuid.UUID]:
    rows = conn.execute(
        sa.select(_c.id).where(_c.pod_id == pod_id, _c.status.in_(LIVE_STATUSES)).order_by(_c.tm_create)
    )
    return [row.id for row in rows]


# ------------------------------------------------------------------------------------------ engines


def database_url(dsn: str, sqlite_path: str) -> URL:
    """The SQLAlchemy URL for ``DATABASE_DSN`` (a SQLAlchemy URL or the Go service's go-sql-driver DSN,
    e.g. ``user:pass@tcp(host:3306)/bin_manager``); SQLite at ``sqlite_path`` when the DSN is empty."""
    if not dsn:
        return URL.create("sqlite+pysqlite", database=sqlite_path)
    if "://" in dsn:
        url = sa.make_url(dsn)
        if url.drivername in ("mysql", "mariadb"):
            url = url.set(drivername="mysql+pymysql")
        return url
    return _go_dsn_url(dsn)


_GO_ADDR: Final = re.compile(r"(?P<net>[a-z0-9]+)(?:\((?P<addr>[^)]*)\))?")


def _go_dsn_url(dsn: str) -> URL:
    """go-sql-driver/mysql DSN: ``[user[:password]@][net[(addr)]]/dbname[?params]``."""
    head, slash, tail = dsn.rpartition("/")
    if not slash:
        raise ValueError("DATABASE_DSN: expected a SQLAlchemy URL or user:pass@tcp(host:port)/dbname")
    database, _, params = tail.partition("?")
    userinfo, at, netaddr = head.rpartition("@")
    if not at:
        userinfo, netaddr = "", head
    user, _, password = userinfo.partition(":")
    host: str | None = "127.0.0.1"
    port: int | None = 3306
    query: dict[str, str] = {}
    if netaddr:
        match = _GO_ADDR.fullmatch(netaddr)
        if match is None:
            raise ValueError(f"DATABASE_DSN: cannot read the address {netaddr!r}")
        net, addr = match["net"], match["addr"] or ""
        if net == "unix":
            host, port = None, None
            query["unix_socket"] = addr or "/tmp/mysql.sock"
        elif addr:
            name, _, port_text = addr.rpartition(":") if ":" in addr else (addr, "", "")
            host = name or "127.0.0.1"
            port = int(port_text) if port_text else 3306
    charset = urllib.parse.parse_qs(params).get("charset", [""])[0].split(",")[0]
    if charset:
        query["charset"] = charset
    return URL.create(
        "mysql+pymysql",
        username=user or None,
        password=password or None,
        host=host,
        port=port,
        database=database or None,
        query=query,
    )


@attrs.frozen
class StoreTimeouts:
    connect: float = 3.0
    read: float = 5.0
    write: float = 5.0
    lock_wait: int = 5  # InnoDB lock wait, whole seconds
    pool_checkout: float = 5.0
    sqlite_busy: float = 5.0


def _create_engine(url: URL, timeouts: StoreTimeouts, pool_size: int) -> Engine:
    if url.get_backend_name() == "sqlite":
        path = url.database or ""
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": timeouts.sqlite_busy, "check_same_thread": False},
            pool_size=pool_size,
            pool_timeout=timeouts.pool_checkout,
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN (pysqlite's own implicit BEGIN is deferred).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Take the write lock before reading: check-then-insert cannot interleave with another writer.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.get_backend_name() not in ("mysql", "mariadb"):
        raise ValueError(f"unsupported database {url.get_backend_name()!r} (SQLite or MySQL/MariaDB)")
    return sa.create_engine(
        url,
        connect_args={
            "connect_timeout": max(1, round(timeouts.connect)),
            "read_timeout": max(1, round(timeouts.read)),
            "write_timeout": max(1, round(timeouts.write)),
            "init_command": f"SET SESSION innodb_lock_wait_timeout = {int(timeouts.lock_wait)}",
        },
        isolation_level="REPEATABLE READ",
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeouts.pool_checkout,
        pool_pre_ping=True,
        pool_recycle=3600,
    )


def _retryable(exc: sa.exc.DBAPIError) -> bool:
    args: tuple[Any, ...] = getattr(exc.orig, "args", ())
    return bool(args) and args[0] in (_MYSQL_DEADLOCK, _MYSQL_LOCK_WAIT_TIMEOUT)


class SpeakingStore:
    """Async facade: each method runs one short transaction in a worker thread."""

    def __init__(
        self,
        url: URL,
        *,
        timeouts: StoreTimeouts = StoreTimeouts(),
        pool_size: int = 4,
    ) -> None:
        self.url = url
        self.engine = _create_engine(url, timeouts, pool_size)
        self.backend = url.get_backend_name()
        self._limiter = trio.CapacityLimiter(pool_size)

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    # -- plumbing ------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any, serializable: bool = False) -> _T:
        return await trio.to_thread.run_sync(
            functools.partial(self._transaction, fn, args, serializable), limiter=self._limiter
        )

    def _transaction(self, fn: Callable[..., _T], args: Sequence[Any], serializable: bool) -> _T:
        for attempt in range(1, _RETRIES + 1):
            try:
                with self.engine.connect() as conn:
                    if serializable and not self.is_sqlite:
                        conn = conn.execution_options(isolation_level="SERIALIZABLE")
                    with conn.begin():
                        return fn(conn, *args)
            except sa.exc.DBAPIError as exc:
                if attempt < _RETRIES and _retryable(exc):
                    log.info("speaking store: %s, retrying (%d)", exc.orig, attempt)
                    time.sleep(0.01 * attempt)  # a worker thread: blocking here is fine
                    continue
                raise StoreError(f"{type(exc.orig).__name__}: {exc.orig}") from exc
            except sa.exc.SQLAlchemyError as exc:
                raise StoreError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    # -- API ------------------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Create the table (and its indexes) where it does not exist yet; check that it answers."""

        def create() -> None:
            try:
                metadata.create_all(self.engine, checkfirst=True)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreError(f"cannot set up {TABLE_NAME} at {self.describe()}: {exc}") from exc

        await trio.to_thread.run_sync(create, limiter=self._limiter)

    async def insert_if_free(self, speaking: Speaking) -> bool:
        return await self._run(insert_if_free, speaking, serializable=True)

    async def get(self, speaking_id: uuid.UUID) -> Speaking | None:
        return await self._run(get, speaking_id)

    async def transition(
        self, speaking_id: uuid.UUID, from_: Collection[str], to: str, now: dt.datetime | None = None
    ) -> Speaking | None:
        return await self._run(transition, speaking_id, tuple(from_), to, now or now_utc())

    async def stop(self, speaking_id: uuid.UUID, now: dt.datetime | None = None) -> StopResult:
        return await self._run(stop, speaking_id, now or now_utc())

    async def list_page(self, where: ListFilter) -> list[Speaking]:
        return await self._run(list_rows, where)

    async def soft_delete(self, speaking_id: uuid.UUID, now: dt.datetime | None = None) -> Speaking | None:
        return await self._run(soft_delete, speaking_id, now or now_utc())

    async def live_ids_of_pod(self, pod_id: str) -> list[uuid.UUID]:
        return await self._run(live_ids_of_pod, pod_id)

    async def truncate(self) -> None:
        """Tests: empty the table."""
        await self._run(lambda conn: conn.execute(sa.delete(speaking_table)))

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.engine.dispose, limiter=self._limiter)


@asynccontextmanager
async def open_speaking_store(
    dsn: str, sqlite_path: str, *, timeouts: StoreTimeouts = StoreTimeouts(), pool_size: int | None = None
) -> AsyncIterator[SpeakingStore]:
    url = database_url(dsn, sqlite_path)
    size = pool_size or (2 if url.get_backend_name() == "sqlite" else 4)
    store = SpeakingStore(url, timeouts=timeouts, pool_size=size)
    try:
        await store.setup()
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
