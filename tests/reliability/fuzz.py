"""Reliability scenario 6: fuzz the daemon's inputs (AMQP requests and chan_websocket control messages)."""

from __future__ import annotations

import collections
import functools
import json
import random
import uuid
from typing import Any

import trio

from tests.amqp_support import open_rig
from tests.reliability.common import (
    Row,
    Settings,
    check_once,
    command,
    daemon_idle,
    delete,
    sid_of,
    wait_for_events,
)
from tests.support import media_uri, task_names
from tests.test_amqp_bad_input import ENGINE as FUZZ_ENGINE
from tests.test_amqp_bad_input import RIG_CONFIG as FUZZ_RIG_CONFIG
from tests.test_amqp_bad_input import draw, fuzz_requests, open_burst_client
from tests.test_amqp_resilience import (
    create,
    poll_until,
)
from tts_streamer.adapters.chan_websocket import protocol
from tts_streamer.adapters.chan_websocket.client import open_media_connection
from tts_streamer.adapters.voipbin.envelope import EventType
from tts_streamer.simulator.asterisk import AsteriskSimulator, memory_dialer

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
        async with open_burst_client(rig.caller.connection) as client:
            sent = await client.send_examples(examples, rig.pod_queue(), in_flight)
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
        with trio.fail_after(5):
            await call.ended.wait()
        await trio.sleep(0.1)
        tasks_after = collections.Counter(task_names())
        leaked = (tasks_after - tasks_before) + (tasks_before - tasks_after)
        row.lose(f"peer tasks left: {dict(leaked)}", sum(leaked.values()))
    row.lose("a mark handler fired more than once", sum(1 for n in marks_fired.values() if n > 1))
    return (
        f"peer: {count} messages ({expected['event']} events, {expected['error']} unparsable, "
        f"{expected['media_start']} MEDIA_START), leg closed {call.closed_code}"
    )
