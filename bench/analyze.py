"""Turns one scenario's raw records (receiver columns + driver JSON) into the figures of the table.

Definitions (all times CLOCK_MONOTONIC, T = 20 ms, L = lead_frames):

- Timeline of an utterance on one connection: t0 = arrival of its first message; a message whose
  first frame is frame k of the utterance is due at ``t0 + max(0, k - L) * T`` (a message of m frames
  is due at the slot of its first frame). Lateness = arrival - due. Drift = lateness of the last message.
- Late for playout (worst tick phase): Asterisk plays frame k no earlier than ``t0 + k*T``, so a frame
  arriving after that may leave a tick empty, an audible gap, whatever the phase of Asterisk's clock.
- Underrun ticks (modelled): Asterisk's 50 Hz clock with a random phase per call (seeded) plays one
  queued frame per tick; empty ticks between an utterance's first and last frame are counted, as the
  simulator does.
- Frames/s achieved: frames arriving while every session is speaking (1 s after the last first
  message to 1 s before the first last message), over that window; ideal = 50 per session.
- Burst window: from the first session's start to 1 s after the last one started (all created and
  speaking, for a burst), the lateness of the messages arriving in it and the late-for-playout frames and
  modelled underrun ticks of the frames arriving in it.
- Commands: the round trip of every command the driver sent while speaking (say_init, say_add,
  say_flush, say_finish: ``Supervisor.call`` until the session's reply); "steady" counts those sent
  inside the CPU window.
- Caller frames: what the receiver sent (50/s per call with inbound audio) and the daemon counted.
- Flush: FLUSH_MEDIA on the wire = its kernel arrival stamp minus the driver's say_flush time.
  Old audio is a message whose pattern byte is one of the flushed texts'. A violation is an old
  message after the FLUSH_MEDIA text on the same connection (TCP keeps order, and Asterisk drops its
  queue on FLUSH_MEDIA, so only such a message could be heard). Old messages arriving after the
  driver's acknowledgement time are also counted, by kernel stamp and by receiver read time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

T = 0.020
FRAME = 160


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def load_receiver(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path.with_suffix(".npz")) as data:
        cols = {name: data[name] for name in data.files}
    meta = json.loads(path.with_suffix(".json").read_text())
    return cols, meta


def window_cpu(samples: list[tuple[float, float, int]], start: float, end: float) -> float:
    """CPU % of a process over [start, end] from its (time, cpu seconds, rss) samples."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return math.nan
    (t0, c0, _), (t1, c1, _) = inside[0], inside[-1]
    return 100.0 * (c1 - c0) / (t1 - t0) if t1 > t0 else math.nan


