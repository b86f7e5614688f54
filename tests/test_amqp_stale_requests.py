"""Late work never happens, end to end on the real broker (issue 14 §4).

Creates left in the shared queue by callers that gave up (a pod drained, none took over for a while)
must create nothing when a pod finally consumes them; a caller still waiting gets its streaming. The
reply-queue probe is checked against the broker: Go's reply queues are exclusive to the caller's
connection, so "exists" is a 405 RESOURCE_LOCKED and "gone" a 404, and both close the probing channel.
"""

from __future__ import annotations

import time
import uuid

import aio_pika
import pytest
import trio
import trio_asyncio

from tests.amqp_support import open_rig, run_pod
from tests.amqp_vhost import private_amqp_url, private_vhost
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.adapters.amqp.bridge import Topology, open_amqp_bridge
from tts_streamer.adapters.amqp.queue_probe import QueueProbe
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import EventType

pytestmark = pytest.mark.realtime

__all__ = ["private_amqp_url"]


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_rabbitmq()


def create_body() -> dict[str, str]:
    return {
        "customer_id": str(uuid.uuid4()),
        "reference_type": "call",
        "reference_id": str(uuid.uuid4()),
        "language": "en-US",
        "direction": "out",
    }


async def test_creates_whose_callers_gave_up_create_nothing(private_amqp_url: str) -> None:
    with trio.fail_after(60):
        async with open_rig(pods=0) as rig:
            # Nobody consumes the shared queue: these callers time out and their reply queues go.
            for _ in range(5):
                assert (
                    await rig.caller.call(SHARED_QUEUE, "/v1/streamings", "POST", create_body(), wait=0.2)
                    is None
                )
            answers = []
            answered = trio.Event()

            async def patient() -> None:
                answers.append(
                    await rig.caller.call(SHARED_QUEUE, "/v1/streamings", "POST", create_body(), wait=20)
                )
                answered.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(patient)
                await trio.sleep(0.3)  # its request is in the queue behind the five
                async with run_pod(rig) as pod:
                    await answered.wait()
                    stats = pod.handle.plane.stats
                    assert stats.not_started["caller_gone"] == 5, dict(stats.not_started)
                    (answer,) = answers
                    assert answer is not None and answer.status_code == 200
                    sid = uuid.UUID(answer.data["id"])
                    assert set(rig.call_manager.created) == {sid}, "an external media for a gone caller"
                    created = rig.caller.of(EventType.STREAMING_CREATED)
                    assert [e.data["id"] for e in created] == [str(sid)]
                    metrics = pod.handle.metrics
                    assert metrics is not None
                    exposed = metrics.render()[0].decode()
                    assert 'tts_streamer_requests_not_started_total{reason="caller_gone"} 5.0' in exposed
                    await rig.request(SHARED_QUEUE, f"/v1/streamings/{sid}", "DELETE")


async def test_reply_queue_probe_on_the_real_broker() -> None:
    """Exists (another connection's exclusive queue), gone, and again exists: the probe channel is
    reopened after each answer that closed it, and no channel is leaked."""
    with private_vhost() as url, trio.fail_after(60):
        async with open_amqp_bridge(url, Topology(), broker_timeout=5) as bridge:
            aio = trio_asyncio.aio_as_trio
            caller = await aio(aio_pika.connect)(url)  # inside the bridge's asyncio loop
            try:
                channel = await aio(caller.channel)()
                queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)

                async def on_reply(message: object) -> None:
                    pass

                await aio(queue.consume)(on_reply, no_ack=True)  # as Go's client: gone with its channel
                for _ in range(5):
                    assert await bridge.queue_exists(queue.name) is True
                    assert await bridge.queue_exists(f"amq.gen-{uuid.uuid4().hex}") is False
                await trio.sleep(1.5)  # a robust channel would have reopened itself by now
                vhost = url.rsplit("/", 1)[1]
                result = await trio.run_process(
                    ["rabbitmqctl", "-q", "--no-table-headers", "list_channels", "vhost"],
                    capture_stdout=True,
                )
                ours = [v for v in result.stdout.decode().split() if v == vhost]
                # the bridge's channel, at most one probe channel, the caller's channel
                assert len(ours) <= 3, ours
                await aio(channel.close)()
                assert await bridge.queue_exists(queue.name) is False  # the caller gave up
            finally:
                await aio(caller.close)()


async def test_the_probe_connection_is_replaced_after_its_uses_and_still_answers() -> None:
    """aio-pika keeps a little of every channel a connection opened, and every probe needs a channel of
    its own: the probes run on a connection of their own, replaced after ``uses`` probes, so what
    aio-pika keeps goes with it. Answers stay right across a replacement, concurrent probes included."""
    with private_vhost() as url, trio.fail_after(60):
        async with trio_asyncio.open_loop():
            aio = trio_asyncio.aio_as_trio
            caller = await aio(aio_pika.connect)(url)
            probe = QueueProbe(url, timeout=5, uses=3)
            try:
                channel = await aio(caller.channel)()
                queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
                answers: list[bool | None] = []

                async def ask(name: str) -> None:
                    answers.append(await probe.exists(name))

                for _ in range(4):
                    await ask(queue.name)
                    await ask(f"amq.gen-{uuid.uuid4().hex}")
                assert answers == [True, False] * 4
                assert probe.connections_opened == 3  # 8 probes, 3 per connection
                answers.clear()
                async with trio.open_nursery() as nursery:
                    for _ in range(7):
                        nursery.start_soon(ask, queue.name)
                assert answers == [True] * 7  # none lost to a connection replaced under it
            finally:
                await probe.aclose()
                await aio(caller.close)()


async def test_a_broker_arrival_stamp_older_than_the_timeout_is_not_started(private_amqp_url: str) -> None:
    """RabbitMQ's arrival-timestamp interceptor adds ``timestamp_in_ms``; a request whose stamp is older
    than the callers' timeout is answered 503 and never reaches its handler (here: a say_add that would
    otherwise be a typed 404 for an unknown streaming)."""
    with trio.fail_after(30):
        async with open_rig() as rig:
            aio = trio_asyncio.aio_as_trio
            channel = await aio(rig.caller.connection.channel)()
            try:
                reply_queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
                replies: list[bytes] = []
                got = trio.Event()

                async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                    replies.append(message.body)
                    got.set()

                await aio(reply_queue.consume)(on_reply, no_ack=True)
                body = envelope.render_request(
                    envelope.make_request(f"/v1/streamings/{uuid.uuid4()}/say_add", "POST", {"text": "x"})
                )
                stamp_ms = int((time.time() - 10) * 1000)
                message = aio_pika.Message(
                    body, reply_to=reply_queue.name, headers={"timestamp_in_ms": stamp_ms}
                )
                await aio(channel.default_exchange.publish)(message, routing_key=rig.pod_queue())
                await got.wait()
            finally:
                await aio(channel.close)()
            reply = envelope.parse_response(replies[0])
            assert (reply.status_code, reply.data["reason"]) == (503, "REQUEST_EXPIRED")
            assert rig.daemon.plane.stats.not_started["timestamp"] == 1
