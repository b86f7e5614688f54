"""What a longer lead and longer messages cost, and the rule that picks the shipped defaults.

``python -m bench.lead_sweep`` (or ``python -m bench.run --only lead-sweep``) sweeps lead_frames x
frames_per_message (leads up to 500 ms, messages up to 400 ms) and measures, per point:

- CPU per session-second of the pacing path (bench/pacing_cpu.py: N real WebSockets to the
  lightweight receiver, the window on an autojump MockClock, so the work does not depend on how busy
  the machine is; the CPU time per unit of work still varies by ~30% with the machine's load, so the
  rule compares frames-per-message values by their mean over the leads);
- memory: what the lead costs is audio queued in Asterisk (the most frames queued, in KiB); the
  daemon holds the vendor channel's budget (audio_queue_ms) whatever the lead;
- against the Asterisk simulator in virtual time, one 3 s utterance with the pacer stalled once for
  each of STALLS_MS (the whole session's sends held, as a loop stall or a collector pause holds them;
  Asterisk keeps playing on its own clock). The stall holds the first send after each of STALL_AT,
  so it always begins when a message is due, i.e. when Asterisk's queue is at its emptiest (the lead):
  the worst case. Measured: the simulator's underrun ticks, the most frames queued in
  Asterisk (XOFF comes at 900), and the error of message_play_finished, i.e. when the session reports
  the utterance played minus when its last frame actually played: MARK_MEDIA in JSON mode, the
  modelled clock in plain-text mode (positive: reported late; negative: reported before the end).

The rule (``choose``): the cheapest frames-per-message (CPU per session-second) of the swept ones;
then the smallest lead with no underrun tick for any stall up to STALL_BUDGET_MS in either control
format, that leaves at least XOFF_HEADROOM frames below XOFF and reports play-finished no earlier than
the last frame and at most PLAY_FINISHED_SLACK_MS after it. ``PacingConfig``'s defaults must be that
choice (tests/test_shipped_defaults.py checks CHOSEN against them).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from bench.pacing_cpu import light_receiver, measure
from bench.procs import ROOT
from bench.recording import raise_fd_limit
from tts_streamer.actors.audio import AudioChannel, AudioChunk, UtteranceEnd
from tts_streamer.actors.media_socket import MediaSocket, PacingConfig
from tts_streamer.adapters.chan_websocket import protocol
from tts_streamer.adapters.chan_websocket.client import MediaConnection, open_media_connection
from tts_streamer.adapters.chan_websocket.protocol import ControlFormat
from tts_streamer.simulator.asterisk import AsteriskSimulator, memory_dialer
from tts_streamer.simulator.asterisk_call import SimConfig
from tts_streamer.supervisor.gc_tuning import tune_gc

LEADS = (3, 5, 10, 15, 20, 25)  # 60 ms .. 500 ms
# 20 ms .. 400 ms per message (issue 16 asked for up to 200 ms; 400 ms was added when the send system
# call turned out to be most of a message's cost: 30 % less CPU per session-second, every rule met).
FPMS = (1, 5, 10, 20)
STALLS_MS = (0, 100, 200, 300, 400)
# When the stall starts, seconds into the utterance: spread over one 200 ms message period, so the
# stall meets the queue at its fullest and at its emptiest (just before a message is due).
STALL_AT = (1.0, 1.05, 1.11, 1.17)
# The longest pause a session must ride out without a gap: the collector's full collections measured
# 75-290 ms at 500 sessions with the stock thresholds (bench/NOTES.md), so 300 ms.
STALL_BUDGET_MS = 300
XOFF_HEADROOM = 800  # frames left below XOFF (900): Asterisk's queue stays under 100 frames
PLAY_FINISHED_SLACK_MS = 40.0  # two ticks: the modelled clock cannot know Asterisk's tick phase
UTTERANCE_S = 3.0
# What the rule chose on this machine (bench/results/2026-12-03-lead-sweep.md); PacingConfig ships it.
CHOSEN = (15, 20)


class _Played:
    def __init__(self) -> None:
        self.at: float | None = None
        self.done = trio.Event()

    def on_first_frame(self, utterance: int) -> None:
        pass

    def on_frames_sent(self, utterance: int, frames: int) -> None:
        pass

    def on_utterance_played(self, utterance: int) -> None:
        self.at = trio.current_time()
        self.done.set()


class _StallingConnection:
    """The real connection, but the first audio send after ``at`` is held for ``stall`` seconds."""

    def __init__(self, conn: MediaConnection, at: float, stall: float) -> None:
        self._conn, self._at, self._stall = conn, at, stall

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def send_audio(self, payload: bytes) -> None:
        if self._stall and trio.current_time() >= self._at:
            self._stall, stall = 0.0, self._stall
            await trio.sleep(stall)
        await self._conn.send_audio(payload)


async def _stall_run(lead: int, fpm: int, fmt: ControlFormat, stall_ms: int, at: float) -> dict[str, float]:
    sim = AsteriskSimulator(seed=lead * 1000 + fpm * 10 + stall_ms)
    call = sim.expect("c1", SimConfig(control_format=fmt, bridge_delay=0.0, tick_phase=0.007))
    pacing = PacingConfig(lead_frames=lead, frames_per_message=fpm, bridge_timeout=0.0)
    listener = _Played()
    async with trio.open_nursery() as nursery:
        dialer = memory_dialer(sim, nursery)
        async with open_media_connection("ws://sim/media/c1", dialer) as conn:
            stalling = _StallingConnection(conn, trio.current_time() + at, stall_ms / 1000)
            audio = AudioChannel(1000)
            media = MediaSocket(cast(MediaConnection, stalling), audio, listener, pacing)
            async with trio.open_nursery() as inner:
                inner.start_soon(media.serve)
                data = bytes([0x10]) * int(UTTERANCE_S * 8000)
                await audio.send(AudioChunk(0, data))
                await audio.send(UtteranceEnd(0))
                with trio.fail_after(UTTERANCE_S + 10):
                    await listener.done.wait()
                await trio.sleep(0.1)
                inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    last_played = max(f.time for f in call.played if f.data[0] == 0x10)
    changes = sorted([(q.time, 1) for q in call.queued] + [(p.time, -1) for p in call.played])
    depth = most = 0
    for _, d in changes:
        depth += d
        most = max(most, depth)
    assert listener.at is not None
    return {
        "underruns": call.underruns,
        "max_queue": most,
        "finished_error_ms": (listener.at - last_played) * 1000,
    }


def stall_runs(lead: int, fpm: int) -> dict[str, Any]:
    """Per control format and stall: the worst over STALL_AT of underruns and queue, and the range of
    the play-finished error."""
    out: dict[str, Any] = {}
    for fmt in (ControlFormat.TEXT, ControlFormat.JSON):
        for stall in STALLS_MS:
            runs = []
            for at in STALL_AT:
                clock = trio.testing.MockClock(autojump_threshold=0)
                runs.append(trio.run(_stall_run, lead, fpm, fmt, stall, at, clock=clock))
            out[f"{fmt.value}/{stall}"] = {
                "underruns": max(r["underruns"] for r in runs),
                "max_queue": max(r["max_queue"] for r in runs),
                "error_min_ms": min(r["finished_error_ms"] for r in runs),
                "error_max_ms": max(r["finished_error_ms"] for r in runs),
            }
    return out


def cpu_runs(points: list[tuple[int, int]], sessions: int, seconds: float) -> dict[tuple[int, int], Any]:
    out = {}
    with light_receiver(max_seconds=1800, capacity=8_000_000) as port:
        for lead, fpm in points:
            pacing = PacingConfig(lead_frames=lead, frames_per_message=fpm, bridge_timeout=0.0)
            clock = trio.testing.MockClock(rate=1.0)
            out[(lead, fpm)] = trio.run(measure, port, sessions, seconds, pacing, clock, clock=clock)
            print(f"  cpu L={lead} F={fpm}: {out[(lead, fpm)]['us_per_session_second']:.0f} us/s", flush=True)
    return out


def acceptable(stalls: dict[str, Any]) -> bool:
    """The rule for one point, judged on the stalls the design must ride out (<= the budget)."""
    for key, r in stalls.items():
        if int(key.split("/")[1]) > STALL_BUDGET_MS:
            continue  # beyond the budget a gap is expected; shown in the table, not judged
        if r["underruns"] or r["max_queue"] > protocol.XOFF_FRAMES - XOFF_HEADROOM:
            return False
        if r["error_min_ms"] < 0.0 or r["error_max_ms"] > PLAY_FINISHED_SLACK_MS:
            return False
    return True


def choose(cpu: dict[tuple[int, int], Any], stalls: dict[tuple[int, int], Any]) -> tuple[int, int] | None:
    by_f: dict[int, list[float]] = {}
    for (_lead, fpm), r in cpu.items():
        by_f.setdefault(fpm, []).append(r["us_per_session_second"])
    for fpm in sorted(by_f, key=lambda f: sum(by_f[f]) / len(by_f[f])):
        leads = sorted(lead for lead, f in stalls if f == fpm and acceptable(stalls[(lead, f)]))
        if leads:
            return leads[0], fpm
    return None


def render(cpu: dict[tuple[int, int], Any], stalls: dict[tuple[int, int], Any], sessions: int) -> str:
    lines = [
        f"# Lead x frames-per-message sweep, {date.today().isoformat()}",
        "",
        f"- `python -m bench.lead_sweep`; CPU at N={sessions} in virtual time (bench/pacing_cpu.py); stalls "
        f"against the Asterisk simulator in virtual time, one {UTTERANCE_S:g} s utterance, the stall "
        f"starting at each of {', '.join(f'{a:g}' for a in STALL_AT)} s",
        "- per stall, text | json control: most underrun ticks / most frames queued in Asterisk / "
        "play-finished error range (ms, reported minus the last frame's playout)",
        "",
        "| L (ms) | F (ms) | CPU us per session-second | most queued in Asterisk (KiB) | "
        + " | ".join(f"stall {s} ms text | json" for s in STALLS_MS)
        + " | meets the rule |",
        "|---|---|---|---|" + "---|---|" * len(STALLS_MS) + "---|",
    ]
    for (lead, fpm), st in sorted(stalls.items()):
        c = cpu.get((lead, fpm), {})
        cells = []
        for s in STALLS_MS:
            t, j = st[f"text/{s}"], st[f"json/{s}"]
            cells.append(
                f"{t['underruns']}/{t['max_queue']}/{t['error_min_ms']:.0f}..{t['error_max_ms']:.0f} | "
                f"{j['underruns']}/{j['max_queue']}/{j['error_min_ms']:.0f}..{j['error_max_ms']:.0f}"
            )
        us = c.get("us_per_session_second", float("nan"))
        lines.append(
            f"| {lead} ({lead * 20}) | {fpm} ({fpm * 20}) | {us:.0f} | "
            f"{st['text/0']['max_queue'] * protocol.FRAME_BYTES / 1024:.1f} | "
            + " | ".join(cells)
            + f" | {'yes' if acceptable(st) else 'no'} |"
        )
    chosen = choose(cpu, stalls)
    picked = "none" if chosen is None else f"lead_frames={chosen[0]}, frames_per_message={chosen[1]}"
    shipped = PacingConfig()
    lines += [
        "",
        f"Rule: the cheapest F, then the smallest lead with no underrun for stalls <= {STALL_BUDGET_MS} ms, "
        f"at least {XOFF_HEADROOM} frames below XOFF, play-finished within 0..{PLAY_FINISHED_SLACK_MS:g} ms "
        f"of the last frame: **{picked}** "
        f"(shipped: lead_frames={shipped.lead_frames}, frames_per_message={shipped.frames_per_message}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lead_sweep", description=__doc__)
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--seconds", type=float, default=3.0, help="virtual seconds of the CPU window")
    p.add_argument("--leads", default=",".join(map(str, LEADS)))
    p.add_argument("--fpm", default=",".join(map(str, FPMS)))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true", help="two points, 10 sessions (a smoke test)")
    args = p.parse_args(argv)
    leads = [int(x) for x in args.leads.split(",")]
    fpms = [int(x) for x in args.fpm.split(",")]
    if args.quick:
        leads, fpms, args.sessions, args.seconds = leads[:1], fpms[-1:], 10, 1.0
    raise_fd_limit()
    tune_gc()
    points = [(lead, fpm) for fpm in fpms for lead in leads]
    stalls = {pt: stall_runs(*pt) for pt in points}
    cpu = cpu_runs(points, args.sessions, args.seconds)
    text = render(cpu, stalls, args.sessions)
    print(text)
    if args.quick:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{date.today().isoformat()}-lead-sweep.md").write_text(text)
    shipped = PacingConfig()
    if choose(cpu, stalls) != (shipped.lead_frames, shipped.frames_per_message):
        print("FAIL: the rule chose other defaults than PacingConfig ships", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
