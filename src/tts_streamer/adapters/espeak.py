"""espeak-ng, the embedded offline voice, driven through ctypes from one engine thread.

libespeak-ng is process-global and not thread-safe (two threads in ``espeak_Synth`` crash the
interpreter), so a single daemon thread per engine owns every call and streams submit sentence-sized jobs
to it by queue. Synchronous mode runs synthesis on that thread and hands 22,050 Hz PCM to a callback, which
converts it to 8 kHz mu-law and passes it to Trio with ``TrioToken.run_sync_soon`` (never blocking the
engine thread on Trio). Stopping is the callback returning 1: ``espeak_Cancel`` does not stop synchronous
synthesis. Calls into the library are also serialised by a module lock, so several engines (tests) can
coexist, each re-initialising the library with its own data path when needed.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import queue
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from ctypes import POINTER, c_char_p, c_int, c_short, c_size_t, c_uint, c_void_p
from typing import Any

import attrs
import numpy as np
import trio

from tts_streamer.adapters.codecs import StreamResampler, ulaw_encode
from tts_streamer.adapters.vendor_stream import wait_future
from tts_streamer.adapters.voice import VoiceError, VoiceSpec

log = logging.getLogger(__name__)

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # without it a bad data path calls exit(1) inside the library
ESPEAK_RATE = 1
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
# Each sentence is its own espeak_Synth call; without this flag sentences run together with no pause.
ESPEAK_ENDPAUSE = 0x1000
DEFAULT_WPM = 175
MIN_WPM, MAX_WPM = 80, 450

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_GENDER_VARIANTS = {"female": "+f3", "f": "+f3", "male": "+m3", "m": "+m3"}

_SynthCallback = ctypes.CFUNCTYPE(c_int, POINTER(c_short), c_int, c_void_p)

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "espeak_Initialize": (c_int, [c_int, c_int, c_char_p, c_int]),
    "espeak_SetSynthCallback": (None, [_SynthCallback]),
    "espeak_SetVoiceByName": (c_int, [c_char_p]),
    "espeak_SetParameter": (c_int, [c_int, c_int, c_int]),
    # text, size, position, position_type, end_position, flags, unique_identifier, user_data
    "espeak_Synth": (c_int, [c_char_p, c_size_t, c_uint, c_int, c_uint, c_uint, POINTER(c_uint), c_void_p]),
}


class _Library:
    """One loaded libespeak-ng with its prototypes, its callback and what it was initialised with."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.lib = lib
        # Lives as long as the module-level registry, i.e. the process: a collected callback segfaults.
        self.callback = _SynthCallback(self._on_synth)
        self.init_key: tuple[str, int] | None = None
        self.sample_rate = 0
        self.voice: str | None = None
        self.active: _Job | None = None

    def ensure_initialized(self, data_path: str, buflength_ms: int) -> int:
        if self.init_key == (data_path, buflength_ms):
            return self.sample_rate
        # A bad path after a good one "succeeds" yet leaves synthesis broken, so check before trying.
        if not os.path.isfile(os.path.join(data_path, "phontab")):
            raise VoiceError(f"espeak-ng data not found at {data_path!r} (no phontab)", kind="init")
        rate: int = self.lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, buflength_ms, os.fsencode(data_path), ESPEAK_INITIALIZE_DONT_EXIT
        )
        self.init_key, self.voice = None, None
        if rate <= 0:
            raise VoiceError(f"espeak_Initialize failed for data path {data_path!r}", kind="init")
        self.lib.espeak_SetSynthCallback(self.callback)
        self.init_key, self.sample_rate = (data_path, buflength_ms), rate
        return rate

    def set_voice(self, name: str) -> bool:
        if self.voice == name:
            return True
        ok = int(self.lib.espeak_SetVoiceByName(name.encode())) == 0
        self.voice = name if ok else None
        return ok

    def _on_synth(self, wav: ctypes._Pointer[c_short], n: int, events: int | None) -> int:
        # Any exception escaping a ctypes callback is printed and read as 0 ("carry on"): stop instead.
        try:
            job = self.active
            if job is None or job.stream.cancelled:
                return 1
            if not wav or n <= 0:
                return 0
            assert job.resampler is not None
            pcm = np.ctypeslib.as_array(wav, shape=(n,))
            out = job.resampler.process(pcm)
            if out.size:
                job.stream._deliver(ulaw_encode(out))
            return 0
        except BaseException:
            log.exception("espeak synth callback failed")
            if self.active is not None:
                self.active.stream.failed = True
            return 1


_LOCK = threading.Lock()
_LIBRARIES: dict[str, _Library] = {}


