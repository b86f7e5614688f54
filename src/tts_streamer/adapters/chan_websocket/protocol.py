"""Sans-IO chan_websocket control protocol: parse Asterisk's events, render our commands.

Both control forms are supported: the plain-text form (``NAME key:value ...`` or ``NAME rest-of-line``)
and the JSON form (``{"event": ...}`` / ``{"command": ...}``). MEDIA_START tells which one a call uses;
commands must be sent in that same form. Adding a command or event is one line in the tables below.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any

import attrs

ULAW_SILENCE = 0xFF
FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
PTIME_MS = 20
MAX_MESSAGE_PAYLOAD = 65527  # a masking client's largest unfragmented payload Asterisk accepts
MAX_CONTROL_BYTES = 128  # Asterisk drops longer text messages silently
XOFF_FRAMES = 900
XON_FRAMES = 800
DROP_FRAMES = 1000


class ProtocolError(ValueError):
    """A control message from the peer that cannot be understood."""


class ControlFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


# ---------------------------------------------------------------------------------------------- events


@attrs.frozen
class MediaStart:
    connection_id: str
    channel: str
    format: str
    optimal_frame_size: int
    ptime: int
    control_format: ControlFormat
    channel_id: str | None = None
    # Keys we do not model (e.g. ``passthrough``, ``unbuffered``, JSON ``channel_variables``) are kept.
    extra: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ControlEvent:
    """Any event other than MEDIA_START.

    ``name`` is the event word (``MEDIA_XOFF``, ``MEDIA_MARK_PROCESSED``...). ``argument`` is the
    plain-text rest of line or the JSON ``correlation_id`` for the events that carry an id;
    ``fields`` holds ``key:value`` pairs (plain text) or the JSON object's other keys.
    """

    name: str
    argument: str = ""
    fields: Mapping[str, Any] = attrs.field(factory=dict)


# Events whose plain-text argument is an id (rest of line) rather than key:value pairs.
_ID_EVENTS = frozenset({"MEDIA_MARK_PROCESSED", "MEDIA_BUFFERING_COMPLETED"})

Event = MediaStart | ControlEvent


def _split_fields(rest: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for token in rest.split():
        key, sep, value = token.partition(":")
        if sep:
            fields[key] = value
    return fields


def _int_field(fields: Mapping[str, Any], key: str, default: int) -> int:
    raw = fields.get(key, default)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ProtocolError(f"MEDIA_START field {key!r} is not an integer: {raw!r}") from None


def _media_start(fields: Mapping[str, Any], control_format: ControlFormat) -> MediaStart:
    known = {"connection_id", "channel", "channel_id", "format", "optimal_frame_size", "ptime", "event"}
    if "connection_id" not in fields:
        raise ProtocolError("MEDIA_START without connection_id")
    channel_id = fields.get("channel_id")
    return MediaStart(
        connection_id=str(fields["connection_id"]),
        channel=str(fields.get("channel", "")),
        channel_id=None if channel_id is None else str(channel_id),
        format=str(fields.get("format", "ulaw")),
        optimal_frame_size=_int_field(fields, "optimal_frame_size", FRAME_BYTES),
        ptime=_int_field(fields, "ptime", PTIME_MS),
        control_format=control_format,
        extra={k: v for k, v in fields.items() if k not in known},
    )


def parse_event(text: str) -> Event:
    """Parse one text message from Asterisk. Raises ProtocolError on garbage."""
    text = text.strip()
    if not text:
        raise ProtocolError("empty control message")
    if text.startswith("{"):
        return _parse_json_event(text)
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name == "MEDIA_START":
        return _media_start(_split_fields(rest), ControlFormat.TEXT)
    if name in _ID_EVENTS:
        return ControlEvent(name=name, argument=rest)
    if name == "ERROR":
        # error_text is free text and may contain spaces: keep everything after its key.
        head, sep, error_text = rest.partition("error_text:")
        fields: dict[str, str] = _split_fields(head)
        if sep:
            fields["error_text"] = error_text.strip()
        return ControlEvent(name=name, argument=fields.get("error_text", rest), fields=fields)
    return ControlEvent(name=name, argument=rest, fields=_split_fields(rest))


def _parse_json_event(text: str) -> Event:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"bad JSON control message: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise ProtocolError("JSON control message without an 'event' string")
    name = obj["event"]
    if name == "MEDIA_START":
        return _media_start(obj, ControlFormat.JSON)
    fields = {k: v for k, v in obj.items() if k != "event"}
    if name in _ID_EVENTS:
        argument = str(fields.get("correlation_id") or "")
    elif name == "ERROR":
        argument = str(fields.get("error_text", ""))
    else:
        argument = ""
    return ControlEvent(name=name, argument=argument, fields=fields)


# -------------------------------------------------------------------------------------------- commands


@attrs.frozen
class Command:
    name: str
    argument: str = ""


FLUSH_MEDIA = Command("FLUSH_MEDIA")
GET_STATUS = Command("GET_STATUS")
REPORT_QUEUE_DRAINED = Command("REPORT_QUEUE_DRAINED")
HANGUP = Command("HANGUP")
ANSWER = Command("ANSWER")
PAUSE_MEDIA = Command("PAUSE_MEDIA")
CONTINUE_MEDIA = Command("CONTINUE_MEDIA")
START_MEDIA_BUFFERING = Command("START_MEDIA_BUFFERING")


def mark_media(mark_id: str) -> Command:
    return Command("MARK_MEDIA", mark_id)


def stop_media_buffering(mark_id: str = "") -> Command:
    return Command("STOP_MEDIA_BUFFERING", mark_id)


# JSON key under which each command's argument travels.
_JSON_ARGUMENT_KEY = {
    "MARK_MEDIA": "correlation_id",
    "STOP_MEDIA_BUFFERING": "correlation_id",
    "SET_MEDIA_DIRECTION": "direction",
}


def render_command(command: Command, control_format: ControlFormat) -> str:
    """Render a command in the call's control form; refuses what Asterisk would silently drop."""
    if control_format is ControlFormat.JSON:
        obj: dict[str, str] = {"command": command.name}
        if command.argument:
            obj[_JSON_ARGUMENT_KEY.get(command.name, "argument")] = command.argument
        text = json.dumps(obj, separators=(",", ":"))
    else:
        text = f"{command.name} {command.argument}" if command.argument else command.name
    if len(text.encode()) > MAX_CONTROL_BYTES:
        raise ValueError(f"control message over {MAX_CONTROL_BYTES} bytes would be dropped: {text[:40]}...")
    return text


