"""The AMQP command plane end to end: real RabbitMQ, the Asterisk simulator, a fake call-manager.

These use the real clock (broker and sockets), with short bounds.
"""

from __future__ import annotations

import uuid

import pytest
import trio

from tests.amqp_support import open_rig
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.adapters.voipbin.envelope import EventType
from tts_streamer.adapters.voipbin.wire import NIL_UUID
from tts_streamer.simulator.asterisk import SimConfig

pytestmark = pytest.mark.realtime


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_rabbitmq()


def by_streaming(sid: str):
    return lambda e: (e.data or {}).get("streaming_id", (e.data or {}).get("id")) == sid


async def test_create_speak_finish_delete_with_events_in_order() -> None:
    with trio.fail_after(20):
        async with open_rig() as rig:
            created = await rig.create()
            assert created.status_code == 200, created
            streaming = created.data
            sid = streaming["id"]
            assert streaming["pod_id"] == rig.daemon.config.pod_id
            assert streaming["message_id"] == str(NIL_UUID)
            assert streaming["reference_type"] == "call" and streaming["direction"] == "out"
            cm_request = rig.call_manager.requests[0].data
            assert cm_request["external_host"] == "INCOMING" and cm_request["connection_type"] == "server"
            assert cm_request["transport"] == "websocket" and cm_request["encapsulation"] == "none"
            assert cm_request["id"] == sid and cm_request["format"] == "ulaw"

            message_id = str(uuid.uuid4())
            init = await rig.streaming(sid, "say_init", {"message_id": message_id})
            assert init.status_code == 200 and init.data["message_id"] == message_id
            for text in ["Hello there. ", "How are you? ", "Goodbye."]:
                added = await rig.streaming(sid, "say_add", {"message_id": message_id, "text": text})
                assert (added.status_code, added.data_type, added.data) == (200, "", None)
            finished = await rig.streaming(sid, "say_finish", {"message_id": message_id})
            assert finished.status_code == 200 and finished.data["id"] == sid
            played = await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(sid))
            assert played.data["id"] == message_id
            assert played.data["total_count"] == 3 and played.data["message_finish"] is True
            assert played.data["total_message"].startswith("Hello there.")

            deleted = await rig.caller.call(SHARED_QUEUE, f"/v1/streamings/{sid}", "DELETE")
            assert deleted is not None and deleted.status_code == 200 and deleted.data["id"] == sid
            await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            call = rig.sim_call_for(sid)
            await call.ended.wait()
            assert call.closed_code == 1000
            assert uuid.UUID(sid) in rig.call_manager.deleted
    mine = [e.type for e in rig.caller.events if by_streaming(sid)(e)]
    assert mine == [
        "streaming_created",
        "message_initiated",
        "message_play_started",
        "message_play_finished",
        "streaming_deleted",
    ]
    expected_frames = round(len("Hello there. How are you? Goodbye.") * 0.05 * 50)
    assert abs(call.frames_played - expected_frames) <= 3


async def test_say_stop_is_barge_in_and_the_call_stays_up() -> None:
    engine = SyntheticEngine(seconds_per_char=0.1, speed=1.5)
    with trio.fail_after(20):
        async with open_rig(engine=engine) as rig:
            sid = (await rig.create()).data["id"]
            first, second = str(uuid.uuid4()), str(uuid.uuid4())
            old_text, new_text = "a long sentence that gets cut off", "fresh words"
            await rig.streaming(sid, "say_init", {"message_id": first})
            await rig.streaming(sid, "say_add", {"message_id": first, "text": old_text})
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, by_streaming(sid))
            await trio.sleep(0.5)
            stopped = await rig.streaming(sid, "say_stop")
            assert (stopped.status_code, stopped.data_type) == (200, "")
            stale = await rig.streaming(sid, "say_add", {"message_id": first, "text": "stale"})
            assert stale.status_code == 500
            await rig.streaming(sid, "say_init", {"message_id": second})
            await rig.streaming(sid, "say_add", {"message_id": second, "text": new_text})
            await rig.streaming(sid, "say_finish", {"message_id": second})
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, lambda e: e.data["id"] == second)
            call = rig.sim_call_for(sid)
            assert not call.hung_up
    flush = next(c for c in call.controls if c.command and c.command.name == "FLUSH_MEDIA")
    old = fill_byte(old_text)
    assert not [m for m in call.queued if m.time > flush.time and m.data[0] == old]
    assert len([f for f in call.played if f.time > flush.time + 0.021 and f.data[0] == old]) == 0
    assert len([f for f in call.played if f.data[0] == fill_byte(new_text)]) == round(
        len(new_text) * 0.1 * 50
    )
    finished_first = [e for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED) if e.data["id"] == first]
    assert len(finished_first) == 1 and "message_finish" not in finished_first[0].data


