"""The reliability scenarios of issue #10: each injects one kind of fault on loopback and returns a Row
saying what was injected, over how many sessions, and how much was *lost* (must be 0).

Every scenario is bounded (``trio.fail_after``) and self-ending, runs on the real clock against the real
broker (``tests.amqp_support.RABBITMQ_URL``, which the runner and the pytest fixture point at a private
vhost), and defines "lost" precisely in its docstring. ``Settings.quick`` selects the short form.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import random
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
import boto3
import grpc
import trio

from tests import amqp_support
from tests.amqp_support import Rig, open_rig, run_pod
from tests.support import media_uri, task_names
from tests.test_amqp_bad_input import ENGINE as FUZZ_ENGINE
from tests.test_amqp_bad_input import RIG_CONFIG as FUZZ_RIG_CONFIG
from tests.test_amqp_bad_input import draw, fuzz_requests, open_burst_client
from tests.test_amqp_resilience import (
    broker_pid_of,
    close_from_broker,
    create,
    open_relayed_rig,
    played_between,
    poll_until,
)
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.adapters.chan_websocket import protocol
from tts_streamer.adapters.chan_websocket.client import open_media_connection
from tts_streamer.adapters.elevenlabs import ElevenLabsEngine
from tts_streamer.adapters.fallback import FallbackEngine, VendorSwitch
from tts_streamer.adapters.google_tts import GoogleTTSEngine
from tts_streamer.adapters.polly import PollyEngine, make_client
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voipbin.envelope import Event, EventType, Response
from tts_streamer.fakes.asterisk import AsteriskSimulator, SimConfig, memory_dialer
from tts_streamer.fakes.elevenlabs import ElevenLabsFake
from tts_streamer.fakes.google_tts import GoogleTTSFake
from tts_streamer.fakes.polly import PollyFake
from tts_streamer.fakes.vendor_faults import Fault
from tts_streamer.fakes.voipbin_client import SHARED_QUEUE

T = TypeVar("T")

LEAD_FRAMES = PacingConfig().lead_frames  # the pacer's cushion: a gap longer than this is audible loss
TICK = 0.020
CREATE_DEADLINE = 3.0  # voipbin callers give up after 3 s


@attrs.frozen
class Settings:
    quick: bool = True
    soak_seconds: float = 20.0


@attrs.define
class Row:
    name: str
    injected: str
    sessions: int = 0
    lost: int = 0
    figures: str = ""
    skipped: str | None = None
    losses: list[str] = attrs.field(factory=list)  # what was lost, for the report

    def lose(self, what: str, count: int = 1) -> None:
        if count:
            self.lost += count
            self.losses.append(what if count == 1 else f"{what} (x{count})")


Scenario = Callable[[Settings], Awaitable[Row]]

# ------------------------------------------------------------------------------------------ helpers


def sid_of(event: Event) -> str | None:
    data = event.data if isinstance(event.data, dict) else {}
    found = data.get("streaming_id", data.get("id"))
    return str(found) if found is not None else None


def counts_by_streaming(events: Sequence[Event]) -> dict[str, collections.Counter[str]]:
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for event in events:
        sid = sid_of(event)
        if sid is not None:
            out[sid][event.type] += 1
    return out


def check_once(row: Row, rig: Rig, sids: Sequence[str], types: Sequence[str]) -> None:
    """Lose one for every (streaming, event type) not delivered exactly once."""
    counts = counts_by_streaming(rig.caller.events)
    for kind in types:
        wrong = [counts[sid][kind] for sid in sids if counts[sid][kind] != 1]
        if wrong:
            row.lose(f"{kind} not exactly once (seen {sorted(set(wrong))} times)", len(wrong))


async def wait_for_events(rig: Rig, sids: Sequence[str], kind: str, within: float) -> set[str]:
    """Wait until every streaming in ``sids`` has an event ``kind``; returns those still missing."""

    def missing() -> set[str]:
        have = {sid_of(e) for e in rig.caller.events if e.type == kind}
        return set(sids) - have

    with trio.move_on_after(within):
        await poll_until(lambda: not missing(), interval=0.05)
    return missing()


async def gather(items: Sequence[T], fn: Callable[[T], Awaitable[Any]], limit: int = 10) -> list[Any]:
    """``fn`` over ``items`` with at most ``limit`` at once; results in order."""
    results: list[Any] = [None] * len(items)
    limiter = trio.CapacityLimiter(limit)

    async def one(index: int, item: T) -> None:
        async with limiter:
            results[index] = await fn(item)

    async with trio.open_nursery() as nursery:
        for index, item in enumerate(items):
            nursery.start_soon(one, index, item)
    return results


def create_body() -> dict[str, Any]:
    return {
        "customer_id": str(uuid.uuid4()),
        "reference_type": "call",
        "reference_id": str(uuid.uuid4()),
        "language": "en-US",
        "direction": "out",
    }


async def command(rig: Rig, sid: str, action: str, data: Any = None) -> Response | None:
    """A per-pod command as Go's callers send it; None when unanswered within 3 s."""
    return await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{sid}/{action}", "POST", data)


