"""Losing the broker mid-call: audio keeps flowing, the bridge reconnects, commands and events resume.

The daemon under test reaches RabbitMQ through a small TCP relay owned by the test. That lets the test
find the daemon's own connection (the relay knows its upstream port, which is the connection's name
on the broker), close exactly that connection *from the broker side* with ``rabbitmqctl
close_connection`` (other connections on the shared broker are left alone), and keep the broker
unreachable for as long as it likes (the relay refuses new connections, as a restarting broker does),
so the outage has a known length and an event can be made to fall inside it.
"""

from __future__ import annotations

import math
import os
import shutil
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aio_pika
import attrs
import pytest
import trio

from tests import amqp_support
from tests.amqp_support import Rig, open_child_daemon, open_rig, run_pod
from tests.amqp_vhost import private_amqp_url
from tests.fakes.daemon_process import parse_samples
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.actors import events as ev
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.adapters.voipbin.envelope import Event, EventType
from tts_streamer.simulator.asterisk_call import SimCall
from tts_streamer.supervisor.ops.metrics import Metrics

pytestmark = pytest.mark.realtime

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672
SECONDS_PER_CHAR = 0.1
TICK = 0.020


__all__ = ["private_amqp_url"]  # the fixture, imported so this module's tests get a private vhost


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_rabbitmq()
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl not found: these tests act on the broker from its side"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


# ------------------------------------------------------------------------------------------ the relay


@attrs.define
class BrokerRelay:
    """A loopback TCP relay to the broker that the test can take down and bring back."""

    broker_url: str
    port: int = 0
    up: bool = True
    upstream_names: list[str] = attrs.field(factory=list)  # broker-side connection names, in order
    refused: int = 0

    @property
    def url(self) -> str:
        """``broker_url`` (credentials, vhost) with the relay's address instead of the broker's."""
        parts = urllib.parse.urlsplit(self.broker_url)
        credentials = parts.netloc.rpartition("@")[0]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{self.port}"))

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(sink)
            await trio.aclose_forcefully(source)

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self.up:
            self.refused += 1
            await trio.aclose_forcefully(client)  # like a broker that is not listening yet
            return
        try:
            upstream = await trio.open_tcp_stream(BROKER_HOST, BROKER_PORT)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        host, port = upstream.socket.getsockname()[:2]
        self.upstream_names.append(f"{host}:{port} -> {BROKER_HOST}:{BROKER_PORT}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, name="relay-up")
            nursery.start_soon(self._pump, upstream, client, name="relay-down")

    async def serve(self, *, task_status: trio.TaskStatus[BrokerRelay] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)


async def rabbitmqctl(*args: str) -> str:
    with trio.fail_after(15):
        done = await trio.run_process(["rabbitmqctl", *args], capture_stdout=True, capture_stderr=True)
    return bytes(done.stdout).decode()


async def close_from_broker(pid: str) -> None:
    """Close one connection from the broker side (the client gets connection.close, 320)."""
    await rabbitmqctl("close_connection", pid, "tts-streamer resilience test")


async def cut_connections(relay: BrokerRelay) -> int:
    """A broker outage's first half: close, from the broker side, every connection the daemon holds
    through ``relay`` (its own and, once a create has run, the reply-queue probe's); returns how many
    connections the relay had seen, so a test can count the reconnects that follow."""
    listing = await rabbitmqctl("list_connections", "-s", "pid", "name")
    open_now = {line.split("\t")[1]: line.split("\t")[0] for line in listing.splitlines() if "\t" in line}
    pids = [open_now[name] for name in relay.upstream_names if name in open_now]
    assert pids, f"none of the daemon's connections {relay.upstream_names} is open at the broker"
    for pid in pids:
        await close_from_broker(pid)
    return len(relay.upstream_names)


# ------------------------------------------------------------------------------------------ the rig


@asynccontextmanager
async def open_relayed_rig(
    engine: SyntheticEngine, broker_url: str, *, child: bool = False
) -> AsyncIterator[tuple[Rig, BrokerRelay]]:
    """open_rig's simulator, fake call-manager and caller (direct), plus one daemon behind the relay:
    in this process, or with ``child`` in a process of its own (``rig.child``)."""
    async with open_rig(pods=0, engine=engine) as rig, trio.open_nursery() as nursery:
        relay: BrokerRelay = await nursery.start(BrokerRelay(broker_url).serve)
        async with AsyncExitStack() as stack:
            if child:
                rig.child = await stack.enter_async_context(open_child_daemon(relay.url, rig.caller, engine))
            else:
                # run_pod reads the broker address when it builds the pod's config: point it at the relay.
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(amqp_support, "RABBITMQ_URL", relay.url)
                    await stack.enter_async_context(run_pod(rig, f"test-resilience-{uuid.uuid4().hex[:6]}"))
            stack.callback(setattr, relay, "up", True)  # the pod's drain needs the broker
            yield rig, relay
        nursery.cancel_scope.cancel()


def by_streaming(sid: str) -> Callable[[Event], bool]:
    return lambda e: (e.data or {}).get("streaming_id", (e.data or {}).get("id")) == sid


def metric_samples(metrics: Metrics) -> dict[str, float]:
    """The daemon's /metrics exposition, by sample name."""
    return parse_samples(metrics.render()[0].decode())


async def poll_until(predicate: Callable[[], bool], interval: float = 0.005) -> None:
    """For state with no event to wait on (the bridge's connection); callers bound it."""
    while True:
        if predicate():
            return
        await trio.sleep(interval)


@attrs.define
class Timeline:
    """When session events happened inside the daemon (Trio clock), keyed by (type, message id)."""

    at: dict[tuple[type[Any], str], float] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, event: ev.SessionEvent) -> None:
        message_id = getattr(event, "message_id", None) or ""
        self.at.setdefault((type(event), message_id), trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, kind: type[Any], message_id: str) -> float:
        while (kind, message_id) not in self.at:
            await self._changed.wait()
        return self.at[(kind, message_id)]


