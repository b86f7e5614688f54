"""A normal DELETE over the real broker ends the streaming as ``deleted`` (issue 14 §3): the fake
call-manager hangs the leg up before it answers, as the real one does, so Asterisk's close arrives first."""

from __future__ import annotations

import logging
import uuid

import pytest
import trio

from tests.amqp_support import open_rig
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.adapters.voipbin.envelope import EventType
from tts_streamer.simulator.asterisk import SimConfig

pytestmark = pytest.mark.realtime


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_rabbitmq()


def by_streaming(sid: str):
    return lambda e: (e.data or {}).get("streaming_id", (e.data or {}).get("id")) == sid


def ended(rig, reason: str) -> float:
    metrics = rig.daemon.metrics
    assert metrics is not None
    return metrics.registry.get_sample_value("tts_streamer_sessions_ended_total", {"reason": reason}) or 0.0


async def test_delete_is_bookkept_as_deleted_not_as_a_socket_failure(caplog):
    caplog.set_level(logging.INFO)
    with trio.fail_after(20):
        async with open_rig() as rig:
            reasons: list[str] = []
            rig.daemon.streamings.add_end_listener(lambda _sid, reason: reasons.append(reason))
            created = await rig.create()
            assert created.status_code == 200
            sid = created.data["id"]
            deleted = await rig.caller.call(SHARED_QUEUE, f"/v1/streamings/{sid}", "DELETE")
            assert deleted is not None and deleted.status_code == 200
            await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            call = rig.sim_call_for(sid)
            await call.ended.wait()
            assert call.hangup_by == "ari"  # call-manager's hang-up closed the socket, as in production
            assert reasons == ["deleted"]
            assert ended(rig, "deleted") == 1 and ended(rig, "hangup") == 0
            assert rig.call_manager.deleted == [uuid.UUID(sid)]
    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("tts_streamer")
    ]
    assert not warnings, [r.getMessage() for r in warnings]


async def test_a_hang_up_from_asterisk_is_still_a_hang_up():
    with trio.fail_after(20):
        async with open_rig() as rig:
            rig.call_manager.leg_config = SimConfig(close_after=0.3)
            created = await rig.create()
            sid = created.data["id"]
            await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            with trio.fail_after(5):
                while uuid.UUID(sid) not in rig.call_manager.deleted:  # noqa: ASYNC110 (a fake's state)
                    await trio.sleep(0.01)
            assert ended(rig, "hangup") == 1 and ended(rig, "deleted") == 0
