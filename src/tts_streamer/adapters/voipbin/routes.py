"""Go tts-manager's route table (§4.1) as data, plus our two marked extensions.

Matching copies Go's dispatch: the regexes are unanchored at the start (``MatchString`` searches) and
anchored at the very end (Go's ``$`` is Python's ``\\Z``); UUIDs must be lowercase hex; the first route
whose regex and method both match wins. The id is the 4th ``/`` segment of the path, read with gofrs
``FromStringOrNil`` semantics, exactly like Go, so an odd prefix yields the nil UUID rather than the id
the regex saw.
"""

from __future__ import annotations

import enum
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Final

import attrs

from .wire import NIL_UUID, uuid_from_string_or_nil

METRIC_TYPE_NOT_FOUND: Final = "notfound"

_UUID: Final = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class RouteName(enum.Enum):
    SPEECH_CREATE = "speech_create"
    SPEAKING_CREATE = "speaking_create"
    SPEAKING_LIST = "speaking_list"
    SPEAKING_GET = "speaking_get"
    SPEAKING_DELETE = "speaking_delete"
    SPEAKING_SAY = "speaking_say"
    SPEAKING_FLUSH = "speaking_flush"
    SPEAKING_STOP = "speaking_stop"
    STREAMING_CREATE = "streaming_create"
    STREAMING_DELETE = "streaming_delete"
    STREAMING_SAY_INIT = "streaming_say_init"
    STREAMING_SAY_ADD = "streaming_say_add"
    STREAMING_SAY_STOP = "streaming_say_stop"
    STREAMING_SAY_FINISH = "streaming_say_finish"
    # extensions (Go answers 404 to these)
    STREAMING_SAY_FLUSH = "streaming_say_flush"
    STREAMING_GET = "streaming_get"


class QueueKind(enum.Enum):
    """Where clients send a route (every route is served on both queues)."""

    SHARED = "shared"
    PER_POD = "per_pod"


@attrs.frozen
class Route:
    name: RouteName
    method: str
    pattern: re.Pattern[str]
    queue: QueueKind
    metric_type: str  # Go's ``type`` label of tts_manager_receive_request_process_time
    has_id: bool
    extension: bool = False


def _route(
    name: RouteName, method: str, regex: str, queue: QueueKind, metric: str, *, extension: bool = False
) -> Route:
    return Route(
        name=name,
        method=method,
        pattern=re.compile(regex.replace("<uuid>", _UUID).replace("$", r"\Z")),
        queue=queue,
        metric_type=metric,
        has_id="<uuid>" in regex,
        extension=extension,
    )


_S, _P = QueueKind.SHARED, QueueKind.PER_POD
_SP, _ST = "/speakings/<speaking-id>", "/streamings/<streaming-id>"

ROUTES: Final[tuple[Route, ...]] = (
    _route(RouteName.SPEECH_CREATE, "POST", "/v1/speeches", _S, "/speeches"),
    _route(RouteName.SPEAKING_CREATE, "POST", r"/v1/speakings(?:\?|$)", _S, "/speakings"),
    _route(RouteName.SPEAKING_LIST, "GET", r"/v1/speakings(?:\?|$)", _S, "/speakings"),
    _route(RouteName.SPEAKING_GET, "GET", "/v1/speakings/<uuid>$", _S, _SP),
    _route(RouteName.SPEAKING_DELETE, "DELETE", "/v1/speakings/<uuid>$", _S, _SP),
    _route(RouteName.SPEAKING_SAY, "POST", "/v1/speakings/<uuid>/say$", _P, _SP + "/say"),
    _route(RouteName.SPEAKING_FLUSH, "POST", "/v1/speakings/<uuid>/flush$", _P, _SP + "/flush"),
    _route(RouteName.SPEAKING_STOP, "POST", "/v1/speakings/<uuid>/stop$", _P, _SP + "/stop"),
    _route(RouteName.STREAMING_CREATE, "POST", "/v1/streamings$", _S, "/streamings"),
    _route(RouteName.STREAMING_DELETE, "DELETE", "/v1/streamings/<uuid>$", _S, _ST),
    _route(RouteName.STREAMING_SAY_INIT, "POST", "/v1/streamings/<uuid>/say_init$", _P, _ST + "/say_init"),
    _route(RouteName.STREAMING_SAY_ADD, "POST", "/v1/streamings/<uuid>/say_add$", _P, _ST + "/say_add"),
    _route(RouteName.STREAMING_SAY_STOP, "POST", "/v1/streamings/<uuid>/say_stop$", _P, _ST + "/say_stop"),
    _route(
        RouteName.STREAMING_SAY_FINISH, "POST", "/v1/streamings/<uuid>/say_finish$", _P, _ST + "/say_finish"
    ),
    # Extensions come last so they can never shadow a Go route.
    _route(
        RouteName.STREAMING_SAY_FLUSH,
        "POST",
        "/v1/streamings/<uuid>/say_flush$",
        _P,
        _ST + "/say_flush",
        extension=True,
    ),
    _route(RouteName.STREAMING_GET, "GET", "/v1/streamings/<uuid>$", _S, _ST, extension=True),
)


@attrs.frozen
class RouteMatch:
    route: Route
    id: uuid.UUID | None  # None for routes without an id; nil UUID when the 4th segment is no UUID
    query: Mapping[str, str]  # first value per key, like Go's ``url.Values.Get``
    # Set when Go's ``url.Parse`` would refuse the URI (speakings answer it with an error code).
    uri_error: str | None = None

    @property
    def name(self) -> RouteName:
        return self.route.name


_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")


def _uri_error(path: str, uri: str) -> str | None:
    if _CONTROL.search(uri):
        return "invalid control character in URL"
    if _BAD_ESCAPE.search(path):
        return "invalid URL escape in path"
    return None


def parse_query(raw: str) -> dict[str, str]:
    """Go's ``url.ParseQuery`` + ``Get``: ``&`` only, pairs with ``;`` or bad escapes dropped, first wins."""
    values: dict[str, str] = {}
    for part in raw.split("&"):
        if not part or ";" in part:
            continue
        key, _, value = part.partition("=")
        if _BAD_ESCAPE.search(key) or _BAD_ESCAPE.search(value):
            continue
        key = urllib.parse.unquote_plus(key, errors="replace")
        if key not in values:
            values[key] = urllib.parse.unquote_plus(value, errors="replace")
    return values


def match_route(method: str, uri: str) -> RouteMatch | None:
    """The route Go would dispatch ``method uri`` to, or None (caller replies plain 404)."""
    for route in ROUTES:
        if route.method == method and route.pattern.search(uri):
            break
    else:
        return None
    without_fragment = uri.partition("#")[0]
    path, _, raw_query = without_fragment.partition("?")
    ident: uuid.UUID | None = None
    if route.has_id:
        segments = path.split("/")
        ident = uuid_from_string_or_nil(segments[3]) if len(segments) > 3 else NIL_UUID
    return RouteMatch(
        route=route,
        id=ident,
        query=parse_query(raw_query),
        uri_error=_uri_error(path, uri),
    )
