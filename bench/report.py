"""Markdown for the terminal and for bench/results/<date>.md: tables, targets, recommendation."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from typing import Any

from bench.procs import ROOT, Scenario

Row = tuple[Scenario, dict[str, Any]]


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _lat(r: dict[str, Any], key: str = "lateness_ms") -> str:
    lat = r[key]
    return f"{_f(lat['p50'])} / {_f(lat['p99'])} / {_f(lat['max'])}"


def _cpu(r: dict[str, Any], key: str) -> str:
    value = r.get(key)
    if value is None or math.isnan(value):
        return "-"
    text = f"{value:.0f}"
    if key == "receiver_cpu_pct" and value >= 90:
        text += " (saturated)"
    return text


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def main_table(rows: list[Row]) -> str:
    head = [
        "scenario",
        "N",
        "config",
        "frames/s (ideal)",
        "lateness p50 / p99 / max ms",
        "steady-state p99 ms",
        "drift worst ms",
        "late-for-playout frames / modelled underrun ticks",
        "while starting: lateness p99 / max ms; late frames / underrun ticks",
        "commands p50 / p99 / max ms (n)",
        "caller frames sent / read by the daemon",
        "first audio p50 / p99 ms",
        "daemon CPU %",
        "RSS KiB/session speaking / idle",
        "receiver CPU %",
        "other processes CPU %",
        "flush ack p50 / p99 ms",
        "FLUSH_MEDIA on the wire p50 / p99 ms",
        "old frames after FLUSH_MEDIA / after ack",
        "ack -> next first frame p50 / p99 ms",
    ]
    body = []
    for sc, r in rows:
        fps = "-"
        if not sc.flush:
            fps = f"{r.get('fps', math.nan):,.0f} ({r.get('fps_ideal', 0):,.0f})"
            if r.get("unfinished_sessions"):
                fps += f"; {r['unfinished_sessions']} sessions unfinished at the deadline"
        fa = r["first_audio_ms"]
        flush_cols = ["-", "-", "-", "-"]
        if sc.flush:
            ack, nx = r["flush_ack_ms"], r["ack_to_next_first_frame_ms"]
            wire = r.get("flush_media_ms", {"p50": math.nan, "p99": math.nan})
            flush_cols = [
                f"{_f(ack['p50'])} / {_f(ack['p99'])}",
                f"{_f(wire['p50'])} / {_f(wire['p99'])}",
                f"{r['old_frames_after_flush_text']} / {r['old_frames_after_ack_kernel']}",
                f"{_f(nx['p50'], 1)} / {_f(nx['p99'], 1)}",
            ]
        steady = r.get("steady_lateness_ms", {}).get("p99") if not sc.flush else None
        busy = r.get("other_cpu_pct", 0.0) > 25.0
        burst = r.get("burst", {})
        cmd = r.get("commands_ms", {"n": 0})
        commands = "-"
        if cmd["n"]:
            commands = f"{_f(cmd['p50'])} / {_f(cmd['p99'])} / {_f(cmd['max'], 1)} ({cmd['n']:,})"
            if cmd.get("errors"):
                commands += f"; {cmd['errors']:,} answered with an error"
        caller = f"{r.get('caller_frames_sent', 0):,} / {r.get('caller_frames_daemon', 0):,}"
        if r.get("caller_frames_dropped"):
            caller += f" ({r['caller_frames_dropped']:,} dropped: the daemon did not read)"
        if r.get("caller_frames_skipped"):
            caller += f" ({r['caller_frames_skipped']:,} skipped: the receiver fell behind)"
        body.append(
            [
                sc.label + (" (machine busy)" if busy else ""),
                str(sc.sessions),
                sc.config_text + ("" if sc.flush else f", {sc.duration:g} s"),
                fps,
                _lat(r),
                _f(steady),
                _f(r["drift_ms"]["worst"]),
                f"{r['late_for_playout_frames']} / {r['underrun_ticks']}",
                f"{_f(burst.get('p99'))} / {_f(burst.get('max'))}; "
                f"{burst.get('late_frames', 0)} / {burst.get('underrun_ticks', 0)}",
                commands,
                caller,
                f"{_f(fa['p50'])} / {_f(fa['p99'])}",
                _cpu(r, "daemon_cpu_pct"),
                f"{_f(r.get('rss_speaking_kib_per_session'), 0)} / "
                f"{_f(r.get('rss_idle_kib_per_session'), 0)}",
                _cpu(r, "receiver_cpu_pct"),
                _cpu(r, "other_cpu_pct"),
                *flush_cols,
            ]
        )
    return _table(head, body)


def sweep_table(rows: list[Row]) -> str:
    head = [
        "lead L",
        "frames/msg F",
        "messages/s",
        "lateness p50 / p99 / max ms",
        "late-for-playout frames (worst phase)",
        "modelled underrun ticks (sessions)",
        "daemon CPU %",
        "GC % of speaking time",
        "receiver CPU %",
        "other processes CPU %",
    ]
    body = []
    for sc, r in rows:
        msgs = r["messages_received"] / sc.duration if sc.duration else math.nan
        body.append(
            [
                str(sc.lead_frames),
                str(sc.frames_per_message),
                f"{msgs:,.0f}",
                _lat(r),
                f"{r['late_for_playout_frames']} of {r['frames_received']:,}",
                f"{r['underrun_ticks']} ({r['sessions_with_underruns']})",
                _cpu(r, "daemon_cpu_pct"),
                _f(r.get("gc_pct"), 0),
                _cpu(r, "receiver_cpu_pct"),
                _cpu(r, "other_cpu_pct"),
            ]
        )
    return _table(head, body)


def baseline_table(pairs: list[tuple[Row, Row]]) -> str:
    head = [
        "N",
        "ours p99 / max ms",
        "baseline p99 / max ms",
        "ours drift ms",
        "baseline drift ms",
        "p99 ratio ours/baseline",
        "drift ratio ours/baseline",
        "late-for-playout frames ours / baseline",
    ]
    body = []
    for (sc, ours), (_, base) in pairs:
        b99 = base["lateness_ms"]["p99"]
        d_o, d_b = abs(ours["drift_ms"]["worst"]), abs(base["drift_ms"]["worst"])
        body.append(
            [
                str(sc.sessions),
                f"{_f(ours['lateness_ms']['p99'])} / {_f(ours['lateness_ms']['max'])}",
                f"{_f(b99)} / {_f(base['lateness_ms']['max'])}",
                _f(ours["drift_ms"]["worst"]),
                _f(base["drift_ms"]["worst"]),
                _f(ours["lateness_ms"]["p99"] / b99 if b99 else math.nan, 4),
                _f(d_o / d_b if d_b else math.nan, 4),
                f"{ours['late_for_playout_frames']} / {base['late_for_playout_frames']} "
                f"of {base['frames_received']:,}",
            ]
        )
    return _table(head, body)


def crosscheck_table(pairs: list[tuple[Row, Row]]) -> str:
    head = [
        "N",
        "receiver",
        "lateness p50 / p99 / max ms (kernel stamp)",
        "same, by receiver read time",
        "drift worst ms",
        "modelled underrun ticks",
        "simulator's own underruns / frames played",
        "first audio p50 / p99 ms",
        "receiver CPU %",
    ]
    body = []
    for light, sim in pairs:
        for (sc, r), name in ((light, "lightweight"), (sim, "simulator")):
            own = r.get("sim")
            fa = r["first_audio_ms"]
            body.append(
                [
                    str(sc.sessions),
                    name,
                    _lat(r),
                    _lat(r, "lateness_user_ms"),
                    _f(r["drift_ms"]["worst"]),
                    str(r["underrun_ticks"]),
                    f"{own['underruns']} / {own['frames_played']:,}" if own else "-",
                    f"{_f(fa['p50'])} / {_f(fa['p99'])}",
                    _cpu(r, "receiver_cpu_pct"),
                ]
            )
    return _table(head, body)


def _proc_field(path: str, name: str) -> str:
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_facts() -> list[str]:
    model = _proc_field("/proc/cpuinfo", "model name")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    mem_kib = _proc_field("/proc/meminfo", "MemTotal").split(" ")[0]
    mem = f"{int(mem_kib) / 2**20:.0f} GiB" if mem_kib.isdigit() else "?"

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return [
        f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} cores ({model or 'unknown CPU'}), {mem} RAM, "
        f"Linux {platform.release()}",
        f"- Python {platform.python_version()} ({sys.implementation.name}), trio {version('trio')}, "
        f"trio-websocket {version('trio-websocket')}, wsproto {version('wsproto')}, numpy {version('numpy')}",
        f"- tts-streamer commit {commit}{' + uncommitted changes' if dirty else ''}",
    ]