@pytest.mark.parametrize("mode", ["error500", "typed_error"])
async def test_failed_create_is_rolled_back_and_reported(mode: str) -> None:
    with trio.fail_after(20):
        async with open_rig() as rig:
            rig.call_manager.mode = mode
            response = await rig.create()
            if mode == "error500":
                assert (response.status_code, response.data_type) == (500, "")
            else:
                assert response.status_code == 404 and response.data["reason"] == "CALL_NOT_FOUND"
            created = await rig.caller.wait_event(EventType.STREAMING_CREATED)
            sid = created.data["id"]
            await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            assert rig.daemon.streamings.streamings == {} and len(rig.daemon.supervisor) == 0


async def test_slow_call_manager_create_fails_within_the_budget() -> None:
    with trio.fail_after(20):
        async with open_rig() as rig:
            rig.call_manager.mode = "slow"
            started = trio.current_time()
            response = await rig.create()
            elapsed = trio.current_time() - started
            assert response.status_code == 500
            assert elapsed < 3.0  # callers give up at 3 s; we answer before that
            sid = (await rig.caller.wait_event(EventType.STREAMING_CREATED)).data["id"]
            await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            # call-manager finishes the abandoned create later (3.5 s): it must not be left behind.
            with trio.fail_after(15):
                while uuid.UUID(sid) not in rig.call_manager.deleted:  # noqa: ASYNC110 (a fake's state)
                    await trio.sleep(0.1)
            assert uuid.UUID(sid) in rig.call_manager.created


async def test_unknown_routes_and_ids() -> None:
    with trio.fail_after(20):
        async with open_rig() as rig:
            unknown = str(uuid.uuid4())
            listing = await rig.caller.call(SHARED_QUEUE, "/v1/streamings", "GET")
            assert listing is not None and (listing.status_code, listing.data_type) == (404, "")
            add = await rig.streaming(unknown, "say_add", {"message_id": unknown, "text": "x"})
            assert add.status_code == 404 and add.data["reason"] == "STREAMING_NOT_FOUND"
            init = await rig.streaming(unknown, "say_init", {"message_id": unknown})
            assert (init.status_code, init.data_type) == (500, "")
            delete = await rig.caller.call(SHARED_QUEUE, f"/v1/streamings/{unknown}", "DELETE")
            assert delete is not None and delete.status_code == 404
            assert delete.data["reason"] == "STREAMING_NOT_FOUND"
            upper = await rig.caller.call(
                rig.pod_queue(), f"/v1/streamings/{unknown.upper()}/say_stop", "POST"
            )
            assert upper is not None and upper.status_code == 404


