"""The fake call-manager the broker tests and the reliability suite run against."""

from __future__ import annotations

import uuid
from typing import Any

import trio

from tests.fakes.call_manager import FakeCallManager
from tts_streamer.adapters.amqp.bridge import AmqpUnavailable, Delivery
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.simulator.asterisk import AsteriskSimulator


class SlowBroker:
    """A bridge whose broker never takes a publish in time (a loaded machine)."""

    def __init__(self) -> None:
        self.attempts = 0

    async def publish(self, *_args: Any, **_kwargs: Any) -> None:
        self.attempts += 1
        raise AmqpUnavailable("broker did not answer within 3.0 s")


async def test_a_reply_the_broker_does_not_take_is_lost_and_counted_not_raised() -> None:
    # It used to raise out of the handler, end the fake's nursery and with it the whole rig (a reliability
    # scenario failed in its set-up on a machine at load 5).
    fake = FakeCallManager(AsteriskSimulator(seed=1), "127.0.0.1", 9)
    request = envelope.make_request(f"/v1/external-medias/{uuid.uuid4()}", "DELETE", None, publisher="test")
    body = envelope.render_request(request)
    delivery = Delivery("q", body, "amq.gen-reply", None, {}, trio.current_time())
    broker = SlowBroker()
    await fake.handle(broker, delivery)  # type: ignore[arg-type]
    assert broker.attempts == 1
    assert fake.replies_lost == 1
    assert [r.uri for r in fake.requests] == [request.uri]
