"""`python -m bench.run`'s command line and the scenarios it plans (bench/run.py runs them).

Scenario kinds (every one as `serve` ships: PacingConfig's defaults, tune_gc() at start-up):

- pacing at each --sessions N for --duration seconds (connect all, then speak spread over max(1 s, N/200 s));
  again at each --inbound-sessions N with 50 caller frames/s per call inbound;
- target at each --target-sessions N: the issue 16 load, N sessions created and speaking within N/200 s
  (5 s at 1,000), 50 caller frames/s per call inbound up to --inbound-max, --duration seconds;
- burst at each --burst-sessions N: created and speaking within --burst-spread seconds (1 s), inbound;
- voice: --voice-sessions N speaking through each of --voices (espeak-ng in the daemon's process, each
  cloud adapter against its fake in another process), texts said --feed-ahead seconds ahead of playback;
- baseline: the same paced as the Go service before its pacing change (sleep after write,
  bench/baselines.py) at --baseline-sessions; baseline-go: the Go service as it is today (a fresh
  ticker per vendor chunk, one frame per message, running ahead of real time) at the same N;
- crosscheck: the lightweight receiver and the Asterisk simulator (softmix legs) side by side;
- flush at each --flush-sessions N (inbound): speak, flush at a staggered time, speak a new utterance;
- speed-inf: vendor at infinite speed at --inf-sessions;
- sweep of lead_frames x frames_per_message at --sweep-sessions for --sweep-duration seconds;
- the command plane (bench/amqp_latency.py through the broker) at --amqp-rate requests/s.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from bench.procs import ROOT, SERVE_GC, Scenario
from tts_streamer.actors.media_socket import PacingConfig

# What `tts-streamer serve` ships: PacingConfig's defaults (DaemonConfig takes its defaults from them)
# and tune_gc() applied at start-up (the driver does it when gc == "serve").
SHIPPED = (PacingConfig().lead_frames, PacingConfig().frames_per_message, SERVE_GC)
CREATES_PER_SECOND = 200  # target rows: 1,000 sessions created within 5 s


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def configs(text: str) -> list[tuple[int, int, str]]:
    """ "3/5,3/1/stock" -> [(3, 5, "serve"), (3, 1, "stock")]."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        parts = item.strip().split("/")
        out.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else SERVE_GC))
    return out


