"""The contract every voice engine (TTS vendor) adapter fulfils; actors see only this.

A stream speaks one utterance: text goes in with ``send_text`` (many times, spoken in order),
``end_input`` says no more text is coming, and ``audio()`` yields 8 kHz mu-law bytes in chunks of any
size as they are produced, ending once all input has been spoken. Leaving the ``open_stream`` context,
normally or by cancellation, must stop the vendor at once and release everything it holds (thread job,
connection, HTTP body, RPC) without blocking: that is what makes a flush instant.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

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


class VoiceStream(Protocol):
    async def send_text(self, text: str) -> None: ...

    async def end_input(self) -> None: ...

    def audio(self) -> AsyncGenerator[bytes, None]: ...


class VoiceEngine(Protocol):
    name: str

    def open_stream(self, voice: VoiceSpec) -> AbstractAsyncContextManager[VoiceStream]: ...

    @property
    def open_streams(self) -> int:
        """Streams currently holding vendor resources (tests assert this returns to 0)."""
        ...
