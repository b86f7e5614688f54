"""/v1/speakings end to end: real RabbitMQ, the Asterisk simulator, a fake call-manager, and the speaking
table on SQLite and on the real MariaDB (tests marked with ``db`` run on both).

Events are read from a queue bound to ``bin-manager.tts-manager.event``, as billing-manager reads them.

Over the ~400-line guide: the /v1/speakings contract end to end in one place, the cases sharing one
rig and one event reader.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import trio

from tests.amqp_support import Rig, open_rig, run_pod
from tests.amqp_vhost import private_amqp_url
from tests.db_support import Database, database_fixture
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tests.test_amqp_resilience import poll_until
from tts_streamer.adapters import speaking_store as ss
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voipbin.envelope import Event, EventType
from tts_streamer.adapters.voipbin.models import Speaking
from tts_streamer.adapters.voipbin.wire import NIL_UUID, parse_timestamp
from tts_streamer.simulator.asterisk import SimConfig

pytestmark = pytest.mark.realtime
db = database_fixture()
__all__ = ["private_amqp_url"]  # imported so this module's rigs run in a private vhost

SPEAKING_FIELDS = [
    "id",
    "customer_id",
    "reference_type",
    "reference_id",
    "language",
    "provider",
    "voice_id",
    "direction",
    "status",
    "pod_id",
    "tm_create",
    "tm_update",
    "tm_delete",
]


@pytest.fixture(autouse=True)
def _broker(private_amqp_url: str) -> None:
    require_rabbitmq()


def body(**overrides: Any) -> dict[str, Any]:
    data = {
        "customer_id": str(uuid.uuid4()),
        "reference_type": "call",
        "reference_id": str(uuid.uuid4()),
        "language": "en-US",
        "provider": "gcp",
        "voice_id": "en-US-Chirp3-HD-Aoede",
        "direction": "out",
    }
    data.update(overrides)
    return data


def of_speaking(sid: str) -> Any:
    """A speaking's own events (``id``) and its streaming's (``streaming_id`` / ``id``)."""
    return lambda e: (e.data or {}).get("streaming_id", (e.data or {}).get("id")) == sid


def events_of(rig: Rig, sid: str, *types: str) -> list[Event]:
    return [e for e in rig.caller.events if of_speaking(sid)(e) and (not types or e.type in types)]


async def create(rig: Rig, data: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await rig.request(SHARED_QUEUE, "/v1/speakings", "POST", data or body())
    assert response.status_code == 200, response
    assert isinstance(response.data, dict)
    return response.data


async def test_create_say_flush_say_stop_with_events_and_rows(db: Database) -> None:
    engine = SyntheticEngine(seconds_per_char=0.1, speed=1.5)
    with trio.fail_after(30):
        async with open_rig(engine=engine, **db.config) as rig:
            request = body()
            speaking = await create(rig, request)
            sid = speaking["id"]
            assert list(speaking) == SPEAKING_FIELDS  # Go's field order, no omitempty
            assert speaking["status"] == "active" and speaking["pod_id"] == rig.daemon.config.pod_id
            assert {k: speaking[k] for k in request} == request
            assert speaking["tm_create"] and speaking["tm_update"] and speaking["tm_delete"] is None
            row = await db.store.get(uuid.UUID(sid))
            assert row is not None and row.to_data() == speaking
            started = await rig.caller.wait_event(EventType.SPEAKING_STARTED, of_speaking(sid))
            assert started.publisher == "tts-manager" and started.data == speaking
            # Speaking id = streaming id = external-media id at call-manager.
            assert rig.call_manager.requests[0].data["id"] == sid

            first = "a long first sentence that the caller interrupts"
            said = await rig.speaking(sid, "say", {"text": first})
            assert said.status_code == 200 and said.data == speaking  # the row as read before saying
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, of_speaking(sid))
            await trio.sleep(0.5)
            flushed = await rig.speaking(sid, "flush")
            assert flushed.status_code == 200 and flushed.data == speaking
            call = rig.sim_call_for(sid)
            flush = next(c for c in call.controls if c.command and c.command.name == "FLUSH_MEDIA")
            assert not call.hung_up  # barge-in keeps the call

            second = "fresh words"
            assert (await rig.speaking(sid, "say", {"text": second})).status_code == 200
            await rig.caller.wait_event(
                EventType.MESSAGE_PLAY_FINISHED, lambda e: e.data.get("total_message") == second
            )
            stopped = await rig.speaking(sid, "stop")
            assert stopped.status_code == 200 and stopped.data["status"] == "stopped"
            assert parse_timestamp(stopped.data["tm_update"]) > parse_timestamp(speaking["tm_update"])
            again = await rig.speaking(sid, "stop")
            assert again.status_code == 200 and again.data == stopped.data  # unchanged, no event
            stopped_event = await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(sid))
            assert stopped_event.data == stopped.data  # billing reads tm_update from here
            await rig.caller.wait_event(EventType.STREAMING_DELETED, of_speaking(sid))
            await call.ended.wait()
            assert uuid.UUID(sid) in rig.call_manager.deleted
            row = await db.store.get(uuid.UUID(sid))
            assert row is not None and row.to_data() == stopped.data
            late = await rig.speaking(sid, "say", {"text": "too late"})
            assert (late.status_code, late.data_type) == (404, "")
    # The first utterance's audio stopped at the flush; the second played in full.
    old = [f for f in call.played if f.time > flush.time + 0.021 and f.data[0] == engine_byte(first)]
    assert old == []
    assert len([f for f in call.played if f.data[0] == engine_byte(second)]) == round(len(second) * 0.1 * 50)
    mine = events_of(rig, sid)
    assert [e.type for e in mine][:8] == [
        "streaming_created",
        "speaking_started",
        "message_initiated",
        "message_play_started",
        "message_play_finished",
        "message_initiated",
        "message_play_started",
        "message_play_finished",
    ]
    assert sorted(e.type for e in mine[8:]) == ["speaking_stopped", "streaming_deleted"]
    # As Go: a speaking's message events carry the nil message id.
    assert {e.data["id"] for e in mine if e.type.startswith("message_")} == {str(NIL_UUID)}
    cut, played = [e.data for e in mine if e.type == "message_play_finished"]
    assert cut["total_message"] == first and "message_finish" not in cut  # cut off by the flush
    assert played["total_message"] == second and played["message_finish"] is True


async def test_flush_silences_every_queued_say_and_reports_each_over() -> None:
    engine = SyntheticEngine(seconds_per_char=0.1, speed=1.5)
    with trio.fail_after(20):
        async with open_rig(engine=engine) as rig:
            sid = (await create(rig))["id"]
            texts = ["one utterance playing now", "another one queued behind it", "and a third"]
            for text in texts:
                assert (await rig.speaking(sid, "say", {"text": text})).status_code == 200
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, of_speaking(sid))
            assert (await rig.speaking(sid, "flush")).status_code == 200
            with trio.fail_after(1):  # at the flush, not at the stop
                while len(events_of(rig, sid, "message_play_finished")) < 3:
                    await rig.caller.wait_event(
                        EventType.MESSAGE_PLAY_FINISHED,
                        lambda e: len(events_of(rig, sid, "message_play_finished")) >= 3,
                    )
            call = rig.sim_call_for(sid)
            assert not call.hung_up and rig.daemon.speakings is not None
            assert (await rig.speaking(sid, "say", {"text": "after"})).status_code == 200  # still usable
            await rig.speaking(sid, "stop")
    finished = [e.data for e in events_of(rig, sid, "message_play_finished")]
    assert [f["total_message"] for f in finished[:3]] == texts
    assert not any("message_finish" in f for f in finished[:3])


def engine_byte(text: str) -> int:
    from tts_streamer.adapters.synthetic import fill_byte

    return fill_byte(text)


async def test_list_filters_and_paging(db: Database) -> None:
    customer, other = uuid.uuid4(), uuid.uuid4()
    reference = uuid.uuid4()
    base = ss.now_utc() - dt.timedelta(minutes=5)
    rows: list[Speaking] = []
    for index in range(7):
        row = Speaking(
            id=uuid.uuid4(),
            customer_id=customer,
            reference_type="confbridge" if index == 3 else "call",
            reference_id=reference if index == 5 else uuid.uuid4(),
            status="stopped" if index % 2 else "active",
            pod_id="pod-a",
            tm_create=base + dt.timedelta(seconds=index, microseconds=index * 1001),
        )
        assert await db.store.insert_if_free(row)
        rows.append(row)
    assert await db.store.insert_if_free(
        Speaking(
            id=uuid.uuid4(), customer_id=other, reference_id=uuid.uuid4(), status="active", tm_create=base
        )
    )
    deleted = Speaking(id=uuid.uuid4(), customer_id=customer, reference_id=uuid.uuid4(), tm_create=base)
    assert await db.store.insert_if_free(deleted)
    await db.store.soft_delete(deleted.id)
    newest_first = [str(r.id) for r in reversed(rows)]

    with trio.fail_after(20):
        async with open_rig(**db.config) as rig:

            async def page(query: str) -> list[dict[str, Any]]:
                response = await rig.request(SHARED_QUEUE, f"/v1/speakings?{query}", "GET")
                assert response.status_code == 200, response
                assert isinstance(response.data, list)
                return response.data

            seen: list[str] = []
            token = ""
            while True:
                items = await page(f"page_token={token}&page_size=3&customer_id={customer}")
                if not items:
                    break
                assert len(items) <= 3
                seen += [item["id"] for item in items]
                token = items[-1]["tm_create"]  # the next page: older than the last row seen
            assert seen == newest_first  # every row once, newest first, the deleted one never
            everything = await page("page_size=0")
            assert len(everything) == 8 and str(deleted.id) not in {i["id"] for i in everything}
            assert len(await page("page_size=500")) == 8  # over 100 means 100
            assert len(await page("page_size=x")) == 8  # unparsable: the default
            active = await page(f"customer_id={customer}&status=active")
            assert [i["id"] for i in active] == [str(r.id) for r in reversed(rows) if r.status == "active"]
            assert [i["id"] for i in await page("reference_type=confbridge")] == [str(rows[3].id)]
            assert [i["id"] for i in await page(f"reference_id={reference}")] == [str(rows[5].id)]
            assert await page("customer_id=not-a-uuid") == []  # Go: FromStringOrNil -> nil UUID
            legacy = (base + dt.timedelta(seconds=2)).strftime("%Y-%m-%d %H:%M:%S.%f")
            assert [i["id"] for i in await page(f"customer_id={customer}&page_token={legacy}")] == [
                str(r.id) for r in rows[1::-1]
            ]
            assert len(await page("page_token=2000-01-01T00:00:00.000000Z")) == 0
            bad = await rig.request(SHARED_QUEUE, "/v1/speakings?page_token=yesterday", "GET")
            assert (bad.status_code, bad.data_type) == (400, "")
            control = await rig.request(SHARED_QUEUE, "/v1/speakings?status=\x01", "GET")
            assert control.status_code == 400  # Go's url.Parse refuses it


async def test_hangup_mid_speech_stops_the_row_with_one_speaking_stopped(tmp_path: Any) -> None:
    engine = SyntheticEngine(seconds_per_char=0.1, speed=1.5)
    with trio.fail_after(20):
        async with open_rig(engine=engine) as rig:
            rig.call_manager.leg_config = SimConfig(close_after=1.0)
            sid = (await create(rig))["id"]
            await rig.speaking(sid, "say", {"text": "x" * 60})
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, of_speaking(sid))
            stopped = await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(sid))
            assert stopped.data["status"] == "stopped" and stopped.data["tm_update"]
            await rig.caller.wait_event(EventType.STREAMING_DELETED, of_speaking(sid))
            got = await rig.request(SHARED_QUEUE, f"/v1/speakings/{sid}", "GET")
            assert got.data == stopped.data
            assert (await rig.speaking(sid, "stop")).data == stopped.data  # already stopped: unchanged
            assert rig.daemon.speakings is not None and rig.daemon.speakings.live == {}
    assert len(events_of(rig, sid, "speaking_started")) == len(events_of(rig, sid, "speaking_stopped")) == 1
    finished = events_of(rig, sid, "message_play_finished")
    assert len(finished) == 1 and "message_finish" not in finished[0].data


async def test_vendor_failure_and_shutdown_stop_their_speakings() -> None:
    failing = SyntheticEngine(name="failing", seconds_per_char=0.05, speed=4.0, fail_after_bytes=1600)
    with trio.fail_after(25):
        async with open_rig(pods=0) as rig:
            async with run_pod(rig, engines={"failing": failing, rig.engine.name: rig.engine}) as pod:
                # Vendor failure: nothing else would tell the caller, so the speaking ends.
                broken = (await create(rig, body(provider="failing")))["id"]
                await rig.speaking(broken, "say", {"text": "this vendor breaks after a fifth of a second"})
                ended = await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(broken))
                assert ended.data["status"] == "stopped"
                await rig.caller.wait_event(EventType.STREAMING_DELETED, of_speaking(broken))
                # Shutdown: a speaking still speaking is stopped, its event sent before the pod exits.
                busy = (await create(rig))["id"]
                await rig.speaking(busy, "say", {"text": "y" * 80})
                await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, of_speaking(busy))
                pod.handle.shutdown()
                await pod.wait_stopped()
            stopped = await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(busy))
            assert stopped.data["status"] == "stopped"
    for sid in (broken, busy):
        assert len(events_of(rig, sid, "speaking_stopped")) == 1


async def test_crash_recovery_on_startup_stops_this_pods_rows(db: Database) -> None:
    pod_id = f"crashing-pod-{uuid.uuid4().hex[:6]}"
    with trio.fail_after(30):
        async with open_rig(pods=0, **db.config) as rig:
            async with run_pod(rig, pod_id, **db.config) as pod:
                sid = (await create(rig))["id"]
                await rig.speaking(sid, "say", {"text": "z" * 80})
                await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, of_speaking(sid))
                crashed_at = ss.now_utc()
                pod.crash()  # killed: no drain, nothing cleaned up
                await pod.wait_stopped()
            left = await db.store.get(uuid.UUID(sid))
            assert left is not None and left.status == "active"
            # A create the crash interrupted, and a live speaking of another pod.
            half = Speaking(id=uuid.uuid4(), reference_id=uuid.uuid4(), status="initiating", pod_id=pod_id)
            foreign = Speaking(
                id=uuid.uuid4(), reference_id=uuid.uuid4(), status="active", pod_id="elsewhere"
            )
            for row in (half, foreign):
                assert await db.store.insert_if_free(attrs_now(row))
            assert events_of(rig, sid, "speaking_stopped") == []
            async with run_pod(rig, pod_id, **db.config) as restarted:
                event = await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(sid))
                assert event.data["status"] == "stopped" and event.data["tm_update"]
                assert event.data["tm_create"] == left.to_data()["tm_create"]
                # The end is the crashed run's last heartbeat, not the restart: downtime is not billed.
                assert parse_timestamp(event.data["tm_update"]) <= crashed_at
                assert restarted.handle.sweeper is not None
                assert restarted.handle.sweeper.stats.recovered_own == 2
                # Its external media was deleted at call-manager (the speaking id is the media id)
                # before the pod started serving.
                assert uuid.UUID(sid) in rig.call_manager.deleted
            statuses = [
                getattr(await db.store.get(r), "status", None) for r in (uuid.UUID(sid), half.id, foreign.id)
            ]
            assert statuses == ["stopped", "stopped", "active"]
            async with run_pod(rig, pod_id, **db.config) as again:  # nothing left to recover
                assert again.handle.sweeper is not None and again.handle.sweeper.stats.recovered_own == 0
    assert len(events_of(rig, sid, "speaking_stopped")) == 1
    # The interrupted create never had a speaking_started: its streaming is reported gone, nothing more.
    assert [e.type for e in events_of(rig, str(half.id))] == ["streaming_deleted"]
    assert events_of(rig, str(foreign.id)) == []


def attrs_now(row: Speaking) -> Speaking:
    import attrs

    return attrs.evolve(row, tm_create=ss.now_utc())


async def test_concurrent_creates_for_one_call_exactly_one_wins(db: Database) -> None:
    request = body()
    with trio.fail_after(25):
        async with open_rig(pods=2, **db.config) as rig:
            replies: list[Any] = []

            async def one() -> None:
                replies.append(await rig.request(SHARED_QUEUE, "/v1/speakings", "POST", request))

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(one)
            winners = [r for r in replies if r.status_code == 200]
            assert len(winners) == 1, [r.status_code for r in replies]
            assert (
                sorted((r.status_code, r.data_type) for r in replies if r.status_code != 200)
                == [(500, "")] * 5
            )
            sid = winners[0].data["id"]
            rows = await db.store.list_page(
                ss.ListFilter(before=ss.now_utc(), reference_id=uuid.UUID(request["reference_id"]))
            )
            assert [str(r.id) for r in rows] == [sid]  # losers never wrote a row
            await rig.caller.wait_event(EventType.SPEAKING_STARTED, of_speaking(sid))
            owner = next(i for i, d in enumerate(rig.daemons) if d.config.pod_id == winners[0].data["pod_id"])
            assert (await rig.speaking(sid, "stop", pod=owner)).data["status"] == "stopped"
            await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(sid))
    assert len(rig.caller.of(EventType.SPEAKING_STARTED)) == 1


async def test_refusals_match_go() -> None:
    with trio.fail_after(20):
        async with open_rig() as rig:
            bad = await rig.request(SHARED_QUEUE, "/v1/speakings", "POST", {"customer_id": "nope"})
            assert (bad.status_code, bad.data_type) == (400, "")
            request = body(provider="")
            speaking = await create(rig, request)
            sid = speaking["id"]
            assert speaking["provider"] == "elevenlabs"  # Go's default
            duplicate = await rig.request(SHARED_QUEUE, "/v1/speakings", "POST", request)
            assert (duplicate.status_code, duplicate.data_type) == (500, "")
            too_long = await rig.speaking(sid, "say", {"text": "é" * 2500 + "!"})  # 5001 bytes
            assert (too_long.status_code, too_long.data_type) == (404, "")
            assert (await rig.speaking(sid, "say", {"text": 5})).status_code == 400
            assert (await rig.speaking(sid, "say", {"text": "é" * 2500})).status_code == 200  # 5000: ok
            unknown = str(uuid.uuid4())
            for action in ("say", "flush", "stop"):
                response = await rig.speaking(unknown, action, {"text": "hi"})
                assert (response.status_code, response.data_type) == (404, ""), action
            for method in ("GET", "DELETE"):
                response = await rig.request(SHARED_QUEUE, f"/v1/speakings/{unknown}", method)
                assert (response.status_code, response.data_type) == (404, ""), method
            # Soft delete: tm_delete set, hidden from lists, still readable, audio untouched.
            deleted = await rig.request(SHARED_QUEUE, f"/v1/speakings/{sid}", "DELETE")
            assert deleted.status_code == 200 and deleted.data["tm_delete"] is not None
            assert deleted.data["tm_update"] == deleted.data["tm_delete"]
            assert deleted.data["status"] == "active"
            assert (await rig.request(SHARED_QUEUE, f"/v1/speakings/{sid}", "GET")).data == deleted.data
            listed = await rig.request(SHARED_QUEUE, "/v1/speakings", "GET")
            assert listed.data == []
            assert (await rig.speaking(sid, "flush")).status_code == 200
            assert (await rig.speaking(sid, "stop")).data["status"] == "stopped"
            assert (await rig.speaking(sid, "say", {"text": "hi"})).status_code == 404
            assert (await rig.speaking(sid, "flush")).status_code == 404


async def test_requests_reaching_another_pod_are_forwarded_and_a_dead_owners_row_stops() -> None:
    with trio.fail_after(25):
        async with open_rig(pods=2) as rig:
            speaking = await create(rig)
            sid = speaking["id"]
            owner = next(i for i, d in enumerate(rig.daemons) if d.config.pod_id == speaking["pod_id"])
            other = 1 - owner
            said = await rig.speaking(sid, "say", {"text": "via the other pod"}, pod=other)
            assert said.status_code == 200 and said.data == speaking
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, of_speaking(sid))
            stopped = await rig.speaking(sid, "stop", pod=other)
            assert stopped.status_code == 200 and stopped.data["status"] == "stopped"
            await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(sid))
            assert sum(d.plane.stats.forwarded for d in rig.daemons) >= 2
            # A pod that died under another name (a Deployment's new pods never sweep its rows):
            # stop finds no owner and stops the row itself, so billing still closes.
            store = rig.daemon.speakings._store if rig.daemon.speakings else None
            assert store is not None
            ghost = Speaking(
                id=uuid.uuid4(),
                reference_id=uuid.uuid4(),
                status="active",
                pod_id="gone",
                tm_create=ss.now_utc(),
            )
            assert await store.insert_if_free(ghost)
            say = await rig.speaking(str(ghost.id), "say", {"text": "anyone?"})
            assert (say.status_code, say.data_type) == (404, "")
            gone = await rig.speaking(str(ghost.id), "stop")
            assert gone.status_code == 200 and gone.data["status"] == "stopped"
            await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(str(ghost.id)))
    assert len(events_of(rig, sid, "speaking_stopped")) == 1
    assert len(events_of(rig, str(ghost.id), "speaking_stopped")) == 1


async def test_a_crashed_pods_speaking_is_closed_by_a_pod_of_another_name(db: Database) -> None:
    """The Deployment case: the crashed pod comes back under a new name, so it never sweeps its own
    rows; any pod closes them once the owner's heartbeat is older than SPEAKING_OWNER_TIMEOUT."""
    liveness: dict[str, Any] = {"speaking_heartbeat_interval": 0.2, "speaking_owner_timeout": 1.0}
    with trio.fail_after(30):
        async with open_rig(pods=0, **db.config) as rig:
            async with run_pod(rig, f"old-{uuid.uuid4().hex[:6]}", **liveness, **db.config) as pod:
                sid = (await create(rig))["id"]
                await rig.speaking(sid, "say", {"text": "z" * 80})
                await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, of_speaking(sid))
                crashed_at = ss.now_utc()
                pod.crash()
                await pod.wait_stopped()
            async with run_pod(rig, f"new-{uuid.uuid4().hex[:6]}", **liveness, **db.config) as new:
                event = await rig.caller.wait_event(EventType.SPEAKING_STOPPED, of_speaking(sid))
                closed_at = ss.now_utc()
                ended = parse_timestamp(event.data["tm_update"])
                # The owner's last heartbeat: at most one interval before the crash, never after it.
                assert crashed_at - dt.timedelta(seconds=1) <= ended <= crashed_at
                assert closed_at - crashed_at < dt.timedelta(seconds=10)
                await rig.caller.wait_event(EventType.STREAMING_DELETED, of_speaking(sid))
                sweeper = new.handle.sweeper
                assert sweeper is not None
                # The sweep counts a row once its external media's DELETE (an RPC after the events,
                # bounded) is done.
                await poll_until(lambda: sweeper.stats.swept > 0)
                assert sweeper.stats.swept == 1
                assert uuid.UUID(sid) in rig.call_manager.deleted
    assert len(events_of(rig, sid, "speaking_stopped")) == 1


