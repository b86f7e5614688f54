"""Reliability scenario 5: the soak (speak, flush, stop and delete in a loop; RSS and tasks stay flat)."""

from __future__ import annotations

import collections
import os
import random
import signal
import uuid

import trio

from tests.amqp_support import open_rig
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.reliability.common import (
    Row,
    Settings,
    command,
    create_body,
    delete,
    metric_until,
    not_ok,
    orphaned_media,
)
from tests.test_amqp_resilience import poll_until
from tests.test_speakings import body as speaking_body
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voipbin.envelope import EventType, Response
from tts_streamer.simulator.asterisk import SimConfig

# ------------------------------------------------------------------------------------------ 5. soak

# The daemon's RSS rises for the first minutes and levels off: the console's history of the last 1,000
# ended sessions and the command plane's last 10,000 latencies fill up, and the allocators reach their
# high-water mark for 20 concurrent sessions (measured: +19 MiB in 2 min, +4 in the next 2, +2.7 in the
# 4 after; Python's allocated blocks flat after the history filled). So the leak check is growth after
# the first 30% of the run; the start->end ceiling only catches gross growth. The soak's ~4,000
# sessions cannot see a leak much below 2 KiB per session: the task count is the sharper check.
SOAK_RSS_WARM_UP_TENTHS = 3
SOAK_RSS_CEILING_KIB = 40 * 1024
SOAK_RSS_STEADY_BOUND_KIB = 8 * 1024


