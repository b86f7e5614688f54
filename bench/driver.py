"""The daemon side of one benchmark scenario: tts-streamer's supervisor, its real dialer, N sessions.

Runs ``open_supervisor`` with the scenario's voice (bench/voices.py: by default a ``SyntheticEngine``,
pre-encoded mu-law at ``speed`` times real time; or espeak-ng, or a cloud adapter against its fake),
dials the receiver with ``websocket_dialer()``, connects N sessions (at most ``connect_concurrency``
handshakes at a time), measures the process while idle, then has every session speak ``duration`` seconds
of audio, starting spread over ``speak_ramp`` seconds (real calls do not start on one common 20 ms
phase). A burst (``create_spread``) skips the connect phase: each session is created and speaks at once,
all within ``create_spread`` seconds. Every command's round trip is recorded (``commands``);
``feed_ahead`` sends the texts as playback goes instead of all at once. With ``flush`` each session is
flushed mid-utterance at a staggered time and then speaks a short new utterance whose audio has another
pattern byte.

Every timestamp written is ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for all processes), never
``trio.current_time()``. CPU is ``getrusage(RUSAGE_SELF)``, RSS is VmRSS from /proc/self/status.

Usage: ``python -m bench.driver CONFIG.json`` (written by bench/run.py); the result goes to
``config["out"]`` as JSON. The run is bounded by ``max_seconds``.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bench.baselines import step_for
from bench.procs import SERVE_GC
from bench.recording import cpu_seconds, machine_jiffies, raise_fd_limit, rss_bytes
from bench.voices import CALL, TimedEngine, build_engine, seconds_of_audio_per_char, texts_for
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import Command, CommandError, SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import websocket_dialer
from tts_streamer.adapters.synthetic import fill_byte
from tts_streamer.supervisor.gc_tuning import tune_gc
from tts_streamer.supervisor.sessions import open_supervisor


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


async def warm(engine: TimedEngine) -> None:
    """Engine start-up before the first call (a cloud channel or pool, espeak's thread), bounded."""
    with trio.fail_after(30):
        await engine.warm()


VENDOR_PID = 0  # the cloud fakes' process (another process's CPU, reported apart from "other")


def process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def mark() -> dict[str, float]:
    busy, total = machine_jiffies()
    out = {"t": time.monotonic(), "cpu": cpu_seconds(), "rss": rss_bytes(), "busy": busy, "total": total}
    if VENDOR_PID:
        out["vendor_cpu"] = process_cpu_seconds(VENDOR_PID)
    return out


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    n = int(cfg["sessions"])
    flush = bool(cfg.get("flush", False))
    # Flush runs tell old from new audio by the synthetic vendor's fill byte (no tone pattern).
    inner, seconds_per_char = build_engine(cfg, pattern_free=flush)
    engine = TimedEngine(inner)
    voice_name = str(cfg.get("engine", "synthetic"))
    if voice_name == "espeak":
        seconds_per_char = await seconds_of_audio_per_char(inner)
    burst = cfg.get("create_spread") is not None
    feed_ahead = cfg.get("feed_ahead")
    pacing = PacingConfig(
        lead_frames=int(cfg["lead_frames"]),
        frames_per_message=int(cfg["frames_per_message"]),
        bridge_timeout=float(cfg["bridge_timeout"]),
        step=step_for(cfg["mode"]),
    )
    sink = BenchSink()
    uris = [f"ws://127.0.0.1:{port}/media/" for port in cfg["ports"]]
    call_ids = [f"s{i:04d}" for i in range(n)]
    old_texts = texts_for(float(cfg["duration"]), "o" if flush else "a", voice_name, seconds_per_char)
    new_texts = texts_for(float(cfg.get("new_seconds", 2.0)), "n", voice_name, seconds_per_char)
    out: dict[str, Any] = {
        "config": cfg,
        "pid": os.getpid(),
        "fill_old": sorted({fill_byte(text) for text in old_texts}),
        "fill_new": sorted({fill_byte(text) for text in new_texts}),
        "samples": [],
        "sessions": {},
        "connect_failures": [],
        "commands": [],  # (sent, seconds to the reply) of every command while speaking
        "command_errors": [],  # (call id, command, error kind) of those answered with an error
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
            limiter = trio.CapacityLimiter(n if burst else int(cfg["connect_concurrency"]))

            async def connect(i: int, cid: str) -> bool:
                uri = uris[i % len(uris)] + cid
                CALL.set(cid)  # copied into the session's tasks: TimedEngine keys first audio by it
                async with limiter:
                    t = time.monotonic()
                    try:
                        await supervisor.start_session(cid, uri)
                    except Exception as exc:
                        out["connect_failures"].append((cid, repr(exc)))
                        return False
                    sessions[cid]["connect"] = (t, time.monotonic())
                    return True

            async def timed(cid: str, command: Command) -> object:
                sent = time.monotonic()
                try:
                    result = await supervisor.call(cid, command)
                except CommandError as exc:  # e.g. not answered in time: counted, and the caller goes on
                    out["command_errors"].append((cid, type(command).__name__, exc.kind))
                    result = None
                out["commands"].append((sent, time.monotonic() - sent))
                return result

            def note_unconnected() -> None:
                failed = {c for c, _ in out["connect_failures"]}
                for cid in call_ids:
                    if "connect" not in sessions[cid] and cid not in failed:
                        out["connect_failures"].append((cid, "not connected in time"))

            await warm(engine)  # as serve warms every engine before taking calls
            if not burst:
                out["connect_start"] = time.monotonic()
                with trio.move_on_after(float(cfg.get("connect_seconds", 60.0))):
                    async with trio.open_nursery() as nursery:
                        for i, cid in enumerate(call_ids):
                            nursery.start_soon(connect, i, cid)
                out["connect_end"] = time.monotonic()
                note_unconnected()
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
            if burst:
                out["connect_start"] = out["speak_start"]

            speech = float(cfg["duration"]) + (float(cfg["new_seconds"]) if flush else 0.0)
            speak_deadline = trio_start + ramp + speech * 1.25 + 10.0
            # Where each text starts in the utterance's audio, for feeding them as playback goes.
            starts_at = list(
                itertools.accumulate((len(t) * seconds_per_char for t in old_texts), initial=0.0)
            )

            async def speak(i: int, cid: str) -> None:
                # Bounded as a whole (creation and commands too): a daemon that cannot keep up is
                # reported as such, not waited for.
                with trio.move_on_at(speak_deadline):
                    await speak_unbounded(i, cid)

            async def speak_unbounded(i: int, cid: str) -> None:
                rec = sessions[cid]
                offset = ramp * i / n
                await trio.sleep_until(trio_start + offset)
                if burst and not await connect(i, cid):
                    return
                rec["speak"] = time.monotonic()
                began = trio.current_time()
                await timed(cid, SayInit())
                for k, text in enumerate(old_texts):
                    if feed_ahead is not None:
                        await trio.sleep_until(began + starts_at[k] - float(feed_ahead))
                    await timed(cid, SayAdd(text))
                if flush:
                    flush_at = trio_start + ramp + float(cfg["flush_after"])
                    flush_at += float(cfg["flush_spread"]) * ((i * 0.618034) % 1.0)
                    await trio.sleep_until(flush_at)
                    rec["flush_cmd"] = time.monotonic()
                    rec["flush_dropped"] = await timed(cid, SayFlush())
                    rec["flush_ack"] = time.monotonic()
                    for text in new_texts:
                        await timed(cid, SayAdd(text))
                    rec["new_added"] = time.monotonic()
                await timed(cid, SayFinish())
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

            speakers = call_ids if burst else [cid for cid in call_ids if "connect" in sessions[cid]]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(steady_marks)
                for i, cid in enumerate(speakers):
                    nursery.start_soon(speak, i, cid)
            if burst:
                note_unconnected()
                out["connect_end"] = max(
                    (s["connect"][1] for s in sessions.values() if "connect" in s), default=out["speak_start"]
                )
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
    await engine.aclose()
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
    global VENDOR_PID
    VENDOR_PID = int(cfg.get("vendor_pid", 0))
    if cfg.get("gc", SERVE_GC) == SERVE_GC:
        tune_gc()  # what `tts-streamer serve` does after configuration, before serving

    async def bounded() -> dict[str, Any]:
        with trio.fail_after(float(cfg["max_seconds"])):
            return await run(cfg)

    result = trio.run(bounded)
    Path(cfg["out"]).write_text(json.dumps(result))
    print(f"DONE {len(result['sessions'])} sessions, {len(result['connect_failures'])} failed to connect")
    # Sessions that failed to connect are in the result (bench/targets.py's integrity check reports
    # them): a daemon that cannot keep up still gets its row.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
