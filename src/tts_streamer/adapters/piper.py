"""Piper, the optional neural offline voice (``pip install 'tts-streamer[piper]'``), as a VoiceEngine.

Text is cut into chunks: sentences (the shared ``split_sentences``), long ones at clauses or words so a
chunk stays under ~8 s of audio, and the **first chunk of an utterance cut after a few words**, later
ones ramping up, because a chunk's audio only exists once the whole chunk has run (~0.1 s per second of
speech plus ~20 ms): a 33-word first sentence would otherwise cost ~0.9 s of silence. Each stream keeps
one chunk in flight on the shared ``PiperModel`` (adapters/piper_model.py), with the deadline by which
its caller needs it, and delivers 8 kHz mu-law through the shared soxr path. Leaving ``open_stream``
cancels the chunk in flight (``RunOptions.terminate``) without waiting for the worker.

Admission control: the model has a measured capacity (about 12 continuously speaking calls per 2 cores,
vendors.md §5); past ``max_streams`` open streams a new utterance is spoken by the ``overflow`` engine
(espeak-ng) instead of making every Piper call stutter. The stream says so the way a fallback chain does:
``spoken_by`` names the engine that spoke and ``switches`` holds one ``VendorSwitch`` of kind
``capacity``, which the session turns into a ``VoiceFallback`` event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Future
from contextlib import aclosing, asynccontextmanager
from typing import Protocol

import attrs
import numpy as np
import trio

from tts_streamer.adapters.codecs import StreamResampler, ulaw_encode
from tts_streamer.adapters.piper_model import (
    JobCancelled,
    PiperModel,
    SynthJob,
    default_model_paths,
    piper_unavailable_reason,
    shared_model,
)
from tts_streamer.adapters.vendor_stream import (
    AudioPipe,
    background_nursery,
    guarded,
    split_sentences,
    wait_future,
)
from tts_streamer.adapters.vendor_stream import split_under as _split_under
from tts_streamer.adapters.voice import VendorSwitch, VoiceEngine, VoiceError, VoiceSpec, VoiceStream

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 12
FIRST_CHUNK_WORDS = 6  # measured: a long first sentence's first frame 452 -> 199 ms
MAX_CHUNK_CHARS = 120  # ~8 s of speech: bounds one run's memory (~35 MiB/s) and a cancel's reach
SENTENCE_PAUSE = 0.15  # seconds after each sentence; chunks cut mid-sentence get none
_CLAUSE_MARKS = (",", ";", ":")


__all__ = ["PiperEngine", "SynthBackend", "piper_unavailable_reason", "plan_chunks"]


class SynthBackend(Protocol):
    """What a stream needs of the model: a PiperModel, or a stand-in in tests."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def length_scale(self) -> float: ...

    @property
    def language(self) -> str: ...

    def submit(self, job: SynthJob) -> None: ...


def plan_chunks(text: str, *, words_before: int = 0) -> list[tuple[str, bool]]:
    """``(chunk, ends_sentence)`` pieces of ``text``, given the words the utterance already had.

    Chunks ramp up: the first is cut after FIRST_CHUNK_WORDS, each later one may hold twice the words
    spoken before it, so every chunk is synthesised (~0.1 s per second of speech) well within the
    playing time of the audio ahead of it. Past the ramp only sentences and MAX_CHUNK_CHARS cut.
    """
    chunks: list[tuple[str, bool]] = []
    words = words_before
    for sentence in split_sentences(text):
        pieces = _split_under(sentence, MAX_CHUNK_CHARS)
        for n, piece in enumerate(pieces):
            rest = piece
            while True:
                head, rest = _cut(rest, max(FIRST_CHUNK_WORDS, 2 * words))
                words += head.count(" ") + 1
                if not rest:
                    chunks.append((head, n == len(pieces) - 1))
                    break
                chunks.append((head, False))
    return chunks


