"""Reliability scenario 5: the soak (speak, flush, stop and delete in a loop; RSS and tasks stay flat)."""

from __future__ import annotations

import collections
import os
import random
import signal
import uuid
from typing import Any

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
from tests.reliability.soak_memory import Gate, allowed_growth, judge_memory, read_idle
from tests.test_amqp_resilience import poll_until
from tests.test_speakings import body as speaking_body
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voipbin.envelope import EventType, Response
from tts_streamer.simulator.asterisk import SimConfig

# ------------------------------------------------------------------------------------------ 5. soak

SOAK_WARM_UP_TENTHS = 3  # the first leak reading, with the workers held: after 30% of the run
# RSS (VmRSS) is only a guard against gross growth. It climbs while pymalloc's arenas and glibc's heap
# reach their high-water mark and then keeps what they once needed (docs/reliability.md), so RSS after
# the warm-up measures allocator retention, not leaks: it has no bound of its own any more, and leaks
# are judged on live blocks (soak_memory.py). The ceiling, idle start to idle end: the most seen was
# +46.8 MiB (10-minute runs of 2026-12-03: +34 to +47; 180 s runs +21 to +27), levelling off (a 45-minute
# attempt grew 0.5 MiB between its 20th and 24th minute); 64 MiB leaves a third for a busier machine,
# where more sessions overlap in their slow phases, and stays far inside the Deployment's 256Mi.
SOAK_RSS_CEILING_KIB = 64 * 1024