async def say(rig: Rig, sid: str, text: str, *, finish: bool) -> str:
    """say_init + say_add (+ say_finish); these are set-up steps, so a failure raises."""
    message_id = str(uuid.uuid4())
    steps: list[tuple[str, dict[str, str]]] = [
        ("say_init", {"message_id": message_id}),
        ("say_add", {"message_id": message_id, "text": text}),
    ]
    if finish:
        steps.append(("say_finish", {"message_id": message_id}))
    for action, data in steps:
        reply = await command(rig, sid, action, data)
        assert reply is not None and reply.status_code == 200, (action, reply)
    return message_id


async def delete(rig: Rig, sid: str) -> Response | None:
    return await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{sid}", "DELETE")


def orphaned_media(rig: Rig, sids: Sequence[str] | None = None) -> list[uuid.UUID]:
    """External medias the fake call-manager created and nobody deleted."""
    left = [m for m in rig.call_manager.created if m not in rig.call_manager.deleted]
    if sids is not None:
        wanted = {uuid.UUID(s) for s in sids}
        left = [m for m in left if m in wanted]
    return left


def daemon_idle(rig: Rig, index: int = 0) -> bool:
    daemon = rig.daemons[index]
    return not (daemon.plane._lanes or daemon.streamings.streamings or len(daemon.supervisor))


def broker_url() -> str:
    """The broker URL open_rig uses now (the runner and the pytest fixture point it at a private vhost)."""
    url: str = vars(amqp_support)["RABBITMQ_URL"]
    return url


# ------------------------------------------------------------------------------------------ 1. broker


async def broker_connection_loss(settings: Settings) -> Row:
    """N sessions speak one long message each; the daemon's broker connection is closed from the broker
    side and the broker stays unreachable (a relay refusing connections) for ``outage`` seconds.

    lost = sessions with an audio gap longer than the lead (``LEAD_FRAMES`` ticks) or fewer frames played
    during the outage than it lasted (less the lead); + commands sent after recovery (say_finish, DELETE)
    not answered 200 within 3 s; + messages not played to their end; + for each streaming, each of
    streaming_created, message_initiated, message_play_started, message_play_finished and
    streaming_deleted not delivered exactly once; + events the daemon's publisher dropped.
    """
    n = 10 if settings.quick else 100
    outage = 1.5 if settings.quick else 3.0
    row = Row(
        "broker connection loss",
        f"daemon's AMQP connection closed by the broker, broker unreachable {outage:.1f} s",
        n,
    )
    if shutil.which("rabbitmqctl") is None:
        row.skipped = "rabbitmqctl not found: the connection is closed from the broker side"
        return row
    spc = 0.1
    text = "B" * round(
        (outage + (4.0 if settings.quick else 8.0)) / spc
    )  # outlasts set-up, outage, reconnect
    engine = SyntheticEngine(seconds_per_char=spc, speed=2.0)
    with trio.fail_after(60 if settings.quick else 150):
        async with open_relayed_rig(engine, broker_url()) as (rig, relay):
            daemon = rig.daemon
            sids: list[str] = await gather(range(n), lambda _: create(rig))
            message_ids: list[str] = await gather(sids, lambda sid: say(rig, sid, text, finish=False))
            not_started = await wait_for_events(rig, sids, EventType.MESSAGE_PLAY_STARTED, 10)
            assert not not_started, f"{len(not_started)} sessions never started playing"
            assert len(relay.upstream_names) == 1
            pid = await broker_pid_of(relay.upstream_names[0])

            relay.up = False
            await close_from_broker(pid)
            with trio.fail_after(5):
                await poll_until(lambda: not daemon.bridge.connected)
            cut_at = trio.current_time()
            await trio.sleep(outage)
            relay.up = True
            with trio.fail_after(15):
                await poll_until(lambda: daemon.bridge.stats.reconnects >= 1 and daemon.bridge.connected)
            back_at = trio.current_time()

            finishes: list[Response | None] = await gather(
                list(zip(sids, message_ids, strict=True)),
                lambda pair: command(rig, pair[0], "say_finish", {"message_id": pair[1]}),
            )
            row.lose("say_finish after recovery not answered 200", sum(_not_ok(r) for r in finishes))
            unfinished = await wait_for_events(rig, sids, EventType.MESSAGE_PLAY_FINISHED, len(text) * spc)
            row.lose("message_play_finished missing", len(unfinished))
            deletes: list[Response | None] = await gather(sids, lambda sid: delete(rig, sid))
            row.lose("DELETE after recovery not answered 200", sum(_not_ok(r) for r in deletes))
            await wait_for_events(rig, sids, EventType.STREAMING_DELETED, 10)
            await trio.sleep(0.5)  # room for a duplicate to arrive
            calls = [rig.sim_call_for(sid) for sid in sids]
            short = [
                e
                for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED)
                if sid_of(e) in sids and not e.data.get("message_finish")
            ]
            row.lose("message cut short", len(short))
            check_once(
                row,
                rig,
                sids,
                [
                    EventType.STREAMING_CREATED,
                    EventType.MESSAGE_INITIATED,
                    EventType.MESSAGE_PLAY_STARTED,
                    EventType.MESSAGE_PLAY_FINISHED,
                    EventType.STREAMING_DELETED,
                ],
            )
            row.lose("events dropped by the publisher", daemon.publisher.dropped)
            reconnects = daemon.bridge.stats.reconnects
    window = back_at - cut_at
    gappy = [c for c in calls if any(g.ticks > LEAD_FRAMES for g in c.gaps)]
    row.lose(f"sessions with a gap > {LEAD_FRAMES} ticks", len(gappy))
    need = math.floor(window / TICK) - LEAD_FRAMES
    quiet = [c for c in calls if played_between(c, text, cut_at, back_at) < need]
    row.lose("sessions not playing through the outage", len(quiet))
    max_gap = max((g.ticks for c in calls for g in c.gaps), default=0)
    row.figures = (
        f"outage {window:.2f} s, reconnects {reconnects}, max gap {max_gap} ticks, "
        f"underruns {sum(c.underruns for c in calls)}, refused reconnects {relay.refused}"
    )
    return row


