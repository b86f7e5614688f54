"""`make bench`: pacing, flush and first-audio latency of tts-streamer, measured in one run.

Each scenario runs the daemon side (bench/driver.py: the real supervisor, sessions, pacer and
websocket dialer, fed by the synthetic vendor) and a receiver (bench/receiver.py, a lightweight
chan_websocket endpoint; or bench/sim_receiver.py, the Asterisk simulator, for the cross-check) as two
processes on 127.0.0.1, timestamps on CLOCK_MONOTONIC. Scenarios:

- pacing at each --sessions N for --duration seconds, as `serve` ships (PacingConfig's defaults, tune_gc());
- baseline: the same paced as the Go service before its pacing change (sleep after write,
  bench/baselines.py) at --baseline-sessions; baseline-go: the Go service as it is today (a fresh
  ticker per vendor chunk, one frame per message, running ahead of real time) at the same N;
- crosscheck: the same as pacing with the Asterisk simulator as receiver at --crosscheck-sessions;
- flush at each --flush-sessions N: speak, flush at a staggered time, speak a new utterance;
- speed-inf: vendor at infinite speed at --inf-sessions;
- sweep of lead_frames x frames_per_message at --sweep-sessions for --sweep-duration seconds;
- lead-sweep (only with --only lead-sweep): bench/lead_sweep.py, leads to 500 ms and messages to
  200 ms, the rule that picks PacingConfig's defaults.

Prints one markdown table, writes bench/results/<date>.md (--out), and exits 1 when a target is
missed (2 when the harness itself failed), after writing the results.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any

import attrs

from bench import analyze as an
from bench import procs, report
from bench.procs import ROOT, SERVE_GC, Scenario, ScenarioError, run_scenario, wait_quiet
from tts_streamer.actors.media_socket import PacingConfig

Row = tuple[Scenario, dict[str, Any]]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _configs(text: str) -> list[tuple[int, int, str]]:
    """ "3/5,3/1/stock" -> [(3, 5, "serve"), (3, 1, "stock")]."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        parts = item.strip().split("/")
        out.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else SERVE_GC))
    return out


