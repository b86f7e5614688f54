"""Reliability scenarios of issue 14 §1 and §5: a command in progress when its session dies, and a say_add
flood. Real clock, real broker, the Asterisk simulator on loopback (see scenarios.py for the conventions)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import attrs
import trio
import trio_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from tests.amqp_support import open_rig
from tests.fakes.daemon_process import DaemonProcess
from tests.reliability.common import (
    Row,
    Settings,
    check_once,
    command,
    daemon_idle,
    delete,
    not_ok,
    orphaned_media,
    say,
    sid_of,
    wait_for_events,
)
from tests.reliability.soak_memory import QUIET_SECONDS
from tests.test_amqp_bad_input import BurstClient
from tests.test_amqp_resilience import create, poll_until
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import EventType, Response
from tts_streamer.supervisor.ops.metrics import count_tasks

# Small kernel buffers on the relay's side of a stalled leg, so the daemon's socket fills in seconds.
STALL_RCVBUF = 4096


class MediaRelay:
    """A TCP relay in front of the Asterisk simulator whose daemon->Asterisk direction can stop being
    read: the peer's receive buffer fills, then the daemon's send buffer, then its paced send blocks."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.stalled = False
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[MediaRelay] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        for listener in listeners:
            listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, down: trio.SocketStream) -> None:
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await down.aclose()
            return
        async with down, up, trio.open_nursery() as nursery:

            async def pump(source: trio.SocketStream, sink: trio.SocketStream, stallable: bool) -> None:
                try:
                    while True:
                        data = await source.receive_some(STALL_RCVBUF)
                        if not data:
                            break
                        if stallable and self.stalled:
                            await trio.sleep_forever()  # stopped reading, for good
                        await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, down, up, True)
            nursery.start_soon(pump, up, down, False)


async def blocked_media_send_flush(settings: Settings) -> Row:
    """A speaking streaming whose media socket stops being read (the peer's receive buffer fills and the
    paced send blocks), then say_flush, then GET, DELETE and say_stop for the same id; a neighbour speaks
    meanwhile.

    lost = any of those four commands not answered within 3 s (a wedged lane); + the stalled streaming's
    streaming_deleted not exactly once; + the neighbour's message not played to its end, or with
    underruns; + command lanes, streamings or sessions left in the daemon; + the daemon's task count not
    back to its idle value; + external medias left created at the fake call-manager.
    """
    row = Row("blocked media send + flush", "leg stops reading (send blocks), then flush/GET/DELETE/stop", 2)
    engine = SyntheticEngine(seconds_per_char=0.05, speed=2.0)
    with trio.fail_after(60):
        async with open_rig(engine=engine) as rig, trio.open_nursery() as nursery:
            cm = rig.call_manager
            relay: MediaRelay = await nursery.start(MediaRelay(cm.media_port).serve)
            await trio.sleep(0.2)
            idle_tasks = count_tasks()
            neighbour = await create(rig)
            await say(rig, neighbour, "N" * 200, finish=True)  # 10 s of audio
            direct_port, cm.media_port = cm.media_port, relay.port
            try:
                stalled = await create(rig)
            finally:
                cm.media_port = direct_port
            await say(rig, stalled, "S" * 1200, finish=False)  # a minute of audio
            await wait_for_events(rig, [stalled], EventType.MESSAGE_PLAY_STARTED, 5)
            session = rig.daemon.supervisor.get(stalled)
            relay.stalled = True
            stalled_at = trio.current_time()
            # The paced send is blocked once frames stop going out (the daemon's socket buffer is full).
            assert session.media is not None
            sent, still_since = session.media.stats.messages_sent, trio.current_time()
            while trio.current_time() - still_since < 0.3 and not session.ended:
                await trio.sleep(0.05)
                if session.media.stats.messages_sent != sent:
                    sent, still_since = session.media.stats.messages_sent, trio.current_time()
            blocked_after = still_since - stalled_at
            replies: dict[str, Response | None] = {}
            took: dict[str, float] = {}
            for action in ("say_flush", "GET", "DELETE", "say_stop"):
                started = time.monotonic()
                if action == "GET":
                    reply = await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{stalled}", "GET")
                elif action == "DELETE":
                    reply = await delete(rig, stalled)
                else:
                    reply = await command(rig, stalled, action)
                replies[action], took[action] = reply, time.monotonic() - started
                row.lose(f"{action} for the stalled streaming unanswered within 3 s", reply is None)
            await wait_for_events(rig, [stalled], EventType.STREAMING_DELETED, 5)
            unfinished = await wait_for_events(rig, [neighbour], EventType.MESSAGE_PLAY_FINISHED, 15)
            row.lose("neighbour's message not finished", len(unfinished))
            row.lose(f"neighbour DELETE answered {replies}", not_ok(await delete(rig, neighbour)))
            await wait_for_events(rig, [neighbour], EventType.STREAMING_DELETED, 5)
            await trio.sleep(0.3)
            check_once(row, rig, [stalled, neighbour], [EventType.STREAMING_DELETED])
            short = [
                e
                for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED)
                if sid_of(e) == neighbour and not e.data.get("message_finish")
            ]
            row.lose("neighbour's message cut short", len(short))
            row.lose("neighbour underruns", rig.sim_call_for(neighbour).underruns)
            with trio.move_on_after(5):
                await poll_until(lambda: daemon_idle(rig))
            daemon = rig.daemon
            row.lose("command lanes left", len(daemon.plane._lanes))
            row.lose("streamings left in memory", len(daemon.streamings.streamings))
            row.lose("sessions left running", len(daemon.supervisor))
            with trio.move_on_after(5):
                await poll_until(lambda: count_tasks() <= idle_tasks, interval=0.05)
            tasks_after = count_tasks()
            row.lose(f"tasks {idle_tasks} -> {tasks_after}", max(0, tasks_after - idle_tasks))
            row.lose("external media left created", len(orphaned_media(rig)))
            nursery.cancel_scope.cancel()
    answers = ", ".join(f"{a} {_refusal(r)} in {took[a]:.2f} s" for a, r in replies.items())
    row.figures = (
        f"send blocked {blocked_after:.1f} s after the stall; {answers}; tasks {idle_tasks} -> {tasks_after}"
    )
    return row