def _not_ok(response: Response | None) -> bool:
    return response is None or response.status_code != 200


# ------------------------------------------------------------------------------------------ 2. asterisk


async def asterisk_faults(settings: Settings) -> Row:
    """Neighbour sessions speak while other legs fail on the Asterisk side: a WebSocket closed by the
    peer mid-utterance (``close_after``), a leg that never sends MEDIA_START, a leg whose reads stall
    (``stall_reads``). XOFF held is not covered: the simulator sends MEDIA_XOFF only when its queue
    fills and MEDIA_XON as it drains, and has no setting to hold it.

    lost = neighbours with an underrun or whose message did not play to its end; + the dropped leg's
    session not ending by itself within 5 s; + the MEDIA_START-less create not failing within 3 s;
    + the stalled session not ending within 5 s of its DELETE (or the DELETE unanswered); + for every
    streaming, streaming_created or streaming_deleted not exactly once, and message_play_finished not
    exactly once for each session that spoke; + external medias left created at the fake call-manager.
    """
    neighbours = 3 if settings.quick else 10
    row = Row(
        "asterisk faults",
        "WS closed mid-utterance, no MEDIA_START, reads stalled (XOFF held: not simulable)",
        neighbours + 3,
    )
    engine = SyntheticEngine(seconds_per_char=0.05, speed=2.0)
    with trio.fail_after(60):
        async with open_rig(engine=engine) as rig:
            cm = rig.call_manager
            t0 = trio.current_time()
            normal = [await create(rig) for _ in range(neighbours)]
            await gather(normal, lambda sid: say(rig, sid, "N" * 160, finish=True))  # 8 s of audio
            cm.leg_config = SimConfig(never_send_media_start=True)
            before = set(cm.created)
            started = trio.current_time()
            marks = {"no-start create": started - t0}
            reply = await rig.caller.call(rig.pod_queue(), "/v1/streamings", "POST", create_body(), wait=5)
            no_start_took = trio.current_time() - started
            (no_start,) = [str(m) for m in set(cm.created) - before]
            if reply is None or reply.status_code == 200 or no_start_took >= CREATE_DEADLINE:
                row.lose(f"MEDIA_START-less create: {reply} after {no_start_took:.2f} s")
            cm.leg_config = SimConfig(close_after=1.5)
            dropped = await create(rig)
            await say(rig, dropped, "D" * 100, finish=False)
            marks["dropped leg up"] = trio.current_time() - t0
            cm.leg_config = SimConfig(stall_reads=0.5)
            stalled = await create(rig)
            await say(rig, stalled, "S" * 100, finish=True)
            cm.leg_config = None

            missing = await wait_for_events(rig, [dropped], EventType.STREAMING_DELETED, 5)
            row.lose("dropped leg's session did not end", len(missing))
            unfinished = await wait_for_events(rig, normal, EventType.MESSAGE_PLAY_FINISHED, 10)
            row.lose("neighbour message not finished", len(unfinished))
            stalled_ended_itself = bool(
                [e for e in rig.caller.of(EventType.STREAMING_DELETED) if sid_of(e) == stalled]
            )
            started = trio.current_time()
            reply = await delete(rig, stalled)
            if not stalled_ended_itself and _not_ok(reply):
                row.lose(f"DELETE of the stalled session answered {reply}")
            missing = await wait_for_events(rig, [stalled], EventType.STREAMING_DELETED, 5)
            row.lose("stalled session did not end after DELETE", len(missing))
            stalled_delete_took = trio.current_time() - started
            for sid in normal:
                reply = await delete(rig, sid)
                row.lose(f"neighbour DELETE answered {reply}", _not_ok(reply))
            everyone = [*normal, dropped, stalled, no_start]
            await wait_for_events(rig, everyone, EventType.STREAMING_DELETED, 10)
            await trio.sleep(0.5)
            check_once(rig=rig, row=row, sids=everyone, types=[EventType.STREAMING_CREATED])
            check_once(rig=rig, row=row, sids=everyone, types=[EventType.STREAMING_DELETED])
            check_once(rig=rig, row=row, sids=[*normal, dropped, stalled], types=["message_play_finished"])
            short = [
                e
                for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED)
                if sid_of(e) in normal and not e.data.get("message_finish")
            ]
            row.lose("neighbour message cut short", len(short))
            neighbour_calls = [rig.sim_call_for(sid) for sid in normal]
            row.lose("neighbours with underruns", sum(1 for c in neighbour_calls if c.underruns))
            row.lose("external media left created", len(orphaned_media(rig)))
            dropped_call = rig.sim_call_for(dropped)
            stalled_call = rig.sim_call_for(stalled)
    row.figures = (
        f"no-MEDIA_START create failed in {no_start_took:.2f} s; dropped leg hung up by "
        f"{dropped_call.hangup_by}; stalled leg: ended by itself {stalled_ended_itself}, "
        f"DELETE->deleted {stalled_delete_took:.2f} s (leg {stalled_call.hangup_by}); "
        f"neighbour underruns {sum(c.underruns for c in neighbour_calls)}"
    )
    gaps = sorted((round(g.start - t0, 2), g.ticks) for c in neighbour_calls for g in c.gaps)
    if gaps:
        row.figures += f"; neighbour gaps (s after start, ticks) {gaps[:8]}; fault times {marks}"
    return row