# What `tts-streamer serve` ships: PacingConfig's defaults (DaemonConfig takes its defaults from them)
# and tune_gc() applied at start-up (the driver does it when gc == "serve").
SHIPPED = (PacingConfig().lead_frames, PacingConfig().frames_per_message, SERVE_GC)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sessions", help="pacing N list, shipped pacing defaults (default 1,100,500,1000)")
    p.add_argument("--duration", type=float, help="seconds of audio per session in pacing runs (default 60)")
    p.add_argument("--flush-sessions", help="flush scenario N list (default 1,100,500,1000)")
    p.add_argument(
        "--candidates",
        help="other pacing configs as L/F[/gc], gc one of serve|stock|freeze|tuned|off "
        "(default 3/1/stock,3/5/stock: the old defaults, and the shipped F without tune_gc)",
    )
    p.add_argument(
        "--candidate-sessions", help="N list for the candidates' pacing and flush runs (default 500,1000)"
    )
    p.add_argument("--baseline-sessions", help="N list for the sleep-after-write baseline (default 1,100)")
    p.add_argument(
        "--crosscheck-sessions",
        help="N list dealt alternately to the lightweight receiver and the simulator (default 2,100)",
    )
    p.add_argument("--crosscheck-duration", type=float, help="default: --duration")
    p.add_argument("--inf-sessions", help="N list with the vendor at infinite speed (default 100)")
    p.add_argument("--sweep-sessions", type=int, help="N for the lead/frames-per-message sweep (default 200)")
    p.add_argument("--sweep-duration", type=float, help="seconds per sweep point (default 15)")
    p.add_argument("--sweep-leads", help="default 0,1,3,5")
    p.add_argument("--sweep-fpm", help="frames per message, default 1,2,5")
    p.add_argument("--speed", type=float, default=4.0, help="synthetic vendor speed vs real time (default 4)")
    p.add_argument(
        "--only", help="comma list of scenario kinds to run (pacing,baseline,crosscheck,flush,...)"
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run with tiny N")
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
        "sessions": "1,10" if quick else "1,100,500,1000",
        "duration": 2.0 if quick else 60.0,
        "candidates": "" if quick else "3/1/stock,3/5/stock",
        "candidate_sessions": "" if quick else "500,1000",
        "inf_sessions": "" if quick else "100",
        "sweep_leads": "0" if quick else "0,1,3,5",
        "sweep_fpm": "5" if quick else "1,2,5",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sessions = _ints(args.sessions)
    if args.attempts is None:
        args.attempts = 1 if quick else 3
    if args.flush_sessions is None:
        args.flush_sessions = str(max(sessions)) if quick else "1,100,500,1000"
    if args.baseline_sessions is None:
        args.baseline_sessions = str(min(sessions)) if quick else "1,100"
    if args.crosscheck_sessions is None:
        args.crosscheck_sessions = "2" if quick else "2,100"
    if args.crosscheck_duration is None:
        args.crosscheck_duration = args.duration
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
    for n in _ints(args.sessions):
        out.append(Scenario("pacing", n, args.duration, **shipped, **common))
    for c_lead, c_fpm, c_gc in _configs(args.candidates):
        for n in _ints(args.candidate_sessions):
            out.append(
                Scenario(
                    "pacing",
                    n,
                    args.duration,
                    lead_frames=c_lead,
                    frames_per_message=c_fpm,
                    gc=c_gc,
                    **common,
                )
            )
    for n in _ints(args.baseline_sessions):
        out.append(Scenario("baseline", n, args.duration, mode="sleep_after_write", **shipped, **common))
        go: dict[str, Any] = {"lead_frames": 0, "frames_per_message": 1, "gc": SERVE_GC}
        out.append(Scenario("baseline-go", n, args.duration, mode="go_today", **go, **common))
    for n in _ints(args.crosscheck_sessions):
        out.append(Scenario("crosscheck", n, args.crosscheck_duration, receiver="both", **shipped, **common))
    for n in _ints(args.flush_sessions):
        out.append(Scenario("flush", n, 0.0, flush=True, **shipped, **flush_extra, **common))
    for c_lead, c_fpm, c_gc in _configs(args.candidates):
        for n in _ints(args.candidate_sessions):
            out.append(
                Scenario(
                    "flush",
                    n,
                    0.0,
                    flush=True,
                    lead_frames=c_lead,
                    frames_per_message=c_fpm,
                    gc=c_gc,
                    **flush_extra,
                    **common,
                )
            )
    for n in _ints(args.inf_sessions):
        out.append(Scenario("speed-inf", n, args.sweep_duration, **shipped, **(common | {"speed": math.inf})))
    for s_lead in _ints(args.sweep_leads):
        for s_fpm in _ints(args.sweep_fpm):
            out.append(
                Scenario(
                    "sweep",
                    args.sweep_sessions,
                    args.sweep_duration,
                    lead_frames=s_lead,
                    frames_per_message=s_fpm,
                    **common,
                )
            )
    if args.only:
        kinds = {k.strip() for k in args.only.split(",")}
        out = [sc for sc in out if sc.kind in kinds]
    return out


# ------------------------------------------------------------------------------------------- targets


def config_name(key: tuple[int, int, str]) -> str:
    lead, fpm, gc = key
    text = f"lead_frames={lead}, frames_per_message={fpm}"
    if gc != SERVE_GC:
        text += f", gc {gc}"
    return text + (" (shipped defaults)" if key == SHIPPED else "")


def evaluate(rows: list[Row], key: tuple[int, int, str]) -> list[tuple[str, str, str]]:
    """(target, PASS|FAIL|NOT MEASURED, detail) for the runs of one pacing configuration."""
    mine = [
        (sc, r) for sc, r in rows if sc.config_key == key and sc.mode == "absolute" and sc.receiver == "light"
    ]
    pacing = {sc.sessions: (sc, r) for sc, r in mine if sc.kind == "pacing"}
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    name = "pacing p99 < 2 ms and |drift| < 1 frame after 60 s, 500 sessions"
    if 500 in pacing:
        sc, r = pacing[500]
        p99, drift = r["lateness_ms"]["p99"], r["drift_ms"]["worst"]
        ok = p99 < 2.0 and abs(drift) < 20.0
        note = "" if sc.duration >= 60 else f" (only {sc.duration:g} s of audio)"
        out.append((name, verdict(ok), f"p99 {p99:.3f} ms, worst drift {drift:.3f} ms{note}"))
    else:
        out.append((name, "NOT MEASURED", "no pacing run at N=500"))

    name = "0 frames of flushed audio after the flush acknowledgement, every N"
    flushes = [(sc, r) for sc, r in mine if sc.kind == "flush"]
    if flushes:
        bad = [
            sc.sessions
            for sc, r in flushes
            if r["old_frames_after_flush_text"]
            or r["old_frames_after_ack_kernel"]
            or r["flush_missing_text"]
            or r["flushes"] != sc.sessions
        ]
        detail = "; ".join(
            f"N={sc.sessions}: {r['old_frames_after_flush_text']} after FLUSH_MEDIA, "
            f"{r['old_frames_after_ack_kernel']} arrived after the ack (kernel stamp), "
            f"{r['old_frames_after_ack_read']} read after it; {r['flushes']} flushes"
            for sc, r in flushes
        )
        out.append((name, verdict(not bad), detail))
    else:
        out.append((name, "NOT MEASURED", "no flush run"))

    name = "first-audio added latency p99 < 5 ms (N <= 500)"
    fa = [(sc, r) for sc, r in mine if sc.kind in ("pacing", "flush") and r["first_audio_ms"]["n"]]
    checked = [(sc, r) for sc, r in fa if sc.sessions <= 500]
    if checked:
        ok = all(r["first_audio_ms"]["p99"] < 5.0 for _, r in checked)
        detail = "; ".join(
            f"{sc.kind} N={sc.sessions}: p99 {r['first_audio_ms']['p99']:.2f} ms" for sc, r in fa
        )
        out.append((name, verdict(ok), detail))
    else:
        out.append((name, "NOT MEASURED", "no first-audio samples at N <= 500"))

    name = "1000 sessions in one process, no frame deadline missed by more than 20 ms"
    if 1000 in pacing:
        sc, r = pacing[1000]
        worst = r["lateness_ms"]["max"]
        out.append(
            (
                name,
                verdict(worst <= 20.0),
                f"max lateness {worst:.2f} ms, p99 {r['lateness_ms']['p99']:.2f} ms",
            )
        )
    else:
        out.append((name, "NOT MEASURED", "no pacing run at N=1000"))

    name = "idle session < 256 KiB RSS"
    if pacing:
        n_max = max(pacing)
        sc, r = pacing[n_max]
        kib = r["rss_idle_kib_per_session"]
        out.append((name, verdict(kib < 256), f"{kib:.1f} KiB per idle session at N={n_max}"))
    else:
        out.append((name, "NOT MEASURED", "no pacing run"))
    return out


def integrity(rows: list[Row]) -> list[str]:
    problems: list[str] = []
    for sc, r in rows:
        tag = f"{sc.label} N={sc.sessions} {sc.config_text}"
        if r["connect_failures"]:
            problems.append(f"{tag}: {r['connect_failures']} sessions failed to connect")
        if r["session_errors"]:
            problems.append(f"{tag}: {r['session_errors']} session errors")
        if r["connected"] != r["sessions_here"]:
            problems.append(f"{tag}: receiver saw {r['connected']} connections")
        if r["frames_received"] != r["frames_sent"]:
            problems.append(f"{tag}: sent {r['frames_sent']} frames, received {r['frames_received']}")
        if r["receiver_faults"]:
            problems.append(f"{tag}: {r['receiver_faults']} protocol faults seen by the receiver")
    return problems


def recommend(sweep: list[Row]) -> list[str]:
    """Defaults from the sweep: the cheapest frames-per-message that keeps up, then a lead that covers
    the worst stall seen with it (a lead of L frames absorbs L * 20 ms of lateness at any tick phase)."""
    if not sweep:
        return ["No sweep was run."]
    by_f: dict[int, list[Row]] = {}
    for sc, r in sweep:
        by_f.setdefault(sc.frames_per_message, []).append((sc, r))
    keeping_up = {
        f: rows
        for f, rows in by_f.items()
        if all(r.get("fps", 0) >= 0.99 * r.get("fps_ideal", math.inf) for _, r in rows)
        and any(r["late_for_playout_frames"] == 0 for _, r in rows)
    }
    lines = []
    for f, rows in sorted(by_f.items()):
        cpu = max(r.get("daemon_cpu_pct", math.nan) for _, r in rows)
        worst = max(r["lateness_ms"]["max"] for _, r in rows)
        clean = [sc.lead_frames for sc, r in rows if r["late_for_playout_frames"] == 0]
        lines.append(
            f"F={f}: daemon CPU up to {cpu:.0f}%, worst lateness {worst:.1f} ms over all leads, "
            f"leads with no late-for-playout frame: {clean or 'none'}"
            + ("" if f in keeping_up else " (does not keep up at this N)")
        )
    if not keeping_up:
        lines.append("No frames-per-message value kept up at this N: no recommendation from this sweep.")
        return lines
    f = min(keeping_up, key=lambda k: max(r.get("daemon_cpu_pct", math.inf) for _, r in keeping_up[k]))
    worst = max(r["lateness_ms"]["max"] for _, r in keeping_up[f])
    leads = sorted(sc.lead_frames for sc, _ in keeping_up[f])
    covering = [lead for lead in leads if lead * 20.0 > worst]
    lead = covering[0] if covering else leads[-1]
    lines.append(
        f"Rule: the cheapest F that keeps up, then the smallest lead whose cushion (L x 20 ms) exceeds "
        f"the worst lateness seen with that F: lead_frames={lead}, frames_per_message={f}."
    )
    return lines


# ------------------------------------------------------------------------------------------- main


OTHER_LOAD_LIMIT = 25.0  # % of one core used by other processes during the steady window


def run_and_analyze(sc: Scenario, raw: Path, tag: str) -> list[Row]:
    paths, drv = run_scenario(sc, raw, tag)
    results: list[Row] = []
    for index, (kind, path) in enumerate(paths.items()):
        cols, meta = an.load_receiver(path)
        row_sc = sc if len(paths) == 1 else attrs.evolve(sc, receiver=kind)
        results.append((row_sc, an.analyze(cols, meta, drv, receiver_index=index)))
        del cols
    receivers_cpu = sum(r.get("receiver_cpu_pct", math.nan) for _, r in results)
    for _, result in results:
        # What the rest of the machine used meanwhile (other processes share these two cores).
        other = (
            result.get("machine_cpu_pct", math.nan) - result.get("daemon_cpu_pct", math.nan) - receivers_cpu
        )
        result["other_cpu_pct"] = other if math.isnan(other) else max(0.0, other)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only and "lead-sweep" in {k.strip() for k in args.only.split(",")}:
        from bench import lead_sweep  # its own module and results file (bench/lead_sweep.py)

        return lead_sweep.main(["--quick"] if args.quick else [])
    scenarios = plan(args) if args.from_json is None else []
    procs.NICE = args.nice
    rows: list[Row] = []
    errors: list[str] = []
    started = time.monotonic()
    raw = Path(tempfile.mkdtemp(prefix="tts-bench-")) if args.keep_raw is None else args.keep_raw
    print(f"bench: {len(scenarios)} scenarios; raw records in {raw}", flush=True)
    try:
        for i, sc in enumerate(scenarios):
            if not args.quick:
                busy = wait_quiet(0.0)
                if busy >= OTHER_LOAD_LIMIT:
                    print(
                        f"    the machine stayed busy ({busy:.0f}% of a core) for 90 s; going on", flush=True
                    )
            print(
                f"[{time.monotonic() - started:6.0f}s] {sc.label} N={sc.sessions} {sc.config_text} ...",
                flush=True,
            )
            best: list[Row] | None = None
            best_other = math.inf
            for attempt in range(1, args.attempts + 1):
                tag = f"{i:02d}-{sc.kind}-n{sc.sessions}-l{sc.lead_frames}-f{sc.frames_per_message}-{attempt}"
                try:
                    results = run_and_analyze(sc, raw, tag)
                except (ScenarioError, OSError, ValueError, KeyError) as exc:
                    errors.append(f"{sc.label} N={sc.sessions}: {exc}")
                    print(f"    FAILED: {exc}", flush=True)
                    traceback.print_exc()
                    break
                other = max(
                    (r["other_cpu_pct"] for _, r in results), key=lambda x: -1 if math.isnan(x) else x
                )
                for row_sc, result in results:
                    result["attempt"] = attempt
                    lat = result["lateness_ms"]
                    print(
                        f"    {row_sc.receiver}: lateness p50 {lat['p50']:.3f} p99 {lat['p99']:.3f} "
                        f"max {lat['max']:.3f} ms, daemon CPU {result.get('daemon_cpu_pct', math.nan):.0f}%, "
                        f"receiver CPU {result.get('receiver_cpu_pct', math.nan):.0f}%, "
                        f"GC {result.get('gc_pct', math.nan):.1f}%, other processes {other:.0f}%",
                        flush=True,
                    )
                if best is None or other < best_other:
                    best, best_other = results, other
                if not other > OTHER_LOAD_LIMIT or attempt == args.attempts:
                    break
                print(
                    f"    other processes used {other:.0f}% of a core: disturbed, running it again",
                    flush=True,
                )
                wait_quiet(2.0)
            if best is not None:
                rows.extend(best)
    finally:
        if args.keep_raw is None:
            shutil.rmtree(raw, ignore_errors=True)

    elapsed, argv_used = time.monotonic() - started, sys.argv[1:]
    if args.from_json is not None:
        dump = json.loads(args.from_json.read_text())
        rows = [(Scenario(**sc), r) for sc, r in dump["rows"]]
        elapsed, argv_used, errors = dump["elapsed"], dump["argv"], dump["errors"]
    keys = [SHIPPED] + [c for c in _configs(args.candidates) if c != SHIPPED]
    targets = {key: evaluate(rows, key) for key in keys}
    problems = integrity(rows)
    text = render(args, rows, targets, problems, errors, elapsed, argv_used)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}{'-quick' if args.quick else ''}.md"
    path.write_text(text)
    if args.from_json is None:
        rows_out = [(attrs.asdict(sc), r) for sc, r in rows]
        dump = {"argv": argv_used, "elapsed": elapsed, "rows": rows_out, "errors": errors}
        path.with_suffix(".json").write_text(json.dumps(dump))
    print()
    print(report.main_table([(sc, r) for sc, r in rows if sc.kind != "sweep"]))
    print()
    for key, verdicts in targets.items():
        print(f"targets for {config_name(key)}:")
        for name, status, detail in verdicts:
            print(f"{status:>14}  {name}: {detail}")
    for problem in problems:
        print(f"{'CHECK':>14}  {problem}")
    for error in errors:
        print(f"{'ERROR':>14}  {error}")
    print(f"\nresults written to {path}")
    if errors:
        return 2
    if problems or any(status == "FAIL" for _, status, _ in targets[SHIPPED]):
        print("bench: a target was missed (shipped pacing defaults)", file=sys.stderr)
        return 1
    return 0