def analyze(
    cols: dict[str, np.ndarray], meta: dict[str, Any], drv: dict[str, Any], receiver_index: int = 0
) -> dict[str, Any]:
    cfg = dict(drv["config"], receiver_index=receiver_index)
    lead = int(cfg["lead_frames"])
    flush = bool(cfg.get("flush"))
    n_sessions = int(cfg["sessions"])  # in the daemon process (all receivers together)
    path_index = {p.rsplit("/", 1)[-1]: i for i, p in enumerate(meta["paths"])}
    # The driver's sessions that dialled this receiver (a split run deals them to two receivers).
    port_count = len(cfg["ports"])
    mine = {f"s{i:04d}" for i in range(n_sessions) if i % port_count == cfg.get("receiver_index", 0)}
    sess = {cid: s for cid, s in drv["sessions"].items() if cid in mine}
    res: dict[str, Any] = {
        "sessions": n_sessions,
        "sessions_here": len(mine),
        "connected": len(meta["paths"]),
    }

    conn = cols["conn"].astype(np.int64)
    kernel = cols["t_kernel"]
    user = cols["t_user"]
    have_kernel = bool(len(kernel)) and not np.isnan(kernel).any()
    arrival = kernel if have_kernel else user
    res["clock"] = "kernel" if have_kernel else "user"
    frames = cols["length"] // FRAME
    first = cols["first"]
    order = np.argsort(conn, kind="stable")  # per connection, in TCP order
    conn, arrival, user, kernel, frames, first = (
        conn[order],
        arrival[order],
        user[order],
        kernel[order],
        frames[order],
        first[order],
    )
    n_conn = len(meta["paths"])
    starts = np.searchsorted(conn, np.arange(n_conn + 1))
    pos = np.arange(len(conn)) - starts[conn]  # message index within its connection

    # Utterance part: 0 before the connection's first FLUSH_MEDIA, 1 after it.
    flush_pos = np.full(n_conn, np.iinfo(np.int64).max, dtype=np.int64)
    flush_text_time = np.full(n_conn, math.nan)
    for c, before, t_k, t_u, text in meta["texts"]:
        if text.strip() == "FLUSH_MEDIA" and flush_pos[c] == np.iinfo(np.int64).max:
            flush_pos[c] = before
            flush_text_time[c] = t_k if have_kernel else t_u
    part = (pos >= flush_pos[conn]).astype(np.int64)
    if flush:
        new_bytes = np.array(drv["fill_new"], dtype=np.uint8)
        is_new = np.isin(first, new_bytes)
        # After the flush, only the new utterance is timed (old messages there are violations).
        keep = (part == 0) | is_new
    else:
        keep = np.ones(len(conn), dtype=bool)
    seg = conn * 2 + part
    k_seg, k_arr, k_frames = seg[keep], arrival[keep], frames[keep]
    k_user = user[keep]

    if len(k_seg):
        seg_ids, seg_start = np.unique(k_seg, return_index=True)
        seg_of = np.searchsorted(seg_ids, k_seg)
        cum = np.cumsum(k_frames) - k_frames  # frames before each message, over everything
        k_index = cum - cum[seg_start][seg_of]  # ... within its segment
        t0 = k_arr[seg_start][seg_of]
        due = t0 + np.maximum(0, k_index - lead) * T
        late = k_arr - due
        late_user = k_user - (k_user[seg_start][seg_of] + np.maximum(0, k_index - lead) * T)
        seg_end = np.append(seg_start[1:], len(k_seg)) - 1
        # Worst-phase late frames: frame k_index + j is late if it arrives after t0 + (k_index + j) * T.
        x = (k_arr - t0) / T - k_index
        late_frames = np.clip(np.ceil(x - 1e-9), 0, k_frames)
        # Modelled playout: ticks at t0 + phase + i*T; frame f plays at max(first tick >= arrival, prev + 1).
        rng = np.random.default_rng(12345)
        phase = rng.uniform(0, T, len(seg_ids))
        f_arr = np.repeat(k_arr, k_frames)
        f_seg = np.repeat(seg_of, k_frames)
        f_index = np.repeat(k_index, k_frames) + (np.arange(len(f_arr)) - np.repeat(cum, k_frames))
        f_t0 = np.repeat(t0, k_frames)
        tick = np.maximum(0, np.ceil((f_arr - f_t0 - phase[f_seg]) / T - 1e-9)).astype(np.int64)
        q = tick - f_index
        big = int(q.max() - q.min() + 2) if len(q) else 1
        acc = np.maximum.accumulate(q + f_seg * big) - f_seg * big
        f_start = np.searchsorted(f_seg, np.arange(len(seg_ids)))
        f_end = np.append(f_start[1:], len(f_seg)) - 1
        underruns = acc[f_end] - acc[f_start]
        f_inc = np.diff(acc, prepend=acc[:1] if len(acc) else acc)
        f_inc[f_start] = 0  # a segment's first frame starts its own count
    else:
        seg_ids = np.array([], dtype=np.int64)
        late = late_user = late_frames = underruns = np.array([])
        f_arr = f_inc = np.array([])
        seg_start = seg_end = np.array([], dtype=np.int64)
        k_index = np.array([], dtype=np.int64)

    total_frames = int(frames.sum())
    res["frames_received"] = total_frames
    res["messages_received"] = len(conn)
    res["lateness_ms"] = {
        "p50": pct(late, 50) * 1e3,
        "p99": pct(late, 99) * 1e3,
        "max": float(late.max()) * 1e3 if len(late) else math.nan,
    }
    res["lateness_user_ms"] = {
        "p50": pct(late_user, 50) * 1e3,
        "p99": pct(late_user, 99) * 1e3,
        "max": float(late_user.max()) * 1e3 if len(late_user) else math.nan,
    }
    # Drift: lateness of the last message of each complete utterance (part 0 of a pacing run).
    part0 = seg_ids % 2 == 0
    if len(seg_ids) and not flush:
        drift = late[seg_end[part0]]
        res["drift_ms"] = {
            "p50": pct(drift, 50) * 1e3,
            "worst": float(drift[np.argmax(np.abs(drift))]) * 1e3,
        }
    else:
        res["drift_ms"] = {"p50": math.nan, "worst": math.nan}
    res["late_for_playout_frames"] = int(late_frames.sum()) if len(late_frames) else 0
    res["underrun_ticks"] = int(underruns.sum()) if len(underruns) else 0
    res["sessions_with_underruns"] = int((underruns > 0).sum()) if len(underruns) else 0
    # While the sessions are created / start speaking (the burst), not only in the steady state.
    b0 = float(drv["speak_start"])
    b1 = b0 + float(cfg["speak_ramp"]) + 1.0
    in_b = (k_arr >= b0) & (k_arr < b1) if len(late) else np.array([], dtype=bool)
    f_in_b = (f_arr >= b0) & (f_arr < b1) if len(f_arr) else np.array([], dtype=bool)
    res["burst"] = {
        "seconds": b1 - b0,
        "p99": pct(late[in_b], 99) * 1e3 if in_b.any() else math.nan,
        "max": float(late[in_b].max()) * 1e3 if in_b.any() else math.nan,
        "late_frames": int(late_frames[in_b].sum()) if in_b.any() else 0,
        "underrun_ticks": int(f_inc[f_in_b].sum()) if f_in_b.any() else 0,
    }
    if have_kernel:
        lag = user - kernel
        res["receiver_lag_ms"] = {"p99": pct(lag, 99) * 1e3, "max": float(lag.max()) * 1e3}

    # Frames/s while everyone speaks (part 0 segments).
    if len(seg_ids):
        first_t = k_arr[seg_start[part0]]
        last_t = k_arr[seg_end[part0]]
        w0, w1 = first_t.max() + 1.0, last_t.min() - 1.0
        if w1 - w0 < 0.5:
            w0, w1 = first_t.max(), last_t.min()
        if w1 > w0:
            in_w = (k_arr >= w0) & (k_arr < w1) & (k_seg % 2 == 0)
            res["fps"] = float(k_frames[in_w].sum() / (w1 - w0))
            steady = late[in_w]
            res["steady_lateness_ms"] = {
                "p50": pct(steady, 50) * 1e3,
                "p99": pct(steady, 99) * 1e3,
                "max": float(steady.max()) * 1e3 if len(steady) else math.nan,
            }
        else:
            res["fps"] = math.nan
        res["fps_ideal"] = 50.0 * int(part0.sum())
        res["window"] = (float(w0), float(w1))

    # Sender-side counters, from the driver.
    sent = sum(s.get("sender", {}).get("frames_sent", 0) for s in sess.values())
    res["frames_sent"] = sent
    res["timeline_restarts"] = sum(s.get("sender", {}).get("timeline_restarts", 0) for s in sess.values())
    res["sender_lateness_max_ms"] = (
        max((s.get("sender", {}).get("lateness_max", 0.0) for s in sess.values()), default=0.0) * 1e3
    )
    res["caller_frames_daemon"] = sum(s.get("sender", {}).get("caller_frames", 0) for s in sess.values())
    res["caller_frames_sent"] = int(meta.get("caller_frames_sent", 0))
    res["caller_frames_dropped"] = int(meta.get("caller_frames_dropped", 0))
    res["caller_frames_skipped"] = int(meta.get("caller_frames_skipped", 0))
    res["caller_send_lag_max_ms"] = float(meta.get("caller_send_lag_max", 0.0)) * 1e3
    res["connect_failures"] = len(drv["connect_failures"])
    res["unfinished_sessions"] = sum(1 for s in sess.values() if "speak" in s and "finished" not in s)
    if not flush:
        res["frames_expected"] = round(len(mine) * float(cfg["duration"]) * 50)
    res["session_errors"] = drv["error_count"]

    # First audio: vendor's first byte -> first message of that utterance at the receiver.
    first_audio = []
    for cid, s in sess.items():
        c = path_index.get(cid)
        times = s.get("first_audio") or []
        if c is None or not times or starts[c] == starts[c + 1]:
            continue
        first_audio.append(arrival[starts[c]] - times[0])
    fa = np.array(first_audio)
    res["first_audio_ms"] = {"p50": pct(fa, 50) * 1e3, "p99": pct(fa, 99) * 1e3, "n": len(fa)}

    if flush:
        res.update(
            _flush(
                meta, drv, path_index, starts, arrival, user, first, frames, pos, flush_pos, flush_text_time
            )
        )

    # Daemon and receiver processes.
    steady0, steady1 = drv.get("steady_start"), drv.get("steady_end")
    base = drv["baseline"]
    if steady0 and steady1:
        res["daemon_cpu_pct"] = 100.0 * (steady1["cpu"] - steady0["cpu"]) / (steady1["t"] - steady0["t"])
        speaking_rss = max(
            [steady0["rss"], steady1["rss"]]
            + [s["rss"] for s in drv["samples"] if steady0["t"] <= s["t"] <= steady1["t"]]
        )
        res["rss_speaking_kib_per_session"] = (speaking_rss - base["rss"]) / 1024 / n_sessions
        res["receiver_cpu_pct"] = window_cpu([tuple(x) for x in meta["cpu"]], steady0["t"], steady1["t"])
        res["steady_seconds"] = steady1["t"] - steady0["t"]
        if "vendor_cpu" in steady0:
            spent = steady1["vendor_cpu"] - steady0["vendor_cpu"]
            res["vendor_cpu_pct"] = 100.0 * spent / (steady1["t"] - steady0["t"])
        if "busy" in steady0 and steady1["total"] > steady0["total"]:
            cores = os.cpu_count() or 1
            machine = (
                100.0 * cores * (steady1["busy"] - steady0["busy"]) / (steady1["total"] - steady0["total"])
            )
            res["machine_cpu_pct"] = machine
    res["commands_ms"] = _commands(drv, steady0, steady1)
    gc_info = drv.get("gc_speaking")
    if gc_info:
        speaking = drv["speak_end"] - drv["speak_start"]
        res["gc_pct"] = 100.0 * sum(gc_info["seconds"]) / speaking if speaking > 0 else math.nan
        res["gc_longest_ms"] = gc_info["longest"] * 1e3
    idle = drv.get("idle")  # a burst has no idle phase: its sessions speak as soon as they exist
    res["rss_idle_kib_per_session"] = (idle["rss"] - base["rss"]) / 1024 / n_sessions if idle else math.nan
    res["rss_baseline_mib"] = base["rss"] / 2**20
    res["connect_seconds"] = drv["connect_end"] - drv["connect_start"]
    res["receiver_faults"] = len(meta["faults"])
    if meta.get("kind") == "sim":
        calls = meta["sim_calls"].values()
        res["sim"] = {
            key: sum(int(c.get(key, 0)) for c in calls)
            for key in ("frames_received", "frames_played", "underruns", "flushes", "tail_bytes_discarded")
        }
        res["sim"]["client_faults"] = sum(int(c.get("client_faults", 0)) for c in calls)
    return res