# ------------------------------------------------------------------------------------------ 3. call-manager


async def call_manager_faults(settings: Settings) -> Row:
    """Creates while the fake call-manager answers late (3.5 s, beyond the callers' 3 s), with a plain
    500, or with a typed error; afterwards the fake is given time to finish its late answers.

    lost = creates not answered with an error within 3 s (a success, a late reply, or none); + streamings
    or sessions left in the daemon's memory; + streamings whose streaming_created / streaming_deleted was
    not delivered exactly once; + external medias the fake created that were never deleted.
    """
    per_mode = 2 if settings.quick else 5
    modes = ("slow", "error500", "typed_error")
    row = Row("call-manager faults", "CM slow (3.5 s), plain 500, typed error", per_mode * len(modes))
    slowest: dict[str, float] = {}
    with trio.fail_after(60):
        async with open_rig() as rig:
            cm = rig.call_manager
            for mode in modes:
                cm.mode = mode

                async def one(_: int) -> tuple[Response | None, float]:
                    started = time.monotonic()
                    reply = await rig.caller.call(
                        SHARED_QUEUE, "/v1/streamings", "POST", create_body(), wait=6
                    )
                    return reply, time.monotonic() - started

                results: list[tuple[Response | None, float]] = await gather(range(per_mode), one)
                slowest[mode] = max(took for _, took in results)
                bad = [
                    (r, t) for r, t in results if r is None or r.status_code == 200 or t >= CREATE_DEADLINE
                ]
                row.lose(f"{mode}: create not failed within 3 s", len(bad))
            cm.mode = "ok"
            await trio.sleep(cm.slow_delay + 0.5)  # the fake finishes the answers nobody waits for
            with trio.move_on_after(5):
                await poll_until(lambda: daemon_idle(rig))
            daemon = rig.daemon
            row.lose("streamings left in memory", len(daemon.streamings.streamings))
            row.lose("sessions left running", len(daemon.supervisor))
            sids = sorted(
                {str(m) for m in cm.created}
                | {s for s in (sid_of(e) for e in rig.caller.of(EventType.STREAMING_CREATED)) if s}
            )
            await wait_for_events(rig, sids, EventType.STREAMING_DELETED, 5)
            await trio.sleep(0.3)
            check_once(row, rig, sids, [EventType.STREAMING_CREATED, EventType.STREAMING_DELETED])
            orphans = orphaned_media(rig)
            row.lose("external media created at call-manager and never deleted", len(orphans))
            # Still serving afterwards.
            sid = await create(rig)
            row.lose("DELETE after the faults not answered 200", _not_ok(await delete(rig, sid)))
    row.figures = "slowest error reply: " + ", ".join(f"{m} {t:.2f} s" for m, t in slowest.items())
    if orphans:
        row.figures += f"; orphaned external medias {len(orphans)}"
    return row


# ------------------------------------------------------------------------------------------ 4. vendors