def parse_command(text: str, control_format: ControlFormat) -> Command:
    """Parse a command as Asterisk does (used by the simulator). Raises ProtocolError."""
    text = text.strip()
    if control_format is ControlFormat.JSON:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            raise ProtocolError("Unable to parse JSON command") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
            raise ProtocolError("Unable to parse JSON command")
        name = obj["command"]
        key = _JSON_ARGUMENT_KEY.get(name, "argument")
        return Command(name, str(obj.get(key) or ""))
    if text.startswith("{"):
        raise ProtocolError("Unable to parse JSON command")
    name, _, rest = text.partition(" ")
    return Command(name, rest.strip())


def render_event(event: Event) -> str:
    """Render an event the way Asterisk would (used by the simulator)."""
    if isinstance(event, MediaStart):
        fields: dict[str, Any] = {"connection_id": event.connection_id, "channel": event.channel}
        if event.channel_id is not None:
            fields["channel_id"] = event.channel_id
        fields |= {"format": event.format, "optimal_frame_size": event.optimal_frame_size}
        fields |= {"ptime": event.ptime, **event.extra}
        if event.control_format is ControlFormat.JSON:
            return json.dumps({"event": "MEDIA_START", **fields}, separators=(",", ":"))
        return "MEDIA_START " + " ".join(f"{k}:{v}" for k, v in fields.items())
    raise TypeError("render_control_event renders the other events")


def render_control_event(event: ControlEvent, control_format: ControlFormat) -> str:
    if control_format is ControlFormat.JSON:
        obj: dict[str, Any] = {"event": event.name, **event.fields}
        if event.name in _ID_EVENTS:
            obj["correlation_id"] = event.argument
        return json.dumps(obj, separators=(",", ":"))
    if event.name in _ID_EVENTS:
        return f"{event.name} {event.argument}".strip()
    pairs = " ".join(f"{k}:{v}" for k, v in event.fields.items())
    return f"{event.name} {pairs}".strip()
