"""Piper figures: cost, first audio, and what N talking calls do to a pacing loop. ``python -m bench.piper``.

cost: CPU seconds (all threads of the process) per second of speech, one stream speaking a paragraph.
first audio: idle engine, from send_text to the first chunk, for a short and a long (33-word) first
sentence.
load: N streams speak paragraphs back to back, each consuming its audio at real time (a chunk arriving
after the previous audio ran out is a gap, summed per stream); meanwhile a pacing task wakes every 20 ms
on an absolute timeline, as the media socket does, and its lateness is recorded. ``thread`` is the
engine (worker threads, GIL released inside onnxruntime); ``process`` runs the same chunks in a
two-process pool (no GIL shared), to compare what each leaves to the Trio loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio

from tts_streamer.adapters.codecs import StreamResampler, ulaw_encode
from tts_streamer.adapters.piper import PiperEngine, plan_chunks
from tts_streamer.adapters.piper_model import OUTPUT_GAIN, default_model_paths
from tts_streamer.adapters.vendor_stream import wait_future as _wait_future
from tts_streamer.adapters.voice import VoiceSpec

SHORT = "Hello, how can I help you today?"
LONG = (
    "Thank you for calling the customer service line of the regional water and electricity company, "
    "where every call is recorded for training purposes and answered in the order it was received today."
)
PARAGRAPH = (
    "Your account shows two payments this month. The first arrived on the third, and the second on the "
    "seventeenth. If you would like to hear the amounts, please stay on the line. Otherwise, you can "
    "hang up at any time, and we will send you a summary by text message."
)
TICK = 0.02

_VOICE: Any = None


def _proc_init(model_path: str, config_path: str) -> None:
    global _VOICE
    import json

    import onnxruntime
    from piper.config import PiperConfig
    from piper.voice import PiperVoice

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model_path, sess_options=options)
    with open(config_path, encoding="utf-8") as f:
        config = PiperConfig.from_dict(json.load(f))
    _VOICE = PiperVoice(session=session, config=config)


def _proc_synth(text: str) -> bytes:
    voice = _VOICE
    out = []
    for phonemes in voice.phonemize(text):
        audio = voice.phoneme_ids_to_audio(voice.phonemes_to_ids(phonemes))
        out.append(np.clip(np.rint(audio * OUTPUT_GAIN * 32767), -32768, 32767).astype(np.int16))
    return np.concatenate(out).tobytes() if out else b""


class _ProcStream:
    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self._pool = pool
        self._texts: list[str] = []
        self._resampler = StreamResampler(22050)

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        self._texts.extend(t for t, _ in plan_chunks(text, words_before=len(self._texts)))

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()

    async def audio(self) -> AsyncIterator[bytes]:
        for text in self._texts:
            fut: Future[bytes] = self._pool.submit(_proc_synth, text)
            pcm = np.frombuffer(await _wait_future(fut), dtype=np.int16)
            yield ulaw_encode(self._resampler.process(pcm))


class ProcessPiper:
    name = "piper-process"

    def __init__(self, workers: int = 2) -> None:
        self.pool = ProcessPoolExecutor(workers, initializer=_proc_init, initargs=default_model_paths())
        for f in [self.pool.submit(_proc_synth, "Ready.") for _ in range(workers * 2)]:
            f.result()

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[_ProcStream]:
        yield _ProcStream(self.pool)


async def _first_audio(engine: Any, text: str) -> tuple[float, float]:
    async with engine.open_stream(VoiceSpec()) as stream:
        start = time.perf_counter()
        await stream.send_text(text)
        await stream.end_input()
        first = None
        total = 0
        async for chunk in stream.audio():
            if first is None:
                first = time.perf_counter() - start
            total += len(chunk)
    assert first is not None
    return first, total / 8000


async def _talker(engine: Any, stop: float, firsts: list[float], gaps: list[float]) -> None:
    gap = 0.0
    while time.perf_counter() < stop:
        async with engine.open_stream(VoiceSpec()) as stream:
            opened = time.perf_counter()
            await stream.send_text(PARAGRAPH)
            await stream.end_input()
            runs_out: float | None = None
            async for chunk in stream.audio():
                now = time.perf_counter()
                if runs_out is None:
                    firsts.append(now - opened)
                    runs_out = now
                elif now > runs_out:
                    gap += now - runs_out
                runs_out = max(runs_out, now) + len(chunk) / 8000
            if runs_out is not None:
                await trio.sleep(max(0.0, runs_out - time.perf_counter()))
    gaps.append(gap)


async def _pacer(stop: float, lateness: list[float]) -> None:
    due = trio.current_time()
    while time.perf_counter() < stop:
        due += TICK
        await trio.sleep_until(due)
        lateness.append(trio.current_time() - due)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


async def _load(engine: Any, streams: int, seconds: float) -> str:
    firsts: list[float] = []
    gaps: list[float] = []
    lateness: list[float] = []
    cpu = time.process_time()
    stop = time.perf_counter() + seconds
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pacer, stop, lateness)
        for _ in range(streams):
            nursery.start_soon(_talker, engine, stop, firsts, gaps)
    cpu = time.process_time() - cpu
    return (
        f"| {engine.name} | {streams} | {_pct(lateness, 50) * 1e3:.2f} | {_pct(lateness, 99) * 1e3:.2f} | "
        f"{max(lateness) * 1e3:.1f} | {_pct(firsts, 50) * 1e3:.0f} | {_pct(firsts, 95) * 1e3:.0f} | "
        f"{(statistics.mean(gaps) if gaps else 0.0) / seconds * 60:.2f} | {cpu / seconds:.2f} |"
    )


async def main(args: argparse.Namespace) -> None:
    engine = PiperEngine(workers=args.workers, max_streams=10_000)
    started = time.perf_counter()
    await engine.start()
    print(f"model load {time.perf_counter() - started:.2f} s; cores {os.cpu_count()}; workers {args.workers}")
    cpu, spoken = time.process_time(), 0.0
    for _ in range(3):
        spoken += (await _first_audio(engine, PARAGRAPH))[1]
    print(f"cost: {(time.process_time() - cpu) / spoken:.3f} CPU-s per second of speech ({spoken:.1f} s)")
    for label, text in (("short", SHORT), ("long", LONG)):
        figures = [(await _first_audio(engine, text))[0] for _ in range(5)]
        print(f"first audio, idle, {label} first sentence: p50 {statistics.median(figures) * 1e3:.0f} ms")
    print()
    print(
        "| mode | streams | lateness p50 ms | p99 ms | max ms | first audio p50 ms | p95 ms |"
        " gap s per stream-minute | CPU cores (this process) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    process = ProcessPiper(args.workers) if "process" in args.modes else None
    for n in args.streams:
        if "thread" in args.modes:
            print(await _load(engine, n, args.seconds), flush=True)
        if process is not None:
            print(await _load(process, n, args.seconds), flush=True)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--streams", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 4, 8, 12, 16]
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="thread,process")
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, _parse())