VENDOR_PACE: dict[str, Any] = {
    "seconds_per_char": 0.015,
    "chunk_bytes": 400,
    "chunk_interval": 0.05,
    "first_audio_delay": 0.05,
}
VENDOR_TEXT = "This is the first sentence. Here is the second one. And a third to finish."

# (case, faults for elevenlabs, gcp, aws, the vendor expected to finish or None for a clean error)
VENDOR_CASES: list[tuple[str, list[Fault], list[Fault], list[Fault], str | None]] = [
    ("11labs error before audio", [Fault("error")], [], [], "gcp"),
    ("11labs drop mid-utterance", [Fault("drop", after_bytes=1500)], [], [], "gcp"),
    ("11labs error + gcp stall", [Fault("error")], [Fault("stall", after_bytes=1000)], [], "aws"),
    ("11labs slow first byte", [Fault("slow_first_byte", delay=1.5)], [], [], "gcp"),
    ("11labs malformed + gcp error", [Fault("malformed")], [Fault("error")], [], "aws"),
    # Polly's client retries a 5xx itself (botocore), so one fault per attempt.
    ("every vendor fails", [Fault("error")], [Fault("error")], [Fault("error")] * 10, None),
]


async def vendor_faults(settings: Settings) -> Row:
    """A daemon whose only engine is ``FallbackEngine([elevenlabs, gcp, aws])`` over the loopback vendor
    fakes; each case arms faults in the fakes and speaks one message in a new streaming.

    lost = messages with no message_play_finished within 15 s (a hung session); + messages that should
    have fallen over but did not play to their end; + the all-vendors-failing message claiming it played
    to its end; + DELETEs not answered 200 or streaming_deleted not exactly once; + vendor streams still
    open at the end.
    """
    cases = VENDOR_CASES if not settings.quick else [VENDOR_CASES[i] for i in (0, 1, 2, 5)]
    row = Row("vendor faults", "fake vendor error/drop/stall/slow/malformed -> FallbackEngine", len(cases))
    switches: list[VendorSwitch] = []
    outcomes: list[str] = []
    with trio.fail_after(90), contextlib.ExitStack() as sync_stack:
        google_fake = sync_stack.enter_context(GoogleTTSFake(**VENDOR_PACE))
        polly_fake = sync_stack.enter_context(PollyFake(**{**VENDOR_PACE, "chunk_bytes": 800}))
        async with open_rig(pods=0) as rig, trio.open_nursery() as nursery:
            eleven_fake = ElevenLabsFake(**VENDOR_PACE)
            await nursery.start(eleven_fake.serve)
            google = GoogleTTSEngine(channel=grpc.insecure_channel(google_fake.address), response_timeout=5)
            session = boto3.Session(
                aws_access_key_id="AKIDTEST", aws_secret_access_key="x", region_name="us-east-1"
            )
            fallback = FallbackEngine(
                [
                    ElevenLabsEngine("test-key", base_url=eleven_fake.base_url, response_timeout=5),
                    google,
                    PollyEngine(make_client(session, endpoint_url=polly_fake.endpoint_url, read_timeout=2)),
                ],
                first_audio_timeout=0.6,
                stall_timeout=0.4,
                cooldown=0,
                on_switch=switches.append,
            )
            try:
                async with run_pod(rig, engines={"fallback": fallback}):
                    for name, eleven, gcp, aws, expect in cases:
                        for fake, faults in ((eleven_fake, eleven), (google_fake, gcp), (polly_fake, aws)):
                            fake.faults.clear()
                            fake.faults.add(*faults)
                        switches.clear()
                        sid = await create(rig)
                        started = trio.current_time()
                        await say(rig, sid, VENDOR_TEXT, finish=True)
                        if await wait_for_events(rig, [sid], EventType.MESSAGE_PLAY_FINISHED, 15):
                            row.lose(f"{name}: hung (no message_play_finished)")
                            outcomes.append(f"{name}: hung")
                        else:
                            (done,) = [
                                e for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED) if sid_of(e) == sid
                            ]
                            whole = bool(done.data.get("message_finish"))
                            if whole != (expect is not None):
                                row.lose(f"{name}: message_finish={whole}")
                            path = (
                                "->".join([s.from_vendor for s in switches] + [str(switches[-1].to_vendor)])
                                if switches
                                else "none"
                            )
                            heard = rig.sim_call_for(sid).frames_played
                            outcomes.append(
                                f"{name}: {'played' if whole else 'clean error'} via {path}, "
                                f"{heard} frames heard, in {trio.current_time() - started:.1f} s"
                            )
                        row.lose(f"{name}: DELETE not answered 200", _not_ok(await delete(rig, sid)))
                        await wait_for_events(rig, [sid], EventType.STREAMING_DELETED, 5)
                        await trio.sleep(0.2)
                        check_once(row, rig, [sid], [EventType.STREAMING_DELETED])
                    row.lose("fallback streams left open", fallback.open_streams)
            finally:
                await google.aclose()
                nursery.cancel_scope.cancel()
    row.figures = "; ".join(outcomes)
    return row