async def soak(settings: Settings) -> Row:
    """N sessions in a loop until the time is up: say_init + say_add, then at random say_finish and wait
    for the end of play, say_flush (then more text and say_finish), or say_stop; every few messages the
    streaming is deleted and a new one created. A quarter of the sessions use the speakings API
    instead: create, one to three says (some flushed), stop. The daemon runs in a process of its own,
    as deployed (``tts-streamer serve``, its GC tuning included), so its RSS (VmRSS) and its task count (the
    ``tts_streamer_tasks`` gauge, read with the daemon idle) are its own, not the harness's.

    lost = commands not answered 200; + messages whose message_play_finished did not arrive exactly
    once; + streamings whose streaming_created / streaming_deleted did not arrive exactly once; +
    speakings whose speaking_started / speaking_stopped did not arrive exactly once; + external media
    created at call-manager and never deleted; + 1 if
    the task count at the end differs from the start; + 1 if RSS grew by more than SOAK_RSS_STEADY_BOUND_KIB
    after the warm-up (the first 30%); + 1 if it grew by more than SOAK_RSS_CEILING_KIB in all.
    """
    sessions = 10 if settings.quick else 20
    seconds = settings.soak_seconds
    row = Row("soak", f"speak/flush/stop/delete loop for {seconds:.0f} s", sessions)
    rng = random.Random(10)
    created: collections.Counter[str] = collections.Counter()
    deleted: collections.Counter[str] = collections.Counter()
    # Messages by (streaming id, message id): a speaking's messages all carry the nil id (as Go's do),
    # so there a speaking must see as many play_finished as initiated, and a streaming's exactly one.
    initiated: collections.Counter[tuple[str, str]] = collections.Counter()
    finished: collections.Counter[tuple[str, str]] = collections.Counter()
    finished_at: dict[str, trio.Event] = collections.defaultdict(trio.Event)
    own_sids: set[str] = set()
    speaking_started: collections.Counter[str] = collections.Counter()
    speaking_stopped: collections.Counter[str] = collections.Counter()
    own_speakings: set[str] = set()
    stats = collections.Counter[str]()
    engine = SyntheticEngine(seconds_per_char=0.05, speed=4.0)
    with trio.fail_after(seconds + 90):
        async with open_rig(engine=engine, child=True) as rig, trio.open_nursery() as nursery:
            rig.call_manager.leg_config = SimConfig(record_frames=False)
            daemon = rig.child
            assert daemon is not None

            async def drain_events() -> None:
                """Index the caller's events and drop them, so the test's own memory stays flat."""
                while True:
                    events = rig.caller.events[:]
                    del rig.caller.events[: len(events)]
                    for event in events:
                        data = event.data if isinstance(event.data, dict) else {}
                        if event.type == EventType.STREAMING_CREATED:
                            created[data["id"]] += 1
                        elif event.type == EventType.STREAMING_DELETED:
                            deleted[data["id"]] += 1
                        elif event.type == EventType.SPEAKING_STARTED:
                            speaking_started[data["id"]] += 1
                        elif event.type == EventType.SPEAKING_STOPPED:
                            speaking_stopped[data["id"]] += 1
                        elif event.type == EventType.MESSAGE_INITIATED:
                            initiated[data["streaming_id"], data["id"]] += 1
                        elif event.type == EventType.MESSAGE_PLAY_FINISHED:
                            finished[data["streaming_id"], data["id"]] += 1
                            waiter = finished_at.get(data["id"])
                            if waiter is not None:
                                waiter.set()
                    await trio.sleep(0.02)

            nursery.start_soon(drain_events)

            def ok(reply: Response | None, what: str) -> None:
                stats["commands"] += 1
                if not_ok(reply):
                    row.lose(f"{what} answered {reply}")

            async def new_streaming() -> str:
                # A create not answered 200 is lost like any command, and the worker carries on: on a
                # machine at load 10 a reply can miss the callers' 3 s, which must not end the soak.
                while True:
                    reply = await rig.caller.call(rig.pod_queue(), "/v1/streamings", "POST", create_body())
                    ok(reply, "create")
                    if reply is not None and reply.status_code == 200:
                        sid: str = reply.data["id"]
                        own_sids.add(sid)
                        return sid
                    await trio.sleep(1.0)

            def forget_leg(sid: str) -> None:
                """Drop the simulator's record of an ended leg, so the harness's memory stays flat."""
                call = rig.sim.calls.pop(rig.call_manager.created[uuid.UUID(sid)], None)
                if call is not None:
                    stats["underruns"] += call.underruns
                rig.call_manager.requests.clear()

            async def end_streaming(sid: str) -> None:
                ok(await delete(rig, sid), "DELETE")
                forget_leg(sid)

            async def speaking_worker(deadline: float) -> None:
                while trio.current_time() < deadline:
                    reply = await rig.caller.call(SHARED_QUEUE, "/v1/speakings", "POST", speaking_body())
                    ok(reply, "speaking create")
                    if reply is None or reply.status_code != 200:
                        await trio.sleep(1.0)
                        continue
                    speaking = f"/v1/speakings/{reply.data['id']}"
                    own_speakings.add(reply.data["id"])
                    stats["speakings"] += 1
                    for _ in range(rng.randrange(1, 4)):
                        text = "y" * rng.randrange(10, 40)
                        ok(
                            await rig.caller.call(rig.pod_queue(), f"{speaking}/say", "POST", {"text": text}),
                            "say",
                        )
                        await trio.sleep(rng.uniform(0.2, 1.0))
                        if rng.random() < 0.3:
                            ok(await rig.caller.call(rig.pod_queue(), f"{speaking}/flush", "POST"), "flush")
                    ok(await rig.caller.call(rig.pod_queue(), f"{speaking}/stop", "POST"), "speaking stop")
                    forget_leg(reply.data["id"])

            async def worker(deadline: float) -> None:
                sid = await new_streaming()
                spoken = 0
                while trio.current_time() < deadline:
                    message_id = str(uuid.uuid4())
                    ok(await command(rig, sid, "say_init", {"message_id": message_id}), "say_init")
                    text = "x" * rng.randrange(10, 50)
                    data = {"message_id": message_id, "text": text}
                    ok(await command(rig, sid, "say_add", data), "say_add")
                    action = rng.choice(["finish", "flush", "stop"])
                    stats[action] += 1
                    if action == "finish":
                        ok(await command(rig, sid, "say_finish", {"message_id": message_id}), "say_finish")
                        if not finished[sid, message_id]:
                            with trio.move_on_after(len(text) * 0.05 + 5):
                                await finished_at[message_id].wait()
                    else:
                        await trio.sleep(rng.uniform(0.1, 0.6))
                        ok(await command(rig, sid, f"say_{action}"), f"say_{action}")
                        if action == "flush":
                            ok(await command(rig, sid, "say_add", data), "say_add")
                            ok(
                                await command(rig, sid, "say_finish", {"message_id": message_id}),
                                "say_finish",
                            )
                    finished_at.pop(message_id, None)
                    spoken += 1
                    if spoken % 5 == 0:
                        await end_streaming(sid)
                        sid = await new_streaming()
                await end_streaming(sid)

            async def settle() -> int:
                with trio.fail_after(15):
                    await metric_until(daemon, lambda m: m["tts_streamer_active_sessions"] == 0)
                await trio.sleep(1.0)
                return int((await daemon.metrics())["tts_streamer_tasks"])

            # Warm up once so lazily started long-lived tasks exist before the baseline.
            await end_streaming(await new_streaming())
            tasks_start = await settle()
            rss_start = daemon.rss_kib()
            probing = bool(os.environ.get("MEMPROBE_DIR"))  # tests/reliability/memprobe: diagnosis only
            if probing:  # dumps only while no worker runs: a dump stalls the daemon for a second
                os.kill(daemon.process.pid, signal.SIGUSR2)
                await trio.sleep(5)
            started = trio.current_time()
            deadline = started + seconds
            trajectory: list[int] = []  # RSS at each tenth of the run: a leak climbs, a warm-up levels off

            async def sample_rss() -> None:
                for tenth in range(1, 10):
                    await trio.sleep_until(started + seconds * tenth / 10)
                    trajectory.append(daemon.rss_kib())

            async with trio.open_nursery() as workers:
                workers.start_soon(sample_rss)
                speaking_sessions = sessions // 4
                for index in range(sessions):
                    workers.start_soon(speaking_worker if index < speaking_sessions else worker, deadline)
            rss_end_busy = daemon.rss_kib()
            trajectory.append(rss_end_busy)
            if probing:  # SIGUSR1: then a full collection and malloc_trim
                os.kill(daemon.process.pid, signal.SIGUSR1)
            rss_middle, rss_warm = trajectory[4], trajectory[SOAK_RSS_WARM_UP_TENTHS - 1]
            with trio.move_on_after(10):  # drain_events empties rig.caller.events: use its counters
                await poll_until(
                    lambda: (
                        not (
                            own_sids - set(deleted)
                            or any(finished[key] < count for key, count in initiated.items())
                            or own_speakings - set(speaking_stopped)
                        )
                    ),
                    interval=0.05,
                )
            await trio.sleep(0.5)
            tasks_end = await settle()
            rss_end = daemon.rss_kib()
            if probing:
                os.kill(daemon.process.pid, signal.SIGUSR2)
                await trio.sleep(5)
            orphans = orphaned_media(rig)
            nursery.cancel_scope.cancel()
    # The warm-up streaming is counted too: it went through the same path.
    row.lose("streaming_created not exactly once", sum(1 for s in own_sids if created[s] != 1))
    row.lose("streaming_deleted not exactly once", sum(1 for s in own_sids if deleted[s] != 1))
    row.lose("speaking_started not exactly once", sum(1 for s in own_speakings if speaking_started[s] != 1))
    row.lose("speaking_stopped not exactly once", sum(1 for s in own_speakings if speaking_stopped[s] != 1))
    row.lose("external media never deleted at call-manager", len(orphans))

    def matched(key: tuple[str, str]) -> bool:
        if key[0] in own_speakings:
            return finished[key] == initiated[key]
        return finished[key] == initiated[key] == 1

    unmatched = [key for key in initiated if not matched(key)]
    shapes = collections.Counter(
        f"{'speaking' if key[0] in own_speakings else 'streaming'} {initiated[key]}/{finished[key]}"
        for key in unmatched
    )
    row.lose(
        f"message without its message_play_finished (initiated/finished: {dict(shapes)})", len(unmatched)
    )
    if tasks_end != tasks_start:
        row.lose(f"task count {tasks_start} -> {tasks_end}")
    growth = rss_end - rss_start
    if growth > SOAK_RSS_CEILING_KIB:
        row.lose(f"RSS grew {growth} KiB in all (ceiling {SOAK_RSS_CEILING_KIB})")
    steady = rss_end_busy - rss_warm
    if steady > SOAK_RSS_STEADY_BOUND_KIB:
        row.lose(f"RSS grew {steady} KiB after the warm-up (bound {SOAK_RSS_STEADY_BOUND_KIB})")
    row.sessions = len(own_sids) + len(own_speakings)
    row.figures = (
        f"{sessions} concurrent, {len(own_sids)} streamings + {len(own_speakings)} speakings, "
        f"{initiated.total()} messages "
        f"(finish {stats['finish']}, flush {stats['flush']}, stop {stats['stop']}), "
        f"{stats['commands']} commands; daemon RSS MiB start/middle/end {rss_start / 1024:.1f}/"
        f"{rss_middle / 1024:.1f}/{rss_end / 1024:.1f} (each tenth: "
        f"{' '.join(f'{kib / 1024:.1f}' for kib in trajectory)}; "
        f"+{steady / 1024:.1f} after the warm-up, bound +{SOAK_RSS_STEADY_BOUND_KIB // 1024}; ceiling "
        f"+{SOAK_RSS_CEILING_KIB // 1024} in all); daemon tasks start/end {tasks_start}/{tasks_end}; "
        f"sim underruns {stats['underruns']} (text control sends no marks: silence between messages counts)"
    )
    return row