def parse_args(argv: list[str] | None, doc: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=(doc or "") + "\n" + (__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sessions", help="pacing N list (default 1,100,500)")
    p.add_argument("--duration", type=float, help="seconds of audio per session, pacing/target (default 60)")
    p.add_argument("--inbound-sessions", help="pacing N list with 50 caller frames/s inbound (default 500)")
    p.add_argument("--target-sessions", help="issue 16 target rows (default 1000,2000)")
    p.add_argument(
        "--inbound-max",
        type=int,
        default=1000,
        help="target rows above this N get no caller frames: one receiver process writing 50 frames/s per "
        "call costs ~12 us of CPU a write on loopback, 1.2 cores at 2,000 calls (default 1000)",
    )
    p.add_argument("--burst-sessions", help="burst N list (default 100,500)")
    p.add_argument("--burst-spread", type=float, default=1.0, help="burst: created within (default 1 s)")
    p.add_argument("--burst-duration", type=float, help="seconds of audio per burst session (default 20)")
    p.add_argument("--voices", help="engines of the voice rows (default espeak,gcp,elevenlabs,aws)")
    p.add_argument("--voice-sessions", help="N list of the voice rows (default 200)")
    p.add_argument("--voice-duration", type=float, help="seconds of audio per voice session (default 20)")
    p.add_argument("--feed-ahead", type=float, default=3.0, help="voice rows: say_adds this far ahead")
    p.add_argument("--flush-sessions", help="flush scenario N list (default 1,100,500,1000)")
    p.add_argument(
        "--candidates",
        help="other pacing configs as L/F[/gc], gc one of serve|stock|freeze|tuned|off (default none)",
    )
    p.add_argument(
        "--candidate-sessions", help="N list for the candidates' pacing and flush runs (default 500,1000)"
    )
    p.add_argument("--baseline-sessions", help="N list for the sleep-after-write baseline (default 1,100)")
    p.add_argument(
        "--crosscheck-sessions",
        help="N list dealt alternately to the lightweight receiver and the simulator (default 2,100)",
    )
    p.add_argument("--crosscheck-duration", type=float, help="default 20 (quick: --duration)")
    p.add_argument("--inf-sessions", help="N list with the vendor at infinite speed (default 100)")
    p.add_argument("--sweep-sessions", type=int, help="N for the lead/frames-per-message sweep (default 200)")
    p.add_argument("--sweep-duration", type=float, help="seconds per sweep point (default 15)")
    p.add_argument("--sweep-leads", help="default 3,15 (the old and the shipped lead)")
    p.add_argument("--sweep-fpm", help="frames per message, default 10,20")
    p.add_argument("--speed", type=float, default=4.0, help="synthetic vendor speed vs real time (default 4)")
    p.add_argument("--amqp-rate", type=float, help="command plane requests/s (default 1000; 0: skip)")
    p.add_argument("--amqp-requests", type=int, help="command plane requests (default 5000)")
    p.add_argument(
        "--only",
        help="comma list of scenario kinds to run (pacing,target,burst,voice,baseline,crosscheck,flush,"
        "speed-inf,sweep,amqp)",
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run with tiny N")
    p.add_argument(
        "--no-wait", action="store_true", help="start each scenario at once, not after the machine went quiet"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time only")
    p.add_argument(
        "--attempts",
        type=int,
        default=None,
        help="runs of a scenario while other processes load the machine (default 3, quick 1)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--keep-raw", type=Path, help="keep raw receiver and driver records in this folder")
    p.add_argument("--from-json", type=Path, help="re-render a results .json written by an earlier run")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the measured processes, e.g. -10 (root) on a machine shared with other work",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "sessions": "1,10" if quick else "1,100,500",
        "duration": 2.0 if quick else 60.0,
        "inbound_sessions": "" if quick else "500",
        "target_sessions": "6" if quick else "1000,2000",
        "burst_sessions": "4" if quick else "100,500",
        "burst_duration": 1.5 if quick else 20.0,
        "voices": "espeak,gcp,elevenlabs,aws",
        "voice_sessions": "2" if quick else "200",
        "voice_duration": 3.0 if quick else 20.0,
        "candidates": "",
        "candidate_sessions": "" if quick else "500,1000",
        "inf_sessions": "" if quick else "100",
        # Six points rather than twelve keep the whole `make bench` within ~25 min with the issue 16 rows.
        "sweep_leads": "0" if quick else "3,15",
        "sweep_fpm": "5" if quick else "10,20",
        "amqp_rate": 100.0 if quick else 1000.0,
        "amqp_requests": 200 if quick else 5000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sessions = ints(args.sessions)
    if args.attempts is None:
        args.attempts = 1 if quick else 3
    if args.flush_sessions is None:
        args.flush_sessions = str(max(sessions)) if quick else "1,100,500,1000"
    if args.baseline_sessions is None:
        args.baseline_sessions = str(min(sessions)) if quick else "1,100"
    if args.crosscheck_sessions is None:
        args.crosscheck_sessions = "2" if quick else "2,100"
    if args.crosscheck_duration is None:
        args.crosscheck_duration = args.duration if quick else 20.0
    if args.sweep_sessions is None:
        args.sweep_sessions = max(sessions) if quick else 200
    if args.sweep_duration is None:
        args.sweep_duration = args.duration if quick else 15.0
    return args


def plan(args: argparse.Namespace) -> list[Scenario]:
    common: dict[str, Any] = {"speed": args.speed}
    if args.quick:
        common |= {"idle_seconds": 0.3, "speak_ramp": 0.3}
    flush_extra: dict[str, Any] = (
        {"flush_after": 0.5, "flush_spread": 0.5, "new_seconds": 0.5} if args.quick else {}
    )
    lead, fpm, gc_mode = SHIPPED
    shipped: dict[str, Any] = {"lead_frames": lead, "frames_per_message": fpm, "gc": gc_mode}
    out: list[Scenario] = []
    for n in ints(args.sessions):
        out.append(Scenario("pacing", n, args.duration, **shipped, **common))
    for n in ints(args.inbound_sessions):
        out.append(Scenario("pacing", n, args.duration, inbound=True, **shipped, **common))
    for n in ints(args.target_sessions):
        spread = n / CREATES_PER_SECOND
        inbound = n <= args.inbound_max
        out.append(
            Scenario("target", n, args.duration, inbound=inbound, create_spread=spread, **shipped, **common)
        )
    for n in ints(args.burst_sessions):
        burst: dict[str, Any] = {"inbound": True, "create_spread": args.burst_spread}
        out.append(Scenario("burst", n, args.burst_duration, **burst, **shipped, **common))
    for engine in [v.strip() for v in args.voices.split(",") if v.strip()]:
        for n in ints(args.voice_sessions):
            voice: dict[str, Any] = {"engine": engine, "feed_ahead": args.feed_ahead, "inbound": True}
            out.append(Scenario("voice", n, args.voice_duration, **voice, **shipped, **common))
    for c_lead, c_fpm, c_gc in configs(args.candidates):
        for n in ints(args.candidate_sessions):
            candidate: dict[str, Any] = {"lead_frames": c_lead, "frames_per_message": c_fpm, "gc": c_gc}
            out.append(Scenario("pacing", n, args.duration, **candidate, **common))
    for n in ints(args.baseline_sessions):
        out.append(Scenario("baseline", n, args.duration, mode="sleep_after_write", **shipped, **common))
        go: dict[str, Any] = {"lead_frames": 0, "frames_per_message": 1, "gc": SERVE_GC}
        out.append(Scenario("baseline-go", n, args.duration, mode="go_today", **go, **common))
    for n in ints(args.crosscheck_sessions):
        cross: dict[str, Any] = {"receiver": "both", "inbound": True}
        out.append(Scenario("crosscheck", n, args.crosscheck_duration, **cross, **shipped, **common))
    for n in ints(args.flush_sessions):
        out.append(Scenario("flush", n, 0.0, flush=True, inbound=True, **shipped, **flush_extra, **common))
    for c_lead, c_fpm, c_gc in configs(args.candidates):
        for n in ints(args.candidate_sessions):
            candidate = {"lead_frames": c_lead, "frames_per_message": c_fpm, "gc": c_gc}
            out.append(Scenario("flush", n, 0.0, flush=True, **candidate, **flush_extra, **common))
    for n in ints(args.inf_sessions):
        out.append(Scenario("speed-inf", n, args.sweep_duration, **shipped, **(common | {"speed": math.inf})))
    for s_lead in ints(args.sweep_leads):
        for s_fpm in ints(args.sweep_fpm):
            point: dict[str, Any] = {"lead_frames": s_lead, "frames_per_message": s_fpm}
            out.append(Scenario("sweep", args.sweep_sessions, args.sweep_duration, **point, **common))
    if args.only:
        kinds = {k.strip() for k in args.only.split(",")}
        out = [sc for sc in out if sc.kind in kinds]
    return out


def wants_amqp(args: argparse.Namespace) -> bool:
    if args.amqp_rate <= 0:
        return False
    return not args.only or "amqp" in {k.strip() for k in args.only.split(",")}


def estimate_seconds(sc: Scenario) -> float:
    """Roughly what one run of ``sc`` takes on a quiet machine (set-up, connect, speech, analysis)."""
    connect = 0.0 if sc.create_spread is not None else sc.sessions * 0.004 + sc.idle_seconds
    return 6.0 + connect + sc.ramp + sc.speech_seconds + sc.sessions * 0.005 + (4.0 if sc.cloud else 0.0)
