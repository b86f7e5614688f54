"""Events a session emits. Later layers (AMQP, console, metrics) translate these; they never block."""

from __future__ import annotations

from typing import Literal, Protocol

import attrs


@attrs.frozen
class Initiated:
    call_id: str
    message_id: str


@attrs.frozen
class PlayStarted:
    """The first frame of the message went onto the wire."""

    call_id: str
    message_id: str


@attrs.frozen
class PlayFinished:
    """The message is over. ``completed``: it was finished and everything said for it played to its end
    (not cut by a flush, no vendor failure)."""

    call_id: str
    message_id: str
    text: str
    texts_added: int
    frames_sent: int
    flushes: int
    completed: bool = True
    spoken_by: tuple[str, ...] = ()  # the vendors that spoke the message, in order


@attrs.frozen
class VendorFirstAudio:
    """A vendor stream produced its first audio ``seconds`` after it was opened with text."""

    call_id: str
    vendor: str
    seconds: float


@attrs.frozen
class VoiceFallback:
    """A vendor failed inside an utterance and the next one took over (``to_vendor`` None: none left)."""

    call_id: str
    from_vendor: str
    to_vendor: str | None
    kind: str
    resumed_at: int  # index of the first sentence the next vendor speaks


@attrs.frozen
class Flushed:
    call_id: str
    message_id: str | None
    frames_dropped: int


@attrs.frozen
class SessionError:
    call_id: str
    reason: str
    kind: str


# Why a session ended: asked to (stopped: the console or a test; deleted: a DELETE; shutdown; demo), or
# not (hangup: Asterisk closed the leg; media_error: the socket failed; internal_error: a bug).
StopReason = Literal["stopped", "deleted", "shutdown", "demo", "hangup", "media_error", "internal_error"]


@attrs.frozen
class Stopped:
    """The session has ended; exactly one per session that started."""

    call_id: str
    reason: StopReason


SessionEvent = (
    Initiated
    | PlayStarted
    | PlayFinished
    | VendorFirstAudio
    | VoiceFallback
    | Flushed
    | SessionError
    | Stopped
)


class EventSink(Protocol):
    def emit(self, event: SessionEvent) -> None:
        """Take an event without blocking (the media path never waits on consumers)."""
        ...