def _cut(text: str, limit: int) -> tuple[str, str]:
    """The first at most ``limit`` words (ending at a clause mark if one is near), and the rest."""
    words = text.split(" ")
    if len(words) <= limit + 3:  # a short rest would sound choppier than it saves
        return text, ""
    cut = limit
    for n in range(2, limit + 4):
        if words[n - 1].endswith(_CLAUSE_MARKS):
            cut = n
            if n >= limit // 2:
                break
    return " ".join(words[:cut]), " ".join(words[cut:])


class PiperStream:
    """One utterance on a PiperEngine."""

    def __init__(self, engine: PiperEngine, model: SynthBackend, voice: VoiceSpec) -> None:
        self._engine = engine
        self._model = model
        rate = voice.speaking_rate if voice.speaking_rate > 0 else 1.0
        self.length_scale = model.length_scale / min(3.0, max(0.3, rate))
        self.pipe = AudioPipe()
        self.spoken_by: list[str] = []
        self._resampler = StreamResampler(model.sample_rate)
        self._chunks: list[tuple[str, bool]] = []
        self._words = 0  # words of input so far (chunks ramp up in size)
        self._input_ended = False
        self._changed = trio.Event()
        self._job: SynthJob | None = None
        self._closed = False

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._input_ended or self._closed:
            raise trio.ClosedResourceError("stream input already ended")
        self._chunks.extend(plan_chunks(text, words_before=self._words))
        self._words += len(text.split())
        self._notify()

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()
        self._input_ended = True
        self._notify()

    def audio(self) -> AsyncGenerator[bytes, None]:
        return self.pipe.audio()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _drive(self) -> None:
        index = 0
        seconds = 0.0  # audio delivered so far
        playout_from: float | None = None  # monotonic time of the first audio
        while True:
            while index == len(self._chunks) and not self._input_ended:
                await self._changed.wait()
            if index == len(self._chunks):
                break
            text, ends_sentence = self._chunks[index]
            index += 1
            # Due when the caller would run out of what it already has (now, for the first chunk).
            now = time.monotonic()
            deadline = now if playout_from is None else playout_from + seconds
            job = SynthJob(
                text, self.length_scale, self._resampler, deadline, SENTENCE_PAUSE if ends_sentence else 0.0
            )
            self._job = job
            self._model.submit(job)
            try:
                chunk = await wait_future(job.future)
            except JobCancelled:
                return
            except BaseException:
                job.cancel()  # flush or stop: the run stops inside onnxruntime; nobody waits for it
                raise
            finally:
                self._job = None
            if chunk:
                if playout_from is None:
                    playout_from = time.monotonic()
                    self.spoken_by.append(self._engine.name)
                seconds += len(chunk) / 8000
                self.pipe.put(chunk)
        tail = self._resampler.process(np.zeros(0, dtype=np.int16), last=True)
        if tail.size:
            self.pipe.put(ulaw_encode(tail))

    def _close(self) -> None:
        self._closed = True
        job = self._job
        if job is not None:
            job.cancel()
        self.pipe.close()


class _OverflowStream:
    """An utterance the Piper engine handed to its overflow engine; reports it like a fallback chain."""

    def __init__(self, inner: VoiceStream, switch: VendorSwitch, name: str) -> None:
        self._inner = inner
        self._name = name
        self.switches = [switch]
        self.spoken_by: list[str] = []

    async def send_text(self, text: str) -> None:
        await self._inner.send_text(text)

    async def end_input(self) -> None:
        await self._inner.end_input()

    async def audio(self) -> AsyncGenerator[bytes, None]:
        async with aclosing(self._inner.audio()) as chunks:
            async for chunk in chunks:
                if chunk and not self.spoken_by:
                    self.spoken_by.append(self._name)
                yield chunk


