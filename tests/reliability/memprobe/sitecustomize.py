"""Opt-in memory probe for the soak's daemon child (diagnosis only: ``make reliability`` never sets it).

    PYTHONPATH=tests/reliability/memprobe MEMPROBE_DIR=/tmp/probe \
        python -m tests.reliability.run --only soak --soak-seconds 240
    python -m tests.reliability.memprobe_report /tmp/probe

On that PYTHONPATH, Python imports this ``sitecustomize`` at start-up in every process; it acts only in
the daemon child (``tests.fakes.daemon_process``) and only with MEMPROBE_DIR set. On every SIGUSR2
it writes ``<n>.json`` into MEMPROBE_DIR: VmRSS, glibc's mallinfo2, pymalloc's allocated blocks, the GC's
counts and a census (count, shallow size) of the objects it tracks, by type. The first SIGUSR2 also
starts tracemalloc (MEMPROBE_FRAMES frames, 1 by default; 0: none), so only what is allocated after it is
traced; later ones also write ``<n>.snapshot``. SIGUSR1 does the same, then a full collection, and
records what it freed (the daemon's GC thresholds make full collections rare: supervisor/gc_tuning.py).
Tracing from start-up slowed the set-up enough to fail creates on a loaded machine, and 8 frames stalled
the daemon's broker I/O for seconds, so the soak signals only while no worker runs: once idle before the
run, idle at the warm-up mark (after its ``memory`` reading), after the run, and idle at the end.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from types import FrameType

_DIR = os.environ.get("MEMPROBE_DIR", "")


def _mallinfo() -> dict[str, int]:
    """glibc's mallinfo2: arena = bytes in the main heap + thread arenas (brk/mmap'd heaps), uordblks =
    in use, fordblks = free but not returned, hblkhd = big blocks in their own mmaps."""

    names = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks"]
    names.append("keepcost")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in names]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return {name: int(getattr(info, name)) for name in names}


def _status() -> dict[str, int]:
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"):
                values[key] = int(rest.split()[0])
    return values


def _heaps() -> int:
    """Thread arenas: anonymous 64 MiB-aligned mappings glibc reserves per arena (counted by their size)."""
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 5:  # anonymous
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start == 64 << 20 or (start % (64 << 20) == 0 and end - start > 1 << 20):
                    count += 1
    return count


def _pymalloc() -> dict[str, int]:
    """pymalloc's arenas (256 KiB each, mmapped, outside mallinfo) from sys._debugmallocstats."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.rpartition("=")
        if sep and key.strip().startswith("#"):
            values[key.strip()] = int(value.strip().replace(",", ""))
    return values


def _dump(signum: int, _frame: FrameType | None) -> None:
    n = len([name for name in os.listdir(_DIR) if name.endswith(".json")])
    started = time.monotonic()
    frames = int(os.environ.get("MEMPROBE_FRAMES", "1"))
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(os.path.join(_DIR, f"{n}.snapshot"))
    elif frames:
        tracemalloc.start(frames)
    objects = gc.get_objects()
    census = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    sizes: collections.Counter[str] = collections.Counter()
    for o in objects:
        sizes[f"{type(o).__module__}.{type(o).__qualname__}"] += sys.getsizeof(o)
    del objects
    traced, peak = tracemalloc.get_traced_memory()
    stats = {
        "time": time.time(),
        "status_kib": _status(),
        "traced": traced,
        "traced_peak": peak,
        "tracemalloc_overhead": tracemalloc.get_tracemalloc_memory(),
        "mallinfo2": _mallinfo(),
        "arena_mappings": _heaps(),
        "gc_count": gc.get_count(),
        "gc_objects": census.total(),
        "allocated_blocks": sys.getallocatedblocks(),
        "census": dict(census.most_common(300)),
        "census_bytes": dict(sizes.most_common(300)),
        "gc_frozen": gc.get_freeze_count(),
        "gc_stats": gc.get_stats(),
        "dump_seconds": time.monotonic() - started,
    }
    stats["pymalloc"] = _pymalloc()
    if signum == signal.SIGUSR1:  # then a full collection, then malloc_trim: what each gives back
        collected = gc.collect()
        stats["full_collect"] = {
            "collected": collected,
            "gc_objects": len(gc.get_objects()),
            "allocated_blocks": sys.getallocatedblocks(),
            "mallinfo2": _mallinfo(),
            "status_kib": _status(),
            "traced": tracemalloc.get_traced_memory()[0],
            "pymalloc": _pymalloc(),
        }
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        stats["malloc_trim"] = {"mallinfo2": _mallinfo(), "status_kib": _status()}
    with open(os.path.join(_DIR, f"{n}.json"), "w") as out:
        json.dump(stats, out, indent=1)


if _DIR and any("daemon_process" in arg for arg in sys.orig_argv):
    signal.signal(signal.SIGUSR2, _dump)
    signal.signal(signal.SIGUSR1, _dump)