async def test_two_pods_route_per_pod_and_delete_on_the_shared_queue_reaches_the_owner() -> None:
    with trio.fail_after(30):
        async with open_rig(pods=2) as rig:
            owners: dict[str, int] = {}
            for _ in range(6):
                streaming = (await rig.create()).data
                owners[streaming["id"]] = next(
                    i for i, d in enumerate(rig.daemons) if d.config.pod_id == streaming["pod_id"]
                )
            assert set(owners.values()) == {0, 1}, "both pods should have taken creates"
            for sid, owner in owners.items():
                message_id = str(uuid.uuid4())
                assert (
                    await rig.streaming(sid, "say_init", {"message_id": message_id}, pod=owner)
                ).status_code == 200
                wrong = await rig.streaming(sid, "say_init", {"message_id": message_id}, pod=1 - owner)
                assert wrong.status_code == 500
            # The broker round-robins the shared queue, so which pod a DELETE lands on is not ours to
            # pick: half go to the shared queue, half straight to the pod that does NOT own them.
            for index, (sid, owner) in enumerate(owners.items()):
                queue = SHARED_QUEUE if index % 2 else rig.pod_queue(1 - owner)
                deleted = await rig.caller.call(queue, f"/v1/streamings/{sid}", "DELETE")
                assert deleted is not None and deleted.status_code == 200, deleted
                assert deleted.data["id"] == sid
            for sid in owners:
                await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            assert all(len(d.supervisor) == 0 for d in rig.daemons)
            assert sum(d.plane.stats.forwarded for d in rig.daemons) >= 3
    for sid in owners:
        assert len([e for e in rig.caller.of(EventType.STREAMING_DELETED) if e.data["id"] == sid]) == 1


async def test_hangup_ends_the_streaming_with_events_once() -> None:
    engine = SyntheticEngine(seconds_per_char=0.1, speed=1.5)
    with trio.fail_after(20):
        async with open_rig(engine=engine) as rig:
            rig.call_manager.leg_config = SimConfig(close_after=1.0)
            sid = (await rig.create()).data["id"]
            message_id = str(uuid.uuid4())
            await rig.streaming(sid, "say_init", {"message_id": message_id})
            await rig.streaming(sid, "say_add", {"message_id": message_id, "text": "x" * 40})
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, by_streaming(sid))
            await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))
            finished = await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(sid))
            assert finished.data["id"] == message_id and "message_finish" not in finished.data
            assert rig.daemon.streamings.streamings == {} and len(rig.daemon.supervisor) == 0
            after = await rig.streaming(sid, "say_add", {"message_id": message_id, "text": "late"})
            assert after.status_code == 404
    assert len(rig.caller.of(EventType.STREAMING_DELETED)) == 1


async def test_running_daemon_reports_health_and_metrics_of_amqp_commands() -> None:
    import urllib.error
    import urllib.request

    def get(port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    engine = SyntheticEngine(seconds_per_char=0.1, speed=1.5)
    # Polling HTTP from outside the daemon: there is no Trio event to wait on (hence the noqa below).
    with trio.fail_after(20):
        async with open_rig(engine=engine) as rig:
            port = rig.daemon.http_port
            with trio.fail_after(3):
                while (await trio.to_thread.run_sync(get, port, "/health/ready"))[0] != 200:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            assert (await trio.to_thread.run_sync(get, port, "/health/live"))[0] == 200
            sid = (await rig.create()).data["id"]
            message_id = str(uuid.uuid4())
            await rig.streaming(sid, "say_init", {"message_id": message_id})
            await rig.streaming(sid, "say_add", {"message_id": message_id, "text": "x" * 30})
            await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, by_streaming(sid))
            await rig.streaming(sid, "say_stop")
            await rig.streaming(sid, "say_add", {"message_id": message_id, "text": "refused"})
            status, text = await trio.to_thread.run_sync(get, port, "/metrics")
            assert status == 200
            assert "tts_streamer_flush_to_silence_seconds_count 1.0" in text
            assert 'tts_streamer_command_errors_total{kind="message_id_mismatch"} 1.0' in text
            assert "tts_streamer_active_sessions 1.0" in text
            assert 'tts_streamer_vendor_first_audio_seconds_count{vendor="synthetic"} 1.0' in text
            rig.daemon.shutdown()
            with trio.fail_after(5):
                while (await trio.to_thread.run_sync(get, port, "/health/ready"))[0] != 503:  # noqa: ASYNC110
                    await trio.sleep(0.05)