def _library(path: str) -> _Library:
    with _LOCK:
        lib = _LIBRARIES.get(path)
        if lib is None:
            try:
                lib = _LIBRARIES[path] = _Library(path)
            except (OSError, AttributeError) as exc:
                raise VoiceError(f"cannot load libespeak-ng from {path!r}: {exc}", kind="init") from exc
        return lib


@attrs.define(eq=False)
class _Job:
    stream: EspeakStream
    text: str
    resampler: StreamResampler | None = None


@attrs.frozen(eq=False)
class _End:
    stream: EspeakStream


@attrs.frozen(eq=False)
class _Stop:
    pass


@attrs.define(eq=False)
class _Worker:
    queue: queue.Queue[_Job | _End | _Stop] = attrs.Factory(queue.Queue)
    started: Future[int] = attrs.Factory(Future)
    exited: Future[None] = attrs.Factory(Future)
    thread: threading.Thread | None = None


class EspeakStream:
    """One utterance on an EspeakEngine; created by ``EspeakEngine.open_stream``."""

    def __init__(self, engine: EspeakEngine, voice: VoiceSpec, token: trio.lowlevel.TrioToken) -> None:
        self._engine = engine
        self._token = token
        self.voice_name = _espeak_voice_name(voice)
        self.wpm = min(MAX_WPM, max(MIN_WPM, round(voice.speaking_rate * DEFAULT_WPM)))
        # Written by Trio or close(), read by the engine thread; a bool store is atomic under the GIL.
        self.cancelled = False
        self.failed = False
        self._input_ended = False
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._input_ended or self.cancelled:
            raise trio.ClosedResourceError("stream input already ended")
        for sentence in split_sentences(text):
            self._engine._submit(_Job(self, sentence))

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._input_ended and not self.cancelled:
            self._input_ended = True
            self._engine._submit(_End(self))

    async def audio(self) -> AsyncGenerator[bytes, None]:
        """Yields the stream's chunks; raises VoiceError at the end if synthesis broke off."""
        async for chunk in self._receive:
            yield chunk
        if self.failed:
            raise VoiceError("espeak-ng synthesis failed", kind="synth")

    # --- called from the engine thread ---

    def _deliver(self, chunk: bytes) -> None:
        self._call_in_trio(self._put, chunk)

    def _finish(self) -> None:
        self._call_in_trio(self._send.close)

    def _call_in_trio(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            self.cancelled = True  # nobody is listening any more: skip this stream's remaining jobs

    def _put(self, chunk: bytes) -> None:
        # Runs in Trio after the stream may have been left; an exception here would crash the Trio run.
        try:
            self._send.send_nowait(chunk)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # --- called from Trio ---

    def _close(self) -> None:
        self.cancelled = True
        self._send.close()
        self._receive.close()


def split_sentences(text: str) -> list[str]:
    """Sentence-sized jobs keep the first audio early and let a cancelled stream skip the rest cheaply."""
    return [s for s in _SENTENCE_END.split(text.replace("\x00", " ").strip()) if s]


def _espeak_voice_name(voice: VoiceSpec) -> str:
    if voice.voice_id:
        return voice.voice_id
    return (voice.language or "en").lower() + _GENDER_VARIANTS.get(voice.gender.lower(), "")


class EspeakEngine:
    """The VoiceEngine for espeak-ng. Start is lazy; call ``aclose()`` (or ``close()``) on shutdown."""

    name = "espeak"

    def __init__(
        self,
        library_path: str | None = None,
        data_path: str | None = None,
        *,
        buflength_ms: int = 200,
    ) -> None:
        self._library_path = library_path
        self._data_path = data_path
        self.buflength_ms = buflength_ms
        self._state_lock = threading.Lock()
        self._worker: _Worker | None = None
        self._streams: set[EspeakStream] = set()
        self._jobs_running = 0
        self._jobs_cancelled = 0
        self._resolved_voices: dict[str, str] = {}

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def jobs_running(self) -> int:
        return self._jobs_running

    @property
    def jobs_cancelled(self) -> int:
        return self._jobs_cancelled

    async def start(self) -> None:
        """Start the engine thread if needed and wait until the library is ready; raises VoiceError."""
        with self._state_lock:
            worker = self._worker
            if worker is None or (worker.started.done() and worker.started.exception() is not None):
                worker = self._worker = _Worker()
                worker.thread = threading.Thread(target=self._run, args=(worker,), name="espeak", daemon=True)
                worker.thread.start()
        try:
            await wait_future(worker.started)
        except VoiceError as exc:
            raise VoiceError(str(exc), kind=exc.kind) from None

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[EspeakStream]:
        await self.start()
        stream = EspeakStream(self, voice, trio.lowlevel.current_trio_token())
        with self._state_lock:
            self._streams.add(stream)
        try:
            yield stream
        finally:
            # Nothing here may block: the engine thread notices the flag at its next callback or job.
            stream._close()
            with self._state_lock:
                self._streams.discard(stream)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the engine thread from any thread, waiting up to ``timeout`` seconds for it."""
        worker = self._shutdown()
        if worker is not None and worker.thread is not None:
            worker.thread.join(timeout)

    async def aclose(self) -> None:
        worker = self._shutdown()
        if worker is None:
            await trio.lowlevel.checkpoint()
            return
        await wait_future(worker.exited)

    def _shutdown(self) -> _Worker | None:
        with self._state_lock:
            worker, self._worker = self._worker, None
            streams = list(self._streams)
        for stream in streams:
            stream.cancelled = True
            stream._finish()
        if worker is not None:
            worker.queue.put_nowait(_Stop())
        return worker

    def _submit(self, item: _Job | _End) -> None:
        worker = self._worker
        if worker is None:
            raise VoiceError("espeak engine is closed", kind="closed")
        worker.queue.put_nowait(item)

    # --- engine thread ---

    def _run(self, worker: _Worker) -> None:
        try:
            try:
                lib = self._init_library()
            except BaseException as exc:  # start() waits on this future: it must always be answered
                err = exc if isinstance(exc, VoiceError) else VoiceError(f"espeak init: {exc!r}", kind="init")
                worker.started.set_exception(err)
                return
            worker.started.set_result(lib.sample_rate)
            while True:
                item = worker.queue.get()
                if isinstance(item, _Stop):
                    break
                if item.stream.cancelled:
                    if isinstance(item, _Job):
                        self._jobs_cancelled += 1
                elif isinstance(item, _End):
                    item.stream._finish()
                else:
                    self._synthesize(lib, item)
        finally:
            worker.exited.set_result(None)

    def _init_library(self) -> _Library:
        if self._library_path is None or self._data_path is None:
            try:
                import espeakng_loader
            except ImportError as exc:
                raise VoiceError("espeakng-loader is not installed", kind="init") from exc
            self._library_path = self._library_path or str(espeakng_loader.get_library_path())
            self._data_path = self._data_path or str(espeakng_loader.get_data_path())
        lib = _library(self._library_path)
        with _LOCK:
            lib.ensure_initialized(self._data_path, self.buflength_ms)
        return lib

    def _synthesize(self, lib: _Library, job: _Job) -> None:
        assert self._data_path is not None
        stream = job.stream
        text = job.text.encode("utf-8")
        self._jobs_running = 1
        try:
            with _LOCK:
                rate = lib.ensure_initialized(self._data_path, self.buflength_ms)
                self._select_voice(lib, stream.voice_name)
                lib.lib.espeak_SetParameter(ESPEAK_RATE, stream.wpm, 0)
                job.resampler = StreamResampler(rate)
                lib.active = job
                try:
                    flags = ESPEAK_CHARS_UTF8 | ESPEAK_ENDPAUSE
                    rc = lib.lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, flags, None, None)
                finally:
                    lib.active = None
            if rc != 0 and not stream.cancelled:
                log.error("espeak_Synth returned %d", rc)
                stream.failed = True
            if stream.cancelled and not stream.failed:
                self._jobs_cancelled += 1
            elif not stream.failed:
                tail = job.resampler.process(np.zeros(0, dtype=np.int16), last=True)
                if tail.size:
                    stream._deliver(ulaw_encode(tail))
        except Exception:
            log.exception("espeak job failed")
            stream.failed = True
        finally:
            self._jobs_running = 0
        if stream.failed:
            # End the stream now so audio() raises instead of waiting for an end marker.
            stream.cancelled = True
            stream._finish()

    def _select_voice(self, lib: _Library, requested: str) -> None:
        resolved = self._resolved_voices.get(requested)
        if resolved is not None and lib.set_voice(resolved):
            return
        base, plus, variant = requested.partition("+")
        candidates = [requested, base.split("-")[0] + plus + variant, "en" + plus + variant, "en"]
        for name in dict.fromkeys(candidates):
            if lib.set_voice(name):
                if name != requested:
                    log.warning("espeak voice %r not found; using %r", requested, name)
                self._resolved_voices[requested] = name
                return
        raise VoiceError(f"no espeak voice for {requested!r}", kind="voice")