# ------------------------------------------------------------------------------------------ 5. soak

SOAK_RSS_BOUND_KIB = 24 * 1024  # start->end growth allowed (allocator noise, caches warming up)
# Middle->end: by then the bounded caches are full (the console keeps the events of the last 1,000
# ended sessions, ~18 KiB each), so a leak shows as growth here (~7 KiB per streaming would cross it).
SOAK_RSS_SECOND_HALF_BOUND_KIB = 8 * 1024


async def soak(settings: Settings) -> Row:
    """N sessions in a loop until the time is up: say_init + say_add, then at random say_finish and wait
    for the end of play, say_flush (then more text and say_finish), or say_stop; every few messages the
    streaming is deleted and a new one created. The daemon runs in a process of its own, as deployed
    (``tts-streamer serve``, its GC tuning included), so its RSS (VmRSS) and its task count (the
    ``tts_streamer_tasks`` gauge, read with the daemon idle) are its own, not the harness's.

    lost = commands not answered 200; + messages whose message_play_finished did not arrive exactly
    once; + streamings whose streaming_created / streaming_deleted did not arrive exactly once; + 1 if
    the task count at the end differs from the start; + 1 if RSS grew by more than SOAK_RSS_BOUND_KIB
    from start to end; + 1 if it grew by more than SOAK_RSS_SECOND_HALF_BOUND_KIB in the second half.
    """
    sessions = 10 if settings.quick else 20
    seconds = settings.soak_seconds
    row = Row("soak", f"speak/flush/stop/delete loop for {seconds:.0f} s", sessions)
    rng = random.Random(10)
    created: collections.Counter[str] = collections.Counter()
    deleted: collections.Counter[str] = collections.Counter()
    initiated: collections.Counter[str] = collections.Counter()
    finished: collections.Counter[str] = collections.Counter()
    finished_at: dict[str, trio.Event] = collections.defaultdict(trio.Event)
    own_sids: set[str] = set()
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
                        elif event.type == EventType.MESSAGE_INITIATED:
                            initiated[data["id"]] += 1
                        elif event.type == EventType.MESSAGE_PLAY_FINISHED:
                            finished[data["id"]] += 1
                            waiter = finished_at.get(data["id"])
                            if waiter is not None:
                                waiter.set()
                    await trio.sleep(0.02)

            nursery.start_soon(drain_events)

            def ok(reply: Response | None, what: str) -> None:
                stats["commands"] += 1
                if _not_ok(reply):
                    row.lose(f"{what} answered {reply}")

            async def new_streaming() -> str:
                sid = await create(rig)
                own_sids.add(sid)
                return sid

            async def end_streaming(sid: str) -> None:
                ok(await delete(rig, sid), "DELETE")
                call = rig.sim.calls.pop(rig.call_manager.created[uuid.UUID(sid)], None)
                if call is not None:
                    stats["underruns"] += call.underruns
                rig.call_manager.requests.clear()

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
                        if not finished[message_id]:
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
                    while True:  # another process: nothing to wait on but its metrics
                        if not (await daemon.metrics())["tts_streamer_active_sessions"]:
                            break
                        await trio.sleep(0.1)
                await trio.sleep(1.0)
                return int((await daemon.metrics())["tts_streamer_tasks"])

            # Warm up once so lazily started long-lived tasks exist before the baseline.
            await end_streaming(await new_streaming())
            tasks_start = await settle()
            rss_start = daemon.rss_kib()
            started = trio.current_time()
            deadline = started + seconds
            rss_middle = 0

            async def sample_middle() -> None:
                nonlocal rss_middle
                await trio.sleep_until(started + seconds / 2)
                rss_middle = daemon.rss_kib()

            async with trio.open_nursery() as workers:
                workers.start_soon(sample_middle)
                for _ in range(sessions):
                    workers.start_soon(worker, deadline)
            rss_end_busy = daemon.rss_kib()
            with trio.move_on_after(10):  # drain_events empties rig.caller.events: use its counters
                await poll_until(
                    lambda: not (own_sids - set(deleted) or set(initiated) - set(finished)), interval=0.05
                )
            await trio.sleep(0.5)
            tasks_end = await settle()
            rss_end = daemon.rss_kib()
            nursery.cancel_scope.cancel()
    # The warm-up streaming is counted too: it went through the same path.
    row.lose("streaming_created not exactly once", sum(1 for s in own_sids if created[s] != 1))
    row.lose("streaming_deleted not exactly once", sum(1 for s in own_sids if deleted[s] != 1))
    unmatched = [m for m in initiated if finished[m] != 1 or initiated[m] != 1]
    row.lose("message without exactly one message_play_finished", len(unmatched))
    if tasks_end != tasks_start:
        row.lose(f"task count {tasks_start} -> {tasks_end}")
    growth = rss_end - rss_start
    if growth > SOAK_RSS_BOUND_KIB:
        row.lose(f"RSS grew {growth} KiB (bound {SOAK_RSS_BOUND_KIB})")
    second_half = rss_end_busy - rss_middle
    if second_half > SOAK_RSS_SECOND_HALF_BOUND_KIB:
        row.lose(f"RSS grew {second_half} KiB in the second half (bound {SOAK_RSS_SECOND_HALF_BOUND_KIB})")
    row.sessions = len(own_sids)
    row.figures = (
        f"{sessions} concurrent, {len(own_sids)} streamings, {len(initiated)} messages "
        f"(finish {stats['finish']}, flush {stats['flush']}, stop {stats['stop']}), "
        f"{stats['commands']} commands; daemon RSS MiB start/middle/end {rss_start / 1024:.1f}/"
        f"{rss_middle / 1024:.1f}/{rss_end / 1024:.1f} (busy end {rss_end_busy / 1024:.1f}, "
        f"bounds +{SOAK_RSS_BOUND_KIB // 1024} in all, +{SOAK_RSS_SECOND_HALF_BOUND_KIB // 1024} in the "
        f"second half); daemon tasks start/end {tasks_start}/{tasks_end}; "
        f"sim underruns {stats['underruns']} (text control sends no marks: silence between messages counts)"
    )
    return row


