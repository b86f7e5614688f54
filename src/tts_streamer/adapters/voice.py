"""The contract every voice engine (TTS vendor) adapter fulfils; actors see only this.

A stream speaks one utterance: text goes in with ``send_text`` (many times, spoken in order),
``end_input`` says no more text is coming, and ``audio()`` yields 8 kHz mu-law bytes in chunks of any
size as they are produced, ending once all input has been spoken. Leaving the ``open_stream`` context,
normally or by cancellation, must stop the vendor at once and release everything it holds (thread job,
connection, HTTP body, RPC) without blocking: that is what makes a flush instant.

A session is one call's lifetime on an engine: ``open_session(engine, voice)`` is entered when the call's
session starts (before its first say) and left when it ends, and its ``open_stream()`` speaks one
utterance. An engine that keeps state across a call's utterances (ElevenLabs: one WebSocket per call)
implements ``open_session`` itself and may run tasks in a nursery it owns for the session's lifetime;
entering it must not fail because the vendor is unreachable (the first utterance reports that), and
leaving it must be bounded even when cancelled. Every other engine gets ``StreamPerUtterance`` for free.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, runtime_checkable

import attrs


class VoiceError(Exception):
    """A vendor failed; ``kind`` is a short machine-readable label for metrics and events."""

    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


@attrs.frozen
class VoiceSpec:
    """Which voice to speak with. Empty fields mean the engine's default."""

    language: str = "en-US"
    voice_id: str = ""
    gender: str = ""
    speaking_rate: float = 1.0


@attrs.frozen
class VendorSwitch:
    """One fall-over inside an utterance (a stream reports them, ``ReportsSwitches``). ``resumed_at``:
    index of the first unit the next vendor speaks."""

    from_vendor: str
    to_vendor: str | None  # None: no vendor left, the utterance ends with an error
    kind: str
    reason: str
    resumed_at: int
    units: int
    had_audio: bool
    at: float


class VoiceStream(Protocol):
    async def send_text(self, text: str) -> None: ...

    async def end_input(self) -> None: ...

    def audio(self) -> AsyncGenerator[bytes, None]: ...


# Optional parts of a stream (a fallback chain has both, Piper's one or both): a stream that does not
# say who spoke is taken to have been spoken by its engine if it produced audio.
@runtime_checkable
class SaysWhoSpoke(Protocol):
    spoken_by: list[str]


@runtime_checkable
class ReportsSwitches(Protocol):
    switches: list[VendorSwitch]


class VoiceEngine(Protocol):
    name: str

    def open_stream(self, voice: VoiceSpec) -> AbstractAsyncContextManager[VoiceStream]: ...

    @property
    def open_streams(self) -> int:
        """Streams currently holding vendor resources (tests assert this returns to 0)."""
        ...


class VoiceSession(Protocol):
    def open_stream(self) -> AbstractAsyncContextManager[VoiceStream]:
        """One utterance in this session (same contract as ``VoiceEngine.open_stream``)."""
        ...


@runtime_checkable
class SessionEngine(Protocol):
    """An engine with state per call; ``open_session`` is optional for engines (see the module doc)."""

    def open_session(self, voice: VoiceSpec) -> AbstractAsyncContextManager[VoiceSession]: ...


class StreamPerUtterance:
    """The session of an engine that keeps nothing between utterances: each one is ``open_stream``."""

    def __init__(self, engine: VoiceEngine, voice: VoiceSpec) -> None:
        self.engine = engine
        self.voice = voice

    def open_stream(self) -> AbstractAsyncContextManager[VoiceStream]:
        return self.engine.open_stream(self.voice)


@asynccontextmanager
async def open_session(engine: VoiceEngine, voice: VoiceSpec) -> AsyncIterator[VoiceSession]:
    """The engine's own session when it has one, else one stream per utterance."""
    if isinstance(engine, SessionEngine):
        async with engine.open_session(voice) as session:
            yield session
    else:
        yield StreamPerUtterance(engine, voice)
