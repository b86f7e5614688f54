"""Every error reply, per route, as voipbin's callers see it (issue 15 §6).

The Go client (bin-common-handler) lets a typed error body (``data_type: "voipbin_error"``) win over
the status code, and api-manager answers the public request with the HTTP code of that body's
``status`` (``INVALID_ARGUMENT`` 400, ``NOT_FOUND`` 404, ``RESOURCE_EXHAUSTED`` 429, ``UNAVAILABLE``
503, anything unknown 500). A plain error (``data_type: ""``) is the status code itself. So where Go
answers a plain status we must answer exactly that plain status: a typed body with another ``status``
would change the public HTTP code, and even one with the same code would change the public error.

Each row: a request on a route (voipbin-wire.md §4.1), what the Go service answers there, and our
reply decoded with that rule. One daemon on the real broker serves the whole table.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import pytest
import trio

from tests.amqp_support import Rig, open_rig
from tests.amqp_vhost import private_amqp_url
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response, VoipbinError

__all__ = ["private_amqp_url"]

pytestmark = pytest.mark.realtime


@pytest.fixture(autouse=True)
def _broker() -> None:
    require_rabbitmq()


@attrs.frozen
class Seen:
    """What a Go caller (and through api-manager, the public API) sees of a reply."""

    kind: str  # ok | plain | typed
    http: int  # the code api-manager / call-manager acts on
    status: str = ""  # the typed error's status name

    @classmethod
    def of(cls, response: Response) -> Seen:
        """The Go client's decoding rule: a typed error body wins over ``status_code``."""
        if response.data_type == envelope.DATA_TYPE_ERROR:
            error = VoipbinError.from_response(response)
            assert error is not None, f"undecodable voipbin_error body: {response}"
            return cls("typed", error.status_code, error.status)
        if response.status_code >= 300:
            return cls("plain", response.status_code)
        return cls("ok", response.status_code)


def plain(code: int) -> Seen:
    return Seen("plain", code)


TYPED_404 = Seen("typed", 404, "NOT_FOUND")
OK = Seen("ok", 200)


@attrs.define
class Live:
    """A live streaming with a current message, and a live speaking, for the rows that need them."""

    sid: str
    message_id: str
    speaking: str


async def live_objects(rig: Rig) -> Live:
    body = {"customer_id": str(uuid.uuid4()), "reference_type": "call", "reference_id": str(uuid.uuid4())}
    created = await rig.request(SHARED_QUEUE, "/v1/streamings", "POST", {**body, "language": "en-US"})
    sid = created.data["id"]
    message_id = str(uuid.uuid4())
    assert (await rig.streaming(sid, "say_init", {"message_id": message_id})).status_code == 200
    speaking = await rig.request(SHARED_QUEUE, "/v1/speakings", "POST", {**body, "provider": rig.engine.name})
    assert speaking.status_code == 200, speaking
    return Live(sid, message_id, speaking.data["id"])


Row = tuple[str, str, str, str, Any, Seen]  # (name, queue kind, method, uri, data, what Go answers)


