"""The espeak-ng worker processes of one EspeakEngine (adapters/espeak.py) and the jobs waiting for them.

A Trio task pair per worker: one writes SYNTH and CANCEL frames to its stdin, one reads AUDIO, DONE and
LOG frames from its stdout (the protocol is in adapters/espeak_worker.py). Waiting jobs (one sentence
each, at most two per stream: the current sentence and its lookahead) go to the first free worker
earliest deadline first, each worker holding at most ``MAX_JOBS_PER_WORKER`` (a second one only if it is
needed within ``READY_HORIZON``). A worker that exits,
breaks the protocol or sends nothing for ``STALL_TIMEOUT`` while it owes audio is killed, reaped and
replaced; the streams it held fail (their jobs on other workers are CANCELled). Every wait is bounded:
the start (``START_TIMEOUT``), each write (``WRITE_TIMEOUT``), the end of a process (``CLOSE_TIMEOUT``,
then a kill).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import struct
import time
from subprocess import PIPE
from typing import TYPE_CHECKING

import attrs
import trio

from tts_streamer.adapters import espeak_worker as wire
from tts_streamer.adapters.voice import VoiceError

if TYPE_CHECKING:
    from tts_streamer.adapters.espeak import EspeakEngine, EspeakStream

log = logging.getLogger("tts_streamer.adapters.espeak")  # one log for the engine and its workers

MAX_JOBS_PER_WORKER = 2  # one running, one ready behind it: the worker never idles on a round trip
# A job needed later than this (a lookahead) goes only to an idle worker: queued behind a running job it
# would run before a first sentence that comes in meanwhile. Every DONE dispatches again.
READY_HORIZON = 1.0
START_TIMEOUT = 20.0  # a worker's READY (a Python start on a loaded machine)
WRITE_TIMEOUT = 5.0  # a job onto a worker's stdin
STALL_TIMEOUT = 10.0  # a worker holding jobs and sending nothing is hung (a sentence takes ~10 ms)
CLOSE_TIMEOUT = 2.0  # from stdin closed to the process gone, then once more after a kill
RESTART_BACKOFF = (0.05, 5.0)  # first and largest pause before replacing a worker that died


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@attrs.define(eq=False)
class Job:
    id: int
    stream: EspeakStream
    text: str
    deadline: float
    dispatched: bool = False
    done: bool = False
    starts_at: float | None = None  # where its audio begins on the caller's timeline, once it has begun
    held: list[bytes] = attrs.Factory(list)  # audio come before the stream's earlier sentence finished


@attrs.define(eq=False)
class _Worker:
    slot: int
    pid: int = 0
    ready: bool = False
    jobs: dict[int, Job] = attrs.Factory(dict)
    outbox: list[bytes] = attrs.Factory(list)
    wake: trio.Event = attrs.Factory(trio.Event)
    progress_at: float = 0.0  # last frame read, or when jobs came to an idle worker

    def post(self, data: bytes) -> None:
        self.outbox.append(data)
        self.wake.set()


class WorkerPool:
    """The worker processes of one engine in one Trio run, and the jobs waiting for them."""

    def __init__(self, engine: EspeakEngine, argv: list[str], size: int) -> None:
        self.engine = engine
        self.argv = argv
        self.token = trio.lowlevel.current_trio_token()
        self.workers = [_Worker(slot) for slot in range(size)]
        self.waiting: list[tuple[float, int, Job]] = []
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
                self._lost(worker)
            log.warning("espeak worker %d (pid %d) exited; starting another", worker.slot, worker.pid)
            # A worker that lived long gets replaced at once; one dying at start waits longer each time.
            pause = (
                RESTART_BACKOFF[0] if trio.current_time() - began > 10 else min(2 * pause, RESTART_BACKOFF[1])
            )
            await trio.sleep(pause)

    def _lost(self, worker: _Worker) -> None:
        """The worker's process is gone: the streams it held fail."""
        worker.ready = False
        held = list(worker.jobs.values())
        worker.jobs.clear()
        worker.outbox.clear()
        for job in held:
            job.stream.forget(job)
            job.stream.fail()

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
            job.stream.deliver(job, payloads[0] if len(payloads) == 1 else b"".join(payloads))

    def _on_frame(self, worker: _Worker, kind: int, job_id: int, payload: bytes) -> None:
        if kind == wire.DONE:
            job = worker.jobs.pop(job_id, None)
            if job is not None:
                self._finished(job, payload[0], payload[1:].decode("utf-8", "replace"))
            self.dispatch()
        elif kind == wire.LOG:
            (level,) = struct.unpack_from("<H", payload)
            log.log(level, "espeak worker %d: %s", worker.pid, payload[2:].decode("utf-8", "replace"))

    def _finished(self, job: Job, status: int, message: str) -> None:
        stream = job.stream
        if status == wire.DONE_FAILED and not stream.cancelled:
            log.error("espeak job failed: %s", message)
            stream.forget(job)
            stream.fail()
        elif status == wire.DONE_CANCELLED or stream.cancelled:
            self.engine.jobs_cancelled += 1
        if stream.cancelled:
            stream.forget(job)
        else:
            stream.job_done(job)
            self.offer(stream)

    def offer(self, stream: EspeakStream) -> None:
        """Queue the stream's next sentences, up to its current one and one lookahead."""
        queued = False
        while (job := stream.next_job(next(self.ids))) is not None:
            heapq.heappush(self.waiting, (job.deadline, job.id, job))
            queued = True
        if queued:
            self.dispatch()

    def dispatch(self) -> None:
        while self.waiting:
            free = [w for w in self.workers if w.ready and len(w.jobs) < MAX_JOBS_PER_WORKER]
            if not free:
                return
            deadline, _id, job = self.waiting[0]
            if job.stream.cancelled or job.dispatched or deadline != job.deadline:  # or rescheduled
                heapq.heappop(self.waiting)
                continue
            worker = min(free, key=lambda w: len(w.jobs))
            if worker.jobs and deadline > time.monotonic() + READY_HORIZON:
                return  # a worker's second job runs first whatever comes next: keep it for a sooner one
            heapq.heappop(self.waiting)
            if not worker.jobs:
                worker.progress_at = trio.current_time()  # idle until now: the stall clock starts here
            job.dispatched = True
            worker.jobs[job.id] = job
            worker.post(wire.synth_frame(job.id, job.stream.wpm, job.stream.voice_name, job.text))

    def reschedule(self, job: Job, deadline: float) -> None:
        """A waiting job's deadline, better known now: queued again by it (the old entry is skipped)."""
        if not job.dispatched and deadline != job.deadline:
            job.deadline = deadline
            heapq.heappush(self.waiting, (deadline, job.id, job))

    def cancel(self, stream: EspeakStream) -> None:
        """CANCEL the stream's running jobs; its waiting ones are skipped when they come up."""
        for job in list(stream.jobs):
            for worker in self.workers:
                if job.id in worker.jobs:
                    worker.post(wire.frame(wire.CANCEL, job.id))
                    break
            else:
                if not job.done:
                    self.engine.jobs_cancelled += 1
                stream.forget(job)

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