def render(
    args: argparse.Namespace,
    rows: list[Row],
    targets: dict[tuple[int, int, str], list[tuple[str, str, str]]],
    problems: list[str],
    errors: list[str],
    elapsed: float,
    argv: list[str],
) -> str:
    out = [
        f"# tts-streamer benchmark, {date.today().isoformat()}{' (quick smoke run)' if args.quick else ''}",
        "",
    ]
    out += report.machine_facts()
    out.append(f"- command: `python -m bench.run {' '.join(argv)}` ({elapsed / 60:.1f} min)")
    out += [
        "- setup: the daemon side (supervisor, sessions, pacer, real websocket dialer, synthetic vendor "
        f"emitting pre-encoded mu-law at {args.speed:g}x real time unless `inf`) and the receiver run as "
        "two processes on 127.0.0.1; sessions start speaking spread over max(1 s, N/200 s); arrival times "
        "are kernel receive stamps (SO_TIMESTAMPNS) on CLOCK_MONOTONIC, the clock the driver stamps "
        "commands and vendor bytes with",
        f"- driver and receivers ran at niceness {args.nice}"
        + (" (the machine is shared with other work)" if args.nice else ""),
        "- config column: L = lead_frames, F = frames_per_message, vendor speed; every row applies "
        "`tune_gc()` at start-up as `serve` does, unless it says `gc stock` (the stock collector) or "
        "names another experiment (see Notes)",
        "",
        "## Results",
        "",
        report.main_table([(sc, r) for sc, r in rows if sc.kind != "sweep"]),
        "",
        "## Targets",
        "",
    ]
    for key, results in targets.items():
        exit_note = " (decides the exit status)" if key == SHIPPED else " (for comparison)"
        out.append(f"{config_name(key)}{exit_note}:")
        out.append("")
        out += [f"- **{status}** {name}: {detail}" for name, status, detail in results]
        out.append("")
    out += [f"- **CHECK** {p}" for p in problems]
    out += [f"- **ERROR** {e}" for e in errors]
    light = [(sc, r) for sc, r in rows if sc.config_key == SHIPPED and sc.speed == args.speed]
    by = {(sc.kind, sc.sessions): (sc, r) for sc, r in light if sc.kind != "sweep"}
    pairs = [
        (by[("pacing", n)], by[("baseline", n)])
        for n in _ints(args.baseline_sessions)
        if ("pacing", n) in by and ("baseline", n) in by
    ]
    if pairs:
        out += [
            "",
            "## Absolute timeline vs the sleep-after-write baseline",
            "",
            report.baseline_table(pairs),
        ]
    split = {(sc.sessions, sc.receiver): (sc, r) for sc, r in rows if sc.kind == "crosscheck"}
    cross = [
        (split[(n, "light")], split[(n, "sim")])
        for n in _ints(args.crosscheck_sessions)
        if (n, "light") in split and (n, "sim") in split
    ]
    if cross:
        out += [
            "",
            "## Cross-check: lightweight receiver vs the Asterisk simulator",
            "",
            report.crosscheck_table(cross),
        ]
    sweep = [(sc, r) for sc, r in rows if sc.kind == "sweep"]
    if sweep:
        out += [
            "",
            f"## Sweep: lead_frames x frames_per_message at N={sweep[0][0].sessions}, "
            f"{sweep[0][0].duration:g} s each",
            "",
            report.sweep_table(sweep),
            "",
        ]
        out += ["- " + line for line in recommend(sweep)]
    out += ["", "## Definitions", "", (an.__doc__ or "").strip().split("\n\n", 1)[-1]]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists() and not args.quick:
        out += ["", notes.read_text().strip()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
