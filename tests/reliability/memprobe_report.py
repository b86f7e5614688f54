"""What grew in the daemon child between two memprobe snapshots (tests/reliability/memprobe).

    python -m tests.reliability.memprobe_report DIR [FIRST LAST] [--top 25]

Prints each dump's VmRSS, traced memory and malloc figures, then the top growth between FIRST and LAST
(default: the first and the last dump) grouped by traceback, and by file.
"""

from __future__ import annotations

import argparse
import json
import os
import tracemalloc

_SKIP = ("tracemalloc.py", "<frozen importlib", "sitecustomize.py")


def _mib(value: float) -> str:
    return f"{value / 2**20:+.2f}" if value < 0 or value else "0"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.memprobe_report")
    parser.add_argument("dir")
    parser.add_argument("first", nargs="?", type=int)
    parser.add_argument("last", nargs="?", type=int)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    dumps = sorted(int(name.split(".")[0]) for name in os.listdir(args.dir) if name.endswith(".json"))
    for n in dumps:
        with open(os.path.join(args.dir, f"{n}.json")) as f:
            stats = json.load(f)
        m = stats["mallinfo2"]
        print(
            f"dump {n}: VmRSS {stats['status_kib']['VmRSS'] / 1024:.1f} MiB, "
            f"RssAnon {stats['status_kib']['RssAnon'] / 1024:.1f}, "
            f"traced {stats['traced'] / 2**20:.1f} MiB "
            f"(tracemalloc's own {stats['tracemalloc_overhead'] / 2**20:.1f}), "
            f"malloc arena {m['arena'] / 2**20:.1f} in use {m['uordblks'] / 2**20:.1f} "
            f"free {m['fordblks'] / 2**20:.1f} mmapped {m['hblkhd'] / 2**20:.1f}, "
            f"arena mappings {stats['arena_mappings']}, threads {stats['status_kib']['Threads']}, "
            f"gc objects {stats['gc_objects']} (frozen {stats['gc_frozen']}), gc count {stats['gc_count']}, "
            f"dump {stats['dump_seconds']:.1f} s"
        )
    with open(os.path.join(args.dir, f"{dumps[0]}.json")) as f:
        first_stats = json.load(f)
    with open(os.path.join(args.dir, f"{dumps[-1]}.json")) as f:
        last_stats = json.load(f)
    print(f"\ngc-tracked objects, dump {dumps[0]} -> {dumps[-1]}, top {args.top} by count growth:")
    census_old, census_new = first_stats["census"], last_stats["census"]
    bytes_old, bytes_new = first_stats["census_bytes"], last_stats["census_bytes"]
    growth = sorted(census_new, key=lambda k: census_old.get(k, 0) - census_new[k])
    for name in growth[: args.top]:
        print(
            f"  {census_new[name] - census_old.get(name, 0):+8d} objects "
            f"{(bytes_new.get(name, 0) - bytes_old.get(name, 0)) / 1024:+9.1f} KiB (shallow)  {name}"
        )
    snaps = [n for n in dumps if os.path.exists(os.path.join(args.dir, f"{n}.snapshot"))]
    if not snaps:
        return
    first = args.first if args.first is not None else snaps[0]
    last = args.last if args.last is not None else snaps[-1]
    old = (
        tracemalloc.Snapshot([], 1)  # first == -1: everything traced since the warm-up
        if first < 0
        else tracemalloc.Snapshot.load(os.path.join(args.dir, f"{first}.snapshot"))
    )
    new = tracemalloc.Snapshot.load(os.path.join(args.dir, f"{last}.snapshot"))
    keep = [tracemalloc.Filter(False, f"*{part}*") for part in _SKIP]
    old, new = old.filter_traces(keep), new.filter_traces(keep)
    total = sum(s.size for s in new.statistics("filename")) - sum(s.size for s in old.statistics("filename"))
    print(f"\ntraced growth {first} -> {last}: {_mib(total)} MiB")
    print(f"\ntop {args.top} by file:")
    for stat in new.compare_to(old, "filename")[: args.top]:
        print(f"  {_mib(stat.size_diff):>8} MiB {stat.count_diff:+8d} blocks  {stat.traceback[0]}")
    print(f"\ntop {args.top} by traceback:")
    for stat in new.compare_to(old, "traceback")[: args.top]:
        print(f"{_mib(stat.size_diff):>8} MiB {stat.count_diff:+8d} blocks (now {stat.size / 2**20:.2f} MiB)")
        for line in stat.traceback.format(limit=args.frames, most_recent_first=True):
            print(f"      {line}")


if __name__ == "__main__":
    main()