class PiperEngine:
    """The VoiceEngine for Piper. The model loads on first use; ``start()`` loads it ahead of time."""

    name = "piper"

    def __init__(
        self,
        *,
        model_path: str | None = None,
        config_path: str | None = None,
        model: SynthBackend | None = None,
        workers: int = 2,
        max_streams: int = DEFAULT_MAX_STREAMS,
        overflow: VoiceEngine | None = None,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"PIPER_MAX_STREAMS must be at least 1, got {max_streams}")
        self._model_path = model_path
        self._config_path = config_path
        self._model = model
        self.workers = workers
        self.max_streams = max_streams
        self.overflow = overflow
        self.overflowed = 0  # utterances handed to the overflow engine
        self._streams: set[PiperStream] = set()
        self._loading: Future[SynthBackend] | None = None
        self._opening = 0  # streams waiting for the model: they hold a slot already

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def model(self) -> SynthBackend | None:
        return self._model

    def preload(self) -> None:
        """Start loading the model in a background thread (at daemon start-up), so that the first call
        does not wait for it (0.7-1 s idle, seconds on a busy machine). Safe to call again."""
        if self._model is not None or self._loading is not None:
            return
        loading: Future[SynthBackend] = Future()
        self._loading = loading

        def load() -> None:
            try:
                loading.set_result(self._load())
            except BaseException as exc:  # start() awaits this future: it must always be answered
                loading.set_exception(exc)

        threading.Thread(target=load, name="piper-load", daemon=True).start()

    async def start(self) -> SynthBackend:
        """Wait for the model, loading it if ``preload`` has not. Raises VoiceError."""
        if self._model is not None:
            await trio.lowlevel.checkpoint()
            return self._model
        self.preload()
        loading = self._loading
        assert loading is not None
        try:
            model = await wait_future(loading)
        except VoiceError:
            if self._loading is loading:
                self._loading = None  # the next utterance tries again
            raise
        except Exception as exc:
            if self._loading is loading:
                self._loading = None
            raise VoiceError(f"piper model failed to load: {exc!r}", kind="init") from exc
        self._model = model
        return model

    def _load(self) -> PiperModel:
        model_path, config_path = self._model_path, self._config_path
        if model_path is None:
            reason = piper_unavailable_reason()
            if reason is not None:
                raise VoiceError(reason, kind="init")
            model_path, config_path = default_model_paths()
        return shared_model(model_path, config_path or f"{model_path}.json", workers=self.workers)

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[VoiceStream]:
        overflow = self.overflow
        held = len(self._streams) + self._opening  # slots taken, counting streams still being opened
        if overflow is not None and held >= self.max_streams:
            reason = f"piper at capacity ({held} of {self.max_streams} streams)"
            async with self._open_overflow(overflow, voice, "capacity", reason) as stream:
                yield stream
            return
        self._opening += 1
        try:
            model = await self.start()
        finally:
            self._opening -= 1
        if overflow is not None and not _same_language(voice.language, model.language):
            reason = f"the piper voice speaks {model.language}, not {voice.language}"
            async with self._open_overflow(overflow, voice, "language", reason) as stream:
                yield stream
            return
        piper = PiperStream(self, model, voice)
        self._streams.add(piper)
        try:
            async with background_nursery("piper") as nursery:
                nursery.start_soon(guarded, piper.pipe, piper._drive, "piper", name="piper-drive")
                try:
                    yield piper
                finally:
                    piper._close()  # never waits: a running chunk stops inside onnxruntime on its own
        finally:
            self._streams.discard(piper)

    @asynccontextmanager
    async def _open_overflow(
        self, overflow: VoiceEngine, voice: VoiceSpec, kind: str, reason: str
    ) -> AsyncIterator[VoiceStream]:
        self.overflowed += 1
        log.warning("%s: utterance spoken by %s", reason, overflow.name)
        switch = VendorSwitch(
            from_vendor=self.name,
            to_vendor=overflow.name,
            kind=kind,
            reason=reason,
            resumed_at=0,
            units=0,
            had_audio=False,
            at=trio.current_time(),
        )
        # A Piper voice id means nothing to the overflow engine: it speaks its default for the language.
        async with overflow.open_stream(attrs.evolve(voice, voice_id="")) as inner:
            yield _OverflowStream(inner, switch, overflow.name)


def _same_language(requested: str, spoken: str) -> bool:
    """``en-US``, ``en_gb`` and ``en`` all match an ``en`` voice; no language asked for matches any."""
    primary = requested.replace("_", "-").split("-")[0].strip().lower()
    return not primary or primary == spoken.replace("_", "-").split("-")[0].lower()
