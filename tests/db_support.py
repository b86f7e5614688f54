"""The speaking store under test: SQLite (always) and the real MariaDB (skipped when unreachable,
failing under CI=true). MariaDB gets the Go service's table from voipbin's own DDL, emptied before each
test; SQLite gets a fresh file per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.services import MARIADB_DSN, require_mariadb
from tts_streamer.adapters.speaking_store import GO_MYSQL_DDL, TABLE_NAME, SpeakingStore, open_speaking_store

BACKENDS = ["sqlite", "mariadb"]
_go_table_created = False


@attrs.frozen
class Database:
    backend: str
    config: dict[str, Any]  # DaemonConfig fields that point a daemon at this database
    store: SpeakingStore


async def recreate_go_table(store: SpeakingStore) -> None:
    """Drop ``tts_manager_speaking`` and create it exactly as voipbin's migrations do."""

    def run() -> None:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {TABLE_NAME}")
            for statement in GO_MYSQL_DDL:
                conn.exec_driver_sql(statement)

    await trio.to_thread.run_sync(run)


@asynccontextmanager
async def open_database(backend: str, tmp_path: Path) -> AsyncIterator[Database]:
    """A clean speaking table on ``backend``; the daemon config that uses it; a store to check rows."""
    global _go_table_created
    if backend == "mariadb":
        require_mariadb()
        config: dict[str, Any] = {"database_dsn": MARIADB_DSN}
    else:
        config = {"sqlite_path": str(tmp_path / "speakings.sqlite3")}
    async with open_speaking_store(config.get("database_dsn", ""), config.get("sqlite_path", "")) as store:
        if backend == "mariadb" and not _go_table_created:
            await recreate_go_table(store)  # once per run: the Go table, unchanged
            _go_table_created = True
        await store.truncate()
        yield Database(backend, config, store)


def database_fixture() -> Any:
    """``db = database_fixture()`` in a test module: every test using ``db`` runs on both backends."""

    @pytest.fixture(name="db", params=BACKENDS)
    async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
        async with open_database(request.param, tmp_path) as database:
            yield database

    return db
