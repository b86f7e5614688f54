"""The speaking store on SQLite and on the real MariaDB (the Go service's table, unchanged)."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio

from tests.db_support import Database, database_fixture, open_database, recreate_go_table
from tts_streamer.adapters import speaking_sql as sql
from tts_streamer.adapters import speaking_store as ss
from tts_streamer.adapters.voipbin.models import Speaking

db = database_fixture()


def speaking(customer: uuid.UUID, reference: uuid.UUID, *, status: str = "initiating", **kw: Any) -> Speaking:
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "customer_id": customer,
        "reference_type": "call",
        "reference_id": reference,
        "language": "en-US",
        "provider": "gcp",
        "voice_id": "en-US-Chirp3-HD-Aoede",
        "direction": "out",
        "status": status,
        "pod_id": "pod-a",
        "tm_create": ss.now_utc(),
    }
    fields.update(kw)
    return Speaking(**fields)


async def test_rows_round_trip_with_binary_uuids_and_microsecond_times(db: Database) -> None:
    row = speaking(uuid.uuid4(), uuid.uuid4())
    assert await db.store.insert_if_free(row)
    assert await db.store.get(row.id) == row  # every field, tm_create to the microsecond, UUIDs intact
    raw = await trio.to_thread.run_sync(
        lambda: db.store.engine.connect().execute(sa.text(f"SELECT id FROM {ss.TABLE_NAME}")).scalar_one()
    )
    assert bytes(raw) == row.id.bytes  # stored as 16 raw bytes, as voipbin stores UUIDs


async def test_concurrent_creates_for_one_reference_exactly_one_wins(db: Database) -> None:
    customer, reference = uuid.uuid4(), uuid.uuid4()
    results: list[bool] = []

    async def create() -> None:
        results.append(await db.store.insert_if_free(speaking(customer, reference)))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(create)
    assert sorted(results) == [False] * 7 + [True]
    # Another reference, or the same one once the winner is stopped, is free again.
    assert await db.store.insert_if_free(speaking(customer, uuid.uuid4()))
    (winner,) = await db.store.list_page(ss.ListFilter(before=ss.now_utc(), reference_id=reference))
    assert (await db.store.stop(winner.id, ss.now_utc())).previous == "initiating"
    assert await db.store.insert_if_free(speaking(customer, reference))


async def test_a_create_inside_another_ones_open_transaction_waits_and_loses(db: Database) -> None:
    """Not timing: while A's insert is uncommitted, B's conditional insert blocks on the database's lock
    (InnoDB next-key lock / SQLite write lock) and, once A commits, sees A's row and inserts nothing."""
    customer, reference = uuid.uuid4(), uuid.uuid4()
    outcome: dict[str, Any] = {}
    inserted = threading.Event()

    def first() -> None:
        with db.store.engine.connect() as conn:
            if db.backend == "mariadb":
                conn.execution_options(isolation_level="SERIALIZABLE")
            with conn.begin():
                outcome["a"] = sql.insert_if_free(conn, speaking(customer, reference))
                inserted.set()
                time.sleep(0.6)

    def second() -> None:
        inserted.wait(5)
        started = time.monotonic()
        outcome["b"] = db.store._transaction(sql.insert_if_free, (speaking(customer, reference),), True)
        outcome["waited"] = time.monotonic() - started

    def race() -> None:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)

    await trio.to_thread.run_sync(race)
    assert outcome["a"] is True and outcome["b"] is False
    assert outcome["waited"] > 0.3  # it waited for A's commit rather than reading around it


async def test_stop_is_compare_and_set_only_one_caller_sees_active(db: Database) -> None:
    row = speaking(uuid.uuid4(), uuid.uuid4())
    assert await db.store.insert_if_free(row)
    active = await db.store.transition(row.id, ("initiating",), "active")
    assert active is not None and active.status == "active" and active.tm_update is not None
    assert await db.store.transition(row.id, ("initiating",), "active") is None
    results: list[ss.StopResult] = []

    async def stop() -> None:
        results.append(await db.store.stop(row.id, ss.now_utc()))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(stop)
    assert [r.previous for r in results].count("active") == 1
    assert [r.previous for r in results].count(None) == 4
    assert all(r.row is not None and r.row.status == "stopped" for r in results)
    assert (await db.store.stop(uuid.uuid4(), ss.now_utc())) == ss.StopResult(None, None)


async def test_soft_delete_keeps_the_first_time_and_hides_from_lists(db: Database) -> None:
    row = speaking(uuid.uuid4(), uuid.uuid4(), tm_create=ss.now_utc() - dt.timedelta(seconds=1))
    assert await db.store.insert_if_free(row)
    first = await db.store.soft_delete(row.id)
    assert first is not None and first.tm_delete is not None and first.tm_update == first.tm_delete
    again = await db.store.soft_delete(row.id)
    assert again == first
    assert await db.store.list_page(ss.ListFilter(before=ss.now_utc())) == []
    assert await db.store.soft_delete(uuid.uuid4()) is None


