#!/usr/bin/env python3
"""The live benchmark: tcpreplay into a veth, `registry-sensor live` capturing the other end.

    sudo python bench/live.py [--size 200M] [--workers 1,2] [--loops 1] [--buffer 64MiB]

Root is needed (network namespaces, AF_PACKET). The workload (bench/make_workload.py, cached in
bench/out/) is replayed from one network namespace into a veth pair whose other end, in a second
namespace, the live sensor captures (the helpers of tests/netns.py: the sensor starts as root,
opens its sockets and drops to nobody; offloads are off, frames stay <= 1514 bytes). Nothing
leaves the two namespaces. For each worker count:

1. `tcpreplay --topspeed`: packets sent, the rate tcpreplay reached, and from the sensor's
   `stats` rows (summed over its workers) what the kernel passed to the sockets, what it dropped
   (ring full), and what the sensor's engines saw.
2. If top speed dropped anything: `tcpreplay --pps=R` with R found by bisection between a rate
   that drops nothing and one that drops, until they are within 10 %: the highest rate with zero
   drops. Each trial replays the whole workload (--loops times), so the ring (--buffer per worker,
   64 MiB holds about 40,000 full-size frames) can absorb only a part of it: the rate found is
   close to what the sensor sustains, a little above it.
3. Drain: the sensor's processes are stopped (SIGSTOP) while the workload (--drain-loops times)
   goes into rings that hold all of it (--drain-buffer per worker), then continued: frames per
   second until the last one is processed. This is the sensor's own capacity with every core to
   itself, which on a small machine the stepped rates cannot show (tcpreplay needs a core too).

Prints a table; writes bench/out/live.json. tcpreplay itself needs a core at top speed: on a
2-core machine a second worker competes with it for the CPU, which the numbers show.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import common
import make_workload
from common import OUT, log

sys.path.insert(0, str(common.ROOT / "tests"))
from netns import Lab, missing_tools, sh, start_sensor, wait_for  # noqa: E402

CONFIG = """\
key_file: fingerprint.key
ports: [5000]
live:
  stats_interval: 0.05
  user: nobody
  workers: {workers}
  buffer_size: {buffer}
"""


def totals(db: Path) -> dict | None:
    """The sensor's latest stats row of each worker, summed (None before the first)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        latest: dict = {}
        for r in conn.execute("SELECT * FROM stats ORDER BY ts"):
            latest[r["worker"]] = dict(r)
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    if not latest:
        return None
    out = {k: sum(r[k] for r in latest.values())
           for k in ("kernel_received", "kernel_dropped", "packets", "transactions")}
    out["workers"] = len(latest)
    out["caught_up"] = all(r["packets"] + r["kernel_dropped"] >= r["kernel_received"]
                           for r in latest.values())
    return out


class Bench:
    def __init__(self, lab: Lab, tx: str, pcap: Path, db: Path, workers: int,
                 loops: int) -> None:
        self.lab, self.tx, self.pcap, self.db = lab, tx, pcap, db
        self.workers, self.loops = workers, loops

    def trial(self, pps: int | None, paused: list[int] | None = None) -> dict:
        """One replay of the workload at `pps` (None: top speed); the sensor's view of it.
        With `paused` (pids), those processes are stopped while tcpreplay runs and the clock
        starts when they continue: how fast they work off what the rings hold."""
        before = wait_for(lambda: (t := totals(self.db)) and t["workers"] == self.workers
                          and t["caught_up"] and t, 30, "the sensor's stats")
        rate = ["--topspeed"] if pps is None else [f"--pps={pps}"]
        for pid in paused or ():
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        out = sh("tcpreplay", *rate, f"--loop={self.loops}", "-i", "rp0", str(self.pcap),
                 ns=self.tx, timeout=3600).stdout
        if paused:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
            started = time.monotonic()
        sent = int(re.search(r"Actual: (\d+) packets", out).group(1))
        m = re.search(r"([\d.]+) Mbps, ([\d.]+) pps", out)
        mbps, actual = float(m.group(1)), float(m.group(2))

        def done():
            t = totals(self.db)
            return (t and t["kernel_received"] - before["kernel_received"] >= sent
                    and t["caught_up"] and t)

        after = wait_for(done, 300, "the sensor to catch up", interval=0.02)
        elapsed = time.monotonic() - started
        d = {k: after[k] - before[k] for k in ("kernel_received", "kernel_dropped", "packets",
                                               "transactions")}
        row = {"target_pps": pps, "sent": sent, "pps": round(actual), "mbps": round(mbps, 1),
               "received": d["kernel_received"], "dropped": d["kernel_dropped"],
               "seen": d["packets"], "transactions": d["transactions"],
               "seconds_to_last_frame_processed": round(elapsed, 3),
               "processed_pps": round(d["packets"] / elapsed)}
        log(f"  {'top speed' if pps is None else f'--pps={pps}'}: sent {sent:,} at "
            f"{actual:,.0f} pps ({mbps:,.0f} Mbit/s); received {row['received']:,}, dropped "
            f"{row['dropped']:,}, seen {row['seen']:,}; all processed after {elapsed:.2f} s "
            f"({row['processed_pps']:,} pps)")
        return row


