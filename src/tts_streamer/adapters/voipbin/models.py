"""voipbin JSON bodies: tts-manager's replies/events, its request bodies, and call/flow-manager bodies.

Attribute order is Go's struct field order, because ``to_data`` walks the attrs fields in order; each
field carries its wire kind and Go's ``omitempty`` flag. UUIDs are never dropped by omitempty (Go's
``uuid.UUID`` is an array), so the nil UUID is always emitted. ``from_data`` ignores unknown keys and
raises WireError with a human reason for anything Go's decoder would refuse.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Self, cast

import attrs

from .wire import NIL_UUID, Fields, TextTooLongError, WireError, format_timestamp

SPEAKING_SAY_MAX_TEXT_BYTES: Final = 5000


class Kind(enum.Enum):
    STR = enum.auto()
    UUID = enum.auto()
    INT = enum.auto()
    BOOL = enum.auto()
    TIME = enum.auto()
    STR_MAP = enum.auto()


@attrs.frozen
class _Spec:
    kind: Kind
    omitempty: bool
    # Lenient fields fall back to their zero value on a type error: used for peers' replies where only a
    # couple of fields matter and the rest must not make us fail.
    lenient: bool


_WIRE: Final = "voipbin_wire"


def _aware(_instance: object, attribute: attrs.Attribute[Any], value: dt.datetime | None) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{attribute.name} must be a timezone-aware datetime")


def _str(*, omitempty: bool = False, lenient: bool = False) -> Any:
    return attrs.field(default="", metadata={_WIRE: _Spec(Kind.STR, omitempty, lenient)})


def _uuid(*, lenient: bool = False) -> Any:
    return attrs.field(default=NIL_UUID, metadata={_WIRE: _Spec(Kind.UUID, False, lenient)})


def _int(*, omitempty: bool = False, lenient: bool = False) -> Any:
    return attrs.field(default=0, metadata={_WIRE: _Spec(Kind.INT, omitempty, lenient)})


def _bool(*, omitempty: bool = False) -> Any:
    return attrs.field(default=False, metadata={_WIRE: _Spec(Kind.BOOL, omitempty, False)})


def _time() -> Any:
    return attrs.field(default=None, validator=_aware, metadata={_WIRE: _Spec(Kind.TIME, False, False)})


def _str_map() -> Any:
    return attrs.field(factory=dict, metadata={_WIRE: _Spec(Kind.STR_MAP, False, False)})


_DECODERS: Final[dict[Kind, Callable[[Fields, str], Any]]] = {
    Kind.STR: Fields.string,
    Kind.UUID: Fields.uuid,
    Kind.INT: Fields.integer,
    Kind.BOOL: Fields.boolean,
    Kind.TIME: Fields.timestamp,
    Kind.STR_MAP: Fields.string_map,
}


def _encode(kind: Kind, value: Any) -> Any:
    if kind is Kind.UUID:
        return str(value)
    if kind is Kind.TIME:
        return None if value is None else format_timestamp(value)
    if kind is Kind.STR_MAP:
        return dict(value)
    return value


class WireModel:
    """Generic ``to_data``/``from_data`` driven by the field specs of the attrs subclass."""

    WHAT: ClassVar[str] = "data"

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in attrs.fields(cast(Any, type(self))):
            spec: _Spec = field.metadata[_WIRE]
            value = getattr(self, field.name)
            if spec.omitempty and not value:
                continue
            out[field.name] = _encode(spec.kind, value)
        return out

    @classmethod
    def from_data(cls, data: object) -> Self:
        fields = Fields(data, cls.WHAT)
        values: dict[str, Any] = {}
        for field in attrs.fields(cast(Any, cls)):
            spec: _Spec = field.metadata[_WIRE]
            try:
                values[field.name] = _DECODERS[spec.kind](fields, field.name)
            except WireError:
                if not spec.lenient:
                    raise
        return cls(**values)


def _check_text(what: str, text: str, max_text_bytes: int | None) -> None:
    if max_text_bytes is None:
        return
    # Go's len(string) is bytes; surrogatepass keeps a hand-built str with lone surrogates countable.
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_text_bytes:
        raise TextTooLongError(f"{what}.text", size, max_text_bytes)


# ------------------------------------------------------------------------------ tts-manager replies


@attrs.frozen(kw_only=True)
class Streaming(WireModel):
    """Reply of the streaming routes and payload of ``streaming_*`` events."""

    WHAT: ClassVar[str] = "streaming"

    id: uuid.UUID = _uuid()
    customer_id: uuid.UUID = _uuid()
    pod_id: str = _str(omitempty=True)
    activeflow_id: uuid.UUID = _uuid()
    reference_type: str = _str(omitempty=True)
    reference_id: uuid.UUID = _uuid()
    language: str = _str(omitempty=True)
    gender: str = _str(omitempty=True)
    provider: str = _str(omitempty=True)
    voice_id: str = _str(omitempty=True)
    direction: str = _str(omitempty=True)
    message_id: uuid.UUID = _uuid()


@attrs.frozen(kw_only=True)
class Message(WireModel):
    """Payload of ``message_*`` events; ``message_initiated`` carries only the three ids."""

    WHAT: ClassVar[str] = "message"

    id: uuid.UUID = _uuid()
    customer_id: uuid.UUID = _uuid()
    streaming_id: uuid.UUID = _uuid()
    total_message: str = _str(omitempty=True)
    played_message: str = _str(omitempty=True)
    total_count: int = _int(omitempty=True)
    count: int = _int(omitempty=True)
    message_finish: bool = _bool(omitempty=True)


class SpeakingStatus(enum.StrEnum):
    INITIATING = "initiating"
    ACTIVE = "active"
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class Speaking(WireModel):
    """Reply of the speaking routes and payload of ``speaking_*`` events (no omitempty at all)."""

    WHAT: ClassVar[str] = "speaking"

    id: uuid.UUID = _uuid()
    customer_id: uuid.UUID = _uuid()
    reference_type: str = _str()
    reference_id: uuid.UUID = _uuid()
    language: str = _str()
    provider: str = _str()
    voice_id: str = _str()
    direction: str = _str()
    status: str = _str()
    pod_id: str = _str()
    tm_create: dt.datetime | None = _time()
    tm_update: dt.datetime | None = _time()
    tm_delete: dt.datetime | None = _time()


@attrs.frozen(kw_only=True)
class Speech(WireModel):
    """Reply of POST /v1/speeches (Go ``tts.TTS``; ``media_bucket_name`` is always empty, so omitted)."""

    WHAT: ClassVar[str] = "speech"

    provider: str = _str(omitempty=True)
    voice_id: str = _str(omitempty=True)
    text: str = _str(omitempty=True)
    language: str = _str(omitempty=True)
    media_filepath: str = _str(omitempty=True)


# ------------------------------------------------------------------------- tts-manager request bodies


@attrs.frozen(kw_only=True)
class StreamingCreate(WireModel):
    """POST /v1/streamings; every field optional and enums unchecked, as in Go."""

    WHAT: ClassVar[str] = "streaming_create"

    customer_id: uuid.UUID = _uuid()
    activeflow_id: uuid.UUID = _uuid()
    reference_type: str = _str(omitempty=True)
    reference_id: uuid.UUID = _uuid()
    language: str = _str(omitempty=True)
    gender: str = _str(omitempty=True)
    direction: str = _str(omitempty=True)


@attrs.frozen(kw_only=True)
class SayInit(WireModel):
    WHAT: ClassVar[str] = "say_init"

    message_id: uuid.UUID = _uuid()


@attrs.frozen(kw_only=True)
class SayAdd(WireModel):
    WHAT: ClassVar[str] = "say_add"

    message_id: uuid.UUID = _uuid()
    text: str = _str(omitempty=True)

    @classmethod
    def from_data(cls, data: object, *, max_text_bytes: int | None = None) -> Self:
        """Go has no limit here; ``max_text_bytes`` lets the service impose one (TextTooLongError)."""
        model = super().from_data(data)
        _check_text(cls.WHAT, model.text, max_text_bytes)
        return model


@attrs.frozen(kw_only=True)
class SayFinish(WireModel):
    WHAT: ClassVar[str] = "say_finish"

    message_id: uuid.UUID = _uuid()


@attrs.frozen(kw_only=True)
class SpeakingCreate(WireModel):
    """POST /v1/speakings (api-manager); ``reference_type`` is validated by api-manager, not here."""

    WHAT: ClassVar[str] = "speaking_create"

    customer_id: uuid.UUID = _uuid()
    reference_type: str = _str(omitempty=True)
    reference_id: uuid.UUID = _uuid()
    language: str = _str(omitempty=True)
    provider: str = _str(omitempty=True)
    voice_id: str = _str(omitempty=True)
    direction: str = _str(omitempty=True)


@attrs.frozen(kw_only=True)
class SpeakingSay(WireModel):
    WHAT: ClassVar[str] = "speaking_say"

    text: str = _str(omitempty=True)

    @classmethod
    def from_data(cls, data: object, *, max_text_bytes: int | None = SPEAKING_SAY_MAX_TEXT_BYTES) -> Self:
        """Go rejects text over 5000 bytes (TextTooLongError: the route answers 404, not 400)."""
        model = super().from_data(data)
        _check_text(cls.WHAT, model.text, max_text_bytes)
        return model


@attrs.frozen(kw_only=True)
class SpeechCreate(WireModel):
    WHAT: ClassVar[str] = "speech_create"

    call_id: uuid.UUID = _uuid()
    text: str = _str()
    language: str = _str()
    provider: str = _str(omitempty=True)
    voice_id: str = _str(omitempty=True)

    @classmethod
    def from_data(cls, data: object, *, max_text_bytes: int | None = None) -> Self:
        model = super().from_data(data)
        _check_text(cls.WHAT, model.text, max_text_bytes)
        return model


# -------------------------------------------------------------------- call-manager / flow-manager


EXTERNAL_HOST_INCOMING: Final = "INCOMING"
ENCAPSULATION_NONE: Final = "none"
TRANSPORT_WEBSOCKET: Final = "websocket"
CONNECTION_TYPE_SERVER: Final = "server"


def external_media_format(provider: str) -> str:
    """The chan_websocket format Go TM asks call-manager for, per provider (§6.1)."""
    return {"gcp": "ulaw", "aws": "slin"}.get(provider, "slin16")


@attrs.frozen(kw_only=True)
class ExternalMediaCreate(WireModel):
    """POST /v1/external-medias to call-manager (CM's request struct; every field omitempty).

    ``type`` is not in the reference; some monorepo revisions send it, so it exists but is omitted when
    empty.
    """

    WHAT: ClassVar[str] = "external_media_create"

    id: uuid.UUID = _uuid()
    type: str = _str(omitempty=True)
    reference_type: str = _str(omitempty=True)
    reference_id: uuid.UUID = _uuid()
    external_host: str = _str(omitempty=True)
    encapsulation: str = _str(omitempty=True)
    transport: str = _str(omitempty=True)
    transport_data: str = _str(omitempty=True)
    connection_type: str = _str(omitempty=True)
    format: str = _str(omitempty=True)
    direction_listen: str = _str(omitempty=True)
    direction_speak: str = _str(omitempty=True)


@attrs.frozen(kw_only=True)
class ExternalMedia(WireModel):
    """call-manager's ExternalMedia reply. Only ``id`` and ``media_uri`` are checked; the rest is read
    leniently (a wrong type gives the zero value) since tts-manager never uses it."""

    WHAT: ClassVar[str] = "external_media"

    id: uuid.UUID = _uuid()
    asterisk_id: str = _str(lenient=True)
    channel_id: str = _str(lenient=True)
    bridge_id: str = _str(omitempty=True, lenient=True)
    playback_id: str = _str(omitempty=True, lenient=True)
    reference_type: str = _str(lenient=True)
    reference_id: uuid.UUID = _uuid(lenient=True)
    status: str = _str(omitempty=True, lenient=True)
    local_ip: str = _str(lenient=True)
    local_port: int = _int(lenient=True)
    external_host: str = _str(lenient=True)
    encapsulation: str = _str(lenient=True)
    transport: str = _str(lenient=True)
    transport_data: str = _str(omitempty=True, lenient=True)
    media_uri: str = _str(omitempty=True)
    connection_type: str = _str(lenient=True)
    format: str = _str(lenient=True)
    direction_listen: str = _str(omitempty=True, lenient=True)
    direction_speak: str = _str(omitempty=True, lenient=True)


@attrs.frozen(kw_only=True)
class FlowVariables(WireModel):
    """flow-manager's reply to GET /v1/variables/<activeflow_id> (§6.4)."""

    WHAT: ClassVar[str] = "variables"

    id: uuid.UUID = _uuid()
    variables: Mapping[str, str] = _str_map()
