"""JSON and value codecs that reproduce Go's ``encoding/json`` + gofrs/uuid + ``time.Time`` behaviour.

Shared by the envelope and model modules. Decoding is strict where Go is strict (wrong JSON types,
bad UUIDs) and lenient where Go is lenient (``null`` means the zero value, unknown keys are ignored).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from typing import Any, Final

NIL_UUID: Final = uuid.UUID(int=0)

# Go's int is 64-bit on every platform voipbin runs on.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1


class WireError(ValueError):
    """Malformed wire input; ``reason`` is a short human-readable explanation for logs and replies."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TextTooLongError(WireError):
    """A text field over its configured byte limit (speakings map this to 404, not to the 400 of bad JSON)."""

    def __init__(self, field: str, size: int, limit: int) -> None:
        super().__init__(f"{field}: text is {size} bytes, the limit is {limit}")
        self.size = size
        self.limit = limit


def preview(value: object, limit: int = 40) -> str:
    """A bounded repr for error reasons, so hostile input cannot blow up log lines."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ------------------------------------------------------------------------------------------------ JSON

# Only present when the body escapes a surrogate; valid pairs are already joined by the decoder, so any
# surrogate left in a decoded string is a lone one, which Go turns into U+FFFD.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATES: Final = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    raise WireError(f"invalid JSON: {name} is not a JSON value")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"invalid JSON: number {preview(text)} is out of range")
    return value


def _scrub_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATES.sub("\ufffd", value)
    if isinstance(value, list):
        return [_scrub_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_scrub_surrogates(k): _scrub_surrogates(v) for k, v in value.items()}
    return value


def loads_json(body: bytes) -> Any:
    """Decode one JSON document the way Go accepts it; raise WireError otherwise.

    Go would silently replace invalid UTF-8 bytes, but every Go peer emits valid UTF-8, so an invalid
    body is something else talking to the queue and is rejected.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"invalid JSON: body is not UTF-8 (byte offset {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except WireError:
        raise
    except json.JSONDecodeError as exc:
        raise WireError(f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise WireError("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. integers past CPython's digit limit
        raise WireError(f"invalid JSON: {preview(str(exc), 80)}") from None
    if _SURROGATE_ESCAPE.search(text):
        value = _scrub_surrogates(value)
    return value


# Go escapes these even with SetEscapeHTML(false) for U+2028/2029; json.dumps(ensure_ascii=False) does not.
# Lone surrogates cannot be UTF-8 encoded; Go would have emitted U+FFFD for them.
_GO_ESCAPES: Final[dict[int, str]] = {
    ord("<"): "\\u003c",
    ord(">"): "\\u003e",
    ord("&"): "\\u0026",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    **{cp: "\ufffd" for cp in range(0xD800, 0xE000)},
}


def dumps_json(value: Any) -> bytes:
    """Compact JSON bytes as Go's ``json.Marshal`` writes them (key order = insertion order).

    Floats are written Python-style, which differs from Go for exponents; no model here has floats.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.translate(_GO_ESCAPES).encode("utf-8")


# ------------------------------------------------------------------------------------------------ UUID

_HEX32: Final = re.compile(r"[0-9a-fA-F]{32}")
_CANONICAL: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def uuid_from_text(text: str) -> uuid.UUID | None:
    """gofrs/uuid ``UnmarshalText``: canonical, 32-hex, ``{...}`` and ``urn:uuid:`` forms, any hex case."""
    core = text
    if core.startswith("urn:uuid:"):
        core = core[9:]
    elif len(core) >= 2 and core[0] == "{" and core[-1] == "}":
        core = core[1:-1]
    if _HEX32.fullmatch(core) or _CANONICAL.fullmatch(core):
        return uuid.UUID(core)
    return None


def uuid_from_string_or_nil(text: str) -> uuid.UUID:
    """gofrs ``FromStringOrNil``, used by Go on URI segments."""
    return uuid_from_text(text) or NIL_UUID


# ------------------------------------------------------------------------------------------- timestamps

_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})"
)


def format_timestamp(value: dt.datetime) -> str:
    """RFC 3339 in UTC like Go's ``time.RFC3339Nano``: fraction without trailing zeros, none if whole."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("wire timestamps must be timezone-aware")
    t = value.astimezone(dt.UTC)
    fraction = f"{t.microsecond:06d}".rstrip("0")
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        + (f".{fraction}" if fraction else "")
        + "Z"
    )


def parse_timestamp(text: str) -> dt.datetime:
    """Parse RFC 3339 (as Go's ``time.Time`` JSON decoding accepts it) to an aware UTC datetime.

    Nanosecond digits beyond microseconds are truncated: Python cannot hold them and MySQL stores µs.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise WireError(f"invalid RFC 3339 timestamp {preview(text)}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        if zone == "Z":
            tz = dt.UTC
        else:
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            sign = -1 if zone[0] == "-" else 1
            tz = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
        value = dt.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz
        )
        return value.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise WireError(f"invalid RFC 3339 timestamp {preview(text)}") from None


# ---------------------------------------------------------------------------------------- object reader


class Fields:
    """Typed reads from one decoded JSON object, Go-style: missing/null = zero value, wrong type = error.

    Keys match exactly; Go would also accept case-insensitive matches, which no voipbin peer relies on.
    """

    def __init__(self, data: object, what: str) -> None:
        if data is None:
            raise WireError(f"{what}: data is missing")
        if not isinstance(data, dict):
            raise WireError(f"{what}: expected a JSON object, got {json_type_name(data)}")
        self._data: dict[str, Any] = data
        self.what = what

    def _wrong(self, key: str, expected: str, value: object) -> WireError:
        return WireError(f"{self.what}.{key}: expected {expected}, got {json_type_name(value)}")

    def raw(self, key: str) -> Any:
        return self._data.get(key)

    def string(self, key: str) -> str:
        value = self._data.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def uuid(self, key: str) -> uuid.UUID:
        value = self._data.get(key)
        if value is None:
            return NIL_UUID
        if not isinstance(value, str):
            raise self._wrong(key, "a UUID string", value)
        parsed = uuid_from_text(value)
        if parsed is None:
            raise WireError(f"{self.what}.{key}: invalid UUID {preview(value)}")
        return parsed

    def integer(self, key: str) -> int:
        value = self._data.get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer", value)
        if not _INT_MIN <= value <= _INT_MAX:
            raise WireError(f"{self.what}.{key}: integer out of range")
        return value

    def boolean(self, key: str) -> bool:
        value = self._data.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self._wrong(key, "a boolean", value)
        return value

    def timestamp(self, key: str) -> dt.datetime | None:
        value = self._data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._wrong(key, "an RFC 3339 string", value)
        try:
            return parse_timestamp(value)
        except WireError as exc:
            raise WireError(f"{self.what}.{key}: {exc.reason}") from None

    def string_map(self, key: str) -> dict[str, str]:
        value = self._data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._wrong(key, "an object", value)
        for item_key, item in value.items():
            if not isinstance(item, str):
                raise WireError(
                    f"{self.what}.{key}[{preview(item_key)}]: expected a string, got {json_type_name(item)}"
                )
        return dict(value)
