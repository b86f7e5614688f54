"""SpeakingService against in-memory fakes under the autojump clock (issue 14 §6, §9): database outages
racing hang-ups and stops, end times, exactly one ``speaking_stopped``. The real-store paths (SQLite and
MariaDB, the broker) are covered end to end in tests/test_speakings.py."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from tests.fake_speaking_store import FakeEvents, FakeSpeakingStore, FakeStreams, virtual_clock
from tts_streamer.adapters.voipbin.routes import match_route
from tts_streamer.supervisor.services.speakings import SpeakingService, StopRetry


@attrs.define
class Rig:
    service: SpeakingService
    store: FakeSpeakingStore
    streams: FakeStreams
    events: FakeEvents

    async def create(self, **overrides: Any) -> uuid.UUID:
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
        response = await self.service.create(data)
        assert response.status_code == 200, response
        return uuid.UUID(response.data["id"])

    def stopped_events(self, sid: uuid.UUID) -> list[dict[str, Any]]:
        return self.events.of("speaking_stopped", sid)


@pytest.fixture
async def rig(autojump_clock: Any) -> AsyncIterator[Rig]:
    store, streams, events = FakeSpeakingStore(), FakeStreams(), FakeEvents()
    async with trio.open_nursery() as nursery:
        service = SpeakingService(
            store,
            streams,
            events,
            nursery,
            pod_id="pod-a",
            stop_retry=StopRetry(give_up_after=120.0),
            clock=virtual_clock,
        )
        streams.end_listeners.append(service.on_streaming_ended)
        yield Rig(service, store, streams, events)
        nursery.cancel_scope.cancel()


async def test_hang_up_during_a_7s_outage_is_written_later_with_the_real_end_time(
    rig: Rig, autojump_clock: Any
) -> None:
    sid = await rig.create()
    rig.store.outage(7.0)
    ended_at = virtual_clock()
    rig.streams.hang_up(sid)
    await trio.sleep(3.0)
    assert rig.store.rows[sid].status == "active" and sid in rig.service.unwritten  # still trying
    await trio.sleep(10.0)
    row = rig.store.rows[sid]
    assert row.status == "stopped"
    assert row.tm_update is not None and abs(row.tm_update - ended_at) < dt.timedelta(milliseconds=50)
    assert row.tm_update < virtual_clock() - dt.timedelta(seconds=6)  # not when the database came back
    (event,) = rig.stopped_events(sid)
    assert event["tm_update"] == row.to_data()["tm_update"]
    assert rig.service.unwritten == {} and rig.service.live == {}
    assert rig.service.stats.stop_write_failures >= 3


async def test_stop_during_an_outage_stops_the_audio_and_answers_500_not_404(
    rig: Rig, autojump_clock: Any
) -> None:
    sid = await rig.create()
    rig.store.outage(7.0)
    stop_time = virtual_clock()
    response = await rig.service.stop(sid)
    assert (response.status_code, response.data_type) == (500, "")
    assert rig.streams.deleted == [sid] and sid not in rig.streams.live  # the audio ended first
    assert rig.stopped_events(sid) == []  # not written yet: nothing announced
    await trio.sleep(15.0)
    row = rig.store.rows[sid]
    assert row.status == "stopped" and row.tm_update is not None
    assert abs(row.tm_update - stop_time) < dt.timedelta(milliseconds=100)
    assert len(rig.stopped_events(sid)) == 1
    again = await rig.service.stop(sid)
    assert again.status_code == 200 and again.data == row.to_data()  # already stopped: unchanged
    assert len(rig.stopped_events(sid)) == 1


async def test_a_store_failure_answers_500_on_every_route(rig: Rig, autojump_clock: Any) -> None:
    sid = await rig.create()
    rig.store.down = True
    match = match_route("GET", "/v1/speakings?page_size=10")
    assert match is not None
    answers = {
        "get": await rig.service.get(sid),
        "delete": await rig.service.delete(sid),
        "say": await rig.service.say(sid, {"text": "hi"}),
        "flush": await rig.service.flush(sid),
        "list": await rig.service.list_page(match),
        "create": await rig.service.create({"customer_id": str(uuid.uuid4())}),
        "stop of an unknown id": await rig.service.stop(uuid.uuid4()),
    }
    assert {name: (r.status_code, r.data_type) for name, r in answers.items()} == dict.fromkeys(
        answers, (500, "")
    )
    rig.store.down = False
    assert (await rig.service.get(uuid.uuid4())).status_code == 404  # a real miss is still 404


async def test_a_lost_commit_acknowledgement_still_gives_exactly_one_speaking_stopped(
    rig: Rig, autojump_clock: Any
) -> None:
    sid = await rig.create()
    rig.store.lose_stop_acks = 1  # the first stop commits, but its answer never arrives
    rig.streams.hang_up(sid)
    await trio.sleep(5.0)
    assert rig.store.rows[sid].status == "stopped"
    assert len(rig.stopped_events(sid)) == 1
    assert rig.service.live == {} and rig.service.unwritten == {}


async def test_hang_up_racing_stop_during_an_outage_publishes_once(rig: Rig, autojump_clock: Any) -> None:
    sids = [await rig.create() for _ in range(5)]
    rig.store.outage(7.0)
    async with trio.open_nursery() as nursery:
        for index, sid in enumerate(sids):
            nursery.start_soon(rig.service.stop, sid)
            if index % 2:
                rig.streams.hang_up(sid)
    await trio.sleep(15.0)
    for sid in sids:
        assert rig.store.rows[sid].status == "stopped"
        assert len(rig.stopped_events(sid)) == 1
    assert rig.service.live == {}


async def test_an_outage_past_the_retry_bound_is_given_up_and_reported(
    rig: Rig, caplog: pytest.LogCaptureFixture, autojump_clock: Any
) -> None:
    sid = await rig.create()
    rig.store.down = True
    rig.streams.hang_up(sid)
    await trio.sleep(60.0)
    assert sid in rig.service.unwritten  # still retrying within the bound (120 s here)
    attempts = rig.store.calls.count("stop")
    assert attempts < 20  # backoff: not a tight loop
    with caplog.at_level(logging.ERROR):
        assert rig.service.report_unwritten() == 1  # what the daemon calls when its drain ends
    assert str(sid) in caplog.text and "still live" in caplog.text
    await trio.sleep(120.0)
    assert rig.service.stats.stops_abandoned == 1 and rig.service.live == {}
    assert rig.store.rows[sid].status == "active" and rig.stopped_events(sid) == []


async def test_drain_waits_for_a_row_written_after_a_short_outage(rig: Rig, autojump_clock: Any) -> None:
    sid = await rig.create()
    rig.store.outage(3.0)
    rig.streams.hang_up(sid)
    with trio.fail_after(10):
        await rig.service.drain()
    assert rig.store.rows[sid].status == "stopped" and len(rig.stopped_events(sid)) == 1