# ------------------------------------------------------------------------------------------ 6. fuzz


async def fuzz(settings: Settings) -> Row:
    """Two parts. Envelopes: test_amqp_bad_input's hypothesis generator (random bytes, JSON, envelopes on
    the streamings routes, live ids included) published to both queues. Peer: the simulator has no hook
    to send arbitrary text, so random chan_websocket control messages (valid events, MEDIA_START again,
    JSON, garbage, oversize) go to ``MediaConnection._handle_text`` of a real connection to the simulator
    over memory streams.

    lost = requests with reply_to not answered exactly once, or replies to requests without one; +
    handler crashes (``internal`` errors) and failed replies; + streamings whose streaming_created /
    streaming_deleted was not exactly once; + tasks left over (by name) once idle; + peer messages that
    raised, were not accounted for (event, protocol error or ignored MEDIA_START), or left the connection
    unusable.
    """
    requests = 300 if settings.quick else 3000
    peer_messages = 2000 if settings.quick else 20000
    row = Row("fuzz", f"{requests} random envelopes; {peer_messages} random peer control messages", 0)
    with trio.fail_after(90):
        envelope_figures = await _fuzz_envelopes(row, requests)
        peer_figures = await _fuzz_peer(row, peer_messages)
    row.figures = f"{envelope_figures}; {peer_figures}"
    return row


async def _fuzz_envelopes(row: Row, count: int) -> str:
    in_flight = 150
    async with open_rig(engine=FUZZ_ENGINE, **FUZZ_RIG_CONFIG) as rig:
        daemon = rig.daemon
        await trio.sleep(0.2)
        tasks_before = collections.Counter(task_names())
        live = [await create(rig) for _ in range(2)]
        row.sessions = len(live)
        message_ids = [str(uuid.uuid4()) for _ in range(3)]
        for sid in live:
            await command(rig, sid, "say_init", {"message_id": message_ids[0]})
        rig.call_manager.mode = "error500"  # random creates roll back instead of piling up legs
        examples = await trio.to_thread.run_sync(lambda: draw(fuzz_requests(live, message_ids), count))
        sent: dict[str, bytes] = {}
        async with open_burst_client(rig.caller.connection) as client:
            for index, (body, reply, shared) in enumerate(examples):
                correlation_id = str(index)
                if reply:
                    sent[correlation_id] = body
                    while len(sent) - sum(client.replies.values()) > in_flight:
                        await client.changed.wait()
                queue = SHARED_QUEUE if shared else rig.pod_queue()
                await client.send(queue, body, correlation_id, reply=reply)
            with trio.move_on_after(20):
                await client.wait_replies(len(sent))
            await trio.sleep(0.5)
            replies = client.replies
        row.lose("request with reply_to unanswered", sum(1 for c in sent if c not in replies))
        row.lose("reply to a request without reply_to", sum(1 for c in replies if c not in sent))
        row.lose("request answered more than once", sum(1 for c, n in replies.items() if n > 1))
        row.lose("handler crashed (internal error)", daemon.plane.stats.errors["internal"])
        row.lose("reply failures", daemon.plane.stats.reply_failures)
        rig.call_manager.mode = "ok"
        for sid in live:
            if daemon.streamings.owns(uuid.UUID(sid)):
                await delete(rig, sid)
        with trio.move_on_after(10):
            await poll_until(lambda: daemon_idle(rig))
        sids = [s for s in (sid_of(e) for e in rig.caller.of(EventType.STREAMING_CREATED)) if s]
        await wait_for_events(rig, sids, EventType.STREAMING_DELETED, 5)
        await trio.sleep(0.5)
        check_once(row, rig, sids, [EventType.STREAMING_CREATED, EventType.STREAMING_DELETED])
        tasks_after = collections.Counter(task_names())
        leaked = (tasks_after - tasks_before) + (tasks_before - tasks_after)
        row.lose(f"tasks differ once idle: {dict(leaked)}", sum(leaked.values()))
        errors = dict(daemon.plane.stats.errors)
    return f"envelopes: {len(examples)} sent, {len(sent)} with reply_to, {len(sids)} creates, errors {errors}"


