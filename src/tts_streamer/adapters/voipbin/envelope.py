"""voipbin AMQP envelopes (bin-common-handler ``sock.Request``/``Response``/``Event``) and error replies.

``data`` is embedded JSON and is kept here as the decoded Python value (``None`` = absent); the models
module turns it into typed bodies. Renderers reproduce Go's struct field order and omitempty rules.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs

from .wire import Fields, WireError, dumps_json, loads_json

__all__ = [
    "DATA_TYPE_ERROR",
    "DATA_TYPE_JSON",
    "PUBLISHER",
    "Event",
    "EventType",
    "Request",
    "Response",
    "VoipbinError",
    "WireError",
    "error_status_code",
    "make_event",
    "make_request",
    "ok",
    "parse_event",
    "parse_request",
    "parse_response",
    "plain_error",
    "render_event",
    "render_request",
    "render_response",
    "request_expired",
    "streaming_not_found",
    "typed_error",
]

DATA_TYPE_JSON: Final = "application/json"
DATA_TYPE_ERROR: Final = "voipbin_error"
PUBLISHER: Final = "tts-manager"
ERROR_DOMAIN: Final = "tts-manager"


class EventType(enum.StrEnum):
    """Event ``type`` values of Go tts-manager (§5); the ``streaming_finished``/``play_*`` ones are unused."""

    STREAMING_CREATED = "streaming_created"
    STREAMING_DELETED = "streaming_deleted"
    MESSAGE_INITIATED = "message_initiated"
    MESSAGE_PLAY_STARTED = "message_play_started"
    MESSAGE_PLAY_FINISHED = "message_play_finished"
    SPEAKING_STARTED = "speaking_started"
    SPEAKING_STOPPED = "speaking_stopped"


@attrs.frozen
class Request:
    uri: str
    method: str
    publisher: str = ""
    data_type: str = ""
    data: Any = None  # decoded embedded JSON; None = absent (a JSON null is folded into absent)
    request_id: str = ""


@attrs.frozen
class Response:
    status_code: int
    data_type: str = ""
    data: Any = None

    @property
    def is_error(self) -> bool:
        # The shared Go client treats anything above 299 as a failure and never reads its data.
        return self.status_code >= 300


@attrs.frozen
class Event:
    type: str
    publisher: str = PUBLISHER
    data_type: str = DATA_TYPE_JSON
    data: Any = None


# ------------------------------------------------------------------------------------------- parsing


def parse_request(body: bytes) -> Request:
    """Decode a request envelope; WireError for malformed JSON, wrong field types or no uri/method."""
    fields = Fields(loads_json(body), "request")
    uri = fields.string("uri")
    method = fields.string("method")
    if not uri:
        raise WireError("request: missing uri")
    if not method:
        raise WireError("request: missing method")
    return Request(
        uri=uri,
        method=method,
        publisher=fields.string("publisher"),
        data_type=fields.string("data_type"),
        data=fields.raw("data"),
        request_id=fields.string("request_id"),
    )


def parse_response(body: bytes) -> Response:
    """Decode a reply envelope (our clients of call-manager/flow-manager, and test clients)."""
    fields = Fields(loads_json(body), "response")
    if fields.raw("status_code") is None:
        # Go would read a missing code as 0, i.e. success; no real server omits it, so refuse to guess.
        raise WireError("response: missing status_code")
    return Response(
        status_code=fields.integer("status_code"),
        data_type=fields.string("data_type"),
        data=fields.raw("data"),
    )


def parse_event(body: bytes) -> Event:
    """Decode an event envelope (test consumers of the event exchange)."""
    fields = Fields(loads_json(body), "event")
    event_type = fields.string("type")
    if not event_type:
        raise WireError("event: missing type")
    return Event(
        type=event_type,
        publisher=fields.string("publisher"),
        data_type=fields.string("data_type"),
        data=fields.raw("data"),
    )


# ----------------------------------------------------------------------------------------- rendering


def render_request(request: Request) -> bytes:
    out: dict[str, Any] = {
        "uri": request.uri,
        "method": request.method,
        "publisher": request.publisher,
        "data_type": request.data_type,
    }
    if request.data is not None:
        out["data"] = request.data
    if request.request_id:
        out["request_id"] = request.request_id
    return dumps_json(out)


def render_response(response: Response) -> bytes:
    out: dict[str, Any] = {"status_code": response.status_code, "data_type": response.data_type}
    if response.data is not None:
        out["data"] = response.data
    return dumps_json(out)


def render_event(event: Event) -> bytes:
    out: dict[str, Any] = {"type": event.type, "publisher": event.publisher, "data_type": event.data_type}
    if event.data is not None:
        out["data"] = event.data
    return dumps_json(out)


# ------------------------------------------------------------------------------------ reply builders


def ok(data: Any = None) -> Response:
    """200 with a JSON body, or the bare ``{"status_code":200,"data_type":""}`` when there is none."""
    if data is None:
        return Response(200, "")
    return Response(200, DATA_TYPE_JSON, data)


def plain_error(status_code: int) -> Response:
    """Go's ``simpleResponse``: ``{"status_code":N,"data_type":""}``."""
    return Response(status_code, "")