def rows(live: Live) -> list[Row]:
    unknown = str(uuid.uuid4())
    st, sp = f"/v1/streamings/{live.sid}", f"/v1/speakings/{live.speaking}"
    add = {"message_id": live.message_id, "text": "ok"}
    return [
        # ---- streamings: typed 404 where Go has it, else plain 500
        ("create: undecodable body", "shared", "POST", "/v1/streamings", [], plain(500)),
        ("create: bad customer_id", "shared", "POST", "/v1/streamings", {"customer_id": "x"}, plain(500)),
        ("delete: unknown", "shared", "DELETE", f"/v1/streamings/{unknown}", None, TYPED_404),
        (
            "say_init: unknown",
            "pod",
            "POST",
            f"/v1/streamings/{unknown}/say_init",
            {"message_id": unknown},
            plain(500),
        ),
        ("say_init: no body", "pod", "POST", f"{st}/say_init", None, plain(500)),
        ("say_init: bad message_id", "pod", "POST", f"{st}/say_init", {"message_id": 5}, plain(500)),
        ("say_add: unknown", "pod", "POST", f"/v1/streamings/{unknown}/say_add", add, TYPED_404),
        ("say_add: no body", "pod", "POST", f"{st}/say_add", None, plain(500)),
        (
            "say_add: stale message_id",
            "pod",
            "POST",
            f"{st}/say_add",
            {**add, "message_id": unknown},
            plain(500),
        ),
        (
            "say_add: text over the limit",
            "pod",
            "POST",
            f"{st}/say_add",
            {**add, "text": "x" * 6000},
            plain(500),
        ),
        (
            "say_add: empty text (session refuses)",
            "pod",
            "POST",
            f"{st}/say_add",
            {**add, "text": ""},
            plain(500),
        ),
        ("say_stop: unknown", "pod", "POST", f"/v1/streamings/{unknown}/say_stop", None, plain(500)),
        ("say_finish: unknown", "pod", "POST", f"/v1/streamings/{unknown}/say_finish", add, TYPED_404),
        ("say_finish: no body", "pod", "POST", f"{st}/say_finish", None, plain(500)),
        (
            "say_finish: stale message_id",
            "pod",
            "POST",
            f"{st}/say_finish",
            {"message_id": unknown},
            plain(500),
        ),
        ("say_add: fine", "pod", "POST", f"{st}/say_add", add, OK),
        ("no route: list streamings", "shared", "GET", "/v1/streamings", None, plain(404)),
        (
            "no route: uppercase id",
            "pod",
            "POST",
            f"/v1/streamings/{unknown.upper()}/say_add",
            add,
            plain(404),
        ),
        ("no route: ping", "pod", "GET", "/v1/ping", None, plain(404)),
        # ---- speakings (api-manager, public): Go's fixed plain codes
        ("speaking create: undecodable body", "shared", "POST", "/v1/speakings", [], plain(400)),
        ("speaking create: duplicate reference", "shared", "POST", "/v1/speakings", None, plain(500)),
        ("speaking list: bad URI", "shared", "GET", "/v1/speakings?page_size=1\x01", None, plain(400)),
        ("speaking get: unknown", "shared", "GET", f"/v1/speakings/{unknown}", None, plain(404)),
        ("speaking delete: unknown", "shared", "DELETE", f"/v1/speakings/{unknown}", None, plain(404)),
        ("speaking say: unknown", "pod", "POST", f"/v1/speakings/{unknown}/say", {"text": "hi"}, plain(404)),
        ("speaking say: undecodable body", "pod", "POST", f"{sp}/say", ["hi"], plain(400)),
        ("speaking say: over 5000 bytes", "pod", "POST", f"{sp}/say", {"text": "x" * 5001}, plain(404)),
        ("speaking flush: unknown", "pod", "POST", f"/v1/speakings/{unknown}/flush", None, plain(404)),
        ("speaking stop: unknown", "pod", "POST", f"/v1/speakings/{unknown}/stop", None, plain(404)),
        ("speaking say: fine", "pod", "POST", f"{sp}/say", {"text": "hi"}, OK),
        # ---- speeches (call-manager)
        ("speech: undecodable body", "shared", "POST", "/v1/speeches", [], plain(500)),
    ]


async def test_every_error_reply_is_what_the_go_service_answers_there(private_amqp_url: str) -> None:
    with trio.fail_after(60):
        async with open_rig() as rig:
            live = await live_objects(rig)
            table = rows(live)
            assert len({row[0] for row in table}) == len(table)
            wrong = []
            for name, queue, method, uri, data, go in table:
                if name == "speaking create: duplicate reference":
                    row = await rig.request(SHARED_QUEUE, f"/v1/speakings/{live.speaking}", "GET")
                    data = {k: row.data[k] for k in ("customer_id", "reference_type", "reference_id")}
                reply = await rig.request(
                    rig.pod_queue() if queue == "pod" else SHARED_QUEUE, uri, method, data
                )
                if Seen.of(reply) != go:
                    wrong.append(f"{name}: Go callers would see {Seen.of(reply)}, Go answers {go} ({reply})")
            assert not wrong, "\n".join(wrong)
            await rig.request(rig.pod_queue(), f"/v1/speakings/{live.speaking}/stop", "POST")
            await rig.request(SHARED_QUEUE, f"/v1/streamings/{live.sid}", "DELETE")


def test_the_rule_itself() -> None:
    """A typed body wins over the code (a typed INVALID_ARGUMENT sent with 500 is a public 400)."""
    sneaky = envelope.typed_error("INVALID_ARGUMENT", "X", "m", status_code=500)
    assert Seen.of(sneaky) == Seen("typed", 400, "INVALID_ARGUMENT")
    assert Seen.of(envelope.plain_error(500)) == plain(500)
    assert Seen.of(envelope.streaming_not_found()) == TYPED_404
    assert Seen.of(envelope.request_expired()) == Seen("typed", 503, "UNAVAILABLE")