def _refusal(reply: Response | None) -> str:
    if reply is None:
        return "none"
    if reply.status_code == 200:
        return "ok"
    data: Any = reply.data
    reason = data.get("reason") if isinstance(data, dict) else None
    return str(reason or reply.status_code)


MAX_MESSAGE_TEXT_BYTES = 64 * 1024  # the daemon's default
FLOOD_IN_FLIGHT = 50  # unanswered say_adds at a time (per-pod requests expire after 3 s in the queue)


def _render(uri: str, data: Any) -> bytes:
    return envelope.render_request(envelope.make_request(uri, "POST", data, publisher="test"))


@attrs.define
class KeepingClient(BurstClient):
    """The fuzz's burst client (one channel, one reply queue), keeping each reply's body."""

    bodies: dict[str, bytes] = attrs.field(factory=dict)

    def on_reply(self, message: AbstractIncomingMessage) -> None:
        self.bodies[message.correlation_id or "?"] = message.body
        super().on_reply(message)


@asynccontextmanager
async def open_keeping_client(connection: AbstractRobustConnection) -> AsyncIterator[KeepingClient]:
    aio = trio_asyncio.aio_as_trio
    channel = await aio(connection.channel)(publisher_confirms=False)
    try:
        queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
        client = KeepingClient(channel, queue.name)

        async def on_reply(message: AbstractIncomingMessage) -> None:
            client.on_reply(message)

        await aio(queue.consume)(on_reply, no_ack=True)
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await aio(channel.close)()


# What the flood may leave behind is judged on live Python blocks read in the daemon (its console's
# ``memory``: a full collection first), after the warm-up (the first third of the large say_adds) and
# at the end: a daemon that kept every say_add (the 14.9 MB message of issue 14 §5) keeps a block per
# text, 2,000 in the last phase of the full form, against this bound. RSS is reported, not judged: it
# measures the allocators' high-water mark, which a faster command plane raises (+6 MiB after warm-up
# at 31-122 s for the flood, +9.7 MiB at 8.5 s once the plane took it in one go), not what is kept.
FLOOD_BLOCKS_PER_SAY_ADD = 0.25
FLOOD_BLOCKS_SLACK = 1000


async def live_blocks(daemon: DaemonProcess) -> int:
    """Live Python blocks in the daemon, less the console history's and the latencies' (both bounded),
    once the broker calls' cancelled timers of the last AMQP timeout are gone (soak_memory.py)."""
    await trio.sleep(QUIET_SECONDS)
    return int((await daemon.console("memory"))[0]["other_blocks"])