async def create(rig: Rig) -> str:
    """A create on this rig's own daemon (its per-pod queue), whoever else consumes the shared queue."""
    body = {
        "customer_id": str(uuid.uuid4()),
        "reference_type": "call",
        "reference_id": str(uuid.uuid4()),
        "language": "en-US",
        "direction": "out",
    }
    response = await rig.caller.call(rig.pod_queue(), "/v1/streamings", "POST", body)
    assert response is not None and response.status_code == 200, response
    sid: str = response.data["id"]
    return sid


async def delete(rig: Rig, sid: str) -> None:
    response = await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{sid}", "DELETE")
    assert response is not None and response.status_code == 200, response
    await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))


async def speak(rig: Rig, sid: str, text: str, *, finish: bool) -> str:
    message_id = str(uuid.uuid4())
    assert (await rig.streaming(sid, "say_init", {"message_id": message_id})).status_code == 200
    assert (await rig.streaming(sid, "say_add", {"message_id": message_id, "text": text})).status_code == 200
    if finish:
        assert (await rig.streaming(sid, "say_finish", {"message_id": message_id})).status_code == 200
    return message_id


def played_between(call: SimCall, text: str, start: float, end: float) -> int:
    byte = fill_byte(text)
    return len([f for f in call.played if start <= f.time <= end and f.data[0] == byte])


# ------------------------------------------------------------------------------------------ tests


async def test_broker_connection_closed_mid_call_audio_flows_and_everything_resumes(
    private_amqp_url: str,
) -> None:
    engine = SyntheticEngine(seconds_per_char=SECONDS_PER_CHAR, speed=2.0)
    long_text = "L" * 100  # 10 s of audio: spans the whole outage and the reconnect
    short_text = "S" * 40  # 4 s: ends while the broker is away
    outage = 3.0  # at least this long, and until B's event has been held for a while
    with trio.fail_after(30):
        async with open_relayed_rig(engine, private_amqp_url) as (rig, relay):
            daemon = rig.daemon
            timeline = Timeline()
            daemon.bus.add_listener(timeline)
            a, b = await create(rig), await create(rig)
            long_id = await speak(rig, a, long_text, finish=False)
            short_id = await speak(rig, b, short_text, finish=True)
            await timeline.wait(ev.PlayStarted, short_id)
            assert daemon.bridge.stats.reconnects == 0 and daemon.bridge.connected

            # -- the outage: broker-side close, and the broker stays unreachable for a while --
            relay.up = False
            seen_before = await cut_connections(relay)
            with trio.fail_after(2):
                await poll_until(lambda: not daemon.bridge.connected)
            cut_at = trio.current_time()
            # B's message plays to its end while the broker is away: its event is produced and held.
            b_finished = await timeline.wait(ev.PlayFinished, short_id)
            assert b_finished > cut_at
            await trio.sleep(0.1)
            assert not daemon.bridge.connected, "the outage ended too early for this test to prove anything"
            assert daemon.publisher.pending >= 1
            assert daemon.metrics is not None
            exposed = metric_samples(daemon.metrics)
            assert exposed["tts_streamer_broker_connected"] == 0
            assert exposed["tts_streamer_events_pending"] == daemon.publisher.pending
            assert not [e for e in rig.caller.of(EventType.MESSAGE_PLAY_FINISHED) if by_streaming(b)(e)]
            await trio.sleep_until(max(cut_at + outage, b_finished + 0.3))
            relay.up = True
            with trio.fail_after(5):
                await poll_until(lambda: daemon.bridge.stats.reconnects >= 1 and daemon.bridge.connected)
            back_at = trio.current_time()
            assert relay.refused >= 1, "the daemon should have tried (and failed) to reconnect meanwhile"
            assert len(relay.upstream_names) == seen_before + 1  # one reconnect, not a storm
            exposed = metric_samples(daemon.metrics)
            assert exposed["tts_streamer_broker_connected"] == 1
            assert exposed["tts_streamer_broker_reconnects_total"] == 1

            # The held event reaches subscribers once the broker is back.
            held = await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(b))
            assert held.data["id"] == short_id and held.data["message_finish"] is True
            assert held.data["total_count"] == 1

            # Consumers, the per-pod queue and the call-manager RPC are restored: commands work.
            inline_before = daemon.bridge._direct.direct
            fresh = await rig.caller.call(
                rig.pod_queue(), f"/v1/streamings/{a}/say_finish", "POST", {"message_id": long_id}, wait=3.0
            )
            assert fresh is not None and fresh.status_code == 200, fresh
            # ... and still handed over inline on the new channel (adapters/amqp/direct.py).
            assert daemon.bridge._direct.direct > inline_before, "deliveries fell back to aio-pika's path"
            done = await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(a))
            assert done.data["id"] == long_id and done.data["message_finish"] is True
            # The shared queue's consumer is back too, and a create needs the call-manager RPC path.
            third = await rig.create()
            assert third.status_code == 200 and third.data["pod_id"] == daemon.config.pod_id
            deleted = await rig.caller.call(SHARED_QUEUE, f"/v1/streamings/{third.data['id']}", "DELETE")
            assert deleted is not None and deleted.status_code == 200
            for sid in (a, b):
                await delete(rig, sid)
            call_a = rig.sim_call_for(a)

    # The media path never waited on the broker: A played continuously through the whole outage.
    long_frames = [f for f in call_a.played if f.data[0] == fill_byte(long_text)]
    assert abs(len(long_frames) - round(len(long_text) * SECONDS_PER_CHAR / TICK)) <= 3
    assert long_frames[0].time < cut_at and long_frames[-1].time > back_at
    window = back_at - cut_at
    assert window > outage
    assert played_between(call_a, long_text, cut_at, back_at) >= math.floor(window / TICK) - 3
    assert call_a.underruns <= 2, call_a.gaps
    assert all(gap.ticks <= 2 for gap in call_a.gaps), call_a.gaps
    call_b = rig.sim_call_for(b)
    assert played_between(call_b, short_text, cut_at, back_at) > 0  # B was audible during the outage
    assert call_b.underruns <= 2, call_b.gaps
    # Nothing was lost or sent twice on the event side.
    for sid in (a, b):
        mine = [e.type for e in rig.caller.events if by_streaming(sid)(e)]
        assert mine.count("message_play_finished") == 1, mine
        assert mine.count("streaming_created") == 1 and mine.count("streaming_deleted") == 1, mine
    assert daemon.publisher.dropped == 0


