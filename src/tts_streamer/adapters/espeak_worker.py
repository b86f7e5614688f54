"""The espeak-ng worker process, and the framed protocol the engine (adapters/espeak.py) speaks with it.

libespeak-ng synthesises on the calling thread and hands each buffer to a callback; in the daemon that
callback held the GIL once per buffer (to resample and encode) and stalled the event loop (command p99
253 ms at 250 req/s). Here the library, the callback, soxr and the mu-law encoder all live in a child
process (``python -m tts_streamer.adapters.espeak_worker``) whose only link to the daemon is a pair of
pipes, so the daemon's share of a second of speech is one pipe read and one channel put per buffer.

One job is one sentence. The main thread runs jobs in order; a reader thread takes frames off stdin,
queues SYNTH jobs and marks CANCELled ones, which the callback sees at its next buffer and stops by
returning 1 (``espeak_Cancel`` does not stop synchronous synthesis). EOF on stdin (the engine closing,
or the daemon dying) stops the running job the same way and ends the process. This module imports no
Trio: the worker starts in a few hundred milliseconds.

Frames, both ways: ``<IBI`` (payload length, type, job id) and the payload.

- daemon -> worker: SYNTH (``<HH`` wpm and voice-name length, the voice name, the UTF-8 text), CANCEL.
- worker -> daemon: READY (``<II`` sample rate, pid) or INIT_FAILED (message) once at start; AUDIO
  (8 kHz mu-law); DONE (one status byte, then a message) once per job; LOG (``<H`` level, message).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import queue
import signal
import struct
import sys
import threading
from collections.abc import Sequence
from ctypes import POINTER, c_char_p, c_int, c_short, c_size_t, c_uint, c_void_p
from typing import Any, BinaryIO

import attrs
import numpy as np

from tts_streamer.adapters.codecs import StreamResampler, ulaw_encode

HEADER = struct.Struct("<IBI")
SYNTH, CANCEL, READY, INIT_FAILED, AUDIO, DONE, LOG = range(1, 8)
DONE_OK, DONE_CANCELLED, DONE_FAILED = 0, 1, 2
MAX_PAYLOAD = 1 << 20  # a sentence or an audio buffer; anything larger is a broken stream

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # without it a bad data path calls exit(1) inside the library
ESPEAK_RATE = 1
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
# Each sentence is its own espeak_Synth call; without this flag sentences run together with no pause.
ESPEAK_ENDPAUSE = 0x1000

_SynthCallback = ctypes.CFUNCTYPE(c_int, POINTER(c_short), c_int, c_void_p)

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "espeak_Initialize": (c_int, [c_int, c_int, c_char_p, c_int]),
    "espeak_SetSynthCallback": (None, [_SynthCallback]),
    "espeak_SetVoiceByName": (c_int, [c_char_p]),
    "espeak_SetParameter": (c_int, [c_int, c_int, c_int]),
    # text, size, position, position_type, end_position, flags, unique_identifier, user_data
    "espeak_Synth": (c_int, [c_char_p, c_size_t, c_uint, c_int, c_uint, c_uint, POINTER(c_uint), c_void_p]),
}


# --- the protocol (sans-IO, shared with the engine) ---


def frame(kind: int, job: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind, job) + payload


def synth_frame(job: int, wpm: int, voice: str, text: str) -> bytes:
    name = voice.encode()
    return frame(SYNTH, job, struct.pack("<HH", wpm, len(name)) + name + text.encode("utf-8"))


def parse_synth(payload: bytes) -> tuple[int, str, str]:
    wpm, size = struct.unpack_from("<HH", payload)
    return wpm, payload[4 : 4 + size].decode(), payload[4 + size :].decode("utf-8", "replace")


class FrameDecoder:
    """Frames out of a byte stream fed in pieces of any size."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[tuple[int, int, bytes]]:
        self._buffer += data
        frames: list[tuple[int, int, bytes]] = []
        offset = 0
        while len(self._buffer) - offset >= HEADER.size:
            size, kind, job = HEADER.unpack_from(self._buffer, offset)
            if size > MAX_PAYLOAD:
                raise ValueError(f"espeak worker frame of {size} bytes")
            end = offset + HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append((kind, job, bytes(self._buffer[offset + HEADER.size : end])))
            offset = end
        del self._buffer[:offset]
        return frames


