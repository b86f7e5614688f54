"""PASS / FAIL for bench/run.py: issue 16's targets (decide the exit status), the earlier per-configuration
targets (for comparison), the harness's integrity checks and the sweep's recommendation.

Each issue 16 target reads one row of the table, named in its detail; a target whose row was not run
(``--only``, smaller ``--target-sessions``) is NOT MEASURED, which does not fail the run.
"""

from __future__ import annotations

import math
from typing import Any

from bench.plan import SHIPPED
from bench.procs import SERVE_GC, Scenario

Row = tuple[Scenario, dict[str, Any]]
Verdict = tuple[str, str, str]  # (target, PASS | FAIL | NOT MEASURED, detail)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _shipped(rows: list[Row], kind: str, n: int, **fields: Any) -> Row | None:
    """The row of ``kind`` at N=n measured with the shipped pacing config (and ``fields``)."""
    for sc, r in rows:
        same = sc.kind == kind and sc.sessions == n and sc.config_key == SHIPPED and sc.receiver == "light"
        if same and all(getattr(sc, k) == v for k, v in fields.items()):
            return sc, r
    return None


def _short(r: dict[str, Any]) -> str:
    """Sessions that never connected or did not finish speaking by the deadline, as a detail ("" if none)."""
    parts = []
    if r.get("connect_failures"):
        parts.append(f"{r['connect_failures']} sessions not connected")
    if r.get("unfinished_sessions"):
        parts.append(f"{r['unfinished_sessions']} sessions unfinished at the deadline")
    return "".join(f", {part}" for part in parts)


def _load_detail(sc: Scenario, r: dict[str, Any]) -> str:
    other = r.get("other_cpu_pct", math.nan)
    return f"{sc.kind} N={sc.sessions} ({sc.config_text}); other processes {other:.0f}% of a core"


def issue16(rows: list[Row], amqp: dict[str, Any] | None, target_n: int = 1000) -> list[Verdict]:
    """Issue 16's targets, one verdict each."""
    out: list[Verdict] = []
    big = target_n * 2

    name = (
        f"{target_n:,} sessions speaking, created within {target_n / 200:g} s, 50 caller frames/s inbound: "
        "0 late-for-playout frames, 0 modelled underrun ticks, daemon CPU < 50% of one core"
    )
    row = _shipped(rows, "target", target_n)
    if row:
        sc, r = row
        cpu = r.get("daemon_cpu_pct", math.nan)
        late, under = r["late_for_playout_frames"], r["underrun_ticks"]
        ok = late == 0 and under == 0 and cpu < 50.0 and not _short(r)
        detail = f"{late} late frames, {under} underrun ticks, daemon CPU {cpu:.0f}%{_short(r)}"
        out.append((name, _verdict(ok), f"{detail}; {_load_detail(sc, r)}"))
    else:
        out.append((name, "NOT MEASURED", f"no target row at N={target_n}"))

    name = f"{big:,} sessions (created within {big / 200:g} s): 0 modelled underrun ticks"
    row = _shipped(rows, "target", big)
    if row:
        sc, r = row
        ok = r["underrun_ticks"] == 0 and not _short(r)
        detail = f"{r['underrun_ticks']} underrun ticks ({r['sessions_with_underruns']} sessions){_short(r)}"
        out.append((name, _verdict(ok), f"{detail}; {_load_detail(sc, r)}"))
    else:
        out.append((name, "NOT MEASURED", f"no target row at N={big}"))

    name = "200 sessions all speaking through espeak-ng: 0 underrun ticks, command p99 < 10 ms meanwhile"
    row = _shipped(rows, "voice", 200, engine="espeak")
    if row:
        sc, r = row
        cmd = r["commands_ms"]
        errors = cmd.get("errors", 0)
        ok = (
            r["underrun_ticks"] == 0 and cmd["p99"] < 10.0 and not errors and not r.get("unfinished_sessions")
        )
        detail = (
            f"{r['underrun_ticks']} underrun ticks, commands p99 {cmd['p99']:.2f} ms (max {cmd['max']:.1f} "
            f"ms, {cmd['n']} commands, {errors} answered with an error)"
        )
        out.append((name, _verdict(ok), f"{detail}; {_load_detail(sc, r)}"))
    else:
        out.append((name, "NOT MEASURED", "no espeak voice row at N=200"))

    name = f"added first-audio latency (vendor byte -> socket) p99 < 5 ms at {target_n:,} sessions"
    row = _shipped(rows, "target", target_n)
    if row:
        sc, r = row
        fa = r["first_audio_ms"]
        out.append(
            (name, _verdict(fa["p99"] < 5.0), f"p99 {fa['p99']:.2f} ms over {fa['n']}; {_load_detail(sc, r)}")
        )
    else:
        out.append((name, "NOT MEASURED", f"no target row at N={target_n}"))

    name = f"flush (say_flush -> FLUSH_MEDIA on the wire) p99 < 5 ms at {target_n:,} sessions"
    row = _shipped(rows, "flush", target_n)
    if row:
        sc, r = row
        fm = r["flush_media_ms"]
        detail = f"p99 {fm['p99']:.2f} ms, max {fm['max']:.2f} ms over {r['flushes']} flushes"
        out.append((name, _verdict(fm["p99"] < 5.0), f"{detail}; {_load_detail(sc, r)}"))
    else:
        out.append((name, "NOT MEASURED", f"no flush row at N={target_n}"))

    name = "command plane: 1,000 requests/s per pod at p99 < 10 ms (bench/amqp_latency.py, pipelined)"
    if amqp and "error" not in amqp:
        ok = (
            amqp["rate"] >= 1000
            and amqp["achieved"] >= 0.95 * amqp["rate"]
            and amqp["failed"] == 0
            and amqp.get("p99_ms", math.inf) < 10.0
        )
        detail = (
            f"offered {amqp['rate']:.0f}/s, achieved {amqp['achieved']:.0f}/s, {amqp['failed']:.0f} failed, "
            f"p99 {amqp.get('p99_ms', math.nan):.2f} ms; load average {amqp.get('load', math.nan):.2f}"
        )
        out.append((name, _verdict(ok), detail))
    else:
        why = amqp["error"] if amqp else "not run"
        out.append((name, "NOT MEASURED", why))

    name = "idle session < 64 KiB (RSS per connected, silent session)"
    idle = [
        (sc, r)
        for sc, r in rows
        if sc.kind == "pacing" and sc.config_key == SHIPPED and not math.isnan(r["rss_idle_kib_per_session"])
    ]
    if idle:
        sc, r = max(idle, key=lambda row: row[0].sessions)
        kib = r["rss_idle_kib_per_session"]
        out.append((name, _verdict(kib < 64), f"{kib:.1f} KiB per idle session at N={sc.sessions}"))
    else:
        out.append((name, "NOT MEASURED", "no pacing run"))
    return out


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
    pacing = {sc.sessions: (sc, r) for sc, r in mine if sc.kind == "pacing" and not sc.inbound}
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
        skipped = r.get("caller_frames_skipped", 0)
        if skipped > 0.01 * max(1, r.get("caller_frames_sent", 0)):
            problems.append(
                f"{tag}: the receiver fell behind and skipped {skipped} caller frames (inbound < 50/s)"
            )
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
