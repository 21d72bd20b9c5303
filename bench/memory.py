#!/usr/bin/env python3
"""Memory flat in blob size: peak RSS of `registry-sensor replay` with small and huge blobs.

    python bench/memory.py [--size 400M] [--small 2M] [--large 200M] [--runs 1]

Generates (or reuses, from bench/out/) two workloads of about the same total size, the same
seed and the same mix of connections, one whose layer blobs are all about --small and one whose
blobs are all about --large, replays each with registry-sensor under `/usr/bin/time -v` and
reports the peak RSS of each (mapped file pages included) and the difference. Target: within a
few MB. Writes bench/out/memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

import common
import make_workload
from common import OUT, log, measure, median


def replay(pcap, runs: int) -> dict:
    config = common.sensor_config()
    db = OUT / "memory-sensor.db"
    out = OUT / "memory-summary.json"
    cmd = [*common.sensor_command(), "replay", str(pcap), "--config", str(config), "--db",
           str(db), "--json"]
    rss, times = [], []
    for _ in range(runs):
        for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            p.unlink(missing_ok=True)
        m = measure(cmd, stdout=out)
        if m["returncode"]:
            raise SystemExit(f"registry-sensor failed: {m['stderr_tail']}")
        rss.append(m["rss_kib"])
        times.append(m["seconds"])
    summary = json.loads(out.read_text())
    return {"peak_rss_kib": max(rss), "rss_kib": rss, "seconds": times,
            "median_seconds": round(median(times), 3), "packets": summary["packets"],
            "transactions": summary["transactions"], "flows": summary["flows"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=make_workload.parse_size,
                    default=make_workload.parse_size("400M"),
                    help="size of each workload (default 400M)")
    ap.add_argument("--small", default="2M", help="small blob size (default 2M)")
    ap.add_argument("--large", default="200M", help="large blob size (default 200M)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1, help="replays of each (peak over runs)")
    args = ap.parse_args(argv)

    rows = []
    for label in (args.small, args.large):
        blob = make_workload.parse_blob_size(label)
        pcap, side = common.ensure_workload(args.size, blob, args.seed)
        common.warm_cache(pcap)
        log(f"replaying {pcap.name} ({side['file_bytes'] / 1e6:,.0f} MB) ...")
        r = replay(pcap, args.runs)
        r.update(blob_size=label, file=str(pcap), file_bytes=side["file_bytes"],
                 connections=side["connections"],
                 largest_body=max(max(t["request_body_bytes"], t["response_body_bytes"])
                                  for t in side["txns"]))
        rows.append(r)
    diff = (rows[1]["peak_rss_kib"] - rows[0]["peak_rss_kib"]) / 1024
    doc = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": common.machine_info(), "source": common.source_state(), "results": rows,
           "difference_mib": round(diff, 1)}
    (OUT / "memory.json").write_text(json.dumps(doc, indent=2) + "\n")

    out = sys.stdout
    out.write(f"\n{'blobs':<8} {'file MB':>8} {'conns':>6} {'largest body MB':>16} "
              f"{'packets':>10} {'txns':>6} {'median s':>9} {'peak RSS MiB':>13}\n")
    for r in rows:
        out.write(f"{r['blob_size']:<8} {r['file_bytes'] / 1e6:>8,.0f} {r['connections']:>6} "
                  f"{r['largest_body'] / 1e6:>16,.1f} {r['packets']:>10,} "
                  f"{r['transactions']:>6} {r['median_seconds']:>9.2f} "
                  f"{r['peak_rss_kib'] / 1024:>13.1f}\n")
    out.write(f"difference (large - small): {diff:+.1f} MiB (target: within a few MB)\n")
    log(f"results: {OUT / 'memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
