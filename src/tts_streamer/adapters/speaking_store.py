"""Speaking rows (voipbin's ``tts_manager_speaking``) through SQLAlchemy Core: engines and the async store.

The table and the store's interface are in speaking_schema.py, the statements in speaking_sql.py.

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
from sqlalchemy.engine import URL, Connection, Engine

from tts_streamer.adapters import speaking_sql as sql
from tts_streamer.adapters.speaking_schema import (
    GO_MYSQL_DDL,
    LIVE_STATUSES,
    POD_TABLE_NAME,
    TABLE_NAME,
    ListFilter,
    Orphan,
    SpeakingRows,
    StopResult,
    StoreError,
    metadata,
    now_utc,
    pod_table,
    speaking_table,
)
from tts_streamer.adapters.voipbin.models import Speaking

__all__ = [
    "GO_MYSQL_DDL",
    "LIVE_STATUSES",
    "POD_TABLE_NAME",
    "TABLE_NAME",
    "ListFilter",
    "Orphan",
    "SpeakingRows",
    "SpeakingStore",
    "StopResult",
    "StoreError",
    "now_utc",
    "open_speaking_store",
    "speaking_table",
]

log = logging.getLogger(__name__)

# MySQL error numbers after which the whole transaction is safely retried.
_MYSQL_DEADLOCK: Final = 1213
_MYSQL_LOCK_WAIT_TIMEOUT: Final = 1205
_RETRIES: Final = 5

_T = TypeVar("_T")


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
        return await self._run(sql.insert_if_free, speaking, serializable=True)

    async def get(self, speaking_id: uuid.UUID) -> Speaking | None:
        return await self._run(sql.get, speaking_id)

    async def transition(
        self, speaking_id: uuid.UUID, from_: Collection[str], to: str, now: dt.datetime | None = None
    ) -> Speaking | None:
        return await self._run(sql.transition, speaking_id, tuple(from_), to, now or now_utc())

    async def stop(self, speaking_id: uuid.UUID, ended_at: dt.datetime) -> StopResult:
        return await self._run(sql.stop, speaking_id, ended_at)

    async def list_page(self, where: ListFilter) -> list[Speaking]:
        return await self._run(sql.list_rows, where)

    async def soft_delete(self, speaking_id: uuid.UUID, now: dt.datetime | None = None) -> Speaking | None:
        return await self._run(sql.soft_delete, speaking_id, now or now_utc())

    async def live_rows_of_pod(self, pod_id: str) -> list[Speaking]:
        return await self._run(sql.live_rows_of_pod, pod_id)

    async def heartbeat(self, pod_id: str, now: dt.datetime) -> dt.datetime | None:
        return await self._run(sql.heartbeat, pod_id, now)

    async def last_seen(self, pod_id: str) -> dt.datetime | None:
        return await self._run(sql.last_seen, pod_id)

    async def orphans(self, seen_before: dt.datetime, *, exclude_pod: str, limit: int = 100) -> list[Orphan]:
        return await self._run(sql.orphans, seen_before, exclude_pod, limit)

    async def forget_pods(self, seen_before: dt.datetime) -> int:
        return await self._run(sql.forget_pods, seen_before)

    async def truncate(self) -> None:
        """Tests: empty the tables."""

        def delete_all(conn: Connection) -> None:
            conn.execute(sa.delete(speaking_table))
            conn.execute(sa.delete(pod_table))

        await self._run(delete_all)

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
