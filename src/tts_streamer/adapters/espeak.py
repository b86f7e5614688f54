"""espeak-ng, the embedded offline voice, synthesised in worker processes off the event loop.

libespeak-ng is process-global, not thread-safe, and its synchronous callback needs Python once per
buffer; run in the daemon that callback took the GIL from the loop for every buffer of every call. So the
library lives in worker processes (adapters/espeak_worker.py, a framed protocol over pipes; the pool is
adapters/espeak_pool.py): the daemon side is a Trio task pair per worker that writes jobs and reads
8 kHz mu-law chunks, one pipe read and one channel put per buffer. A dead worker is replaced; the
utterances it held fail with ``VoiceError`` (kind "synth"), as a failed synthesis always did, and reach
the session's fallback or error path.

Scheduling: one job is one sentence, and each stream has at most ``LOOKAHEAD + 1`` (two) jobs queued or
running: the sentence being heard and the next one, so the next can start the moment a worker is free
rather than a worker round trip and a queue wait after the current one ends (under CPU shortage that
hand-off ran the caller's audio dry mid-utterance). The queue is bounded by twice the open streams. The
next sentence may run on another worker: its audio is held on the stream until the sentence before it is
done, so a stream's audio comes in order. Waiting jobs go to the first free worker earliest deadline
first; the deadline is when the caller would run out of the audio it has (now, for a first sentence),
and for the lookahead the current sentence's expected end (where it begins on the caller's timeline,
its deadline until it has begun, plus its estimated length; exact once it is done), so a lookahead
never jumps another stream's first sentence that is needed sooner. Each worker holds at most
``MAX_JOBS_PER_WORKER``, a second only if needed within ``READY_HORIZON``. ``LOOKAHEAD = 0`` restores
one job per stream. espeak-ng is the last-resort voice (Piper's overflow, every fallback chain's
end), so there is no admission limit: at ~2 ms of CPU per second of speech a core speaks ~500 calls in
real time (bench/results/2026-12-03-espeak.md), and a burst waits in the queue, not on the loop.

Stopping: leaving ``open_stream`` drops the stream's waiting jobs, sends CANCEL for its running ones (the
worker's callback returns 1 at its next buffer) and closes the stream's channel, so no later chunk is
delivered. ``aclose()`` ends every stream, closes the workers' stdin (they exit on EOF, or are killed
after ``CLOSE_TIMEOUT``) and returns once every process is reaped. The pool starts lazily and runs in a
Trio system task of the current run (the engine is shared by sessions of every nursery), or in the
nursery of ``open_espeak_engine``; either way it is cancelled, processes killed, when the run ends.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from tts_streamer.adapters import espeak_worker as wire
from tts_streamer.adapters.espeak_pool import CLOSE_TIMEOUT, START_TIMEOUT, Job, WorkerPool, default_workers
from tts_streamer.adapters.vendor_stream import split_sentences
from tts_streamer.adapters.voice import VoiceError, VoiceSpec

log = logging.getLogger(__name__)

DEFAULT_WPM = 175
MIN_WPM, MAX_WPM = 80, 450

LOOKAHEAD = 1  # sentences queued behind the one being synthesised or heard
# espeak-ng speaks ~18 characters a second at 175 wpm (the bench sentences: 0.055 s per character); a
# slight underestimate only moves the lookahead a little earlier in the queue.
SECONDS_PER_CHAR_AT_1_WPM = 10.0

_GENDER_VARIANTS = {"female": "+f3", "f": "+f3", "male": "+m3", "m": "+m3"}


class EspeakStream:
    """One utterance on an EspeakEngine; created by ``EspeakEngine.open_stream``."""

    def __init__(self, engine: EspeakEngine, pool: WorkerPool, voice: VoiceSpec) -> None:
        self._engine = engine
        self._pool = pool
        self.voice_name = _espeak_voice_name(voice)
        self.wpm = min(MAX_WPM, max(MIN_WPM, round(voice.speaking_rate * DEFAULT_WPM)))
        self.cancelled = False
        self.failed = False
        self._input_ended = False
        self._sentences: deque[str] = deque()
        # Queued, running or done but not yet heard, in sentence order: at most LOOKAHEAD + 1. Only
        # the first one's audio goes to the reader; a later one's waits in its ``held`` list.
        self.jobs: deque[Job] = deque()
        self.first_audio_at: float | None = None
        self.audio_seconds = 0.0
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._input_ended or self.cancelled:
            raise trio.ClosedResourceError("stream input already ended")
        self._sentences.extend(split_sentences(text))
        self._pool.offer(self)

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._input_ended and not self.cancelled:
            self._input_ended = True
            self._maybe_finish()

    async def audio(self) -> AsyncGenerator[bytes, None]:
        """Yields the stream's chunks; raises VoiceError at the end if synthesis broke off."""
        async for chunk in self._receive:
            yield chunk
        if self.failed:
            raise VoiceError("espeak-ng synthesis failed", kind="synth")

    def next_job(self, job_id: int) -> Job | None:
        if len(self.jobs) > LOOKAHEAD or self.cancelled or not self._sentences:
            return None
        if self.jobs:  # the lookahead: needed when the sentence before it has been heard
            before = self.jobs[-1]
            begins = before.starts_at if before.starts_at is not None else before.deadline
            deadline = begins + estimated_seconds(before.text, self.wpm)
        elif self.first_audio_at is None:
            deadline = time.monotonic()
        else:
            deadline = self.first_audio_at + self.audio_seconds
        job = Job(job_id, self, self._sentences.popleft(), deadline)
        self.jobs.append(job)
        return job

    def deliver(self, job: Job, chunk: bytes) -> None:
        if self.jobs and self.jobs[0] is job:
            self._start(job)
            self._emit(chunk)
        elif job in self.jobs:
            job.held.append(chunk)

    def _start(self, job: Job) -> None:
        """The sentence's first audio: where it begins on the caller's timeline times its lookahead."""
        if job.starts_at is not None:
            return
        first = self.first_audio_at
        job.starts_at = time.monotonic() if first is None else first + self.audio_seconds
        if len(self.jobs) > 1:
            # Begun later than its deadline (a queue wait): the lookahead is needed later too, and must
            # not keep jumping first sentences that came in meanwhile.
            self._pool.reschedule(self.jobs[1], job.starts_at + estimated_seconds(job.text, self.wpm))

    def _emit(self, chunk: bytes) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
        self.audio_seconds += len(chunk) / 8000
        try:
            self._send.send_nowait(chunk)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def job_done(self, job: Job) -> None:
        """The job's audio is all in: the next sentence's held audio goes out, and it is the head."""
        job.done = True
        while self.jobs and self.jobs[0].done:
            self.jobs.popleft()
            if self.jobs:
                head = self.jobs[0]
                if head.held:
                    self._start(head)
                for chunk in head.held:
                    self._emit(chunk)
                head.held.clear()
        if self.jobs and self.first_audio_at is not None:  # now known exactly, if it still waits
            self._pool.reschedule(self.jobs[0], self.first_audio_at + self.audio_seconds)
        self._maybe_finish()

    def forget(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    def fail(self) -> None:
        # End the stream now so audio() raises instead of waiting for the rest; a stream already
        # ended (left, or the engine closing) ends cleanly.
        if not self.cancelled:
            self.failed = True
            self.end()
            self._pool.cancel(self)  # its other sentence may be running on another worker

    def end(self) -> None:
        """No more audio (failed, or the engine closing); the reader drains what came and stops."""
        self.cancelled = True
        self._engine.jobs_cancelled += len(self._sentences)
        self._sentences.clear()
        self._send.close()

    def _maybe_finish(self) -> None:
        if self._input_ended and not self.jobs and not self._sentences:
            self._send.close()

    def close(self) -> None:
        self.end()
        self._receive.close()
        self._pool.cancel(self)


def estimated_seconds(text: str, wpm: int) -> float:
    return len(text) * SECONDS_PER_CHAR_AT_1_WPM / wpm


def _espeak_voice_name(voice: VoiceSpec) -> str:
    if voice.voice_id:
        return voice.voice_id
    return (voice.language or "en").lower() + _GENDER_VARIANTS.get(voice.gender.lower(), "")


class EspeakEngine:
    """The VoiceEngine for espeak-ng. Workers start lazily (or at ``warm()``); ``aclose()`` on shutdown."""

    name = "espeak"

    def __init__(
        self,
        library_path: str | None = None,
        data_path: str | None = None,
        *,
        buflength_ms: int = 200,
        workers: int | None = None,
        worker_command: Sequence[str] | None = None,
    ) -> None:
        self._library_path = library_path
        self._data_path = data_path
        self.buflength_ms = buflength_ms
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ValueError(f"ESPEAK_WORKERS must be at least 1, got {workers}")
        # Tests swap the program (a worker with a fault injected); the arguments are always ours.
        self._worker_command = list(worker_command or [sys.executable, "-m", wire.__name__])
        self._pool: WorkerPool | None = None
        self._nursery: trio.Nursery | None = None
        self._streams: set[EspeakStream] = set()
        self.jobs_cancelled = 0

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def jobs_running(self) -> int:
        """Jobs handed to a worker and not yet reported done."""
        return 0 if self._pool is None else self._pool.running

    @property
    def worker_pids(self) -> list[int]:
        return [] if self._pool is None else [w.pid for w in self._pool.workers if w.ready]

    async def warm(self) -> None:
        """Start the workers at daemon start-up, so the first call does not wait for them."""
        await self.start()

    async def start(self) -> None:
        """Start the worker pool if needed and wait until a worker is ready; raises VoiceError."""
        pool = self._pool
        if pool is None or pool.finished.is_set() or pool.token is not trio.lowlevel.current_trio_token():
            pool = self._pool = WorkerPool(self, self._argv(), self.workers)
            if self._nursery is not None:
                self._nursery.start_soon(pool.run, name="espeak-pool")
            else:
                trio.lowlevel.spawn_system_task(pool.run, name="espeak-pool")
        with trio.move_on_after(START_TIMEOUT + 1):
            await pool.started.wait()
        if not pool.started.is_set():
            raise VoiceError(f"no espeak worker ready within {START_TIMEOUT + 1:g} s", kind="init")
        if not any(w.ready for w in pool.workers) and pool.error is not None:
            raise VoiceError(str(pool.error), kind=pool.error.kind)

    def _argv(self) -> list[str]:
        if self._library_path is None or self._data_path is None:
            try:
                import espeakng_loader
            except ImportError as exc:
                raise VoiceError("espeakng-loader is not installed", kind="init") from exc
            self._library_path = self._library_path or str(espeakng_loader.get_library_path())
            self._data_path = self._data_path or str(espeakng_loader.get_data_path())
        return [
            *self._worker_command,
            f"--library={self._library_path}",
            f"--data={self._data_path}",
            f"--buflength-ms={self.buflength_ms}",
        ]

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[EspeakStream]:
        await self.start()
        assert self._pool is not None
        stream = EspeakStream(self, self._pool, voice)
        self._streams.add(stream)
        try:
            yield stream
        finally:
            stream.close()  # never blocks: a CANCEL is posted, the worker stops at its next buffer
            self._streams.discard(stream)

    async def aclose(self) -> None:
        """End every open stream, stop the workers and wait (bounded) until their processes are gone."""
        pool, self._pool = self._pool, None
        for stream in list(self._streams):
            stream.end()
        if pool is None:
            await trio.lowlevel.checkpoint()
            return
        pool.stop()
        with trio.CancelScope(shield=True), trio.move_on_after(3 * CLOSE_TIMEOUT):
            await pool.finished.wait()


@asynccontextmanager
async def open_espeak_engine(
    library_path: str | None = None,
    data_path: str | None = None,
    *,
    buflength_ms: int = 200,
    workers: int | None = None,
    worker_command: Sequence[str] | None = None,
) -> AsyncIterator[EspeakEngine]:
    """An EspeakEngine whose workers run in this block's nursery and are gone when it is left."""
    engine = EspeakEngine(
        library_path, data_path, buflength_ms=buflength_ms, workers=workers, worker_command=worker_command
    )
    async with trio.open_nursery() as nursery:
        engine._nursery = nursery
        try:
            yield engine
        finally:
            engine._nursery = None
            await engine.aclose()