def make_request(uri: str, method: str, data: Any = None, *, publisher: str = PUBLISHER) -> Request:
    """A request as Go's client builds it: ``data_type`` is ``application/json`` only when data is sent."""
    return Request(uri, method, publisher, DATA_TYPE_JSON if data is not None else "", data)


def make_event(event_type: str, data: Any) -> Event:
    return Event(type=str(event_type), publisher=PUBLISHER, data_type=DATA_TYPE_JSON, data=data)


_STATUS_CODES: Final[dict[str, int]] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PAYMENT_REQUIRED": 402,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
}


def error_status_code(status: str) -> int:
    """HTTP-like code for a voipbin error status name; unknown names are 500."""
    return _STATUS_CODES.get(status, 500)


@attrs.frozen(kw_only=True)
class VoipbinError:
    """The ``voipbin_error`` body: ``status``, ``reason``, ``domain``, ``message``, optional ``details``."""

    status: str
    reason: str
    domain: str = ERROR_DOMAIN
    message: str = ""
    details: Any = None

    @property
    def status_code(self) -> int:
        return error_status_code(self.status)

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "reason": self.reason,
            "domain": self.domain,
            "message": self.message,
        }
        if self.details is not None:
            out["details"] = self.details
        return out

    @classmethod
    def from_data(cls, data: object) -> VoipbinError:
        fields = Fields(data, "voipbin_error")
        return cls(
            status=fields.string("status"),
            reason=fields.string("reason"),
            domain=fields.string("domain"),
            message=fields.string("message"),
            details=fields.raw("details"),
        )

    @classmethod
    def from_response(cls, response: Response) -> VoipbinError | None:
        """The typed error carried by a reply (e.g. call-manager's), so it can be relayed as is."""
        if response.data_type != DATA_TYPE_ERROR or response.data is None:
            return None
        try:
            return cls.from_data(response.data)
        except WireError:
            return None


def typed_error(
    status: str,
    reason: str,
    message: str,
    *,
    domain: str = ERROR_DOMAIN,
    details: Any = None,
    status_code: int | None = None,
) -> Response:
    """A ``voipbin_error`` reply; the code follows the status table unless a relayed code is given."""
    error = VoipbinError(status=status, reason=reason, domain=domain, message=message, details=details)
    code = error.status_code if status_code is None else status_code
    return Response(code, DATA_TYPE_ERROR, error.to_data())


def streaming_not_found() -> Response:
    """The typed 404 that say_add, say_finish and DELETE return for an unknown streaming."""
    return typed_error("NOT_FOUND", "STREAMING_NOT_FOUND", "The streaming was not found.")


def request_expired() -> Response:
    """A request not started because its caller can no longer be waiting (a typed 503: api-manager
    answers 503, "try again", to anyone who is still there)."""
    return typed_error(
        "UNAVAILABLE",
        "REQUEST_EXPIRED",
        "The request waited longer than its caller's timeout and was not started.",
    )