# --- the worker process ---


@attrs.define(eq=False)
class _Job:
    id: int
    wpm: int
    voice: str
    text: str
    resampler: StreamResampler | None = None
    failed: bool = False


class Worker:
    """The library, the job queue and the pipes of one worker process."""

    def __init__(self, library_path: str, data_path: str, buflength_ms: int, out: BinaryIO) -> None:
        self._out = out
        self._library_path = library_path
        self._data_path = data_path
        self._buflength_ms = buflength_ms
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._known: set[int] = set()  # queued or running: a CANCEL for any other id is stale
        self._cancelled: set[int] = set()
        self.stopping = False
        self._active: _Job | None = None
        self._voice: str | None = None
        self._resolved: dict[str, str] = {}
        self.sample_rate = 0
        self._callback = _SynthCallback(self._on_synth)  # referenced for the process's life

    def send(self, kind: int, job: int = 0, payload: bytes = b"") -> None:
        self._out.write(frame(kind, job, payload))
        self._out.flush()

    def log(self, level: int, message: str) -> None:
        self.send(LOG, 0, struct.pack("<H", level) + message.encode("utf-8", "replace"))

    def init(self) -> str:
        """Load and initialise the library; "" when ready, else why not."""
        if not os.path.isfile(os.path.join(self._data_path, "phontab")):
            return f"espeak-ng data not found at {self._data_path!r} (no phontab)"
        try:
            lib = ctypes.CDLL(self._library_path)
            for name, (restype, argtypes) in _PROTOTYPES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except (OSError, AttributeError) as exc:
            return f"cannot load libespeak-ng from {self._library_path!r}: {exc}"
        flags = ESPEAK_INITIALIZE_DONT_EXIT
        rate = int(
            lib.espeak_Initialize(
                AUDIO_OUTPUT_SYNCHRONOUS, self._buflength_ms, os.fsencode(self._data_path), flags
            )
        )
        if rate <= 0:
            return f"espeak_Initialize failed for data path {self._data_path!r}"
        lib.espeak_SetSynthCallback(self._callback)
        self.lib, self.sample_rate = lib, rate
        return ""

    def read_commands(self, stdin: BinaryIO) -> None:
        """The reader thread: SYNTH -> queue, CANCEL -> flag; EOF stops everything."""
        try:
            while True:
                header = stdin.read(HEADER.size)
                if len(header) < HEADER.size:
                    break
                size, kind, job = HEADER.unpack(header)
                payload = stdin.read(size) if size else b""
                if len(payload) < size:
                    break
                if kind == SYNTH:
                    wpm, voice, text = parse_synth(payload)
                    with self._lock:
                        self._known.add(job)
                    self.jobs.put(_Job(job, wpm, voice, text))
                elif kind == CANCEL:
                    with self._lock:
                        if job in self._known:
                            self._cancelled.add(job)
        finally:
            self.stopping = True
            self.jobs.put(None)

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            status, message = self._run_job(job)
            with self._lock:
                self._known.discard(job.id)
                self._cancelled.discard(job.id)
            self.send(DONE, job.id, bytes([status]) + message.encode("utf-8", "replace"))

    def _is_cancelled(self, job: _Job) -> bool:
        return self.stopping or job.id in self._cancelled

    def _run_job(self, job: _Job) -> tuple[int, str]:
        if self._is_cancelled(job):
            return DONE_CANCELLED, ""
        try:
            self._select_voice(job.voice)
        except LookupError as exc:
            return DONE_FAILED, str(exc)
        self.lib.espeak_SetParameter(ESPEAK_RATE, job.wpm, 0)
        job.resampler = StreamResampler(self.sample_rate)
        text = job.text.encode("utf-8")
        self._active = job
        try:
            flags = ESPEAK_CHARS_UTF8 | ESPEAK_ENDPAUSE
            rc = self.lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, flags, None, None)
        finally:
            self._active = None
        if job.failed:
            return DONE_FAILED, "espeak synth callback failed"
        if self._is_cancelled(job):
            return DONE_CANCELLED, ""
        if rc != 0:
            self.log(logging.ERROR, f"espeak_Synth returned {rc}")
            return DONE_FAILED, f"espeak_Synth returned {rc}"
        tail = job.resampler.process(np.zeros(0, dtype=np.int16), last=True)
        if tail.size:
            self.send(AUDIO, job.id, ulaw_encode(tail))
        return DONE_OK, ""

    def _on_synth(self, wav: ctypes._Pointer[c_short], n: int, events: int | None) -> int:
        # Any exception escaping a ctypes callback is printed and read as 0 ("carry on"): stop instead.
        job = self._active
        try:
            if job is None or self._is_cancelled(job):
                return 1
            if not wav or n <= 0:
                return 0
            assert job.resampler is not None
            out = job.resampler.process(np.ctypeslib.as_array(wav, shape=(n,)))
            if out.size:
                self.send(AUDIO, job.id, ulaw_encode(out))
            return 0
        except BaseException as exc:
            if job is not None:
                job.failed = True
            try:
                self.log(logging.ERROR, f"espeak synth callback failed: {exc!r}")
            except BaseException:  # the daemon's end of the pipe is gone: nothing left to tell
                self.stopping = True
            return 1

    def _select_voice(self, requested: str) -> None:
        resolved = self._resolved.get(requested)
        if resolved is not None and self._set_voice(resolved):
            return
        base, plus, variant = requested.partition("+")
        candidates = [requested, base.split("-")[0] + plus + variant, "en" + plus + variant, "en"]
        for name in dict.fromkeys(candidates):
            if self._set_voice(name):
                if name != requested:
                    self.log(logging.WARNING, f"espeak voice {requested!r} not found; using {name!r}")
                self._resolved[requested] = name
                return
        raise LookupError(f"no espeak voice for {requested!r}")

    def _set_voice(self, name: str) -> bool:
        if self._voice == name:
            return True
        ok = int(self.lib.espeak_SetVoiceByName(name.encode())) == 0
        self._voice = name if ok else None
        return ok


