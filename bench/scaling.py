#!/usr/bin/env python3
"""Replay scaling with `--workers`: the workload split into files, replayed by 1 and 2 processes.

    python bench/scaling.py [--size 1G] [--files 4] [--workers 1,2] [--runs 3]

The workload (bench/make_workload.py, cached in bench/out/) is split into --files pcaps by
connection: every packet of a TCP connection goes to the same file, and connections are dealt
out biggest first to the file with the fewest bytes so far, so the files are about equal and
each one holds whole connections (nothing is split across files, so every worker count must
find exactly the generator's transactions). Then, in interleaved rounds, each as its own
process: `registry-sensor replay` of the one original file (the reference: one engine), and of
the split files with `--workers N` for each N. Prints wall time (median), CPU time (user +
system of all processes), packets/s, the speed-up over one worker on the same files, peak RSS of
the largest process, and whether the transactions match the generator's. Writes
bench/out/scaling.json. On this kind of machine (2 cores) 2 workers can at best halve the time.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sqlite3
import struct
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import common
import make_workload
from common import OUT, compare, expected_transactions, log, measure, median

_REC = struct.Struct("<IIII")


def split_by_connection(src: Path, files: int, out: Path = OUT) -> list[Path]:
    """`src` (classic pcap, Ethernet, IPv4/TCP) as `files` pcaps of whole connections (cached)."""
    stem = f"{src.stem}.split{files}"
    paths = [out / f"{stem}-{i + 1}.pcap" for i in range(files)]
    meta = out / f"{stem}.json"
    if meta.exists() and all(p.exists() for p in paths):
        m = json.loads(meta.read_text())
        if m.get("source_bytes") == src.stat().st_size and m.get("files") == files:
            return paths
    log(f"splitting {src.name} into {files} files by connection ...")
    with open(src, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)

        def records():
            pos = 24
            while pos + 16 <= size:
                incl = _REC.unpack_from(mm, pos)[2]
                yield pos, 16 + incl
                pos += 16 + incl

        def flow(pos: int, length: int) -> bytes:
            frame = pos + 16
            if length < 16 + 38 or mm[frame + 12:frame + 14] != b"\x08\x00":
                return b""
            ihl = (mm[frame + 14] & 0x0F) * 4
            a = mm[frame + 26:frame + 30] + mm[frame + 14 + ihl:frame + 16 + ihl]
            b = mm[frame + 30:frame + 34] + mm[frame + 16 + ihl:frame + 18 + ihl]
            return min(a, b) + max(a, b)

        volume: Counter[bytes] = Counter()
        for pos, length in records():
            volume[flow(pos, length)] += length
        load = [0] * files
        where: dict[bytes, int] = {}
        for key, n in sorted(volume.items(), key=lambda kv: (-kv[1], kv[0])):
            i = load.index(min(load))
            where[key] = i
            load[i] += n
        outs = [open(p.with_name(p.name + ".part"), "wb", buffering=8 << 20)  # noqa: SIM115
                for p in paths]
        try:
            for o in outs:
                o.write(mm[:24])
            for pos, length in records():
                outs[where[flow(pos, length)]].write(mm[pos:pos + length])
        finally:
            for o in outs:
                o.close()
    for p in paths:
        os.replace(p.with_name(p.name + ".part"), p)
    meta.write_text(json.dumps({"source": str(src), "source_bytes": src.stat().st_size,
                                "files": files, "bytes": load}))
    return paths


def run_replay(label: str, pcaps: list[Path], workers: int) -> dict:
    config = common.sensor_config()
    db = OUT / f"scaling-{label}.db"
    summary_path = OUT / f"scaling-{label}.json"
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    cmd = [*common.sensor_command(), "replay", *map(str, pcaps), "--config", str(config),
           "--db", str(db), "--json", "--workers", str(workers)]
    m = measure(cmd, stdout=summary_path)
    if m["returncode"]:
        raise SystemExit(f"{label}: exit {m['returncode']}: {m['stderr_tail']}")
    summary = json.loads(summary_path.read_text())
    conn = sqlite3.connect(db)
    found = Counter(conn.execute("SELECT method, uri, status FROM transactions"))
    conn.close()
    return {"seconds": m["seconds"], "cpu": m["cpu_seconds"], "rss_kib": m["rss_kib"],
            "packets": summary["packets"], "transactions": summary["transactions"],
            "found": found, "command": cmd}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=make_workload.parse_size, default=make_workload.parse_size("1G"))
    ap.add_argument("--blob-size", type=make_workload.parse_blob_size,
                    default=make_workload.parse_blob_size("1M-16M"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--files", type=int, default=4, help="files to split the workload into (4)")
    ap.add_argument("--workers", default="1,2", help="worker counts to time (1,2)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; the median is reported (3)")
    ap.add_argument("--output", type=Path, default=OUT / "scaling.json")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]

    OUT.mkdir(parents=True, exist_ok=True)
    pcap, side = common.ensure_workload(args.size, args.blob_size, args.seed)
    parts = split_by_connection(pcap, args.files)
    for p in (pcap, *parts):
        common.warm_cache(p)
    expected = expected_transactions(side)
    configs = [("one file", [pcap], 1)] + [(f"{args.files} files", parts, n) for n in counts]
    load_before = os.getloadavg()
    results: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for r in range(args.runs):
        for i, (label, pcaps, n) in enumerate(configs):
            tag = f"{len(pcaps)}f-w{n}"
            log(f"round {r + 1}/{args.runs}: {label}, --workers {n} ...")
            results[i].append(run_replay(tag, pcaps, n))
            log(f"  {results[i][-1]['seconds']:.2f} s")
    load_after = os.getloadavg()

    rows = []
    base = None
    for i, (label, pcaps, n) in enumerate(configs):
        runs = results[i]
        secs = median([x["seconds"] for x in runs])
        cpu = median([x["cpu"] for x in runs])
        check = compare(expected, runs[-1]["found"])
        row = {"input": label, "files": len(pcaps), "workers": n, "runs": len(runs),
               "seconds": [round(x["seconds"], 3) for x in runs],
               "median_seconds": round(secs, 3), "median_cpu_seconds": round(cpu, 3),
               "packets": runs[-1]["packets"],
               "packets_per_second": round(runs[-1]["packets"] / secs),
               "peak_rss_mib_largest_process": round(max(x["rss_kib"] for x in runs) / 1024, 1),
               "transactions": runs[-1]["transactions"],
               "check": {k: check[k] for k in ("expected", "found", "missing", "extra", "ok")}}
        if len(pcaps) > 1 and n == 1:
            base = secs
        rows.append(row)
    for row in rows:
        if base and row["files"] > 1:
            row["speedup_vs_1_worker"] = round(base / row["median_seconds"], 2)
    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "source": common.source_state(),
        "workload": {k: v for k, v in side.items() if k != "txns"},
        "split": [str(p) for p in parts],
        "split_bytes": [p.stat().st_size for p in parts],
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in load_after]},
        "results": rows,
    }
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    log(f"results: {args.output}")
    return 0


def print_table(doc: dict) -> None:
    m, w = doc["machine"], doc["workload"]
    out = sys.stdout
    out.write(f"\nreplay scaling with --workers, {doc['date']}\n")
    out.write(f"machine: {m['cpu']}, {m['cores']} cores, {m['os']}, Python {m['python']}; "
              f"load average before {doc['load_average']['before'][0]}\n")
    out.write(f"workload: {Path(w['file']).name}: {w['file_bytes'] / 1e6:,.1f} MB, "
              f"{w['packets']:,} packets, {w['transactions']} transactions; split by "
              f"connection into {len(doc['split'])} files of "
              f"{', '.join(f'{b / 1e6:,.0f}' for b in doc['split_bytes'])} MB\n\n")
    head = (f"{'input':<10} {'workers':>7} {'median s':>9} {'CPU s':>7} {'packets/s':>10} "
            f"{'speed-up':>8} {'RSS MiB':>8}  transactions")
    out.write(head + "\n" + "-" * len(head) + "\n")
    for r in doc["results"]:
        c = r["check"]
        speed = f"{r['speedup_vs_1_worker']:.2f}x" if "speedup_vs_1_worker" in r else "-"
        out.write(f"{r['input']:<10} {r['workers']:>7} {r['median_seconds']:>9.2f} "
                  f"{r['median_cpu_seconds']:>7.2f} {r['packets_per_second']:>10,} {speed:>8} "
                  f"{r['peak_rss_mib_largest_process']:>8.1f}  {c['found']}/{c['expected']} "
                  f"{'ok' if c['ok'] else 'MISMATCH'}\n")
    out.write("\nspeed-up: wall time of --workers 1 on the same files divided by this row's; "
              "RSS: the largest single process (ru_maxrss).\n\n")


if __name__ == "__main__":
    sys.exit(main())
