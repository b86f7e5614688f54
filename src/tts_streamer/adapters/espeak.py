"""espeak-ng, the embedded offline voice, synthesised in worker processes off the event loop.

libespeak-ng is process-global, not thread-safe, and its synchronous callback needs Python once per
buffer; run in the daemon that callback took the GIL from the loop for every buffer of every call. So the
library lives in worker processes (adapters/espeak_worker.py, a framed protocol over pipes): the daemon
side is a Trio task pair per worker that writes jobs and reads 8 kHz mu-law chunks, one pipe read and one
channel put per buffer. A dead worker is replaced; the utterances it held fail with ``VoiceError`` (kind
"synth"), as a failed synthesis always did, and reach the session's fallback or error path.

Scheduling: one job is one sentence, and each stream has at most one job queued or running, so the queue
is bounded by the open streams and a stream's audio comes in order. Waiting jobs go to the first free
worker earliest deadline first (the deadline is when the caller would run out of the audio it has; now,
for a first sentence), each worker holding at most ``MAX_JOBS_PER_WORKER``. espeak-ng is the last-resort
voice (Piper's overflow, every fallback chain's end), so there is no admission limit: at ~2 ms of CPU per
second of speech a core speaks ~500 calls in real time (bench/results/2026-12-03-espeak.md), and a
burst waits in the queue, not on the loop.

Stopping: leaving ``open_stream`` drops the stream's waiting job, sends CANCEL for its running one (the
worker's callback returns 1 at its next buffer) and closes the stream's channel, so no later chunk is
delivered. ``aclose()`` ends every stream, closes the workers' stdin (they exit on EOF, or are killed
after ``CLOSE_TIMEOUT``) and returns once every process is reaped. The pool starts lazily and runs in a
Trio system task of the current run (the engine is shared by sessions of every nursery), or in the
nursery of ``open_espeak_engine``; either way it is cancelled, processes killed, when the run ends.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import struct
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from subprocess import PIPE

import attrs
import trio

from tts_streamer.adapters import espeak_worker as wire
from tts_streamer.adapters.vendor_stream import split_sentences
from tts_streamer.adapters.voice import VoiceError, VoiceSpec

log = logging.getLogger(__name__)

DEFAULT_WPM = 175
MIN_WPM, MAX_WPM = 80, 450
MAX_JOBS_PER_WORKER = 2  # one running, one ready behind it: the worker never idles on a round trip
START_TIMEOUT = 20.0  # a worker's READY (a Python start on a loaded machine)
WRITE_TIMEOUT = 5.0  # a job onto a worker's stdin
STALL_TIMEOUT = 10.0  # a worker holding jobs and sending nothing is hung (a sentence takes ~10 ms)
CLOSE_TIMEOUT = 2.0  # from stdin closed to the process gone, then once more after a kill
RESTART_BACKOFF = (0.05, 5.0)  # first and largest pause before replacing a worker that died

_GENDER_VARIANTS = {"female": "+f3", "f": "+f3", "male": "+m3", "m": "+m3"}


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@attrs.define(eq=False)
class _Job:
    id: int
    stream: EspeakStream
    text: str
    deadline: float


@attrs.define(eq=False)
class _Worker:
    slot: int
    pid: int = 0
    ready: bool = False
    jobs: dict[int, _Job] = attrs.Factory(dict)
    outbox: list[bytes] = attrs.Factory(list)
    wake: trio.Event = attrs.Factory(trio.Event)
    progress_at: float = 0.0  # last frame read, or when jobs came to an idle worker

    def post(self, data: bytes) -> None:
        self.outbox.append(data)
        self.wake.set()


class EspeakStream:
    """One utterance on an EspeakEngine; created by ``EspeakEngine.open_stream``."""

    def __init__(self, engine: EspeakEngine, pool: _Pool, voice: VoiceSpec) -> None:
        self._engine = engine
        self._pool = pool
        self.voice_name = _espeak_voice_name(voice)
        self.wpm = min(MAX_WPM, max(MIN_WPM, round(voice.speaking_rate * DEFAULT_WPM)))
        self.cancelled = False
        self.failed = False
        self._input_ended = False
        self._sentences: deque[str] = deque()
        self.job: _Job | None = None  # queued or running: at most one
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

    def next_job(self, job_id: int) -> _Job | None:
        if self.job is not None or self.cancelled or not self._sentences:
            return None
        now = time.monotonic()
        deadline = now if self.first_audio_at is None else self.first_audio_at + self.audio_seconds
        self.job = _Job(job_id, self, self._sentences.popleft(), deadline)
        return self.job

    def deliver(self, chunk: bytes) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
        self.audio_seconds += len(chunk) / 8000
        try:
            self._send.send_nowait(chunk)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def job_done(self) -> None:
        self.job = None
        self._maybe_finish()

    def fail(self) -> None:
        # End the stream now so audio() raises instead of waiting for the rest; a stream already
        # ended (left, or the engine closing) ends cleanly.
        if not self.cancelled:
            self.failed = True
            self.end()

    def end(self) -> None:
        """No more audio (failed, or the engine closing); the reader drains what came and stops."""
        self.cancelled = True
        self._engine.jobs_cancelled += len(self._sentences)
        self._sentences.clear()
        self._send.close()

    def _maybe_finish(self) -> None:
        if self._input_ended and self.job is None and not self._sentences:
            self._send.close()

    def close(self) -> None:
        self.end()
        self._receive.close()
        self._pool.cancel(self)


def _espeak_voice_name(voice: VoiceSpec) -> str:
    if voice.voice_id:
        return voice.voice_id
    return (voice.language or "en").lower() + _GENDER_VARIANTS.get(voice.gender.lower(), "")


class _Pool:
    """The worker processes of one engine in one Trio run, and the jobs waiting for them."""

    def __init__(self, engine: EspeakEngine, argv: list[str], size: int) -> None:
        self.engine = engine
        self.argv = argv
        self.token = trio.lowlevel.current_trio_token()
        self.workers = [_Worker(slot) for slot in range(size)]
        self.waiting: list[tuple[float, int, _Job]] = []
        self.ids = itertools.count(1)
        self.started = trio.Event()  # a worker is ready, or the pool failed / ended
        self.error: VoiceError | None = None
        self.scope = trio.CancelScope()
        self.finished = trio.Event()

    async def run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    for worker in self.workers:
                        nursery.start_soon(self._keep_running, worker, name=f"espeak-worker[{worker.slot}]")
        except Exception as exc:  # a system task must not raise: the streams learn of it instead
            log.exception("espeak worker pool failed")
            self.error = VoiceError(f"espeak worker pool failed: {exc!r}", kind="init")
        finally:
            if self.error is None:
                self.error = VoiceError("espeak engine is closed", kind="closed")
            self.started.set()
            for _deadline, _id, job in self.waiting:
                job.stream.fail()  # never run; the engine closing ended these streams already
            self.waiting.clear()
            self.finished.set()

    def stop(self) -> None:
        self.scope.cancel(reason="espeak engine closed")

    async def _keep_running(self, worker: _Worker) -> None:
        pause = RESTART_BACKOFF[0]
        while True:
            began = trio.current_time()
            try:
                await self._run_process(worker)
            except VoiceError as exc:  # the library cannot start: no worker will, until asked again
                self.error = exc
                self.started.set()
                self.scope.cancel(reason=str(exc))
                return
            except Exception as exc:  # died, hung, broke the protocol: replaced below
                log.error("espeak worker %d (pid %d) failed: %r", worker.slot, worker.pid, exc)
            finally:
                worker.ready = False
                held = list(worker.jobs.values())
                worker.jobs.clear()
                worker.outbox.clear()
                for job in held:
                    job.stream.fail()
            log.warning("espeak worker %d (pid %d) exited; starting another", worker.slot, worker.pid)
            # A worker that lived long gets replaced at once; one dying at start waits longer each time.
            pause = (
                RESTART_BACKOFF[0] if trio.current_time() - began > 10 else min(2 * pause, RESTART_BACKOFF[1])
            )
            await trio.sleep(pause)

    async def _run_process(self, worker: _Worker) -> None:
        process = await trio.lowlevel.open_process(self.argv, stdin=PIPE, stdout=PIPE)
        worker.pid = process.pid
        assert process.stdin is not None and process.stdout is not None
        decoder = wire.FrameDecoder()
        try:
            with trio.fail_after(START_TIMEOUT):
                await self._handshake(worker, process.stdout, decoder)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, worker, process.stdin, name=f"espeak-write[{worker.slot}]")
                await self._read(worker, process.stdout, decoder)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _end_process(process)

    async def _handshake(
        self, worker: _Worker, stdout: trio.abc.ReceiveStream, decoder: wire.FrameDecoder
    ) -> None:
        while True:
            data = await stdout.receive_some(65536)
            if not data:
                raise OSError("espeak worker exited before it was ready")
            for kind, _job, payload in decoder.feed(data):
                if kind == wire.INIT_FAILED:
                    raise VoiceError(payload.decode("utf-8", "replace"), kind="init")
                if kind == wire.READY:
                    _rate, worker.pid = struct.unpack("<II", payload)
                    worker.ready = True
                    self.started.set()
                    self.dispatch()
                    return

    async def _write(self, worker: _Worker, stdin: trio.abc.SendStream) -> None:
        while True:
            await worker.wake.wait()
            worker.wake = trio.Event()
            data = b"".join(worker.outbox)
            worker.outbox.clear()
            with trio.fail_after(WRITE_TIMEOUT):
                await stdin.send_all(data)

    async def _read(
        self, worker: _Worker, stdout: trio.abc.ReceiveStream, decoder: wire.FrameDecoder
    ) -> None:
        while True:
            with trio.move_on_after(STALL_TIMEOUT / 4) as waited:
                data = await stdout.receive_some(65536)
            now = trio.current_time()
            if waited.cancelled_caught:
                if worker.jobs and now - worker.progress_at > STALL_TIMEOUT:
                    log.error(
                        "espeak worker %d (pid %d) hung: nothing for %s s",
                        worker.slot,
                        worker.pid,
                        STALL_TIMEOUT,
                    )
                    return
                continue
            if not data:
                return
            worker.progress_at = now
            # Under load one read holds many buffers: those of one job in a row go out as one chunk, so
            # the busier the loop, the fewer wake-ups each second of speech costs it.
            run: list[bytes] = []
            run_job = 0
            for kind, job_id, payload in decoder.feed(data):
                if kind == wire.AUDIO and (job_id == run_job or not run):
                    run.append(payload)
                    run_job = job_id
                    continue
                if run:
                    self._audio(worker, run_job, run)
                    run = []
                if kind == wire.AUDIO:
                    run, run_job = [payload], job_id
                else:
                    self._on_frame(worker, kind, job_id, payload)
            if run:
                self._audio(worker, run_job, run)

    def _audio(self, worker: _Worker, job_id: int, payloads: list[bytes]) -> None:
        job = worker.jobs.get(job_id)
        if job is not None and not job.stream.cancelled:
            job.stream.deliver(payloads[0] if len(payloads) == 1 else b"".join(payloads))

    def _on_frame(self, worker: _Worker, kind: int, job_id: int, payload: bytes) -> None:
        if kind == wire.DONE:
            job = worker.jobs.pop(job_id, None)
            if job is not None:
                self._finished(job, payload[0], payload[1:].decode("utf-8", "replace"))
            self.dispatch()
        elif kind == wire.LOG:
            (level,) = struct.unpack_from("<H", payload)
            log.log(level, "espeak worker %d: %s", worker.pid, payload[2:].decode("utf-8", "replace"))

    def _finished(self, job: _Job, status: int, message: str) -> None:
        stream = job.stream
        if status == wire.DONE_FAILED and not stream.cancelled:
            log.error("espeak job failed: %s", message)
            stream.fail()
        elif status == wire.DONE_CANCELLED or stream.cancelled:
            self.engine.jobs_cancelled += 1
        if stream.job is job:
            stream.job_done()
            self.offer(stream)

    def offer(self, stream: EspeakStream) -> None:
        """Queue the stream's next sentence if it has none queued or running."""
        job = stream.next_job(next(self.ids))
        if job is not None:
            heapq.heappush(self.waiting, (job.deadline, job.id, job))
            self.dispatch()

    def dispatch(self) -> None:
        while self.waiting:
            free = [w for w in self.workers if w.ready and len(w.jobs) < MAX_JOBS_PER_WORKER]
            if not free:
                return
            _deadline, _id, job = heapq.heappop(self.waiting)
            if job.stream.cancelled:
                continue
            worker = min(free, key=lambda w: len(w.jobs))
            if not worker.jobs:
                worker.progress_at = trio.current_time()  # idle until now: the stall clock starts here
            worker.jobs[job.id] = job
            worker.post(wire.synth_frame(job.id, job.stream.wpm, job.stream.voice_name, job.text))

    def cancel(self, stream: EspeakStream) -> None:
        job = stream.job
        if job is None:
            return
        for worker in self.workers:
            if job.id in worker.jobs:
                worker.post(wire.frame(wire.CANCEL, job.id))
                return
        # Still waiting: it is skipped when it comes up.
        self.engine.jobs_cancelled += 1
        stream.job = None

    @property
    def running(self) -> int:
        return sum(len(w.jobs) for w in self.workers)


async def _end_process(process: trio.Process) -> None:
    """EOF first (the worker stops its job and exits), then a kill; bounded either way."""
    if process.stdin is not None:
        try:
            await process.stdin.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    with trio.move_on_after(CLOSE_TIMEOUT):
        await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await process.wait()
    if process.stdout is not None:
        await process.stdout.aclose()


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
        self._pool: _Pool | None = None
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
            pool = self._pool = _Pool(self, self._argv(), self.workers)
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
