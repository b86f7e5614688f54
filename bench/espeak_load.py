"""N sessions all speaking through espeak-ng, and what that does to the event loop:
``python -m bench.espeak_load --sessions 50 100 200``.

Each session speaks utterances back to back the way a call does: an utterance's text goes in, its audio
is read as it comes, and the next one starts when the audio already received would have finished
playing (real time from the utterance's first chunk). Meanwhile a probe task asks to wake every 1 ms on
an absolute schedule: how late it wakes is how long the loop was kept from running anything else
(a command, a pacer), whatever the cause. Reported per N:

- loop stall: p50/p99/max lateness of the 1 ms probe;
- late chunks: a chunk that arrives after the audio before it would have finished playing (an underrun
  the caller would hear, with no lead at all: an upper bound on the pacer's underruns);
- first audio: utterance text in -> first chunk out, p50/p99;
- CPU: this process (the loop thread alone too) and the espeak worker processes, per second of wall
  time and per second of audio produced; the real-time factor per core (audio seconds per CPU second).

Load-independent figures are the CPU ones; wall-clock ones depend on the machine's load, printed too.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import resource
import time
from collections.abc import Sequence

import attrs
import trio

from tts_streamer.adapters.espeak import EspeakEngine
from tts_streamer.adapters.voice import VoiceSpec

SENTENCES = [
    "Thank you for calling, your call is important to us.",
    "Please hold while we connect you to the next available agent.",
    "Your estimated waiting time is about three minutes.",
    "You can also reach us on our website at any time of the day.",
]
TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _stat_cpu(path: str) -> float:
    try:
        with open(path) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def children_pids() -> list[int]:
    pids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as handle:
                pids.extend(int(p) for p in handle.read().split())
        except OSError:
            continue
    return pids


@attrs.define
class CpuSample:
    process: float
    loop_thread: float
    children: float

    @classmethod
    def now(cls, pids: Sequence[int]) -> CpuSample:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            usage.ru_utime + usage.ru_stime,
            _stat_cpu(f"/proc/self/task/{os.getpid()}/stat"),
            sum(_stat_cpu(f"/proc/{pid}/stat") for pid in pids),
        )


@attrs.define
class Stats:
    lateness: list[float] = attrs.Factory(list)
    first_audio: list[float] = attrs.Factory(list)
    chunks: int = 0
    late_chunks: int = 0
    audio_seconds: float = 0.0
    utterances: int = 0
    errors: int = 0


async def probe(stats: Stats, stop: trio.Event) -> None:
    period = 0.001
    start = trio.current_time()
    k = 0
    while not stop.is_set():
        k += 1
        deadline = start + k * period
        await trio.sleep_until(deadline)
        late = trio.current_time() - deadline
        stats.lateness.append(late)
        if late > period:  # skip the missed slots rather than count one stall many times
            k = math.floor((trio.current_time() - start) / period)


async def session(engine: EspeakEngine, n: int, stats: Stats, until: float, spread: float) -> None:
    await trio.sleep(spread)
    i = n
    while trio.current_time() < until:
        text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(2))
        i += 1
        sent = trio.current_time()
        first: float | None = None
        audio = 0.0
        try:
            with trio.fail_after(30):
                async with engine.open_stream(VoiceSpec()) as stream:
                    await stream.send_text(text)
                    await stream.end_input()
                    async for chunk in stream.audio():
                        now = trio.current_time()
                        if first is None:
                            first = now
                            stats.first_audio.append(now - sent)
                        elif now > first + audio:
                            stats.late_chunks += 1
                        stats.chunks += 1
                        audio += len(chunk) / 8000
        except Exception:
            stats.errors += 1
            await trio.sleep(1)
            continue
        stats.utterances += 1
        stats.audio_seconds += audio
        await trio.sleep_until((first or sent) + audio)


async def run_one(engine: EspeakEngine, sessions: int, seconds: float) -> dict[str, float]:
    stats = Stats()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe, stats, stop)
        pids = children_pids()
        before, wall = CpuSample.now(pids), time.monotonic()
        until = trio.current_time() + seconds
        async with trio.open_nursery() as speakers:
            for n in range(sessions):
                speakers.start_soon(session, engine, n, stats, until, n / sessions)
        pids = sorted(set(pids) | set(children_pids()))
        after, wall = CpuSample.now(pids), time.monotonic() - wall
        stop.set()
    audio = max(stats.audio_seconds, 1e-9)
    child_cpu = after.children - before.children
    process_cpu = after.process - before.process
    synth_cpu = child_cpu if child_cpu > 0 else process_cpu - (after.loop_thread - before.loop_thread)
    return {
        "sessions": sessions,
        "wall_s": wall,
        "stall_p50_ms": percentile(stats.lateness, 0.5) * 1000,
        "stall_p99_ms": percentile(stats.lateness, 0.99) * 1000,
        "stall_max_ms": max(stats.lateness, default=math.nan) * 1000,
        "first_audio_p50_ms": percentile(stats.first_audio, 0.5) * 1000,
        "first_audio_p99_ms": percentile(stats.first_audio, 0.99) * 1000,
        "utterances": stats.utterances,
        "errors": stats.errors,
        "chunks": stats.chunks,
        "late_chunks": stats.late_chunks,
        "audio_s": stats.audio_seconds,
        "process_cpu_pct": 100 * process_cpu / wall,
        "loop_thread_cpu_pct": 100 * (after.loop_thread - before.loop_thread) / wall,
        "workers_cpu_pct": 100 * child_cpu / wall,
        "synth_cpu_ms_per_audio_s": 1000 * synth_cpu / audio,
        "rtf_per_core": audio / max(synth_cpu, 1e-9),
    }


async def main_async(options: argparse.Namespace) -> None:
    if options.engine_module:  # A/B against another implementation (e.g. the in-process engine of old)
        engine = importlib.import_module(options.engine_module).EspeakEngine()
    else:
        engine = EspeakEngine(workers=options.workers)
    try:
        async with engine.open_stream(VoiceSpec()) as stream:  # start (and warm) the engine first
            await stream.send_text("Warm up.")
            await stream.end_input()
            async for _chunk in stream.audio():
                pass
        print(f"load average {os.getloadavg()}, {os.cpu_count()} cores")
        for n in options.sessions:
            row = await run_one(engine, n, options.seconds)
            print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            print(f"  load average {os.getloadavg()}")
    finally:
        await engine.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=None, help="ESPEAK_WORKERS (default: one per core)")
    parser.add_argument("--engine-module", default="", help="a module with another EspeakEngine to compare")
    trio.run(main_async, parser.parse_args(argv))


if __name__ == "__main__":
    main()
