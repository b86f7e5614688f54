"""StreamingService's races in virtual time (issue 14 §3, §9): create rollback, reaping of a late-created
external media, and the DELETE / hang-up race, against in-memory call-manager and publisher fakes."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
import trio

from tests.streaming_fakes import open_service_rig
from tts_streamer.actors import events as ev
from tts_streamer.adapters.voipbin import models
from tts_streamer.simulator.asterisk import SimConfig
from tts_streamer.supervisor.services.streamings import REAP_DELAYS

CREATE = models.StreamingCreate.from_data(
    {
        "customer_id": str(uuid.uuid4()),
        "reference_type": "call",
        "reference_id": str(uuid.uuid4()),
        "language": "en-US",
        "direction": "out",
    }
)


async def create(service: Any) -> uuid.UUID:
    response = await service.start(CREATE)
    assert response.status_code == 200, response
    return uuid.UUID(response.data["id"])


async def test_a_create_slower_than_its_budget_is_rolled_back_and_its_late_media_reaped(
    nursery, autojump_clock
):
    async with open_service_rig(nursery, create_delay=3.0, create_timeout=2.5) as rig:
        started = trio.current_time()
        response = await rig.service.start(CREATE)
        assert response.status_code == 500
        assert trio.current_time() - started == pytest.approx(2.5)
        assert rig.service.streamings == {}
        [(sid, reason)] = rig.ended
        assert reason == "create_failed"
        assert rig.publisher.types(sid) == ["streaming_created", "streaming_deleted"]
        # call-manager finished the create at 3.0 s; the reaper's first DELETE (2.5 + 1 s) finds it.
        await trio.sleep(sum(REAP_DELAYS) + 1)
        assert rig.media.deleted(sid)
        assert [round(t - started, 6) for t, mid, _ in rig.media.deletes if mid == sid] == [
            2.5 + REAP_DELAYS[0]
        ]


async def test_reaping_retries_until_the_late_create_has_happened(nursery, autojump_clock):
    async with open_service_rig(nursery, create_delay=5.0, create_timeout=2.5) as rig:
        started = trio.current_time()
        assert (await rig.service.start(CREATE)).status_code == 500
        [(sid, _)] = rig.ended
        await trio.sleep(sum(REAP_DELAYS) + 1)
        attempts = [(round(t - started, 6), found) for t, mid, found in rig.media.deletes if mid == sid]
        # 3.5 s: not there yet (call-manager answers 500); 6.5 s: created at 5 s, deleted; then no more.
        assert attempts == [(2.5 + REAP_DELAYS[0], False), (2.5 + REAP_DELAYS[0] + REAP_DELAYS[1], True)]


async def test_a_media_socket_failing_after_create_deletes_the_external_media(nursery, autojump_clock):
    async with open_service_rig(nursery, register_legs=False) as rig:
        response = await rig.service.start(CREATE)
        assert response.status_code == 500
        [(sid, reason)] = rig.ended
        assert reason == "create_failed" and rig.service.streamings == {}
        assert rig.media.deleted(sid)  # rolled back at once, not left to the reaper
        assert rig.publisher.types(sid) == ["streaming_created", "streaming_deleted"]
        await trio.sleep(sum(REAP_DELAYS) + 1)
        assert len([d for d in rig.media.deletes if d[1] == sid]) == 1


@pytest.mark.parametrize(
    "hangup_delay", [0.0, 0.009, None], ids=["cm-hangs-up-at-once", "cm-hangs-up-9ms-later", "we-close-first"]
)
async def test_a_delete_ends_the_streaming_as_deleted_whichever_close_comes_first(
    nursery, autojump_clock, caplog, hangup_delay
):
    caplog.set_level(logging.INFO)
    async with open_service_rig(nursery, hangup_delay=hangup_delay) as rig:
        sid = await create(rig.service)
        response = await rig.service.delete(sid)
        assert response is not None and response.status_code == 200
        assert rig.ended == [(sid, "deleted")]
        [stopped] = rig.sink.of(ev.Stopped, str(sid))
        assert stopped.reason == "deleted"
        assert rig.sink.of(ev.SessionError, str(sid)) == []
        assert rig.publisher.types(sid) == ["streaming_created", "streaming_deleted"]
        assert [d[1] for d in rig.media.deletes] == [sid]  # one DELETE at call-manager, no second one
        leg: Any = rig.media.leg(sid)
        await leg.ended.wait()
        assert leg.closed_code == 1000
        assert leg.hangup_by == ("client_close" if hangup_delay is None else "ari")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_hang_up_from_asterisk_stays_a_hang_up(nursery, autojump_clock, caplog):
    async with open_service_rig(nursery, leg_config=SimConfig(close_after=1.0)) as rig:
        sid = await create(rig.service)
        with trio.fail_after(5):
            while not rig.ended:  # noqa: ASYNC110 (the service's state)
                await trio.sleep(0.01)
        assert rig.ended == [(sid, "hangup")]
        assert rig.sink.of(ev.Stopped, str(sid))[0].reason == "hangup"
        assert rig.publisher.types(sid) == ["streaming_created", "streaming_deleted"]
        await trio.sleep(0.1)
        assert rig.media.deleted(sid)  # call-manager is told, so it forgets the leg too
    assert "media socket ended the session" in caplog.text  # a real hang-up is still worth a warning