async def soak(settings: Settings) -> Row:
    """N sessions in a loop until the time is up: say_init + say_add, then at random say_finish and wait
    for the end of play, say_flush (then more text and say_finish), or say_stop; every few messages the
    streaming is deleted and a new one created. A quarter of the sessions use the speakings API
    instead: create, one to three says (some flushed), stop. The daemon runs in a process of its own,
    as deployed (``tts-streamer serve``, its GC tuning included), so its RSS (VmRSS), its live Python
    blocks (the console's ``memory``) and its task count (the ``tts_streamer_tasks`` gauge, read with
    the daemon idle) are its own, not the harness's. At 30% of the run every worker ends its session
    and waits while the idle daemon is read; the time held is added to the run.

    lost = commands not answered 200; + messages whose message_play_finished did not arrive exactly
    once; + streamings whose streaming_created / streaming_deleted did not arrive exactly once; +
    speakings whose speaking_started / speaking_stopped did not arrive exactly once; + external media
    created at call-manager and never deleted; + 1 if the task count at the end differs from the start;
    + 1 if the live blocks outside the bounded stores grew between the idle reading at 30% and the idle
    end by more than the bound for the sessions served meanwhile (soak_memory.judge_memory); + 1 if
    RSS grew by more than SOAK_RSS_CEILING_KIB in all.
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
                    stats["creates"] += 1  # each is probed by the daemon (soak_memory.align_probes)
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
                reply = await delete(rig, sid)
                ok(reply, "DELETE")
                if reply is None:  # lost already; at load 8 it may have expired unstarted: the daemon
                    await delete(rig, sid)  # must still end the session before an idle reading
                forget_leg(sid)

            gate = Gate()
            # The run's end, pushed back by the time the workers spent held at the warm-up mark.
            schedule = {"deadline": 0.0, "held": 0.0}

            async def speaking_worker() -> None:
                while trio.current_time() < schedule["deadline"]:
                    if gate.closing:
                        await gate.hold()
                        continue
                    stats["creates"] += 1
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

            async def worker() -> None:
                sid = await new_streaming()
                spoken = 0
                while trio.current_time() < schedule["deadline"]:
                    if gate.closing:
                        await end_streaming(sid)
                        await gate.hold()
                        sid = await new_streaming()
                        continue
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

            async def settle(within: float = 15.0) -> int:
                with trio.move_on_after(within):
                    await metric_until(daemon, lambda m: m["tts_streamer_active_sessions"] == 0)
                    await trio.sleep(1.0)
                    return int((await daemon.metrics())["tts_streamer_tasks"])
                live = await daemon.console("sessions")  # which, for the report: seen at load 8-11
                raise AssertionError(f"daemon not idle {within:g} s after every session ended: {live}")

            # Warm up once so lazily started long-lived tasks exist before the baseline.
            await end_streaming(await new_streaming())
            tasks_start = await settle()
            rss_start = daemon.rss_kib()
            probing = bool(os.environ.get("MEMPROBE_DIR"))  # tests/reliability/memprobe: diagnosis only
            if probing:  # dumps only while no worker runs: a dump stalls the daemon for a second
                os.kill(daemon.process.pid, signal.SIGUSR2)
                await trio.sleep(5)
            started = trio.current_time()
            schedule["deadline"] = started + seconds
            trajectory: list[int] = []  # RSS at each tenth of the run (time held at the mark left out)
            warm: dict[str, Any] = {}

            def at_tenth(tenth: int) -> float:
                return started + schedule["held"] + seconds * tenth / 10

            async def sample_rss() -> None:
                for tenth in range(1, 10):
                    if tenth > SOAK_WARM_UP_TENTHS:
                        await gate.reopened.wait()  # then at_tenth counts the time held
                    await trio.sleep_until(at_tenth(tenth))
                    trajectory.append(daemon.rss_kib())

            async def read_warm() -> None:
                """At the warm-up mark: every worker ends its session and waits; the daemon, idle, is read."""
                await trio.sleep_until(at_tenth(SOAK_WARM_UP_TENTHS))
                closed = trio.current_time()
                gate.closing = True
                with trio.fail_after(60):
                    await poll_until(lambda: gate.parked == sessions, interval=0.05)
                await settle(within=60.0)  # a loaded machine: one DELETE's retry may be needed first
                warm.update(await read_idle(rig, daemon, stats["creates"]))
                stats["creates"] += warm["alignment_probes"]
                warm["sessions"] = len(own_sids) + len(own_speakings)
                if probing:
                    os.kill(daemon.process.pid, signal.SIGUSR2)
                    await trio.sleep(5)
                held = trio.current_time() - closed
                schedule["held"] += held
                schedule["deadline"] += held
                stats["held_ms"] = round(held * 1000)
                gate.closing = False
                gate.reopened.set()

            async with trio.open_nursery() as workers:
                workers.start_soon(sample_rss)
                workers.start_soon(read_warm)
                speaking_sessions = sessions // 4
                for index in range(sessions):
                    workers.start_soon(speaking_worker if index < speaking_sessions else worker)
            rss_end_busy = daemon.rss_kib()
            trajectory.append(rss_end_busy)
            if probing:  # SIGUSR1: then a full collection and malloc_trim
                os.kill(daemon.process.pid, signal.SIGUSR1)
            rss_middle = trajectory[4]
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
            last = await read_idle(rig, daemon, stats["creates"])
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
    row.sessions = len(own_sids) + len(own_speakings)
    after_warm = row.sessions - int(warm["sessions"])
    leak = judge_memory(warm, last, after_warm, int(warm["sessions"]))
    if leak is not None:
        row.lose(leak)
    grew = int(last["other_blocks"]) - int(warm["other_blocks"])
    tracked = int(last["gc_objects"]) - int(warm["gc_objects"])
    row.figures = (
        f"{sessions} concurrent, {len(own_sids)} streamings + {len(own_speakings)} speakings, "
        f"{initiated.total()} messages "
        f"(finish {stats['finish']}, flush {stats['flush']}, stop {stats['stop']}), "
        f"{stats['commands']} commands; daemon RSS MiB start/middle/end {rss_start / 1024:.1f}/"
        f"{rss_middle / 1024:.1f}/{rss_end / 1024:.1f} (each tenth: "
        f"{' '.join(f'{kib / 1024:.1f}' for kib in trajectory)}; idle at the warm-up mark "
        f"{int(warm['rss_kib']) / 1024:.1f}; ceiling +{SOAK_RSS_CEILING_KIB // 1024} in all); live blocks "
        f"idle at the mark/end {warm['allocated_blocks']}/{last['allocated_blocks']} (history "
        f"{warm['history_blocks']}/{last['history_blocks']}, latencies {warm['latency_blocks']}/"
        f"{last['latency_blocks']}; other {warm['other_blocks']}/{last['other_blocks']}: {grew:+d} over "
        f"{after_warm} sessions, {grew / max(after_warm, 1):+.2f} a session, allowed "
        f"{allowed_growth(after_warm, int(warm['sessions'])):.0f}); gc-tracked objects (the history's "
        f"included) {tracked:+d}; held at the mark {stats['held_ms']} ms; "
        f"daemon tasks start/end {tasks_start}/{tasks_end}; "
        f"sim underruns {stats['underruns']} (text control sends no marks: silence between messages counts)"
    )
    return row