async def test_mariadb_schema_created_by_the_store_matches_the_go_migrations(tmp_path: Path) -> None:
    """The table the daemon creates when missing is the Go service's: same column types, nullability,
    defaults and indexes (compared through information_schema)."""
    async with open_database("mariadb", tmp_path) as database:
        store = database.store

        def describe() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            with store.engine.connect() as conn:
                columns = conn.execute(
                    sa.text(
                        "SELECT column_name, column_type, is_nullable, column_default, ordinal_position"
                        " FROM information_schema.columns WHERE table_schema = DATABASE()"
                        " AND table_name = :t ORDER BY ordinal_position"
                    ),
                    {"t": ss.TABLE_NAME},
                ).all()
                indexes = conn.execute(
                    sa.text(
                        "SELECT index_name, seq_in_index, column_name, non_unique"
                        " FROM information_schema.statistics WHERE table_schema = DATABASE()"
                        " AND table_name = :t ORDER BY index_name, seq_in_index"
                    ),
                    {"t": ss.TABLE_NAME},
                ).all()
            return [tuple(c) for c in columns], [tuple(i) for i in indexes]

        try:
            await recreate_go_table(store)
            go = await trio.to_thread.run_sync(describe)
            await trio.to_thread.run_sync(
                lambda: store.engine.connect().exec_driver_sql(f"DROP TABLE {ss.TABLE_NAME}")
            )
            await store.setup()
            ours = await trio.to_thread.run_sync(describe)
        finally:
            await recreate_go_table(store)  # leave the Go table for the other tests
    assert ours == go
    assert ("id", "binary(16)", "NO", None, 1) in go[0]
    assert ("tm_create", "datetime(6)", "YES", "NULL", 11) in go[0]
    assert {name for name, *_ in go[1]} == {
        "PRIMARY",
        "idx_tts_manager_speaking_customer_id",
        "idx_tts_manager_speaking_reference",
        "idx_tts_manager_speaking_status",
        "idx_tts_manager_speaking_ref_status",
    }


async def test_sqlite_file_and_table_are_created_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "speakings.sqlite3"
    async with ss.open_speaking_store("", str(path)) as store:
        assert await store.insert_if_free(speaking(uuid.uuid4(), uuid.uuid4()))
    assert path.is_file()
    async with ss.open_speaking_store("", str(path)) as store:  # reopening keeps the rows
        assert len(await store.list_page(ss.ListFilter(before=ss.now_utc()))) == 1


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("", "sqlite+pysqlite:///x.db"),
        ("root@tcp(127.0.0.1:3306)/test", "mysql+pymysql://root@127.0.0.1:3306/test"),
        (
            "bin-manager:p@ss:w@rd@tcp(10.0.0.5:3307)/bin_manager?parseTime=true&charset=utf8mb4",
            "mysql+pymysql://bin-manager:***@10.0.0.5:3307/bin_manager?charset=utf8mb4",
        ),
        (
            "user@unix(/run/mysqld/mysqld.sock)/db",
            "mysql+pymysql://user@/db?unix_socket=%2Frun%2Fmysqld%2Fmysqld.sock",
        ),
        ("mysql://u:pw@db:3306/voipbin", "mysql+pymysql://u:***@db:3306/voipbin"),
    ],
)
def test_database_dsn_accepts_the_go_driver_form_and_urls(dsn: str, expected: str) -> None:
    url = ss.database_url(dsn, "x.db")
    assert url.render_as_string(hide_password=True) == expected
    if "p@ss" in dsn:
        assert url.password == "p@ss:w@rd"


async def test_stop_records_the_end_time_it_is_given_not_the_time_of_the_write(db: Database) -> None:
    row = speaking(
        uuid.uuid4(), uuid.uuid4(), status="active", tm_create=ss.now_utc() - dt.timedelta(minutes=2)
    )
    assert await db.store.insert_if_free(row)
    ended_at = ss.now_utc() - dt.timedelta(seconds=75, microseconds=123)
    result = await db.store.stop(row.id, ended_at)
    assert result.previous == "active" and result.row is not None
    assert result.row.tm_update == ended_at  # to the microsecond: a retry recognises its own write
    assert (await db.store.stop(row.id, ss.now_utc())).row == result.row  # unchanged once stopped


async def test_pod_heartbeats_and_orphans_never_include_pods_that_do_not_heartbeat(db: Database) -> None:
    now = ss.now_utc()
    old, fresh = now - dt.timedelta(seconds=90), now - dt.timedelta(seconds=2)
    assert await db.store.heartbeat("dead-pod", old - dt.timedelta(seconds=5)) is None
    assert await db.store.heartbeat("dead-pod", old) == old - dt.timedelta(seconds=5)
    assert await db.store.heartbeat("live-pod", fresh) is None
    assert await db.store.last_seen("dead-pod") == old and await db.store.last_seen("nobody") is None
    rows = {
        name: speaking(uuid.uuid4(), uuid.uuid4(), status=status, pod_id=pod)
        for name, status, pod in [
            ("orphan", "active", "dead-pod"),
            ("half", "initiating", "dead-pod"),
            ("closed", "stopped", "dead-pod"),
            ("alive", "active", "live-pod"),
            ("go", "active", "tts-manager-6c8f7d9b5-x2k4p"),  # a Go pod: never in our table
            ("mine", "active", "me"),
        ]
    }
    for row in rows.values():
        assert await db.store.insert_if_free(row)
    await db.store.heartbeat("me", old)
    found = await db.store.orphans(now - dt.timedelta(seconds=60), exclude_pod="me")
    assert {o.row.id for o in found} == {rows["orphan"].id, rows["half"].id}
    assert {o.owner_last_seen for o in found} == {old}
    assert [r.id for r in await db.store.live_rows_of_pod("dead-pod")] == [rows["orphan"].id, rows["half"].id]
    # Pods are forgotten only once they own no live row.
    assert await db.store.forget_pods(now) == 0  # every pod here still owns a live row
    for name in ("orphan", "half"):
        await db.store.stop(rows[name].id, old)
    assert await db.store.forget_pods(now) == 1
    assert await db.store.last_seen("dead-pod") is None and await db.store.last_seen("live-pod") == fresh
