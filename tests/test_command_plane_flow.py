"""The command plane in virtual time (issue 14 §4 and §9): flow control, staleness, at most once, lanes.

``CommandPlane`` runs over ``FakeBroker`` (tests/fake_deliveries.py) under the autojump clock, with
route handlers that record when each request was started. "Late" = started at or after its caller's
deadline (publish + 3 s).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from tests.fake_deliveries import FakeBroker
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.adapters.voipbin.routes import RouteName
from tts_streamer.supervisor.config import DaemonConfig
from tts_streamer.supervisor.daemon import request_deadlines
from tts_streamer.supervisor.services.command_plane import CommandPlane, RouteCall
from tts_streamer.supervisor.services.delivery_source import RequestDeadlines

POD_QUEUE = "bin-manager.tts-manager.request.pod-a"
SHARED = "bin-manager.tts-manager.request"
CALLER_TIMEOUT = 3.0


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


@attrs.define
class Recorder:
    """Route handlers that take ``work`` seconds and record (route, id, start time)."""

    work: float = 0.0
    started: list[tuple[RouteName, uuid.UUID | None, float]] = attrs.field(factory=list)

    def handler(self, route: RouteName) -> Callable[[RouteCall], Awaitable[Response]]:
        async def handle(call: RouteCall) -> Response:
            self.started.append((route, call.match.id, trio.current_time()))
            await trio.sleep(self.work)
            return envelope.ok()

        return handle

    def routes(self) -> dict[RouteName, Any]:
        return {name: self.handler(name) for name in RouteName}


@asynccontextmanager
async def open_plane(
    broker: FakeBroker, recorder: Recorder, deadlines: RequestDeadlines | None = None
) -> AsyncIterator[CommandPlane]:
    config = DaemonConfig(pod_id="pod-a")
    plane = CommandPlane(
        broker, recorder.routes(), pod_id="pod-a", deadlines=deadlines or request_deadlines(config)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        await nursery.start(plane.serve)
        yield plane
        nursery.cancel_scope.cancel()


def say_add(sid: uuid.UUID) -> str:
    return f"/v1/streamings/{sid}/say_add"


async def test_a_burst_past_the_callers_timeout_runs_nothing_late(clock: Any) -> None:
    """2,000 say_adds at once for 20 streamings, 50 ms of work each: one pod cannot finish them in 3 s.
    What it cannot start in time is refused (in the broker by the TTL, or here), never run late; what
    waits in memory never exceeds the prefetch window."""
    config = DaemonConfig(pod_id="pod-a")
    broker = FakeBroker(prefetch=config.amqp_prefetch, ttl={POD_QUEUE: config.per_pod_message_ttl_ms / 1000})
    recorder = Recorder(work=0.05)
    sids = [uuid.uuid4() for _ in range(20)]
    async with open_plane(broker, recorder) as plane:
        published = trio.current_time()
        callers = [broker.publish_request(POD_QUEUE, say_add(sids[i % 20]), data={}) for i in range(2000)]
        await trio.sleep(10)
    late = [t for _, _, t in recorder.started if t - published >= CALLER_TIMEOUT]
    assert not late, f"{len(late)} requests started after their callers' deadline"
    assert broker.max_unacked <= config.amqp_prefetch
    assert recorder.started, "nothing was served at all"
    assert len(recorder.started) < 2000, "the burst did not overload the pod: the test shows nothing"
    answered = sum(1 for c in callers if broker.replies_to(c))
    refused_here = sum(plane.stats.not_started.values())
    assert len(recorder.started) + refused_here + broker.expired_in_broker == 2000
    assert answered == len(recorder.started) + refused_here  # every delivered request answered once
    expired = [r for c in callers for r in broker.replies_to(c) if r.status_code != 200]
    assert all(r.data["reason"] == "REQUEST_EXPIRED" and r.status_code == 503 for r in expired)


async def test_a_request_stuck_behind_its_lane_is_answered_expired_not_run(clock: Any) -> None:
    """A per-pod request that waited in memory past REQUEST_TIMEOUT - TTL is not started: typed 503."""
    broker = FakeBroker()
    recorder = Recorder(work=2.0)  # each request of this streaming holds its lane 2 s
    sid = uuid.uuid4()
    async with open_plane(broker, recorder) as plane:
        first = broker.publish_request(POD_QUEUE, say_add(sid), data={})
        second = broker.publish_request(POD_QUEUE, say_add(sid), data={})
        await trio.sleep(5)
    assert [r.status_code for r in broker.replies_to(first)] == [200]
    (reply,) = broker.replies_to(second)
    assert reply.status_code == 503
    assert reply.data_type == envelope.DATA_TYPE_ERROR and reply.data["status"] == "UNAVAILABLE"
    assert len(recorder.started) == 1
    assert plane.stats.not_started["timeout"] == 1


async def test_a_shared_queue_request_gets_the_whole_timeout_from_receipt(clock: Any) -> None:
    broker = FakeBroker()
    recorder = Recorder(work=1.0)
    sid = uuid.uuid4()
    async with open_plane(broker, recorder):
        callers = [broker.publish_request(SHARED, f"/v1/streamings/{sid}", "DELETE") for _ in range(4)]
        await trio.sleep(6)
    # Started at 0, 1, 2 s after receipt; the fourth would start at 3 s: refused.
    assert [len(broker.replies_to(c)) for c in callers] == [1, 1, 1, 1]
    assert [t for _, _, t in recorder.started] == pytest.approx([0, 1, 2], abs=0.05)
    assert broker.replies_to(callers[3])[0].status_code == 503


async def test_an_old_amqp_timestamp_is_not_started(clock: Any) -> None:
    broker = FakeBroker()
    recorder = Recorder()
    now = 1_800_000_000.0
    deadlines = attrs.evolve(request_deadlines(DaemonConfig(pod_id="pod-a")), wall_clock=lambda: now)
    async with open_plane(broker, recorder, deadlines) as plane:
        old = broker.publish_request(POD_QUEUE, say_add(uuid.uuid4()), data={}, timestamp=now - 4)
        fresh = broker.publish_request(POD_QUEUE, say_add(uuid.uuid4()), data={}, timestamp=now - 1)
        await trio.sleep(1)
    assert broker.replies_to(old)[0].status_code == 503
    assert broker.replies_to(fresh)[0].status_code == 200
    assert plane.stats.not_started["timestamp"] == 1


async def test_a_redelivered_request_is_never_run_again(clock: Any) -> None:
    broker = FakeBroker()
    recorder = Recorder()
    async with open_plane(broker, recorder) as plane:
        caller = broker.publish_request(SHARED, "/v1/streamings", data={}, redelivered=True)
        await trio.sleep(1)
    assert recorder.started == []
    assert broker.replies_to(caller) == []
    assert broker.acked == 1  # taken off the queue, so it is not redelivered once more
    assert plane.stats.not_started["redelivered"] == 1


async def test_a_request_whose_ack_fails_is_not_run(clock: Any) -> None:
    broker = FakeBroker(ack_fails=True)
    recorder = Recorder()
    async with open_plane(broker, recorder) as plane:
        broker.publish_request(POD_QUEUE, say_add(uuid.uuid4()), data={})
        await trio.sleep(1)
    assert recorder.started == []
    assert plane.stats.not_started["ack_failed"] == 1


@pytest.mark.parametrize("route_uri", ["/v1/streamings", "/v1/speakings"])
async def test_a_create_whose_caller_gave_up_creates_nothing(clock: Any, route_uri: str) -> None:
    """A create sitting in the shared queue (a pod drained, the next one takes over 70 s later): its
    caller's reply queue is gone, so nothing is created and nothing is answered."""
    broker = FakeBroker()
    recorder = Recorder()
    async with open_plane(broker, recorder) as plane:
        gone = broker.publish_request(SHARED, route_uri, data={})
        waiting = broker.publish_request(SHARED, route_uri, data={})
        assert gone is not None
        broker.give_up(gone)
        await trio.sleep(1)
    assert [r for r, _, _ in recorder.started] == [
        RouteName.STREAMING_CREATE if route_uri == "/v1/streamings" else RouteName.SPEAKING_CREATE
    ]
    assert broker.replies_to(gone) == []
    assert broker.replies_to(waiting)[0].status_code == 200
    assert plane.stats.not_started["caller_gone"] == 1


