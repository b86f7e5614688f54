"""The pieces of the speaking service that are not routes: its state per live speaking, its settings
and counters, the stop-write retry loop, and the list route's query parsing
(supervisor/services/speakings.py)."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Final, Protocol

import attrs
import trio

from tts_streamer.adapters.speaking_schema import (
    ListFilter,
    SpeakingRows,
    StopResult,
    StoreError,
    column_lengths,
    now_utc,
)
from tts_streamer.adapters.voipbin import models
from tts_streamer.adapters.voipbin.envelope import Event, Response
from tts_streamer.adapters.voipbin.models import Speaking, SpeakingStatus
from tts_streamer.adapters.voipbin.wire import WireError, parse_timestamp, uuid_from_string_or_nil

log = logging.getLogger(__name__)

# The request's text fields, each bounded by its column of the Go table (varchar(N), charset utf8).
_CHECKED_COLUMNS: Final = ("reference_type", "language", "provider", "voice_id", "direction")
_LENGTHS: Final = column_lengths()

DEFAULT_PROVIDER: Final = "elevenlabs"
PAGE_SIZE_MAX: Final = 100
_LEGACY_TOKEN: Final = "%Y-%m-%d %H:%M:%S.%f"  # voipbin's pre-2026 timestamp text

ACTIVE: Final = SpeakingStatus.ACTIVE.value
INITIATING: Final = SpeakingStatus.INITIATING.value
STOPPED: Final = SpeakingStatus.STOPPED.value


class EventSink(Protocol):
    """Where voipbin events go (adapters/amqp/event_publisher.EventPublisher; a list in tests)."""

    def publish(self, event: Event) -> None: ...


class SpeakingStreams(Protocol):
    """What a speaking needs of the streaming service (supervisor/services/streamings.py; a fake in tests)."""

    async def start(
        self,
        request: models.StreamingCreate,
        *,
        streaming_id: uuid.UUID | None = None,
        provider: str = "",
        voice_id: str = "",
        engine: str | None = None,
        wire_message_id: uuid.UUID | None = None,
    ) -> Response: ...

    async def delete(self, streaming_id: uuid.UUID) -> Response | None: ...

    async def speak(self, streaming_id: uuid.UUID, text: str) -> None: ...

    async def barge_in(self, streaming_id: uuid.UUID) -> None: ...


@attrs.frozen
class StopRetry:
    """How long the row of an ended speaking is retried while the database fails. The default outlasts
    a MariaDB failover or restart by far (seconds to a few minutes); the backoff keeps a long outage
    to one attempt per ``cap`` seconds per speaking."""

    first: float = 0.25
    cap: float = 10.0
    give_up_after: float = 900.0  # SPEAKING_STOP_RETRY_TIMEOUT
    # The stop route answers 500 if the row is not written this long after the request came (the
    # stream's teardown included: callers wait 3 s).
    reply_within: float = 2.0


@attrs.define(eq=False)
class LiveSpeaking:
    """A speaking whose stream this pod holds (from its create until its row is stopped)."""

    speaking_id: uuid.UUID
    creating: bool = True  # the create route has not finished yet
    active: bool = False  # speaking_started has been published
    ended: bool = False  # the stream is gone
    end_reason: str = ""
    stopping: bool = False  # a stop (route or vendor failure) is ending it
    deferred_stop: Speaking | None = None  # stopped before create announced it: create publishes it
    ended_at: dt.datetime | None = None  # when the audio ended: the tm_update the row gets
    written: trio.Event | None = None  # set once the row's stop is written (or given up)
    result: StopResult | None = None  # the write's outcome (None: given up)


@attrs.define
class SpeakingStats:
    created: int = 0
    refused_duplicate: int = 0
    create_failed: int = 0
    started_events: int = 0
    stopped_events: int = 0
    stop_write_failures: int = 0  # failed attempts at writing a stopped row (each retried)
    stops_abandoned: int = 0  # rows whose stop could not be written within the retry bound


def parse_page_token(token: str) -> dt.datetime:
    """A page token is a ``tm_create`` (``YYYY-MM-DDTHH:MM:SS.ffffffZ``, or voipbin's older text form)."""
    try:
        return parse_timestamp(token)
    except WireError:
        pass
    try:
        return dt.datetime.strptime(token, _LEGACY_TOKEN).replace(tzinfo=dt.UTC)
    except ValueError:
        raise WireError(f"invalid page_token {token[:40]!r}") from None


def page_size(raw: str | None) -> int:
    """Go: an unparsable size is ignored (100); 0 or over 100 becomes 100."""
    size = int(raw) if raw and raw.isascii() and raw.isdigit() else PAGE_SIZE_MAX
    return PAGE_SIZE_MAX if size == 0 or size > PAGE_SIZE_MAX else size


def list_filter(query: Mapping[str, str]) -> ListFilter:
    """The list route's query (Go's rules, docs/speakings.md); raises WireError for a bad page token."""
    token = query.get("page_token", "")
    before = parse_page_token(token) if token else now_utc()
    customer_id, reference_id = query.get("customer_id"), query.get("reference_id")
    return ListFilter(
        before=before,
        limit=page_size(query.get("page_size")),
        # Go: FromStringOrNil, so a malformed id filters on the nil UUID.
        customer_id=uuid_from_string_or_nil(customer_id) if customer_id else None,
        reference_type=query.get("reference_type") or None,
        reference_id=uuid_from_string_or_nil(reference_id) if reference_id else None,
        status=query.get("status") or None,
    )


@attrs.frozen
class StopWritten:
    result: StopResult
    # The write had to be retried: a earlier attempt may have committed without its answer arriving.
    retried: bool


async def write_stop_with_retries(
    store: SpeakingRows,
    speaking_id: uuid.UUID,
    ended_at: dt.datetime,
    retry: StopRetry,
    *,
    on_failure: Callable[[StoreError], None],
) -> StopWritten | None:
    """``store.stop`` until it answers, with exponential backoff, for at most ``retry.give_up_after``
    seconds; None when it never did."""
    give_up = trio.current_time() + retry.give_up_after
    delay = retry.first
    retried = False
    while True:
        try:
            return StopWritten(await store.stop(speaking_id, ended_at), retried)
        except StoreError as exc:
            on_failure(exc)
            if not retried:
                log.error("speaking=%s stop: store failed, retrying: %s", speaking_id, exc)
            retried = True
            if trio.current_time() + delay > give_up:
                log.error(
                    "speaking=%s stop not written after %.0f s (%s); its row stays live",
                    speaking_id,
                    retry.give_up_after,
                    exc,
                )
                return None
            await trio.sleep(delay)
            delay = min(delay * 2, retry.cap)


def stopped_at(row: Speaking | None, ended_at: dt.datetime) -> bool:
    """The row is stopped with exactly this end time (microseconds): written by the caller that has it."""
    return row is not None and row.status == SpeakingStatus.STOPPED.value and row.tm_update == ended_at


def check_columns(request: models.SpeakingCreate) -> None:
    """Refuse (WireError: 400, Go's answer to a bad request body) a field its column cannot hold, the
    same on every store: longer than its ``varchar(N)`` in characters, or a character outside the
    Basic Multilingual Plane, which MySQL's ``utf8`` (3 bytes at most) rejects while SQLite stores it."""
    for name in _CHECKED_COLUMNS:
        value: str = getattr(request, name)
        limit = _LENGTHS[name]
        if len(value) > limit:
            raise WireError(f"speaking_create: {name} is {len(value)} characters, over its {limit}")
        if any(ord(char) > 0xFFFF for char in value):
            raise WireError(f"speaking_create: {name} has a character the table's utf8 cannot store")


def local_store_warning(is_sqlite: bool, env: Mapping[str, str]) -> str:
    """Why a local SQLite store is wrong here ("" when it is not): in Kubernetes the shared request
    queue is normally served by several replicas, and each would keep its own speakings, so GET, list
    and DELETE (and api-manager's say/flush/stop, which start with a GET) miss on the other pods."""
    if not is_sqlite or not env.get("KUBERNETES_SERVICE_HOST"):
        return ""
    return (
        "speakings are kept in a local SQLite file while other pods may serve the same shared queue: "
        "set DATABASE_DSN to the shared MariaDB (the Go service's tts_manager_speaking)"
    )