async def test_fields_longer_than_their_go_columns_are_refused_on_both_stores(db: Database) -> None:
    """Go's table: varchar(32) reference_type and provider, (16) language, (255) voice_id, (8)
    direction, charset utf8 (3 bytes at most). SQLite would store anything: the edge refuses it (400,
    Go's code for a bad request) the same on both; the longest values that fit are stored whole."""
    with trio.fail_after(30):
        async with open_rig(**db.config) as rig:
            too_long = {
                "voice_id": "v" * 1_000_000,
                "provider": "p" * 100_000,
                "reference_type": "r" * 33,
                "language": "l" * 17,
                "direction": "d" * 9,
            }
            for name, value in {**too_long, "voice_id": "é" * 256, "language": "en-US-\U0001f600"}.items():
                response = await rig.request(SHARED_QUEUE, "/v1/speakings", "POST", body(**{name: value}))
                assert (response.status_code, response.data_type) == (400, ""), name
            for name in too_long:
                response = await rig.request(SHARED_QUEUE, "/v1/speakings", "POST", body(**{name: "x"}))
                assert response.status_code == 200, name
                await rig.speaking(response.data["id"], "stop")
            assert await rig.request(SHARED_QUEUE, "/v1/speakings", "GET") is not None
            fits = body(voice_id="é" * 255, provider="p" * 32, reference_type="r" * 32, language="l" * 16)
            speaking = await create(rig, fits)
            row = await db.store.get(uuid.UUID(speaking["id"]))
            assert row is not None and (row.voice_id, row.provider) == (fits["voice_id"], fits["provider"])
            listed = await rig.request(SHARED_QUEUE, "/v1/speakings?page_size=100", "GET")
            assert len(listed.data) == len(too_long) + 1  # the refused ones never wrote a row


async def test_a_local_sqlite_store_in_kubernetes_is_a_warning_and_a_readiness_detail(
    db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Replicas of a Deployment share the request queue: each on its own SQLite file would miss the
    others' speakings. Loud, but the pod stays ready: streamings need no database, and a single-pod
    setup on SQLite must keep working."""
    import json
    import urllib.request

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    with trio.fail_after(20):
        async with open_rig(**db.config) as rig:
            readiness = rig.daemon.readiness
            assert readiness is not None

            def fetch() -> dict[str, Any]:
                url = f"http://127.0.0.1:{rig.daemon.http_port}/health/ready"
                with urllib.request.urlopen(url, timeout=3) as response:
                    assert response.status == 200
                    return dict(json.loads(response.read()))

            ready = await trio.to_thread.run_sync(fetch)
    warned = [r for r in caplog.records if "local SQLite file" in r.getMessage()]
    assert ready["ready"] is True
    if db.backend == "sqlite":
        assert "DATABASE_DSN" in ready["speakings_store_warning"]
        assert [r.levelname for r in warned] == ["WARNING"]
    else:
        assert "speakings_store_warning" not in ready and warned == []