async def test_a_create_whose_caller_cannot_be_checked_is_refused(clock: Any) -> None:
    broker = FakeBroker(probe_fails=True)
    recorder = Recorder()
    async with open_plane(broker, recorder) as plane:
        caller = broker.publish_request(SHARED, "/v1/streamings", data={})
        await trio.sleep(1)
    assert recorder.started == []
    assert broker.replies_to(caller)[0].status_code == 503
    assert plane.stats.not_started["caller_unknown"] == 1


async def test_fire_and_forget_requests_run_under_the_time_bound_only(clock: Any) -> None:
    broker = FakeBroker()
    recorder = Recorder()
    async with open_plane(broker, recorder):
        broker.publish_request(SHARED, "/v1/streamings", data={}, reply=False)
        broker.publish_request(POD_QUEUE, say_add(uuid.uuid4()), data={}, reply=False)
        await trio.sleep(1)
    assert len(recorder.started) == 2
    assert broker.replies == []


async def test_one_streaming_with_more_queued_than_a_lane_used_to_hold_gets_no_429(clock: Any) -> None:
    """300 requests for one streaming (the old lane held 256, then answered 429): flow control keeps
    them in the broker, every one is answered 200, in order."""
    broker = FakeBroker()
    recorder = Recorder(work=0.001)
    sid = uuid.uuid4()
    async with open_plane(broker, recorder):
        callers = [broker.publish_request(POD_QUEUE, say_add(sid), data={}) for _ in range(300)]
        await trio.sleep(2)
    codes = [r.status_code for c in callers for r in broker.replies_to(c)]
    assert codes == [200] * 300
    assert broker.max_unacked <= broker.prefetch
    times = [t for _, _, t in recorder.started]
    assert times == sorted(times)
