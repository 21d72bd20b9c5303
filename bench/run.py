#!/usr/bin/env python3
"""The replay benchmark: registry-sensor side by side with the tools a user would pick instead.

    python bench/run.py [--size 1G] [--runs 3] [--install]

Generates the workload if it is not cached in bench/out/ (bench/make_workload.py), reads it once
to warm the page cache, then times on the same file, each tool as its own process:

  registry-sensor   `registry-sensor replay FILE --db ... --json` (default rules, SQLite on)
  bare loop         bench/bare_loop.py: the sensor's reader + one flow-dict lookup per packet
  suricata          Suricata 7, `--runmode single -k none -S /dev/null`, eve http logging,
                    stream.reassembly.depth 0 (unlimited: needed to see every request)
  suricata-1mb      the same with Suricata's default depth of 1 MB (misses requests after a
                    big body on a keep-alive connection; shown for reference)
  tshark            `tshark -d tcp.port==5000,http -Y "http.request || http.response" -T fields`
                    on a slice (first --tshark-slice bytes), rates scaled from the slice
  scapy             bench/scapy_http.py (PcapReader + dissection + request-line regex) on a
                    slice (first --scapy-slice bytes)

The fast tools run in interleaved rounds, --runs of them. For each: wall time (median of --runs,
or --slow-runs for tshark and scapy), CPU time, packets/s, Gbit/s (captured frame bytes), peak
RSS (`/usr/bin/time -v`, mapped file pages included) and the ratio of the tool's throughput to
registry-sensor's. The transactions each tool found are checked
against the generator's sidecar (count; and the multiset of (method, uri, status) for
registry-sensor, Suricata and tshark). Prints a table; writes bench/out/results.json.
A missing Suricata (or tshark) is skipped with a note; `--install` runs bench/setup.sh first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import common
import make_workload
from common import OUT, compare, expected_transactions, log, measure, median

TOOLS = ("registry-sensor", "bare-loop", "suricata", "suricata-1mb", "tshark", "scapy")

SURICATA_YAML = """%YAML 1.1
---
# Minimal Suricata 7 configuration for the registry benchmark: no rules, HTTP on port 5000
# (protocol detection finds it on any port; HTTP_PORTS lists 5000 for rules), eve.json with http
# events only, checksum validation off.
vars:
  address-groups:
    HOME_NET: "[10.0.0.0/8,172.16.0.0/12,192.168.0.0/16]"
    EXTERNAL_NET: "any"
  port-groups:
    HTTP_PORTS: "[80,5000]"
outputs:
  - eve-log:
      enabled: yes
      filetype: regular
      filename: eve.json
      types:
        - http:
            extended: yes
app-layer:
  protocols:
    http:
      enabled: yes
      libhtp:
        default-config:
          personality: IDS
          request-body-limit: 100kb
          response-body-limit: 100kb
stream:
  memcap: 64mb
  checksum-validation: no
  reassembly:
    memcap: 256mb
    depth: {depth}
