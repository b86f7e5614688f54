"""Hostile and malformed input through the real broker: the documented error replies, and nothing else
disturbed (no crash, no leaked task, lane or session, every request with a ``reply_to`` answered once).

The table uses the Go-style caller (``VoipbinCaller.send_raw``); the fuzz run publishes thousands of
hypothesis-generated envelopes on one channel with one reply queue, matching replies by correlation id.
The module runs in a private vhost (tests/amqp_vhost.py), so no other run's daemon takes its requests.

Over the ~400-line guide: one table of hostile inputs and the fuzz run share one broker rig and
one set of invariants (no crash, nothing leaked, one reply each).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import attrs
import hypothesis.strategies as st
import pytest
import trio
import trio_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from hypothesis import HealthCheck, Phase, given, settings

from tests.amqp_support import Rig, open_rig
from tests.amqp_vhost import private_amqp_url
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tests.support import task_names
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voipbin.envelope import Event, EventType, Response
from tts_streamer.adapters.voipbin.wire import NIL_UUID

pytestmark = pytest.mark.realtime
__all__ = ["private_amqp_url"]  # the fixture, imported so this module's tests get a private vhost

MAX_TEXT_BYTES = 100
# Tiny audio per character: the table and the fuzz speak a lot of text and must not wait for it.
ENGINE = SyntheticEngine(seconds_per_char=0.002, speed=math.inf)
RIG_CONFIG: dict[str, Any] = {
    "max_text_bytes": MAX_TEXT_BYTES,
    "delete_forward_timeout": 0.2,
    # These tests check that every request is answered exactly once, whatever the machine's load: give
    # requests time (a busy pod otherwise lets the broker expire them unanswered, by design; the
    # deadlines have tests of their own in test_command_plane_flow.py and the reliability suite).
    "request_timeout": 30.0,
    "per_pod_message_ttl_ms": 29_000,
}
MISSING = object()


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_rabbitmq()


def envelope(uri: Any, method: Any = "POST", data: Any = MISSING, **extra: Any) -> bytes:
    body: dict[str, Any] = {"uri": uri, "method": method, "publisher": "test"}
    if data is not MISSING:
        body["data_type"] = "application/json"
        body["data"] = data
    body.update(extra)
    return json.dumps(body).encode()


def by_streaming(sid: str) -> Callable[[Event], bool]:
    return lambda e: (e.data or {}).get("streaming_id", (e.data or {}).get("id")) == sid


async def create(rig: Rig) -> str:
    body = {"customer_id": str(uuid.uuid4()), "reference_type": "call", "reference_id": str(uuid.uuid4())}
    response = await rig.caller.call(rig.pod_queue(), "/v1/streamings", "POST", body)
    assert response is not None and response.status_code == 200, response
    sid: str = response.data["id"]
    return sid


async def delete(rig: Rig, sid: str) -> None:
    response = await rig.caller.call(SHARED_QUEUE, f"/v1/streamings/{sid}", "DELETE")
    assert response is not None and response.status_code == 200, response
    await rig.caller.wait_event(EventType.STREAMING_DELETED, by_streaming(sid))


async def poll_until(predicate: Callable[[], bool], interval: float = 0.01) -> None:
    """For daemon state with no event to wait on (lanes, counters); callers bound it."""
    while True:
        if predicate():
            return
        await trio.sleep(interval)


async def wait_idle(rig: Rig) -> None:
    """Until every lane has run dry and no streaming or session is left."""
    daemon = rig.daemon
    with trio.fail_after(5):
        await poll_until(
            lambda: not (daemon.plane._lanes or daemon.streamings.streamings or len(daemon.supervisor))
        )


async def full_conversation(rig: Rig) -> None:
    """A normal create, say and delete, with its events: the daemon still serves."""
    sid = await create(rig)
    message_id = str(uuid.uuid4())
    assert (await rig.streaming(sid, "say_init", {"message_id": message_id})).status_code == 200
    added = await rig.streaming(sid, "say_add", {"message_id": message_id, "text": "Still here."})
    assert (added.status_code, added.data_type) == (200, "")
    assert (await rig.streaming(sid, "say_finish", {"message_id": message_id})).status_code == 200
    played = await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(sid))
    assert played.data["id"] == message_id and played.data["message_finish"] is True
    await delete(rig, sid)


# ------------------------------------------------------------------------------------ the table


@attrs.frozen
class Expect:
    status: int
    data_type: str = "voipbin_error"
    reason: str | None = None  # the typed error's reason
    message: str | None = None  # a piece of the typed error's message
    logged: str | None = None  # a piece of what the daemon logged about it (plain errors say no more)

    def check(self, name: str, response: Response | None, logs: Callable[[], str] | None = None) -> None:
        assert response is not None, f"{name}: no reply"
        got = (response.status_code, response.data_type)
        assert got == (self.status, self.data_type), f"{name}: {response}"
        if self.data_type == "voipbin_error":
            assert response.data["domain"] == "tts-manager", f"{name}: {response}"
            if self.reason is not None:
                assert response.data["reason"] == self.reason, f"{name}: {response}"
            if self.message is not None:
                assert self.message in response.data["message"], f"{name}: {response}"
        elif self.data_type == "":
            assert response.data is None, f"{name}: {response}"
        if self.logged is not None and logs is not None:
            assert self.logged in logs(), f"{name}: {self.logged!r} not logged"


def bad_envelope(message: str) -> Expect:
    return Expect(400, reason="BAD_ENVELOPE", message=message)


def bad_body(message: str) -> Expect:
    """Undecodable streaming bodies: Go's plain 500 (a typed body would win over the code at the Go
    client); why is logged."""
    return Expect(500, "", logged=message)


PLAIN_404 = Expect(404, "")
PLAIN_500 = Expect(500, "")
NOT_FOUND = Expect(404, reason="STREAMING_NOT_FOUND")
MISMATCH = Expect(500, "", logged="message ID mismatch")
OK_EMPTY = Expect(200, "")
OK_JSON = Expect(200, "application/json")


def table(sid: str, message_id: str) -> list[tuple[str, bytes, Expect]]:
    """(name, raw request, expected reply) against a live streaming ``sid`` whose message is current."""
    base = f"/v1/streamings/{sid}"
    unknown = str(uuid.uuid4())
    add = f"{base}/say_add"
    good_add = {"message_id": message_id, "text": "ok"}
    return [
        # -- the envelope itself --
        ("not JSON", b"hello", bad_envelope("invalid JSON")),
        ("empty body", b"", bad_envelope("invalid JSON")),
        ("not UTF-8", b'{"uri":"/v1/streamings","method":"POST","x":"\xff"}', bad_envelope("UTF-8")),
        ("JSON array", b"[]", bad_envelope("expected a JSON object, got array")),
        ("JSON string", b'"/v1/streamings"', bad_envelope("expected a JSON object, got string")),
        ("JSON null", b"null", bad_envelope("request: data is missing")),
        ("NaN", b'{"uri":"/v1/streamings","method":"POST","data":NaN}', bad_envelope("NaN")),
        (
            "nested too deeply",
            b'{"uri":"x","method":"POST","data":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            bad_envelope("nested too deeply"),
        ),
        ("missing uri", json.dumps({"method": "POST"}).encode(), bad_envelope("missing uri")),
        ("empty uri", envelope(""), bad_envelope("missing uri")),
        ("missing method", json.dumps({"uri": add}).encode(), bad_envelope("missing method")),
        ("uri is a number", envelope(5), bad_envelope("request.uri: expected a string, got number")),
        ("method is a list", envelope(add, ["POST"]), bad_envelope("request.method: expected a string")),
        ("publisher is a number", envelope(add, publisher=7), bad_envelope("request.publisher")),
        # -- routes Go does not serve, or not like this --
        ("unknown route", envelope("/v1/ping", "GET"), PLAIN_404),
        ("list streamings", envelope("/v1/streamings", "GET"), PLAIN_404),
        ("wrong method", envelope(add, "GET"), PLAIN_404),
        ("PUT a streaming", envelope(base, "PUT"), PLAIN_404),
        ("lowercase method", envelope(add, "post", good_add), PLAIN_404),
        ("non-UUID id", envelope("/v1/streamings/not-a-uuid/say_add", data=good_add), PLAIN_404),
        ("uppercase UUID id", envelope(f"/v1/streamings/{sid.upper()}/say_add", data=good_add), PLAIN_404),
        ("trailing slash", envelope(add + "/", data=good_add), PLAIN_404),
        ("query string", envelope(add + "?x=1", data=good_add), PLAIN_404),
        ("unknown action", envelope(f"{base}/say_louder", data=good_add), PLAIN_404),
        # Go's regexes are unanchored at the start but the id is the 4th segment: here "streamings".
        ("prefixed path", envelope(f"/x{add}", data=good_add), NOT_FOUND),
        # -- bodies --
        (
            "say_add data as a JSON string",
            envelope(add, data=json.dumps(good_add)),
            bad_body("say_add: expected a JSON object, got string"),
        ),
        ("say_add data as an array", envelope(add, data=[good_add]), bad_body("got array")),
        ("say_add without body", envelope(add), bad_body("say_add: data is missing")),
        (
            "say_add non-UUID message_id",
            envelope(add, data={"message_id": "nope", "text": "x"}),
            bad_body("say_add.message_id: invalid UUID"),
        ),
        (
            "say_add empty message_id",
            envelope(add, data={"message_id": "", "text": "x"}),
            bad_body("invalid UUID"),
        ),
        (
            "say_add numeric message_id",
            envelope(add, data={"message_id": 42, "text": "x"}),
            bad_body("expected a UUID string, got number"),
        ),
        (
            "say_add text is a number",
            envelope(add, data={"message_id": message_id, "text": 5}),
            bad_body("say_add.text: expected a string, got number"),
        ),
        # 51 characters, 102 bytes: the limit is on UTF-8 bytes, as Go's len().
        (
            "say_add text over the limit",
            envelope(add, data={"message_id": message_id, "text": "é" * 51}),
            bad_body(f"text is 102 bytes, the limit is {MAX_TEXT_BYTES}"),
        ),
        (
            "say_add text at the limit",
            envelope(add, data={"message_id": message_id, "text": "a" * 100}),
            OK_EMPTY,
        ),
        # Go would pass an empty chunk to the vendor (ElevenLabs: end of input); refused here.
        (
            "say_add empty text",
            envelope(add, data={"message_id": message_id}),
            Expect(500, "", logged="(empty_text)"),
        ),
        ("say_add stale message_id", envelope(add, data={"message_id": unknown, "text": "x"}), MISMATCH),
        (
            "say_add uppercase message_id",
            envelope(add, data={"message_id": message_id.upper(), "text": "x"}),
            OK_EMPTY,
        ),  # gofrs parses any hex case in bodies
        (
            "say_add braced message_id",
            envelope(add, data={"message_id": f"{{{message_id}}}", "text": "x"}),
            OK_EMPTY,
        ),
        ("say_add without data_type", envelope(add, data=good_add, data_type=""), OK_EMPTY),
        ("say_add unknown fields", envelope(add, data={**good_add, "flush": True, "x": [1]}), OK_EMPTY),
        (
            "say_add unknown streaming",
            envelope(f"/v1/streamings/{unknown}/say_add", data=good_add),
            NOT_FOUND,
        ),
        ("say_init without body", envelope(f"{base}/say_init"), bad_body("say_init: data is missing")),
        (
            "say_init data as a JSON string",
            envelope(f"{base}/say_init", data=json.dumps({"message_id": unknown})),
            bad_body("expected a JSON object, got string"),
        ),
        (
            "say_init non-UUID message_id",
            envelope(f"{base}/say_init", data={"message_id": "m-1"}),
            bad_body("invalid UUID"),
        ),
        (
            "say_init unknown streaming",
            envelope(f"/v1/streamings/{unknown}/say_init", data={"message_id": unknown}),
            PLAIN_500,
        ),
        ("say_finish without body", envelope(f"{base}/say_finish"), bad_body("say_finish: data is missing")),
        (
            "say_finish stale message_id",
            envelope(f"{base}/say_finish", data={"message_id": unknown}),
            MISMATCH,
        ),
        (
            "say_finish unknown streaming",
            envelope(f"/v1/streamings/{unknown}/say_finish", data={"message_id": unknown}),
            NOT_FOUND,
        ),
        ("say_stop unknown streaming", envelope(f"/v1/streamings/{unknown}/say_stop"), PLAIN_500),
        ("say_flush unknown streaming", envelope(f"/v1/streamings/{unknown}/say_flush"), NOT_FOUND),
        ("GET unknown streaming", envelope(f"/v1/streamings/{unknown}", "GET"), NOT_FOUND),
        ("DELETE unknown streaming", envelope(f"/v1/streamings/{unknown}", "DELETE"), NOT_FOUND),
        (
            "create with data as an array",
            envelope("/v1/streamings", data=[]),
            bad_body("streaming_create: expected a JSON object, got array"),
        ),
        (
            "create with data as a JSON string",
            envelope("/v1/streamings", data="{}"),
            bad_body("expected a JSON object, got string"),
        ),
        (
            "create with a non-UUID customer_id",
            envelope("/v1/streamings", data={"customer_id": "c-1"}),
            bad_body("streaming_create.customer_id: invalid UUID"),
        ),
        (
            "create with a numeric language",
            envelope("/v1/streamings", data={"language": 1}),
            bad_body("streaming_create.language: expected a string, got number"),
        ),
        # -- still the same streaming and message after all that --
        ("GET the live streaming", envelope(base, "GET"), OK_JSON),
        ("say_add still accepted", envelope(add, data=good_add), OK_EMPTY),
    ]


async def test_malformed_requests_get_the_documented_replies_and_disturb_nothing(
    private_amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tts_streamer.supervisor.services.streamings")
    with trio.fail_after(40):
        async with open_rig(engine=ENGINE, **RIG_CONFIG) as rig:
            sid = await create(rig)
            message_id = str(uuid.uuid4())
            assert (await rig.streaming(sid, "say_init", {"message_id": message_id})).status_code == 200
            cases = table(sid, message_id)
            assert len({name for name, _, _ in cases}) == len(cases)
            for index, (name, body, expect) in enumerate(cases):
                # Alternate queues: every route is served on both.
                queue = rig.pod_queue() if index % 2 else SHARED_QUEUE
                expect.check(name, await rig.caller.send_raw(queue, body), lambda: caplog.text)
            live = await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{sid}", "GET")
            assert live is not None and live.data["message_id"] == message_id
            # Failed creates were never started, so they left no streaming_created behind.
            assert len(rig.caller.of(EventType.STREAMING_CREATED)) == 1
            assert rig.daemon.plane.stats.errors["internal"] == 0
            await delete(rig, sid)
            await full_conversation(rig)
            await wait_idle(rig)


async def test_a_request_without_reply_to_is_processed_but_not_answered(private_amqp_url: str) -> None:
    with trio.fail_after(20):
        async with open_rig(engine=ENGINE, **RIG_CONFIG) as rig:
            plane = rig.daemon.plane
            sid = await create(rig)
            message_id = str(uuid.uuid4())
            assert (await rig.streaming(sid, "say_init", {"message_id": message_id})).status_code == 200
            requests, replies = plane.stats.requests, plane.stats.replies
            assert await rig.caller.send_raw(rig.pod_queue(), b"not json", reply=False) is None
            stop = envelope(f"/v1/streamings/{sid}/say_stop")
            assert await rig.caller.send_raw(rig.pod_queue(), stop, reply=False) is None
            with trio.fail_after(3):
                await poll_until(lambda: plane.stats.requests >= requests + 2 and not plane._lanes)
            assert plane.stats.replies == replies and plane.stats.reply_failures == 0
            # ... and yet the say_stop took effect: the message is over.
            finished = await rig.caller.wait_event(EventType.MESSAGE_PLAY_FINISHED, by_streaming(sid))
            assert finished.data["id"] == message_id
            state = await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{sid}", "GET")
            assert state is not None and state.data["message_id"] == str(NIL_UUID)
            stale = await rig.streaming(sid, "say_add", {"message_id": message_id, "text": "late"})
            MISMATCH.check("say_add after the unanswered say_stop", stale)
            await delete(rig, sid)
            await wait_idle(rig)


# ------------------------------------------------------------------------------------ the fuzz run


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
ACTIONS = ["say_init", "say_add", "say_add", "say_stop", "say_finish", "say_flush"]

Example = tuple[bytes, bool, bool]  # raw request, sent with a reply_to, to the shared queue


@st.composite
def fuzz_requests(draw: st.DrawFn, live_ids: list[str], message_ids: list[str]) -> Example:
    """Random bytes, random JSON, and random envelopes on the streamings routes (live streamings and
    their message ids included). The shape is picked with weights from a true random source, so most
    requests reach a handler; hypothesis draws the values inside."""
    rnd = draw(st.randoms(use_true_random=True))

    def pick(*weighted: tuple[int, Callable[[], Any]]) -> Any:
        choice = rnd.choices([make for _, make in weighted], weights=[weight for weight, _ in weighted])[0]
        return choice()

    def some_uuid() -> str:
        return str(draw(st.uuids()))

    def streaming_id() -> str:
        return str(
            pick(
                (6, lambda: rnd.choice(live_ids)),
                (1, some_uuid),
                (1, lambda: some_uuid().upper()),
                (1, lambda: NIL_UUID),
                (1, lambda: draw(st.text(max_size=40))),
            )
        )

    def message_id() -> Any:
        return pick(
            (5, lambda: rnd.choice(message_ids)),
            (1, some_uuid),
            (1, lambda: rnd.choice(message_ids).upper()),
            (1, lambda: draw(JSON_SCALARS)),
        )

    def say_body() -> Any:
        body: dict[str, Any] = {}
        if rnd.random() < 0.9:
            body["message_id"] = message_id()
        if rnd.random() < 0.7:
            body["text"] = pick(
                (6, lambda: draw(st.text(max_size=40))),
                (1, lambda: "x" * (MAX_TEXT_BYTES + 1)),
                (1, lambda: draw(JSON_SCALARS)),
            )
        if rnd.random() < 0.1:
            body[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        return pick((8, lambda: body), (1, lambda: json.dumps(body)), (1, lambda: draw(JSON_VALUES)))

    def say() -> dict[str, Any]:
        prefix = pick((8, lambda: ""), (1, lambda: "/x"), (1, lambda: draw(st.text(max_size=8))))
        action = pick((8, lambda: rnd.choice(ACTIONS)), (1, lambda: draw(st.text(max_size=10))))
        envelope: dict[str, Any] = {
            "uri": f"{prefix}/v1/streamings/{streaming_id()}/{action}",
            "method": pick((8, lambda: "POST"), (1, lambda: "GET"), (1, lambda: "post")),
        }
        if rnd.random() < 0.9:
            envelope["data"] = say_body()
        if rnd.random() < 0.5:
            envelope["data_type"] = rnd.choice(["application/json", ""])
        if rnd.random() < 0.2:
            envelope["publisher"] = draw(JSON_SCALARS)
        return envelope

    def whole() -> dict[str, Any]:
        # DELETE/GET on ids this pod does not own (the live ones are deleted by the test, at the end).
        ident = pick(
            (3, some_uuid), (1, lambda: some_uuid().upper()), (1, lambda: draw(st.text(max_size=40)))
        )
        return {"uri": f"/v1/streamings/{ident}", "method": rnd.choice(["DELETE", "GET", "PUT"])}

    def create() -> dict[str, Any]:
        data = {
            key: pick((3, make), (1, lambda: draw(JSON_SCALARS)))
            for key, make in [
                ("customer_id", some_uuid),
                ("reference_type", lambda: rnd.choice(["call", "confbridge"])),
                ("reference_id", some_uuid),
                ("language", lambda: draw(st.text(max_size=8))),
                ("direction", lambda: rnd.choice(["in", "out", "both"])),
            ]
            if rnd.random() < 0.6
        }
        return {
            "uri": pick((8, lambda: "/v1/streamings"), (1, lambda: "/v1/streamings?x=1")),
            "method": "POST",
            "data": pick((6, lambda: data), (1, lambda: draw(JSON_VALUES))),
        }

    def anything() -> dict[str, Any]:
        keys = ["uri", "method", "data", "data_type", "publisher", "request_id"]
        return {key: draw(JSON_VALUES) for key in keys if rnd.random() < 0.5}

    body: bytes = pick(
        (60, lambda: json.dumps(say()).encode()),
        (8, lambda: json.dumps(whole()).encode()),
        (8, lambda: json.dumps(create()).encode()),
        (8, lambda: json.dumps(anything()).encode()),
        (8, lambda: json.dumps(draw(JSON_VALUES)).encode()),
        (8, lambda: draw(st.binary(max_size=64))),
    )
    return body, rnd.random() < 0.9, rnd.random() < 0.5


def draw(strategy: st.SearchStrategy[Example], count: int) -> list[Example]:
    """``count`` examples of ``strategy`` (collected synchronously; they are sent afterwards).

    Drawn as lists of distinct bodies: hypothesis' per-example overhead dominates otherwise, and plain
    lists repeat their elements a lot.
    """
    batch = 20
    drawn: list[Example] = []

    @settings(
        max_examples=-(-count // batch),
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(strategy, min_size=batch, max_size=batch, unique_by=lambda example: example[0]))
    def collect(examples: list[Example]) -> None:
        drawn.extend(examples)

    collect()
    return drawn[:count]


@attrs.define
class BurstClient:
    """One channel, one reply queue, no confirms: publishes as fast as the broker takes it."""

    channel: Any
    reply_queue: str
    replies: collections.Counter[str] = attrs.field(factory=collections.Counter)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def on_reply(self, message: AbstractIncomingMessage) -> None:
        self.replies[message.correlation_id or "?"] += 1
        self.changed.set()
        self.changed = trio.Event()

    async def send(self, queue: str, body: bytes, correlation_id: str, *, reply: bool) -> None:
        message = aio_pika.Message(
            body,
            content_type="text/plain",
            correlation_id=correlation_id,
            reply_to=self.reply_queue if reply else None,
        )
        await trio_asyncio.aio_as_trio(self.channel.default_exchange.publish)(message, routing_key=queue)

    async def send_examples(
        self, examples: list[Example], pod_queue: str, in_flight: int
    ) -> dict[str, bytes]:
        """Publish every example (to the shared or the pod queue), with at most ``in_flight`` unanswered;
        returns the bodies that asked for a reply, by correlation id."""
        sent: dict[str, bytes] = {}
        for index, (body, reply, shared) in enumerate(examples):
            correlation_id = str(index)
            if reply:
                sent[correlation_id] = body
                while len(sent) - sum(self.replies.values()) > in_flight:
                    await self.changed.wait()
            await self.send(SHARED_QUEUE if shared else pod_queue, body, correlation_id, reply=reply)
        return sent

    async def wait_replies(self, count: int) -> None:
        while sum(self.replies.values()) < count:
            await self.changed.wait()


@asynccontextmanager
async def open_burst_client(connection: AbstractRobustConnection) -> AsyncIterator[BurstClient]:
    aio = trio_asyncio.aio_as_trio
    channel = await aio(connection.channel)(publisher_confirms=False)
    try:
        queue = await aio(channel.declare_queue)(exclusive=True, auto_delete=True)
        client = BurstClient(channel, queue.name)

        async def on_reply(message: AbstractIncomingMessage) -> None:
            client.on_reply(message)

        await aio(queue.consume)(on_reply, no_ack=True)
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await aio(channel.close)()


FUZZ_REQUESTS = 3000
IN_FLIGHT = 150  # bounded, so the pod is not outrun by more than the rig's request timeout


async def test_fuzz_thousands_of_random_envelopes(private_amqp_url: str) -> None:
    with trio.fail_after(60):
        async with open_rig(engine=ENGINE, **RIG_CONFIG) as rig:
            daemon = rig.daemon
            await trio.sleep(0.2)
            tasks_before = collections.Counter(task_names())
            live_ids = [await create(rig) for _ in range(2)]
            message_ids = [str(uuid.uuid4()) for _ in range(3)]
            for sid in live_ids:
                await rig.streaming(sid, "say_init", {"message_id": message_ids[0]})
            rig.call_manager.mode = "error500"  # random creates roll back instead of piling up calls
            examples = draw(fuzz_requests(live_ids, message_ids), FUZZ_REQUESTS)
            async with open_burst_client(rig.caller.connection) as client:
                sent = await client.send_examples(examples, rig.pod_queue(), IN_FLIGHT)
                with trio.fail_after(20):
                    await client.wait_replies(len(sent))
                await trio.sleep(0.5)  # room for a duplicate to show up
                replies = client.replies
            missing = [sent[c][:200] for c in sent if c not in replies]
            assert not missing, f"{len(missing)} requests were not answered, e.g. {missing[:3]}"
            assert not [c for c in replies if c not in sent], "a reply for a request sent without reply_to"
            twice = {c: n for c, n in replies.items() if n != 1}
            assert not twice, f"answered more than once: {[(sent[c][:200], n) for c, n in twice.items()][:3]}"
            assert daemon.plane.stats.errors["internal"] == 0, "a handler raised (a 500 by accident)"
            assert daemon.plane.stats.reply_failures == 0
            # Not vacuous: the fuzz reached the live sessions (new messages) and the create path.
            initiated = [
                e for e in rig.caller.of(EventType.MESSAGE_INITIATED) if e.data["streaming_id"] in live_ids
            ]
            assert len(initiated) > 10
            assert len(rig.caller.of(EventType.STREAMING_CREATED)) > 10 + len(live_ids)
            # Still serving, and nothing leaked: delete what the fuzz left alive, then count.
            rig.call_manager.mode = "ok"
            for sid in live_ids:
                if daemon.streamings.owns(uuid.UUID(sid)):
                    await delete(rig, sid)
            await full_conversation(rig)
            await wait_idle(rig)
            # Events leave in order: with the last streaming_deleted in, every earlier one is in too.
            created = collections.Counter(e.data["id"] for e in rig.caller.of(EventType.STREAMING_CREATED))
            deleted = collections.Counter(e.data["id"] for e in rig.caller.of(EventType.STREAMING_DELETED))
            assert created == deleted and set(created.values()) == {1}, "streaming_deleted once per created"
            await trio.sleep(0.2)
            tasks_after = collections.Counter(task_names())
            assert tasks_after == tasks_before, (tasks_after - tasks_before, tasks_before - tasks_after)
            assert daemon.publisher.dropped == 0
            print(
                f"fuzz: {len(examples)} requests, {len(sent)} with reply_to, {len(initiated)} messages, "
                f"{dict(daemon.plane.stats.errors)}"
            )
