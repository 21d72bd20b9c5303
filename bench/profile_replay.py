#!/usr/bin/env python3
"""Where registry-sensor's replay spends its time: a py-spy profile with a self-time table.

    python bench/profile_replay.py [--size 200M] [--rate 1000] [--top 15] [--svg]

Replays the cached workload of --size (generated when missing) under
`py-spy record --format raw --rate 1000` (sampling: the sensor runs at nearly full speed) and
prints the functions and the source lines with the most self time (samples where that frame was
the one running) and the functions with the most inclusive time: for the whole process, and for
the stacks inside --focus (run_replay) that are not importing (--exclude). Files in bench/out/:
  profile.txt   collapsed stacks (py-spy raw): open in https://www.speedscope.app or feed to
                flamegraph.pl
  profile.svg   with --svg: a flame graph from a second recording
  profile.json  the tables
Without py-spy (`pip install py-spy`), cProfile is used instead (slower, skews towards
functions with many calls; its tottime column is the self time).

Named profile_replay.py, not profile.py: a bench/profile.py would shadow the standard
library's `profile` module (which cProfile imports) for every script run from bench/.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import common
import make_workload
from common import OUT, log

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_collapsed(path: Path, focus: str | None = None, exclude: tuple[str, ...] = ()
                    ) -> tuple[int, Counter, Counter, Counter]:
    """Total samples, self samples by function, self samples by line, inclusive by function.

    With `focus`, only the stacks that pass through a function of that name count, and of
    those not the ones with a frame containing one of the `exclude` strings.
    """
    total = 0
    self_fn: Counter = Counter()
    self_line: Counter = Counter()
    incl_fn: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if focus is not None and not any(f.startswith(focus + " ") or
                                         f.split(" (", 1)[0].endswith("." + focus)
                                         for f in frames):
            continue
        if exclude and any(x in stack for x in exclude):
            continue
        total += n
        seen = set()
        for frame in frames:
            m = FRAME.match(frame)
            key = f"{m['func']} ({m['file']})" if m else frame
            if key not in seen:
                seen.add(key)
                incl_fn[key] += n
        leaf = frames[-1]
        m = FRAME.match(leaf)
        self_fn[f"{m['func']} ({m['file']})" if m else leaf] += n
        self_line[leaf] += n
    return total, self_fn, self_line, incl_fn


def table(title: str, counts: Counter, total: int, top: int) -> list[dict]:
    sys.stdout.write(f"\n{title}\n{'samples':>8} {'%':>6}  where\n")
    rows = []
    for where, n in counts.most_common(top):
        sys.stdout.write(f"{n:>8} {100 * n / total:>5.1f}%  {where}\n")
        rows.append({"where": where, "samples": n, "percent": round(100 * n / total, 2)})
    return rows


def run_cprofile(replay_args: list[str], top: int) -> int:
    import pstats

    stats_path = OUT / "profile.pstats"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(stats_path), "-m", "sensor.cli",
           *replay_args]
    log("py-spy not found: profiling with cProfile (pip install py-spy for a sampling "
        "profile)")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stats = pstats.Stats(str(stats_path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=make_workload.parse_size,
                    default=make_workload.parse_size("200M"),
                    help="workload size (default 200M)")
    ap.add_argument("--blob-size", type=make_workload.parse_blob_size,
                    default=make_workload.parse_blob_size("1M-16M"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=int, default=1000,
                    help="py-spy samples per second (1000)")
    ap.add_argument("--focus", default="run_replay",
                    help="also show the tables for stacks through this function only "
                         "(default run_replay: the replay loop)")
    ap.add_argument("--exclude", default="importlib,_find_and_load",
                    help="comma-separated: in the focus tables, drop stacks with a frame "
                         "containing one of these (default: imports and entry-point scans)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--svg", action="store_true", help="also record a flame graph (SVG)")
    ap.add_argument("--cprofile", action="store_true", help="use cProfile even with py-spy")
    args = ap.parse_args(argv)

    pcap, side = common.ensure_workload(args.size, args.blob_size, args.seed)
    common.warm_cache(pcap)
    db = OUT / "profile-sensor.db"
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    replay_args = ["replay", str(pcap), "--config", str(common.sensor_config()), "--db", str(db),
                   "--json"]
    pyspy = shutil.which("py-spy")
    if pyspy is None or args.cprofile:
        return run_cprofile(replay_args, args.top)

    raw = OUT / "profile.txt"
    sensor = common.sensor_command()
    log(f"py-spy record ({args.rate} Hz) of registry-sensor replay {pcap.name} "
        f"({side['file_bytes'] / 1e6:,.0f} MB, {side['packets']:,} packets) ...")
    subprocess.run([pyspy, "record", "--rate", str(args.rate), "--format", "raw", "--output",
                    str(raw), "--", *sensor, *replay_args], check=True,
                   stdout=subprocess.DEVNULL)
    if args.svg:
        for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            p.unlink(missing_ok=True)
        subprocess.run([pyspy, "record", "--rate", str(args.rate), "--format", "flamegraph",
                        "--output", str(OUT / "profile.svg"), "--", *sensor, *replay_args],
                       check=True, stdout=subprocess.DEVNULL)

    total, self_fn, self_line, incl_fn = parse_collapsed(raw)
    if not total:
        sys.exit("py-spy recorded no samples")
    sys.stdout.write(f"{total} samples at {args.rate} Hz (~{total / args.rate:.1f} s of "
                     f"running Python)\n")
    doc = {
        "workload": {k: v for k, v in side.items() if k != "txns"},
        "rate": args.rate,
        "samples": total,
        "self_by_function": table("self time by function (whole process)", self_fn, total,
                                  args.top),
        "self_by_line": table("self time by line (whole process)", self_line, total, args.top),
        "inclusive_by_function": table("inclusive time by function (whole process)", incl_fn,
                                       total, args.top),
    }
    if args.focus:
        exclude = tuple(x for x in args.exclude.split(",") if x)
        ftotal, fself, fline, _fincl = parse_collapsed(raw, args.focus, exclude)
        if ftotal:
            sys.stdout.write(f"\n{ftotal} samples ({100 * ftotal / total:.0f}%) inside "
                             f"{args.focus}, without stacks through {', '.join(exclude)}; "
                             f"percentages below are of those\n")
            doc["focus"] = {
                "function": args.focus, "samples": ftotal,
                "self_by_function": table(f"self time by function inside {args.focus}", fself,
                                          ftotal, args.top),
                "self_by_line": table(f"self time by line inside {args.focus}", fline, ftotal,
                                      args.top),
            }
        else:
            sys.stdout.write(f"\n(no samples inside {args.focus})\n")
    (OUT / "profile.json").write_text(json.dumps(doc, indent=2) + "\n")
    log(f"collapsed stacks: {raw} (speedscope.app opens it)"
        + (f"; flame graph: {OUT / 'profile.svg'}" if args.svg else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