"""


# -- one tool each ------------------------------------------------------------------------------

def run_sensor(pcap: Path, runs: int) -> dict:
    config = common.sensor_config()
    db = OUT / "bench-sensor.db"
    summary_path = OUT / "sensor-summary.json"
    cmd = [*common.sensor_command(), "replay", str(pcap), "--config", str(config), "--db",
           str(db), "--json"]
    times, cpu, rss, internal = [], [], [], []
    res: dict = {"command": cmd}
    for _ in range(runs):
        for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            p.unlink(missing_ok=True)
        m = measure(cmd, stdout=summary_path)
        if m["returncode"]:
            return res | {"error": f"exit {m['returncode']}: {m['stderr_tail']}"}
        times.append(m["seconds"])
        cpu.append(m["cpu_seconds"])
        rss.append(m["rss_kib"])
        internal.append(json.loads(summary_path.read_text())["seconds"])
    summary = json.loads(summary_path.read_text())
    conn = sqlite3.connect(db)
    found = Counter(conn.execute("SELECT method, uri, status FROM transactions"))
    conn.close()
    return res | {"times": times, "cpu": cpu, "rss_kib": rss, "internal_seconds": internal,
                  "packets_seen": summary["packets"], "transactions": summary["transactions"],
                  "anomalies": summary["anomalies"], "gaps": summary["gaps"],
                  "findings": summary["findings"], "found": found}


def timed_runs(cmd: list, runs: int, stdout: Path | None = None,
               before: Callable[[], None] | None = None) -> dict:
    """Run `cmd` `runs` times; its times, CPU times and peak RSS, or an error."""
    times, cpu, rss = [], [], []
    for _ in range(runs):
        if before is not None:
            before()
        m = measure(cmd, stdout=stdout) if stdout is not None else measure(cmd)
        if m["returncode"]:
            return {"command": cmd, "error": f"exit {m['returncode']}: {m['stderr_tail']}"}
        times.append(m["seconds"])
        cpu.append(m["cpu_seconds"])
        rss.append(m["rss_kib"])
    return {"command": cmd, "times": times, "cpu": cpu, "rss_kib": rss}


def run_bare(pcap: Path, runs: int) -> dict:
    cmd = [sys.executable, str(common.BENCH / "bare_loop.py"), str(pcap)]
    out = OUT / "bare-loop.json"
    timed = timed_runs(cmd, runs, stdout=out)
    if "error" in timed:
        return timed
    doc = json.loads(out.read_text())
    return {**timed,
            "packets_seen": doc["packets"],
            "internal_seconds": [doc["seconds"]]}


def run_suricata(pcap: Path, runs: int, depth: str, name: str) -> dict:
    exe = shutil.which("suricata")
    if exe is None:
        return {"skipped": "suricata is not installed (python bench/run.py --install, or "
                           "apt-get install -t bookworm-backports suricata)"}
    work = OUT / name
    work.mkdir(parents=True, exist_ok=True)
    yaml = work / "suricata.yaml"
    yaml.write_text(SURICATA_YAML.format(depth=depth))
    logdir = work / "log"
    cmd = [exe, "-c", str(yaml), "-r", str(pcap), "--runmode", "single", "-k", "none",
           "-S", "/dev/null", "-l", str(logdir)]
    def fresh_logdir() -> None:
        shutil.rmtree(logdir, ignore_errors=True)
        logdir.mkdir()

    timed = timed_runs(cmd, runs, before=fresh_logdir)
    if "error" in timed:
        return timed
    found: Counter = Counter()
    with open(logdir / "eve.json") as fh:
        for line in fh:
            ev = json.loads(line)
            if ev.get("event_type") == "http":
                h = ev["http"]
                found[(h.get("http_method"), h.get("url"), h.get("status"))] += 1
    return {**timed, "found": found,
            "transactions": sum(found.values()), "config": str(yaml)}


def run_tshark(pcap: Path, runs: int) -> dict:
    exe = shutil.which("tshark")
    if exe is None:
        return {"skipped": "tshark is not installed (apt-get install tshark)"}
    out = OUT / "tshark.tsv"
    cmd = [exe, "-r", str(pcap), "-n", "-d", "tcp.port==5000,http",
           "-Y", "http.request || http.response", "-T", "fields", "-E", "separator=/t",
           "-E", "occurrence=a", "-E", "aggregator=|", "-e", "frame.number", "-e", "tcp.stream",
           "-e", "http.request.method", "-e", "http.request.uri", "-e", "http.response.code"]
    timed = timed_runs(cmd, runs, stdout=out)
    if "error" in timed:
        return timed
    # Pair responses with requests in order on each TCP stream (HTTP/1.1 semantics); a frame
    # may carry several messages (pipelining), listed with the aggregator.
    queues: dict[str, deque] = defaultdict(deque)
    found: Counter = Counter()
    requests = 0
    for line in out.read_text().splitlines():
        parts = (line.split("\t") + ["", "", "", ""])[:5]
        _frame, stream, methods, uris, codes = parts
        if methods:
            for method, uri in zip(methods.split("|"), uris.split("|"), strict=False):
                queues[stream].append((method, uri))
                requests += 1
        if codes:
            for code in codes.split("|"):
                if queues[stream]:
                    method, uri = queues[stream].popleft()
                    found[(method, uri, int(code))] += 1
                else:
                    found[(None, None, int(code))] += 1
    for q in queues.values():
        for method, uri in q:
            found[(method, uri, None)] += 1
    return {**timed, "found": found,
            "transactions": requests}


def run_scapy(pcap: Path, runs: int) -> dict:
    cmd = [sys.executable, str(common.BENCH / "scapy_http.py"), str(pcap)]
    out = OUT / "scapy.json"
    timed = timed_runs(cmd, runs, stdout=out)
    if "error" in timed:
        return timed
    doc = json.loads(out.read_text())
    return {**timed,
            "packets_seen": doc["packets"],
            "requests": doc["requests"], "statuses": doc["statuses"],
            "transactions": len(doc["requests"])}


# -- the run ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=make_workload.parse_size, default=make_workload.parse_size("1G"),
                    help="workload size (default 1G)")
    ap.add_argument("--blob-size", type=make_workload.parse_blob_size,
                    default=make_workload.parse_blob_size("1M-16M"),
                    help="layer blob size or range (default 1M-16M)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of the fast tools; the median is reported (default 3)")
    ap.add_argument("--slow-runs", type=int, default=1, help="runs of tshark and scapy (1)")
    ap.add_argument("--tshark-slice", type=make_workload.parse_size,
                    default=make_workload.parse_size("256M"),
                    help="tshark reads the first this many bytes (default 256M; a value "
                         "bigger than the file means all of it)")
    ap.add_argument("--scapy-slice", type=make_workload.parse_size,
                    default=make_workload.parse_size("32M"),
                    help="scapy reads the first this many bytes (default 32M)")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(TOOLS)}")
    ap.add_argument("--install", action="store_true",
                    help="run bench/setup.sh first (root, Debian bookworm: tshark, Suricata 7 "
                         "from bookworm-backports, py-spy)")
    ap.add_argument("--output", type=Path, default=OUT / "results.json")
    args = ap.parse_args(argv)
    tools = TOOLS if not args.only else tuple(t.strip() for t in args.only.split(","))
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tool(s): {', '.join(sorted(unknown))}")

    if args.install:
        log("installing peers with bench/setup.sh ...")
        subprocess.run(["sh", str(common.BENCH / "setup.sh")], check=True,
                       env={**os.environ, "PYTHON": sys.executable})

    OUT.mkdir(parents=True, exist_ok=True)
    pcap, side = common.ensure_workload(args.size, args.blob_size, args.seed)
    log(f"workload {pcap.name}: {side['file_bytes'] / 1e6:,.1f} MB, {side['packets']:,} packets, "
        f"{side['connections']} connections, {side['transactions']} transactions")
    common.warm_cache(pcap)
    expected_all = expected_transactions(side)

    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"note: load average {load_before[0]:.2f} before the runs: other processes compete "
            f"for the CPU and the numbers will be noisy (the ratios less so: the fast tools run "
            f"in interleaved rounds)")
    inputs: dict[str, tuple[Path, int, int, str]] = {}
    full = (pcap, side["packets"], side["frame_bytes"], "full")
    for tool in tools:
        if tool in ("tshark", "scapy"):
            limit = args.tshark_slice if tool == "tshark" else args.scapy_slice
            path, packets, fbytes = common.slice_pcap(pcap, limit)
            label = "full" if path == pcap else f"first {common.fmt_size(limit)}"
            inputs[tool] = (path, packets, fbytes, label)
        else:
            inputs[tool] = full

    def one(tool: str, runs: int) -> dict:
        path = inputs[tool][0]
        if tool == "registry-sensor":
            return run_sensor(path, runs)
        if tool == "bare-loop":
            return run_bare(path, runs)
        if tool == "suricata":
            return run_suricata(path, runs, "0", "suricata")
        if tool == "suricata-1mb":
            return run_suricata(path, runs, "1mb", "suricata-1mb")
        if tool == "tshark":
            return run_tshark(path, runs)
        return run_scapy(path, runs)

    # The fast tools run in rounds (each once per round), so a burst of load elsewhere on the
    # machine hits all of them alike; then tshark and scapy.
    results: dict[str, dict] = {}
    fast = [t for t in tools if t not in ("tshark", "scapy")]
    for n in range(args.runs):
        for tool in fast:
            prev = results.get(tool)
            if prev is not None and "times" not in prev:
                continue  # skipped or failed: once is enough
            log(f"{tool}: run {n + 1} of {args.runs} on {inputs[tool][3]} "
                f"({inputs[tool][1]:,} packets) ...")
            r = one(tool, 1)
            if prev is not None and "times" in r:
                for key in ("times", "cpu", "rss_kib", "internal_seconds"):
                    if key in r:
                        r[key] = prev.get(key, []) + r[key]
            results[tool] = r
            log(f"  {r['times'][-1]:.2f} s" if "times" in r
                else f"  {r.get('skipped') or r.get('error')}")
    for tool in tools:
        if tool in fast:
            continue
        common.warm_cache(inputs[tool][0])
        log(f"{tool}: {args.slow_runs} run(s) on {inputs[tool][3]} ({inputs[tool][1]:,} "
            f"packets) ...")
        results[tool] = r = one(tool, args.slow_runs)
        log(f"  median {median(r['times']):.2f} s" if "times" in r
            else f"  {r.get('skipped') or r.get('error')}")
    load_after = os.getloadavg()

    # metrics and checks
    rows = []
    sensor_pps = None
    for tool in tools:
        r = results[tool]
        path, packets, fbytes, label = inputs[tool]
        row: dict = {"tool": tool, "input": label, "input_file": str(path), "packets": packets,
                     "frame_bytes": fbytes}
        if "times" not in r:
            row["note"] = r.get("skipped") or r.get("error")
            rows.append(row)
            continue
        secs = median(r["times"])
        row.update(runs=len(r["times"]), seconds=r["times"], median_seconds=round(secs, 3),
                   min_seconds=round(min(r["times"]), 3),
                   cpu_seconds=[round(x, 2) for x in r["cpu"]],
                   median_cpu_seconds=round(median(r["cpu"]), 3),
                   packets_per_cpu_second=round(packets / max(median(r["cpu"]), 1e-6)),
                   packets_per_second_best=round(packets / min(r["times"])),
                   packets_per_second=round(packets / secs),
                   gbit_per_second=round(fbytes * 8 / secs / 1e9, 3),
                   peak_rss_mib=round(max(r["rss_kib"]) / 1024, 1),
                   full_file_seconds_estimate=round(side["packets"] / (packets / secs), 2))
        if "internal_seconds" in r:
            row["internal_seconds"] = r["internal_seconds"]
        if "packets_seen" in r and r["packets_seen"] != packets:
            row["packet_count_mismatch"] = r["packets_seen"]
        if tool == "registry-sensor":
            sensor_pps = row["packets_per_second"]
            row["check"] = compare(expected_all, r["found"])
            row["check"]["reported_transactions"] = r["transactions"]
            row["anomalies"], row["gaps"] = r["anomalies"], r["gaps"]
            row["findings"] = r["findings"]
        elif tool in ("suricata", "suricata-1mb"):
            row["check"] = compare(expected_all, r["found"])
        elif tool == "tshark":
            sliced = path != pcap
            exp = expected_transactions(side, packets if sliced else None)
            row["check"] = compare(exp, r["found"])
        elif tool == "scapy":
            sliced = path != pcap
            exp_req = Counter((t["method"], t["uri"]) for t in side["txns"]
                              if not sliced or t["req_first"] <= packets)
            exp_status = Counter(t["status"] for t in side["txns"]
                                 if not sliced or t["resp_first"] <= packets)
            got_req = Counter(tuple(x) for x in r["requests"])
            got_status = Counter(r["statuses"])
            row["check"] = {
                "expected": sum(exp_req.values()), "found": len(r["requests"]),
                "requests_missing": sum((exp_req - got_req).values()),
                "requests_extra": sum((got_req - exp_req).values()),
                "statuses_expected": sum(exp_status.values()),
                "statuses_found": len(r["statuses"]),
                "missing_examples": [list(k) for k in list(exp_req - got_req)[:5]],
                "ok": exp_req == got_req and exp_status == got_status,
            }
        rows.append(row)
    sensor_cpu_pps = None
    for row in rows:
        if row["tool"] == "registry-sensor" and "packets_per_cpu_second" in row:
            sensor_cpu_pps = row["packets_per_cpu_second"]
    for row in rows:
        if sensor_pps and "packets_per_second" in row:
            row["throughput_vs_sensor"] = round(row["packets_per_second"] / sensor_pps, 3)
        if sensor_cpu_pps and "packets_per_cpu_second" in row:
            row["cpu_throughput_vs_sensor"] = round(row["packets_per_cpu_second"]
                                                    / sensor_cpu_pps, 3)

    by = {row["tool"]: row for row in rows}
    targets = {}
    if sensor_pps:
        for tool, want in (("suricata", 1.0), ("tshark", 20.0), ("bare-loop", 0.8)):
            if tool in by and "packets_per_second" in by[tool]:
                ratio = sensor_pps / by[tool]["packets_per_second"]
                cpu_ratio = sensor_cpu_pps / by[tool]["packets_per_cpu_second"]
                targets[f"sensor/{tool}"] = {"ratio": round(ratio, 3), "target": want,
                                             "met": ratio >= want,
                                             "ratio_by_cpu_time": round(cpu_ratio, 3)}
        rss = by["registry-sensor"].get("peak_rss_mib")
        if rss is not None:
            targets["sensor peak RSS MiB"] = {"value": rss, "target": "< 100",
                                              "met": rss < 100}

    doc = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "source": common.source_state(),
        "workload": {k: v for k, v in side.items() if k != "txns"},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in load_after]},
        "parameters": {"runs": args.runs, "slow_runs": args.slow_runs,
                       "tshark_slice": args.tshark_slice, "scapy_slice": args.scapy_slice},
        "results": rows,
        "targets": targets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    log(f"results: {args.output}")
    return 0


def print_table(doc: dict) -> None:
    w = doc["workload"]
    m = doc["machine"]
    out = sys.stdout
    out.write(f"\nregistry replay benchmark, {doc['date']}\n")
    out.write(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, "
              f"Python {m['python']}\n")
    out.write(f"workload: {Path(w['file']).name}: {w['file_bytes'] / 1e6:,.1f} MB, "
              f"{w['packets']:,} packets, {w['connections']} connections, "
              f"{w['transactions']} transactions\n\n")
    head = (f"{'tool':<16} {'input':<10} {'runs':>4} {'median s':>9} {'CPU s':>6} "
            f"{'packets/s':>10} {'Gbit/s':>7} {'RSS MiB':>8} {'÷ sensor':>9} {'(CPU)':>6}  "
            f"transactions (found/expected)")
    out.write(head + "\n" + "-" * len(head) + "\n")
    for row in doc["results"]:
        if "packets_per_second" not in row:
            out.write(f"{row['tool']:<16} {row['input']:<10} skipped: {row.get('note')}\n")
            continue
        check = row.get("check")
        if check:
            verdict = "ok" if check["ok"] else "MISMATCH"
            txt = f"{check['found']}/{check['expected']} {verdict}"
        else:
            txt = "-"
        out.write(f"{row['tool']:<16} {row['input']:<10} {row['runs']:>4} "
                  f"{row['median_seconds']:>9.2f} {row['median_cpu_seconds']:>6.2f} "
                  f"{row['packets_per_second']:>10,} "
                  f"{row['gbit_per_second']:>7.2f} {row['peak_rss_mib']:>8.1f} "
                  f"{row.get('throughput_vs_sensor', 0):>9.3f} "
                  f"{row.get('cpu_throughput_vs_sensor', 0):>6.2f}  {txt}\n")
    out.write("\n÷ sensor: the tool's packets/s divided by registry-sensor's (sliced inputs: "
              "rate on the slice); (CPU): the same from CPU seconds (user + system, all "
              "threads),\nwhich other load on the machine disturbs less than wall time.\n")
    for name, t in doc["targets"].items():
        shown = t.get("ratio", t.get("value"))
        by_cpu = f"; by CPU time {t['ratio_by_cpu_time']}" if "ratio_by_cpu_time" in t else ""
        out.write(f"target {name}: {shown} (want {t['target']}) "
                  f"{'met' if t['met'] else 'NOT met'}{by_cpu}\n")
    for row in doc["results"]:
        check = row.get("check")
        if not check or check["ok"]:
            continue
        out.write(f"\n{row['tool']} mismatch: {check['found']} found, {check['expected']} "
                  f"expected; requests missing {check['requests_missing']}, requests extra "
                  f"{check.get('requests_extra', 0)}")
        if "missing" in check:
            out.write(f"; (method, uri, status) missing {check['missing']}, extra "
                      f"{check['extra']}")
        out.write("\n")
        for what in ("missing_examples", "extra_examples"):
            for ex in check.get(what, [])[:3]:
                shown = " ".join("-" if x is None else str(x) for x in ex[:3])
                out.write(f"  {what.split('_')[0]}: {shown[:110]}"
                          f"{' x' + str(ex[3]) if len(ex) > 3 and ex[3] > 1 else ''}\n")
    out.write("\n")


if __name__ == "__main__":
    sys.exit(main())
