"""Reliability scenario: a request burst past the callers' timeout (issue 14 §4).

Before: requests were acked on receipt into a 1,000-entry backlog, so in a 2,000-request burst 1,382
say_adds were answered after their callers' 3 s timeout, and spoken; and creates left in the shared
queue by callers that had given up were executed by the next pod that consumed it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from tests.amqp_support import Rig, open_rig, run_pod
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.reliability.common import CREATE_DEADLINE, Row, Settings, broker_url, create_body
from tts_streamer.actors.commands import Command, SayAdd
from tts_streamer.adapters.voipbin.envelope import EventType, Response


async def create_on(rig: Rig) -> Response:
    return await rig.request(rig.pod_queue(), "/v1/streamings", "POST", create_body())


async def _setup(step: Callable[[], Awaitable[Response]]) -> Any:
    """A set-up step (not what is measured): on a machine busy enough that even a lone request waits
    past its budget, it is answered 503 REQUEST_EXPIRED; try again."""
    for _ in range(5):
        reply = await step()
        if reply.status_code != 503:
            break
    assert reply.status_code == 200, reply
    return reply.data["id"] if isinstance(reply.data, dict) else None


async def request_burst(settings: Settings) -> Row:
    """Creates are left in the shared queue by callers that gave up (no pod consuming it), then a pod
    starts; once it serves N streamings with a current message, a burst of say_adds (each with its own
    text) is published at once to its queue, far more than one pod can work off in 3 s.

    lost = say_adds started (the daemon's say_add handler entered) at or after their caller's deadline
    (publish + 3 s); + say_adds started twice; + say_adds answered twice; + external medias created for
    the abandoned creates (or any streaming_created of theirs).
    """
    n, burst_size, abandoned = (10, 1000, 5) if settings.quick else (20, 2000, 20)
    row = Row(
        "request burst past the callers' timeout",
        f"{burst_size} say_adds at once; {abandoned} stale creates",
        n,
    )
    started: dict[str, list[float]] = {}
    with trio.fail_after(60 if settings.quick else 120):
        async with open_rig(pods=0) as rig:
            for _ in range(abandoned):  # nobody consumes: the callers time out and their queues go
                await rig.caller.call(SHARED_QUEUE, "/v1/streamings", "POST", create_body(), wait=0.1)
            async with run_pod(rig) as pod:
                supervisor = pod.handle.supervisor
                original = supervisor.call

                # Where a say_add reaches its session (the service's one way in): when it started.
                async def recording_call(call_id: str, command: Command) -> Any:
                    if isinstance(command, SayAdd) and isinstance(command.text, str):
                        started.setdefault(command.text, []).append(time.monotonic())
                    return await original(call_id, command)

                supervisor.call = recording_call  # type: ignore[method-assign]
                sids = [await _setup(lambda: create_on(rig)) for _ in range(n)]
                message_ids = {}
                for sid in sids:
                    message_ids[sid] = str(uuid.uuid4())
                    data = {"message_id": message_ids[sid]}
                    await _setup(lambda: rig.streaming(sid, "say_init", data))  # noqa: B023
                plan = []
                for i in range(burst_size):
                    sid = sids[i % n]
                    plan.append(
                        [f"/v1/streamings/{sid}/say_add", {"message_id": message_ids[sid], "text": f"w{i}"}]
                    )
                # Everything the daemon will ever start or answer does so within the callers' timeout
                # after the last publish; linger that and a margin.
                result = await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "tests.reliability.burst_sender",
                        broker_url(),
                        pod.handle.config.pod_queue,
                        str(CREATE_DEADLINE + 2.0),
                    ],
                    stdin=json.dumps(plan).encode(),
                    capture_stdout=True,
                )
                sent = json.loads(result.stdout)
                stats = pod.handle.plane.stats
                not_started = dict(stats.not_started)
                media = set(rig.call_manager.created)
                created_events = rig.caller.of(EventType.STREAMING_CREATED)
                for sid in sids:
                    await rig.request(SHARED_QUEUE, f"/v1/streamings/{sid}", "DELETE")
    published: dict[str, float] = sent["published"]
    replies: dict[str, list[list[float]]] = sent["replies"]
    delays = []
    late = twice = 0
    for i in range(burst_size):
        times = started.get(f"w{i}", [])
        twice += len(times) > 1
        if times:
            delay = times[0] - published[str(i)]
            delays.append(delay)
            late += delay >= CREATE_DEADLINE
    row.lose("say_adds started after their caller's deadline", late)
    row.lose("say_adds started twice", twice)
    row.lose("say_adds answered twice", sum(1 for r in replies.values() if len(r) > 1))
    row.lose("external medias created for abandoned creates", len(media) - n)
    row.lose("streaming_created for abandoned creates", len(created_events) - n)
    answered = {c: (r[0][0], int(r[0][1])) for c, r in replies.items()}
    ok = [c for c, (_, status) in answered.items() if status == 200]
    on_time = [c for c in ok if answered[c][0] - published[c] < CREATE_DEADLINE]
    late_replies = [c for c, (t, _) in answered.items() if t - published[c] >= CREATE_DEADLINE]
    expired = sum(1 for _, status in answered.values() if status == 503)
    row.figures = (
        f"started {len(delays)} of {burst_size} (start delay p50 {statistics.median(delays):.2f} s, "
        f"max {max(delays):.2f} s); 200 within 3 s {len(on_time)}; answered 503 REQUEST_EXPIRED {expired}; "
        f"unanswered (expired in the broker) {burst_size - len(answered)}; replies after 3 s "
        f"{len(late_replies)} (read by nobody); not started {not_started}"
        if delays
        else f"nothing started; not started {not_started}"
    )
    return row
