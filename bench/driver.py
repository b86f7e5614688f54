"""The daemon side of one benchmark scenario: tts-streamer's supervisor, its real dialer, N sessions.

Runs ``open_supervisor`` with a ``SyntheticEngine`` (pre-encoded mu-law at ``speed`` times real time),
dials the receiver with ``websocket_dialer()``, connects N sessions (at most ``connect_concurrency``
handshakes at a time), measures the process while idle, then has every session speak ``duration``
seconds of audio, starting spread over ``speak_ramp`` seconds (real calls do not start on one common
20 ms phase). With ``flush`` each session is flushed mid-utterance at a staggered time and then speaks a
short new utterance whose audio has another pattern byte.

Every timestamp written is ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for all processes), never
``trio.current_time()``. CPU is ``getrusage(RUSAGE_SELF)``, RSS is VmRSS from /proc/self/status.

Usage: ``python -m bench.driver CONFIG.json`` (written by bench/run.py); the result goes to
``config["out"]`` as JSON. The run is bounded by ``max_seconds``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from bench.baselines import step_for
from bench.procs import SERVE_GC
from bench.recording import cpu_seconds, machine_jiffies, raise_fd_limit, rss_bytes
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import websocket_dialer
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte, tone
from tts_streamer.adapters.voice import VoiceSpec, VoiceStream
from tts_streamer.supervisor.gc_tuning import tune_gc
from tts_streamer.supervisor.sessions import open_supervisor

CHARS_PER_TEXT = 40  # one say_add per text; the synthetic vendor renders one text at a time


class TimedStream:
    """Wraps a vendor stream: the time its first audio chunk came out (the vendor's first byte)."""

    def __init__(self, inner: VoiceStream, times: list[float]) -> None:
        self._inner = inner
        self._times = times

    async def send_text(self, text: str) -> None:
        await self._inner.send_text(text)

    async def end_input(self) -> None:
        await self._inner.end_input()

    async def audio(self) -> AsyncGenerator[bytes, None]:
        first = True
        async with aclosing(self._inner.audio()) as chunks:
            async for chunk in chunks:
                if first and chunk:
                    first = False
                    self._times.append(time.monotonic())
                yield chunk


class TimedEngine:
    """A SyntheticEngine whose streams report their first audio byte per session (keyed by voice_id)."""

    def __init__(self, inner: SyntheticEngine) -> None:
        self.name = "bench"
        self.inner = inner
        self.first_audio: dict[str, list[float]] = {}

    @property
    def open_streams(self) -> int:
        return self.inner.open_streams

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[TimedStream]:
        times = self.first_audio.setdefault(voice.voice_id, [])
        async with self.inner.open_stream(voice) as stream:
            yield TimedStream(stream, times)


class BenchSink:
    """Counts events; wakes the session task waiting for its message to finish. Never blocks."""

    def __init__(self) -> None:
        self.finished: dict[str, trio.Event] = {}
        self.errors: list[tuple[str, str, str]] = []
        self.counts: dict[str, int] = {}

    def emit(self, event: ev.SessionEvent) -> None:
        name = type(event).__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        if isinstance(event, ev.PlayFinished):
            self.finished.setdefault(event.call_id, trio.Event()).set()
        elif isinstance(event, ev.SessionError):
            self.errors.append((event.call_id, event.kind, event.reason))


class GcClock:
    """Time spent in the cyclic garbage collector, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self.longest = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        spent = time.perf_counter() - self._start
        generation = info["generation"]
        self.seconds[generation] += spent
        self.counts[generation] += 1
        self.longest = max(self.longest, spent)


def mark() -> dict[str, float]:
    busy, total = machine_jiffies()
    return {"t": time.monotonic(), "cpu": cpu_seconds(), "rss": rss_bytes(), "busy": busy, "total": total}


def texts_for(seconds: float, char: str) -> list[str]:
    """Texts that together make ``seconds`` of synthetic audio (each CHARS_PER_TEXT chars or fewer)."""
    chars = round(seconds / 0.05)
    full, rest = divmod(chars, CHARS_PER_TEXT)
    return [char * CHARS_PER_TEXT] * full + ([char * rest] if rest else [])


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    n = int(cfg["sessions"])
    speed = float(cfg["speed"])
    flush = bool(cfg.get("flush", False))
    pattern = None if flush else tone(440.0, 1.0)  # flush runs tell old from new by the fill byte
    engine = TimedEngine(
        SyntheticEngine(seconds_per_char=0.05, speed=speed, chunk_bytes=800, pattern=pattern)
    )
    pacing = PacingConfig(
        lead_frames=int(cfg["lead_frames"]),
        frames_per_message=int(cfg["frames_per_message"]),
        bridge_timeout=float(cfg["bridge_timeout"]),
        step=step_for(cfg["mode"]),
    )
    sink = BenchSink()
    uris = [f"ws://127.0.0.1:{port}/media/" for port in cfg["ports"]]
    call_ids = [f"s{i:04d}" for i in range(n)]
    old_texts = texts_for(float(cfg["duration"]), "o" if flush else "a")
    new_texts = texts_for(float(cfg.get("new_seconds", 2.0)), "n")
    out: dict[str, Any] = {
        "config": cfg,
        "pid": os.getpid(),
        "fill_old": sorted({fill_byte(text) for text in old_texts}),
        "fill_new": sorted({fill_byte(text) for text in new_texts}),
        "samples": [],
        "sessions": {},
        "connect_failures": [],
    }
    if flush and set(out["fill_old"]) & set(out["fill_new"]):
        raise SystemExit("old and new texts have the same fill byte")
    sessions: dict[str, dict[str, Any]] = {cid: {} for cid in call_ids}

    async def sampler() -> None:
        while True:
            out["samples"].append(mark())
            await trio.sleep(0.5)

    gc_clock = GcClock()
    gc.callbacks.append(gc_clock)
    gc.collect()
    out["baseline"] = mark()
    async with trio.open_nursery() as outer:
        outer.start_soon(sampler)
        async with open_supervisor(
            engines={"bench": engine},
            default_engine="bench",
            dialer=websocket_dialer(),
            events=sink,
            config=SessionConfig(pacing=pacing),
            stop_grace=10.0,
        ) as supervisor:
            limiter = trio.CapacityLimiter(int(cfg["connect_concurrency"]))

            async def connect(i: int, cid: str) -> None:
                uri = uris[i % len(uris)] + cid
                async with limiter:
                    t = time.monotonic()
                    try:
                        await supervisor.start_session(cid, uri, voice=VoiceSpec(voice_id=cid))
                    except Exception as exc:
                        out["connect_failures"].append((cid, repr(exc)))
                        return
                    sessions[cid]["connect"] = (t, time.monotonic())

            out["connect_start"] = time.monotonic()
            async with trio.open_nursery() as nursery:
                for i, cid in enumerate(call_ids):
                    nursery.start_soon(connect, i, cid)
            out["connect_end"] = time.monotonic()
            await trio.sleep(float(cfg["idle_seconds"]))
            gc.collect()
            out["idle"] = mark()
            if cfg.get("gc") == "freeze":
                # Experiment (not what the daemon does today): every object that exists once the
                # sessions are connected moves to the permanent generation, out of every collection.
                gc.freeze()
            elif cfg.get("gc") == "tuned":
                # Experiment: freeze the connected sessions and make young collections rarer, so
                # objects that live for a frame or a chunk (tens of ms) die before being promoted.
                gc.freeze()
                gc.set_threshold(50_000, 20, 100)
            elif cfg.get("gc") == "off":
                gc.disable()  # experiment: an upper bound on what collector tuning can give
            gc_at_speak = (list(gc_clock.seconds), list(gc_clock.counts))
            gc_clock.longest = 0.0

            ramp = float(cfg["speak_ramp"]) if n > 1 else 0.0
            trio_start = trio.current_time() + 0.2
            out["speak_start"] = time.monotonic() + 0.2

            speech = float(cfg["duration"]) + (float(cfg["new_seconds"]) if flush else 0.0)
            speak_deadline = trio_start + ramp + speech * 1.25 + 10.0

            async def speak(i: int, cid: str) -> None:
                rec = sessions[cid]
                offset = ramp * i / n
                await trio.sleep_until(trio_start + offset)
                rec["speak"] = time.monotonic()
                await supervisor.call(cid, SayInit())
                for text in old_texts:
                    await supervisor.call(cid, SayAdd(text))
                if flush:
                    flush_at = trio_start + ramp + float(cfg["flush_after"])
                    flush_at += float(cfg["flush_spread"]) * ((i * 0.618034) % 1.0)
                    await trio.sleep_until(flush_at)
                    rec["flush_cmd"] = time.monotonic()
                    rec["flush_dropped"] = await supervisor.call(cid, SayFlush())
                    rec["flush_ack"] = time.monotonic()
                    for text in new_texts:
                        await supervisor.call(cid, SayAdd(text))
                    rec["new_added"] = time.monotonic()
                await supervisor.call(cid, SayFinish())
                # Bounded: a daemon that cannot keep up is reported as such, not waited for.
                with trio.move_on_at(speak_deadline):
                    await sink.finished.setdefault(cid, trio.Event()).wait()
                    rec["finished"] = time.monotonic()

            async def steady_marks() -> None:
                # CPU and RSS while every session speaks: from 1 s after the last one started to 1 s
                # before the first one ends (or its flush).
                if flush:  # between the last session's start and the first flush
                    start = trio_start + ramp + 0.5
                    end = trio_start + ramp + float(cfg["flush_after"]) - 0.5
                else:
                    start, end = trio_start + ramp + 1.0, trio_start + float(cfg["duration"]) - 1.0
                if end - start < 0.5:
                    start, end = trio_start + ramp, trio_start + ramp + 0.5
                await trio.sleep_until(start)
                out["steady_start"] = mark()
                await trio.sleep_until(end)
                out["steady_end"] = mark()

            connected = [cid for cid in call_ids if "connect" in sessions[cid]]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(steady_marks)
                for i, cid in enumerate(connected):
                    nursery.start_soon(speak, i, cid)
            out["speak_end"] = time.monotonic()
            out["gc_speaking"] = {
                "seconds": [a - b for a, b in zip(gc_clock.seconds, gc_at_speak[0], strict=True)],
                "collections": [a - b for a, b in zip(gc_clock.counts, gc_at_speak[1], strict=True)],
                "longest": gc_clock.longest,
            }
            live = list(supervisor)  # read after they stopped: every frame sent is counted
        out["stopped"] = mark()
        for session in live:
            media = session.media
            if media is None:
                continue
            stats = media.stats
            conn = session.connection
            sessions[session.call_id]["sender"] = {
                "frames_sent": stats.frames_sent,
                "messages_sent": stats.messages_sent,
                "timeline_restarts": stats.timeline_restarts,
                "frames_dropped_by_flush": stats.frames_dropped_by_flush,
                "flushes": stats.flushes,
                "lateness_p50": stats.lateness.percentile(50),
                "lateness_p99": stats.lateness.percentile(99),
                "lateness_max": stats.lateness.maximum,
                "caller_frames": conn.stats.caller_frames_received if conn else 0,
            }
        outer.cancel_scope.cancel()
    for cid, times in engine.first_audio.items():
        sessions[cid]["first_audio"] = times
    out["sessions"] = sessions
    out["events"] = sink.counts
    out["errors"] = sink.errors[:50]
    out["error_count"] = len(sink.errors)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(Path(argv[0]).read_text())
    raise_fd_limit()
    if cfg.get("gc", SERVE_GC) == SERVE_GC:
        tune_gc()  # what `tts-streamer serve` does after configuration, before serving

    async def bounded() -> dict[str, Any]:
        with trio.fail_after(float(cfg["max_seconds"])):
            return await run(cfg)

    result = trio.run(bounded)
    Path(cfg["out"]).write_text(json.dumps(result))
    print(f"DONE {len(result['sessions'])} sessions, {len(result['connect_failures'])} failed to connect")
    return 0 if not result["connect_failures"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