def _peer_message(rng: random.Random) -> str:
    names = [
        "MEDIA_XOFF",
        "MEDIA_XON",
        "MEDIA_MARK_PROCESSED",
        "MEDIA_BUFFERING_COMPLETED",
        "QUEUE_DRAINED",
        "STATUS",
        "ERROR",
        "MEDIA_START",
        "DTMF_END",
        "",
    ]
    name = rng.choice(names)
    shape = rng.randrange(7)
    if shape == 0:
        return name
    if shape == 1:
        return f"{name} {rng.choice(['m1', 'm2', 'x' * rng.randrange(200), 'a:b c:d', 'ptime:0'])}"
    if shape == 2:
        obj: dict[str, Any] = {"event": name}
        if rng.random() < 0.5:
            obj["correlation_id"] = rng.choice(["m1", "m2", 7, None, ["x"]])
        if rng.random() < 0.3:
            obj["optimal_frame_size"] = rng.choice([160, 0, -1, "x"])
        return json.dumps(obj)
    if shape == 3:
        return json.dumps(rng.choice([[], {}, None, 1, "s", {"event": {"x": 1}}]))
    if shape == 4:
        return "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(40)))
    if shape == 5:
        return "{" + "".join(rng.choice('{}[]":, ab') for _ in range(rng.randrange(30)))
    return (
        f"MEDIA_START connection_id:{rng.choice(['c', ''])} format:{rng.choice(['ulaw', 'slin16', ''])} "
        f"optimal_frame_size:{rng.choice(['160', '0', 'x'])} ptime:{rng.choice(['20', ''])}"
    )


def _expected(text: str) -> str:
    """How the client should account for ``text``: ``error``, ``media_start`` or ``event``."""
    try:
        event = protocol.parse_event(text)
    except protocol.ProtocolError:
        return "error"
    return "media_start" if isinstance(event, protocol.MediaStart) else "event"


async def _fuzz_peer(row: Row, count: int) -> str:
    rng = random.Random(6)
    sim = AsteriskSimulator(seed=6)
    call = sim.expect("fuzz-peer")
    expected: collections.Counter[str] = collections.Counter()
    marks_fired = collections.Counter[str]()
    async with trio.open_nursery() as nursery:
        tasks_before = collections.Counter(task_names())
        async with open_media_connection(media_uri("fuzz-peer"), memory_dialer(sim, nursery)) as conn:
            base_events = conn.stats.control_events_received
            base_errors = conn.stats.protocol_errors
            for mark in ("m1", "m2"):
                conn.on_mark(mark, functools.partial(marks_fired.update, [mark]))
            for _ in range(count):
                text = _peer_message(rng)
                expected[_expected(text)] += 1
                try:
                    conn._handle_text(text)
                except Exception as exc:
                    row.lose(f"peer message {text[:40]!r} raised {exc!r}")
                if rng.random() < 0.05:
                    await trio.lowlevel.checkpoint()
            got_events = conn.stats.control_events_received - base_events
            got_errors = conn.stats.protocol_errors - base_errors
            row.lose("peer events miscounted", abs(got_events - expected["event"]))
            row.lose("peer protocol errors miscounted", abs(got_errors - expected["error"]))
            conn._handle_text("MEDIA_XON")
            if conn.paused:
                row.lose("connection still paused after MEDIA_XON")
            try:
                with trio.fail_after(2):
                    await conn.send_audio(bytes([protocol.ULAW_SILENCE]) * protocol.FRAME_BYTES)
            except Exception as exc:
                row.lose(f"connection unusable after the fuzz: {exc!r}")
            dropped = conn.stats.control_events_dropped
        with trio.fail_after(5):
            await call.ended.wait()
        await trio.sleep(0.1)
        tasks_after = collections.Counter(task_names())
        leaked = (tasks_after - tasks_before) + (tasks_before - tasks_after)
        row.lose(f"peer tasks left: {dict(leaked)}", sum(leaked.values()))
    row.lose("a mark handler fired more than once", sum(1 for n in marks_fired.values() if n > 1))
    return (
        f"peer: {count} messages ({expected['event']} events, {expected['error']} unparsable, "
        f"{expected['media_start']} MEDIA_START), {dropped} events dropped by the full queue, leg closed "
        f"{call.closed_code}"
    )


SCENARIOS: list[Scenario] = [
    broker_connection_loss,
    asterisk_faults,
    call_manager_faults,
    vendor_faults,
    soak,
    fuzz,
]