# Synthesis runs a sentence ahead of playback; the daemon's loop (pacing, commands) cannot wait. At
# 200 espeak sessions on 2 cores the workers' bursts held the daemon off the CPU: command p99 ~80 ms
# with the daemon itself at 23 % of a core. So a worker yields the CPU to it: a lower priority
# (nice +10: ~1/10 of the daemon's CFS weight) and SCHED_BATCH (it does not preempt on wake-up).
WORKER_NICENESS = 10


def lower_priority(niceness: int) -> None:
    """Make this process defer to the daemon for the CPU; best effort (a platform may refuse)."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(niceness)  # relative to the daemon's own (the kernel caps it at 19)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="espeak-ng worker: framed jobs on stdin, audio on stdout")
    parser.add_argument("--library", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--buflength-ms", type=int, default=200)
    parser.add_argument("--niceness", type=int, default=WORKER_NICENESS)
    options = parser.parse_args(argv)
    lower_priority(options.niceness)
    # The daemon handles Ctrl-C and SIGTERM; this process ends when its stdin does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    worker = Worker(options.library, options.data, options.buflength_ms, out)
    problem = worker.init()
    if problem:
        worker.send(INIT_FAILED, 0, problem.encode("utf-8", "replace"))
        return 1
    worker.send(READY, 0, struct.pack("<II", worker.sample_rate, os.getpid()))
    reader = threading.Thread(target=worker.read_commands, args=(stdin,), name="espeak-commands", daemon=True)
    reader.start()
    try:
        worker.run()
    except BrokenPipeError:
        # The daemon went away: point stdout at /dev/null so the flush at exit does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
