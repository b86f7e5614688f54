"""A synthetic voice: pre-encoded mu-law at a configurable rate, so tests and benchmarks measure
tts-streamer rather than a voice engine.

Each text yields ``len(text) * seconds_per_char`` seconds of audio. Unless a ``pattern`` (e.g. a tone)
is given, every byte of a text's audio is ``fill_byte(text)``, so a receiver can tell which text a frame
came from. ``speed`` is how many times faster than real time audio is produced (``math.inf``: at once).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import attrs
import numpy as np
import trio

from tts_streamer.adapters.codecs import ulaw_encode
from tts_streamer.adapters.voice import VoiceError, VoiceSpec

BYTES_PER_SECOND = 8000


def fill_byte(text: str) -> int:
    """The mu-law byte a text's synthetic audio is made of; never 0xFF (silence padding)."""
    return 0x10 + zlib.crc32(text.encode()) % 0x60


def tone(frequency: float = 440.0, seconds: float = 1.0, level: float = 0.3) -> bytes:
    """A mu-law sine, for audible demos and benchmarks."""
    t = np.arange(int(BYTES_PER_SECOND * seconds)) / BYTES_PER_SECOND
    pcm = np.rint(np.sin(2 * np.pi * frequency * t) * level * 32767).astype(np.int16)
    return ulaw_encode(pcm)


@attrs.define
class SyntheticEngine:
    name: str = "synthetic"
    seconds_per_char: float = 0.05
    speed: float = math.inf
    chunk_bytes: int = 800
    first_audio_delay: float = 0.0
    pattern: bytes | None = None
    fail_after_bytes: int | None = None  # fault injection: VoiceError once this much audio went out
    streams_opened: int = 0
    streams_cancelled: int = 0
    _open: int = 0

    @property
    def open_streams(self) -> int:
        return self._open

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[SyntheticStream]:
        self.streams_opened += 1
        self._open += 1
        stream = SyntheticStream(self)
        try:
            yield stream
        finally:
            self._open -= 1
            if not stream.finished:
                self.streams_cancelled += 1  # released before its audio ended: flushed or stopped
            stream.close()

    def audio_for(self, text: str) -> bytes:
        size = round(len(text) * self.seconds_per_char * BYTES_PER_SECOND)
        if self.pattern:
            repeats = size // len(self.pattern) + 1
            return (self.pattern * repeats)[:size]
        return bytes([fill_byte(text)]) * size


class SyntheticStream:
    def __init__(self, engine: SyntheticEngine) -> None:
        self._engine = engine
        self._text_send, self._text_recv = trio.open_memory_channel[str](math.inf)
        self.finished = False

    async def send_text(self, text: str) -> None:
        self._text_send.send_nowait(text)

    async def end_input(self) -> None:
        await self._text_send.aclose()

    def close(self) -> None:
        self._text_send.close()
        self._text_recv.close()

    async def audio(self) -> AsyncGenerator[bytes, None]:
        engine = self._engine
        if engine.first_audio_delay:
            await trio.sleep(engine.first_audio_delay)
        produced = 0
        async for text in self._text_recv:
            audio = engine.audio_for(text)
            for start in range(0, len(audio), engine.chunk_bytes):
                chunk = audio[start : start + engine.chunk_bytes]
                if engine.fail_after_bytes is not None and produced >= engine.fail_after_bytes:
                    raise VoiceError("synthetic failure", kind="injected")
                if math.isfinite(engine.speed):
                    await trio.sleep(len(chunk) / BYTES_PER_SECOND / engine.speed)
                else:
                    await trio.lowlevel.checkpoint()
                produced += len(chunk)
                yield chunk
        self.finished = True