def _commands(
    drv: dict[str, Any], steady0: dict[str, float] | None, steady1: dict[str, float] | None
) -> dict[str, float]:
    sent = np.array([c[0] for c in drv.get("commands", [])])
    took = np.array([c[1] for c in drv.get("commands", [])]) * 1e3
    out = {"n": len(took), "p50": pct(took, 50), "p99": pct(took, 99)}
    out["errors"] = len(drv.get("command_errors", []))  # answered with an error (e.g. not in time)
    out["max"] = float(took.max()) if len(took) else math.nan
    if steady0 and steady1:
        inside = (sent >= steady0["t"]) & (sent <= steady1["t"]) if len(sent) else np.array([], dtype=bool)
        out["steady_n"] = int(inside.sum())
        out["steady_p99"] = pct(took[inside], 99) if inside.any() else math.nan
        out["steady_rate"] = float(inside.sum()) / max(1e-9, steady1["t"] - steady0["t"])
    return out


def _flush(
    meta: dict[str, Any],
    drv: dict[str, Any],
    path_index: dict[str, int],
    starts: np.ndarray,
    arrival: np.ndarray,
    user: np.ndarray,
    first: np.ndarray,
    frames: np.ndarray,
    pos: np.ndarray,
    flush_pos: np.ndarray,
    flush_text_time: np.ndarray,
) -> dict[str, Any]:
    old_bytes = set(drv["fill_old"])
    new_bytes = set(drv["fill_new"])
    ack_ms, next_ms, vendor_ms, added_ms, wire_ms = [], [], [], [], []
    after_text = after_ack_kernel = after_ack_user = 0
    missing_flush = 0
    for cid, s in drv["sessions"].items():
        c = path_index.get(cid)
        if c is None or "flush_ack" not in s:  # not this receiver's, or never flushed
            continue
        ack = s["flush_ack"]
        ack_ms.append((ack - s["flush_cmd"]) * 1e3)
        lo, hi = starts[c], starts[c + 1]
        if flush_pos[c] == np.iinfo(np.int64).max:
            missing_flush += 1
            continue
        wire_ms.append((flush_text_time[c] - s["flush_cmd"]) * 1e3)
        p = lo + flush_pos[c]
        is_old = np.isin(first[lo:hi], list(old_bytes))
        after = np.arange(lo, hi) >= p
        after_text += int(frames[lo:hi][is_old & after].sum())
        after_ack_kernel += int(frames[lo:hi][is_old & (arrival[lo:hi] > ack)].sum())
        after_ack_user += int(frames[lo:hi][is_old & (user[lo:hi] > ack)].sum())
        new_idx = np.nonzero(np.isin(first[lo:hi], list(new_bytes)) & after)[0]
        if len(new_idx):
            t_new = arrival[lo + new_idx[0]]
            next_ms.append((t_new - ack) * 1e3)
            times = s.get("first_audio") or []
            if len(times) >= 2:
                vendor_ms.append((times[1] - ack) * 1e3)
                added_ms.append((t_new - times[1]) * 1e3)
    a, nx, v, ad, w = (np.array(x) for x in (ack_ms, next_ms, vendor_ms, added_ms, wire_ms))
    return {
        "flushes": len(ack_ms),
        "flush_missing_text": missing_flush,
        "flush_ack_ms": {"p50": pct(a, 50), "p99": pct(a, 99), "max": float(a.max()) if len(a) else math.nan},
        "flush_media_ms": {
            "p50": pct(w, 50),
            "p99": pct(w, 99),
            "max": float(w.max()) if len(w) else math.nan,
        },
        "old_frames_after_flush_text": after_text,
        "old_frames_after_ack_kernel": after_ack_kernel,
        "old_frames_after_ack_read": after_ack_user,
        "ack_to_next_first_frame_ms": {"p50": pct(nx, 50), "p99": pct(nx, 99), "n": len(nx)},
        "ack_to_vendor_first_byte_ms": {"p50": pct(v, 50), "p99": pct(v, 99)},
        "first_audio_after_flush_ms": {"p50": pct(ad, 50), "p99": pct(ad, 99), "n": len(ad)},
    }