async def say_add_flood(settings: Settings) -> Row:
    """One streaming gets a flood of say_adds in one message (full form: 10,000 x 18 B then 3,000 x
    4,900 B, as in issue 14 §5; quick: 300 then 40, still past the bound), 50 unanswered at a time
    (one lane: the daemon works them off in order), from one channel and reply queue; a
    neighbour speaks meanwhile. The daemon runs in a process of its own, so its RSS is its own.

    lost = say_adds unanswered (30 s after the last one was sent), or refused otherwise than Go would
    (a plain 500) for a session refusal (each counted in the daemon's tts_streamer_command_errors_total:
    message_too_long or busy); + none refused at all (nothing bounded the message); + say_stop not
    answered 200, or the flooded message's message_play_finished missing, or its total_message empty
    or over MAX_MESSAGE_TEXT_BYTES; + the neighbour's message not played to its end, or with
    underruns; + the daemon's live Python blocks growing after warm-up (the first third of the large
    say_adds) by more than FLOOD_BLOCKS_PER_SAY_ADD a say_add + FLOOD_BLOCKS_SLACK; + streaming_deleted
    not exactly once after the DELETEs.
    """
    small, large = (300, 40) if settings.quick else (10_000, 3_000)
    row = Row("say_add flood", f"{small} x 18 B + {large} x 4,900 B say_adds to one message", 2)
    engine = SyntheticEngine(seconds_per_char=0.05, speed=4.0)
    with trio.fail_after(90 if settings.quick else 900):
        async with open_rig(engine=engine, child=True) as rig:
            daemon = rig.child
            assert daemon is not None
            neighbour = await create(rig)
            await say(rig, neighbour, "N" * 200, finish=True)  # 10 s of audio at 0.05 s per char
            flooded = await create(rig)
            message_id = await say(rig, flooded, "start. ", finish=False)
            rss_before = daemon.rss_kib() * 1024
            errors_before = (await daemon.metrics()).get("tts_streamer_command_errors_total", 0.0)
            small_texts = ["flood flood flood "] * small
            large_texts = [("x" * 48 + " ") * 98] * large
            uri = f"/v1/streamings/{flooded}/say_add"
            warm = large // 3  # RSS settles once the large bodies have been through (allocator high-water)
            phases = [small_texts, large_texts[:warm], large_texts[warm:]]
            rss: list[int] = []
            blocks: list[int] = []
            outcomes: dict[str, int] = {}
            started = time.monotonic()
            # One channel and reply queue for the whole flood (the per-request caller cannot do 13,000).
            async with open_keeping_client(rig.caller.connection) as client:
                for texts in phases:
                    examples = [
                        (_render(uri, {"message_id": message_id, "text": text}), True, False)
                        for text in texts
                    ]
                    client.bodies.clear()
                    client.replies.clear()
                    sent = await client.send_examples(examples, rig.pod_queue(), FLOOD_IN_FLIGHT)
                    with trio.move_on_after(30):
                        await client.wait_replies(len(sent))
                    for correlation_id in sent:
                        raw = client.bodies.get(correlation_id)
                        kind = _refusal(envelope.parse_response(raw) if raw is not None else None)
                        outcomes[kind] = outcomes.get(kind, 0) + 1
                    rss.append(daemon.rss_kib() * 1024)
                    if texts is not small_texts:  # after the warm-up, and at the end
                        blocks.append(await live_blocks(daemon))
            flood_took = time.monotonic() - started
            bad = {k: n for k, n in outcomes.items() if k not in {"ok", "500"}}
            row.lose(f"say_adds unanswered or refused otherwise: {bad}", sum(bad.values()))
            # Go's client sees a plain 500 for a refusal; the daemon counts each by its kind.
            refusals = (await daemon.metrics()).get("tts_streamer_command_errors_total", 0.0) - errors_before
            row.lose(
                f"{outcomes.get('500', 0)} say_adds answered 500 but {refusals:.0f} session refusals counted",
                outcomes.get("500", 0) != refusals,
            )
            row.lose("no say_add refused: the message is unbounded", not (set(outcomes) - {"ok"}))
            # An hour of text will not play out here: say_stop ends the message, and its
            # message_play_finished carries everything it held (total_message).
            stop = await command(rig, flooded, "say_stop")
            row.lose(f"say_stop after the flood answered {stop}", not_ok(stop))
            await wait_for_events(rig, [flooded], EventType.MESSAGE_PLAY_FINISHED, 5)
            unfinished = await wait_for_events(rig, [neighbour], EventType.MESSAGE_PLAY_FINISHED, 15)
            row.lose("neighbour's message not finished", len(unfinished))
            row.lose("flooded streaming DELETE", not_ok(await delete(rig, flooded)))
            row.lose("neighbour DELETE", not_ok(await delete(rig, neighbour)))
            await wait_for_events(rig, [flooded, neighbour], EventType.STREAMING_DELETED, 10)
            await trio.sleep(0.3)
            check_once(row, rig, [flooded, neighbour], [EventType.STREAMING_DELETED])
            finished = [e for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED) if sid_of(e) == flooded]
            row.lose("flooded message's message_play_finished missing", not finished)
            total = max((len(str(e.data.get("total_message", "")).encode()) for e in finished), default=0)
            row.lose(f"total_message of {total} bytes", not 0 < total <= MAX_MESSAGE_TEXT_BYTES)
            short = [
                e
                for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED)
                if sid_of(e) == neighbour and not e.data.get("message_finish")
            ]
            row.lose("neighbour's message cut short", len(short))
            row.lose("neighbour underruns", rig.sim_call_for(neighbour).underruns)
    grew = blocks[-1] - blocks[0]
    allowed = FLOOD_BLOCKS_PER_SAY_ADD * (large - warm) + FLOOD_BLOCKS_SLACK
    row.lose(f"live Python blocks grew by {grew} after warm-up (allowed {allowed:.0f})", grew > allowed)
    mib = " -> ".join(f"{value / 2**20:.0f}" for value in [rss_before, *rss])
    row.figures = (
        f"{small + large} say_adds in {flood_took:.1f} s: {dict(sorted(outcomes.items()))}; "
        f"total_message {total} B; RSS {mib} MiB (start, small done, {warm} large, all); live blocks "
        f"{blocks[0]} -> {blocks[-1]} after warm-up ({grew:+d}, allowed {allowed:.0f})"
    )
    return row