@pytest.mark.skipif(
    os.environ.get("TTS_TEST_BROKER_RESTART") != "1" and os.environ.get("CI") != "true",
    reason="restarts the broker other runs share (rabbitmqctl stop_app/start_app): runs under CI=true "
    "or with TTS_TEST_BROKER_RESTART=1",
)
async def test_real_broker_restart_mid_call(private_amqp_url: str) -> None:
    """The same, with the whole broker restarted: every queue and binding must be re-declared."""
    engine = SyntheticEngine(seconds_per_char=SECONDS_PER_CHAR, speed=2.0)
    text = "R" * 80
    restarted = False
    try:
        with trio.fail_after(45):
            async with open_rig(engine=engine) as rig:
                daemon = rig.daemon
                sid = await create(rig)
                message_id = await speak(rig, sid, text, finish=False)
                await rig.caller.wait_event(EventType.MESSAGE_PLAY_STARTED, by_streaming(sid))
                await rabbitmqctl("stop_app")
                cut_at = trio.current_time()
                await trio.sleep(1.0)
                await rabbitmqctl("start_app")
                restarted = True
                with trio.fail_after(15):
                    await poll_until(lambda: daemon.bridge.stats.reconnects >= 1 and daemon.bridge.connected)
                back_at = trio.current_time()
                # The test caller's robust connection reconnects too: probe (GET is idempotent) until it
                # can make calls again, then send the real command once.
                with trio.fail_after(10):
                    while True:
                        try:
                            probe = await rig.caller.call(
                                rig.pod_queue(), f"/v1/streamings/{sid}", "GET", wait=1
                            )
                        except (RuntimeError, aio_pika.exceptions.AMQPError, ConnectionError):
                            probe = None  # the caller's connection is still reconnecting
                        if probe is not None:
                            break
                        await trio.sleep(0.2)
                assert probe.status_code == 200 and probe.data["message_id"] == message_id
                reply = await rig.streaming(sid, "say_finish", {"message_id": message_id})
                assert reply.status_code == 200
                await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(sid))
                call = rig.sim_call_for(sid)
    finally:
        if not restarted:
            with trio.CancelScope(shield=True):
                await rabbitmqctl("start_app")
        with trio.CancelScope(shield=True), trio.fail_after(30):
            while True:
                try:
                    await (await trio.open_tcp_stream(BROKER_HOST, BROKER_PORT)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.2)
    assert played_between(call, text, cut_at, back_at) >= math.floor((back_at - cut_at) / TICK) - 3
    assert call.underruns <= 2, call.gaps