def drain(workers: int, pcap: Path, args: argparse.Namespace) -> dict:
    """The sensor's own capacity, without tcpreplay competing for a core: its processes are
    stopped (SIGSTOP) while the workload goes into rings big enough to hold it all
    (--drain-buffer per worker), then continued; the time until the last frame is processed."""
    lab = Lab(f"r{workers}")
    try:
        tx, rx = lab.netns("tx"), lab.netns("rx")
        lab.veth(tx, "rp0", rx, "rp1")
        work = lab.dir / "sensor"
        proc, _notify = start_sensor(lab, rx, "sensor", "rp1", work,
                                     CONFIG.format(workers=workers, buffer=args.drain_buffer))
        log(f"--workers {workers}, drain of {args.drain_buffer} rings:")
        pids = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
                .split()] if workers > 1 else [proc.pid]
        row = Bench(lab, tx, pcap, work / "sensor.db", workers, args.drain_loops).trial(
            None, paused=pids)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        return row
    finally:
        lab.close()


def run_workers(workers: int, pcap: Path, args: argparse.Namespace) -> dict:
    lab = Lab(f"b{workers}")
    try:
        tx, rx = lab.netns("tx"), lab.netns("rx")
        lab.veth(tx, "rp0", rx, "rp1")
        work = lab.dir / "sensor"
        proc, _notify = start_sensor(lab, rx, "sensor", "rp1", work,
                                     CONFIG.format(workers=workers, buffer=args.buffer))
        bench = Bench(lab, tx, pcap, work / "sensor.db", workers, args.loops)
        log(f"--workers {workers}:")
        top = bench.trial(None)
        steps = []
        if top["dropped"] == 0:
            zero = top["pps"]
            note = "no drops at tcpreplay's top speed"
        else:
            good = bad = None  # targets, for the bisection
            best = None  # the highest rate tcpreplay reached in a trial without drops
            hi = top["pps"]
            target = hi // 2
            while len(steps) < args.max_steps:
                row = bench.trial(target)
                steps.append(row)
                if row["dropped"] == 0:
                    good = target
                    best = max(best or 0, row["pps"])
                else:
                    bad = target
                    if good is None:  # halve again, down to the floor
                        if target <= args.floor:
                            break
                        target = max(args.floor, target // 2)
                        continue
                upper = bad if bad is not None else hi
                if upper <= good * 1.1:
                    break
                target = (good + upper) // 2
            zero = best
            note = (f"highest rate with zero drops (bisection, {len(steps)} trials)"
                    if best is not None else f"drops even at --pps={args.floor}")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        return {"workers": workers, "top_speed": top, "steps": steps, "zero_drop_pps": zero,
                "zero_drop_note": note, "exit_code": rc}
    finally:
        lab.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=make_workload.parse_size,
                    default=make_workload.parse_size("200M"))
    ap.add_argument("--blob-size", type=make_workload.parse_blob_size,
                    default=make_workload.parse_blob_size("1M-16M"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", default="1,2", help="worker counts (1,2)")
    ap.add_argument("--loops", type=int, default=1, help="tcpreplay --loop per trial (1)")
    ap.add_argument("--buffer", default="64MiB", help="live.buffer_size, per worker (64MiB)")
    ap.add_argument("--floor", type=int, default=20000, help="lowest rate tried, pps (20000)")
    ap.add_argument("--drain-buffer", default="2GiB",
                    help="ring per worker for the drain measurement (2GiB; 0: skip it)")
    ap.add_argument("--drain-loops", type=int, default=3, help="tcpreplay --loop of the drain (3)")
    ap.add_argument("--max-steps", type=int, default=8, help="bisection trials at most (8)")
    ap.add_argument("--output", type=Path, default=OUT / "live.json")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root: network namespaces and AF_PACKET")
    missing = missing_tools("ip", "tcpreplay", "setpriv", "unshare", "ethtool")
    if missing:
        ap.error(f"missing tools: {', '.join(missing)} (apt-get install tcpreplay iproute2 "
                 f"ethtool util-linux)")
    OUT.mkdir(parents=True, exist_ok=True)
    pcap, side = common.ensure_workload(args.size, args.blob_size, args.seed)
    common.warm_cache(pcap)
    load_before = os.getloadavg()
    results = [run_workers(int(n), pcap, args) for n in args.workers.split(",")]
    if args.drain_buffer not in ("0", ""):
        for r in results:
            r["drain"] = drain(r["workers"], pcap, args)
    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "source": common.source_state(),
        "workload": {k: v for k, v in side.items() if k != "txns"},
        "parameters": {"loops": args.loops, "buffer_size_per_worker": args.buffer,
                       "floor_pps": args.floor, "drain_buffer_per_worker": args.drain_buffer,
                       "drain_loops": args.drain_loops},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "tcpreplay": common.tool_version(["tcpreplay", "--version"]),
        "results": results,
    }
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    log(f"results: {args.output}")
    return 0


def print_table(doc: dict) -> None:
    m, w, par = doc["machine"], doc["workload"], doc["parameters"]
    out = sys.stdout
    out.write(f"\nlive capture benchmark (tcpreplay -> veth -> registry-sensor live), "
              f"{doc['date']}\n")
    out.write(f"machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python "
              f"{m['python']}; load average before {doc['load_average']['before'][0]}\n")
    out.write(f"workload: {Path(w['file']).name}: {w['packets']:,} packets x {par['loops']} "
              f"loop(s) a trial, frames <= 1514 bytes; ring {par['buffer_size_per_worker']} "
              f"per worker\n\n")
    head = (f"{'workers':>7} {'top speed pps':>13} {'Mbit/s':>7} {'sent':>10} {'received':>10} "
            f"{'dropped':>8} {'seen':>10} {'processed pps':>13}  {'zero-drop pps':>13}")
    out.write(head + "\n" + "-" * len(head) + "\n")
    for r in doc["results"]:
        t = r["top_speed"]
        zero = f"{r['zero_drop_pps']:,}" if r["zero_drop_pps"] else "-"
        if not r["steps"] and r["zero_drop_pps"]:
            zero = ">= " + zero
        out.write(f"{r['workers']:>7} {t['pps']:>13,} {t['mbps']:>7,.0f} {t['sent']:>10,} "
                  f"{t['received']:>10,} {t['dropped']:>8,} {t['seen']:>10,} "
                  f"{t['processed_pps']:>13,}  {zero:>13}\n")
    for r in doc["results"]:
        if r["steps"]:
            out.write(f"\n--workers {r['workers']} rate steps: " + "; ".join(
                f"{s['pps']:,} pps -> {s['dropped']:,} dropped" for s in r["steps"]) + "\n")
        out.write(f"--workers {r['workers']}: {r['zero_drop_note']}\n")
    drains = [r for r in doc["results"] if "drain" in r]
    if drains:
        d0 = drains[0]["drain"]
        out.write(f"\ndrain: {d0['sent']:,} frames queued in {par['drain_buffer_per_worker']} "
                  f"rings while the sensor was stopped, then processed with the CPU to "
                  f"itself\n")
        base = d0["processed_pps"]
        for r in drains:
            d = r["drain"]
            out.write(f"  --workers {r['workers']}: {d['seconds_to_last_frame_processed']:.2f} "
                      f"s, {d['processed_pps']:,} pps ({d['processed_pps'] / base:.2f}x); "
                      f"dropped {d['dropped']:,}, seen {d['seen']:,}\n")
    out.write("\nsent: tcpreplay's count; received: frames the kernel passed to the sockets "
              "(dropped ones included); dropped: ring full; seen: frames the engines "
              "processed;\nprocessed pps: seen / time from the start of tcpreplay until the "
              "last frame was processed (stats rows every 50 ms).\n\n")


if __name__ == "__main__":
    sys.exit(main())
