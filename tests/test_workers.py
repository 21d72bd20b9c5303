"""`--workers N`: replay of many files in parallel processes, and live capture spread over worker
processes by PACKET_FANOUT_HASH, all of them writing to one database.

Replay: with two workers the sample captures give exactly the transactions of one worker, and
the events and anomalies of replaying each file on its own (each file has its own engine and
detector); a flow cut across two files is two flows. Live (root: network namespaces, a veth
fed by tcpreplay): every frame reaches exactly one worker, both directions of every connection
the same one (no mid-stream pickups, the transactions of an offline replay of the same files),
SIGTERM leaves one consistent database, and the supervisor answers for its workers to systemd.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import PCAPS, SAMPLE_CAPTURES, run_cli
from netns import count_rows, replay_wire, sh, start_sensor, wait_for

from sensor.config import load_config
from sensor.replay import run_replay
from sensor.yamlfile import ConfigError

# every column but the ones the capture clock decides (live frames carry kernel timestamps)
CLOCK_COLUMNS = ("ts", "flow_id", "response_ts")


def rows(db: Path, table: str) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    finally:
        conn.close()


def multiset(items: list[dict], drop: tuple[str, ...] = ()) -> Counter:
    return Counter(tuple(sorted((k, v) for k, v in r.items() if k not in drop)) for r in items)


# -- replay -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replays(tmp_path_factory):
    """All sample captures with --workers 1 and --workers 2 (the CLI), and each file alone."""
    tmp = tmp_path_factory.mktemp("workers")
    config = tmp / "sensor.yaml"
    config.write_text("key_file: fingerprint.key\n")
    out = {}
    for n in (1, 2):
        db = tmp / f"w{n}.db"
        rc, stdout, err = run_cli(["replay", *SAMPLE_CAPTURES, "--db", db, "--config", config,
                                   "--workers", str(n), "--json"])
        assert rc == 0, err
        out[n] = (db, json.loads(stdout))
    cfg = load_config(config)
    alone = {}
    for pcap in SAMPLE_CAPTURES:
        db = tmp / f"alone-{pcap.stem}.db"
        summary, _ = run_replay([str(pcap)], cfg, db)
        alone[str(pcap)] = (db, summary)
    return out, alone


def test_replay_two_workers_same_transactions(replays):
    (db1, s1), (db2, _s2) = replays[0][1], replays[0][2]
    t1, t2 = rows(db1, "transactions"), rows(db2, "transactions")
    assert len(t1) == s1["transactions"] > 100
    assert multiset(t1) == multiset(t2)  # every column, ts and flow_id included


def test_replay_two_workers_events_and_anomalies_as_each_file_alone(replays):
    (db2, _s2), alone = replays[0][2], replays[1]
    for table in ("events", "anomalies"):
        expected = Counter()
        for db, _ in alone.values():
            expected += multiset(rows(db, table))
        assert multiset(rows(db2, table)) == expected, table
    # with these captures (no connection spans two files) the anomalies are those of one engine
    assert multiset(rows(replays[0][1][0], "anomalies")) == multiset(rows(db2, "anomalies"))


def test_replay_two_workers_summary_adds_up(replays):
    (_, s1), (_, s2) = replays[0][1], replays[0][2]
    alone = replays[1]
    assert "workers" not in s1 and "per_file" not in s1  # one worker: the summary as before
    assert s2["workers"] == 2 and s2["interrupted"] is False
    for key in ("packets", "bytes", "tcp_packets", "flows", "transactions", "gaps", "skipped",
                "anomalies"):
        assert s2[key] == s1[key], key
    assert s2["files"] == s1["files"]
    per_file = {f["file"]: f for f in s2["per_file"]}
    assert set(per_file) == set(alone)
    assert {f["worker"] for f in s2["per_file"]} == {0, 1}  # both took files
    findings: Counter = Counter()
    for path, (_, summary) in alone.items():
        for key in ("packets", "flows", "transactions", "findings", "anomalies"):
            assert per_file[path][key] == summary[key], (path, key)
        findings.update(summary["findings"])
    assert s2["findings"] == dict(sorted(findings.items()))
    assert sum(s2["findings"].values()) == len(rows(replays[0][2][0], "events"))


def test_replay_workers_text_summary(tmp_path, config_path):
    rc, out, err = run_cli(["replay", *SAMPLE_CAPTURES[:3], "--db", tmp_path / "x.db",
                            "--config", config_path, "--workers", "2"])
    assert rc == 0, err
    assert re.search(r"^files: +3 \([\d,]+ bytes of packets\), 2 workers$", out, re.M)


def _split_pcap(src: Path, first: Path, second: Path) -> None:
    """A classic pcap cut in two in the middle of its longest connection, as a capture rotated
    mid-connection."""
    from sensor.decode import Decoder

    data = src.read_bytes()
    header, pos, records, keys = data[:24], 24, [], []
    linktype = struct.unpack_from("<I", data, 20)[0]
    decoder = Decoder()
    while pos < len(data):
        incl = struct.unpack_from("<I", data, pos + 8)[0]
        records.append(data[pos:pos + 16 + incl])
        seg = decoder.decode(linktype, data[pos + 16:pos + 16 + incl])
        keys.append(frozenset([(seg[0], seg[2]), (seg[1], seg[3])]) if seg else None)
        pos += 16 + incl
    longest = Counter(k for k in keys if k).most_common(1)[0][0]
    at = [i for i, k in enumerate(keys) if k == longest]
    cut = at[len(at) // 2]
    first.write_bytes(header + b"".join(records[:cut]))
    second.write_bytes(header + b"".join(records[cut:]))


def test_a_connection_cut_across_files_is_split_with_workers(tmp_path, replay):
    src = PCAPS / "anonymous-push-pull.pcap"
    a, b = tmp_path / "part1.pcap", tmp_path / "part2.pcap"
    _split_pcap(src, a, b)
    rc, out, err, db_one = replay(a, b, json=True)
    assert rc == 0, err
    rc, out2, err, db_two = replay(a, b, json=True, extra=("--workers", "2"))
    assert rc == 0, err
    one, two = json.loads(out), json.loads(out2)
    assert "midstream-pickup" not in one["anomalies"]  # one engine: the flow goes on
    assert two["anomalies"].get("midstream-pickup", 0) >= 1  # two: the second half is new
    assert two["flows"] > one["flows"]


def test_workers_option_and_setting_are_checked(tmp_path, config_path):
    for bad in ("0", "-1", "x", "65"):
        rc, _, err = run_cli(["replay", PCAPS / "bulk-pull.pcap", "--db", tmp_path / "x.db",
                              "--config", config_path, "--workers", bad])
        assert rc == 2 and "--workers" in err, (bad, err)
    path = tmp_path / "live.yaml"
    for bad in ("0", "true", "2.5", "100"):
        path.write_text(f"live:\n  workers: {bad}\n")
        with pytest.raises(ConfigError, match=r"live\.workers"):
            load_config(path)
    path.write_text("live:\n  workers: 3\n")
    assert load_config(path).live.workers == 3
    assert load_config(None).live.workers == 1


def test_a_bad_file_stops_a_parallel_replay_before_any_is_read(tmp_path, config_path):
    bad = tmp_path / "notes.pcap"
    bad.write_text("not a capture\n")
    db = tmp_path / "x.db"
    rc, _, err = run_cli(["replay", PCAPS / "bulk-pull.pcap", bad, "--db", db, "--config",
                          config_path, "--workers", "2"])
    assert rc == 2 and "notes.pcap" in err
    assert not db.exists()


def test_parallel_replay_alerts_once_from_the_parent(tmp_path):
    from alert_receivers import HttpReceiver

    with HttpReceiver() as hook:
        config = tmp_path / "alerts.yaml"
        config.write_text("key_file: fingerprint.key\nalerts:\n  timeout: 2\n  retries: 1\n"
                          "  min_interval: 0\n  burst_count: 1000\n  drain_timeout: 10\n"
                          f"  targets:\n    - name: soc\n      url: \"{hook.url('/a')}\"\n"
                          "      min_severity: info\n")
        db = tmp_path / "sensor.db"
        rc, out, err = run_cli(["replay", *SAMPLE_CAPTURES, "--db", db, "--config", config,
                                "--workers", "2", "--alert", "--json"], timeout=120)
        assert rc == 0, err
        requests = list(hook.requests)
    summary = json.loads(out)
    target = summary["alerts"]["targets"]["soc"]
    assert target["delivered"] == len(requests) > 0 and target["failed"] == 0
    docs = [json.loads(json.loads(r["raw"])["message"]) for r in requests]
    events = rows(db, "events")
    for rule in {e["rule"] for e in events}:  # every finding alerted (repeats merged, counted)
        assert sum(d["count"] for d in docs if d["rule"] == rule) == \
            sum(e["count"] for e in events if e["rule"] == rule), rule


# -- live -------------------------------------------------------------------------------------

live = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, AF_PACKET")
LOOPS = 10
CAPTURES = [str(p) for p in SAMPLE_CAPTURES]
CONFIG = """\
key_file: fingerprint.key
ports: [5000]
live:
  stats_interval: 0.5
  user: nobody
  workers: 2
"""


@pytest.fixture
def wire():
    with replay_wire("k") as made:
        yield made


def _workers_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _latest_per_worker(db: Path) -> dict[int, dict]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        out = {}
        for r in conn.execute("SELECT * FROM stats ORDER BY ts"):
            out[r["worker"]] = dict(r)
        return out
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def _consistent(db: Path) -> dict[int, dict]:
    """One database, whole: integrity, both workers' final stats rows, and the transactions
    their counters say they recorded are all there."""
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    final = _latest_per_worker(db)
    assert set(final) == {0, 1}
    assert sum(f["transactions"] for f in final.values()) == count_rows(db, "transactions")
    assert sum(f["anomalies"] for f in final.values()) == count_rows(db, "anomalies")
    return final


@live
def test_live_two_workers_see_every_frame_once_and_whole_flows(wire, capsys):
    lab, tx, rx = wire
    work = lab.dir / "two"
    proc, notify = start_sensor(lab, rx, "two", "rp1", work, CONFIG)
    assert len(_workers_of(proc.pid)) == 2
    # paced: at top speed a loaded machine may defer the veth's receive work to ksoftirqd on
    # another CPU, which can reorder frames (a SYN behind its data) with or without workers
    out = sh("tcpreplay", "--pps=50000", f"--loop={LOOPS}", "-i", "rp0", *CAPTURES, ns=tx,
             timeout=120).stdout
    sent = int(re.search(r"Actual: (\d+) packets", out).group(1))
    db = work / "sensor.db"

    def caught_up():
        s = _latest_per_worker(db)
        return (len(s) == 2 and sum(r["kernel_received"] for r in s.values()) >= sent
                and all(r["packets"] + r["kernel_dropped"] >= r["kernel_received"]
                        for r in s.values()))

    wait_for(caught_up, 60, "both workers to catch up")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, (lab.dir / "two.log").read_text()[-3000:]
    final = _consistent(db)
    with capsys.disabled():
        print(f"\n[workers 2] sent {sent}; " + "; ".join(
            f"worker {w}: kernel received {r['kernel_received']}, dropped "
            f"{r['kernel_dropped']}, packets {r['packets']}, flows {r['flows']}, transactions "
            f"{r['transactions']}" for w, r in sorted(final.items())))
    assert all(r["kernel_dropped"] == 0 for r in final.values())
    assert sum(r["kernel_received"] for r in final.values()) == sent  # each frame to one worker
    assert sum(r["packets"] for r in final.values()) == sent  # ... and seen by it once
    assert all(r["packets"] > 0 and r["transactions"] > 0 for r in final.values())
    odd = [a for a in rows(db, "anomalies") if a["kind"] != "tls-to-plaintext-server"]
    assert not odd, odd[:5]  # no midstream-pickup, no gap: each flow whole in one worker
    # the same transactions as one offline replay of the same files, LOOPS times over
    offline = lab.dir / "offline.db"
    run_replay(CAPTURES, load_config(work / "sensor.yaml"), offline)
    once = multiset(rows(offline, "transactions"), CLOCK_COLUMNS)
    assert multiset(rows(db, "transactions"), CLOCK_COLUMNS) == Counter(
        {k: v * LOOPS for k, v in once.items()})
    assert all(t["partial"] == 0 for t in rows(db, "transactions"))
    ready = notify.seen("READY=1")
    assert len(ready) == 1 and notify.seen("STOPPING=1")
    rc, out, err = run_cli(["status", "--db", db])
    assert rc == 0, err
    assert "rp1 (worker 0): ring capture" in out and "rp1 (worker 1): ring capture" in out
    assert f"packets:      {sent:,} (" in out and "(2 workers)" in out


@live
def test_live_workers_sigterm_mid_traffic_leaves_one_consistent_database(wire):
    lab, tx, rx = wire
    work = lab.dir / "term"
    proc, _notify = start_sensor(lab, rx, "term", "rp1", work, CONFIG)
    replayer = lab.spawn("tcpreplay", "--pps=4000", "--loop=100", "-i", "rp0", *CAPTURES,
                         ns=tx)
    db = work / "sensor.db"
    wait_for(lambda: count_rows(db, "transactions") > 300, 30, "transactions")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, (lab.dir / "term.log").read_text()[-3000:]
    assert replayer.poll() is None  # the traffic was still flowing
    lab.stop(replayer)
    final = _consistent(db)
    assert all(r["transactions"] > 0 for r in final.values())
    log = (lab.dir / "term.log").read_text()
    assert log.count("stopped (SIGTERM)") == 3  # both workers and the supervisor


@live
def test_live_workers_watchdog_reload_and_a_dead_worker(wire):
    """The supervisor pings the watchdog only while every worker's loop turns, reports a
    reload once all workers reloaded, and stops everything (exit 1) when a worker dies."""
    lab, tx, rx = wire
    work = lab.dir / "wd"
    proc, notify = start_sensor(lab, rx, "wd", "rp1", work, CONFIG, watchdog_usec=1_000_000)
    first, second = _workers_of(proc.pid)
    wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 3, 10, "watchdog pings")
    os.kill(second, signal.SIGSTOP)  # a stalled worker
    time.sleep(0.8)  # what it beat before the stop may still count
    stalled_at = time.monotonic()
    time.sleep(2)
    assert not [t for t in notify.seen("WATCHDOG=1") if t > stalled_at]
    os.kill(second, signal.SIGCONT)
    wait_for(lambda: [t for t in notify.seen("WATCHDOG=1") if t > stalled_at + 2], 5,
             "pings again")

    hup = time.monotonic()
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: [t for t in notify.seen("READY=1") if t > hup], 10, "READY after reload")
    assert [t for t in notify.seen("RELOADING=1") if t > hup]
    log = (lab.dir / "wd.log").read_text()
    assert "registry-sensor[worker 0]: INFO: reloaded" in log
    assert "registry-sensor[worker 1]: INFO: reloaded" in log

    os.kill(first, signal.SIGKILL)  # a worker dies: everything stops, systemd restarts it
    assert proc.wait(30) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
    log = (lab.dir / "wd.log").read_text()
    assert "worker 0 (pid" in log and "exited with -9" in log
    assert "registry-sensor[worker 1]: INFO: stopped (SIGTERM)" in log
    conn = sqlite3.connect(work / "sensor.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@live
def test_live_workers_as_the_unit_runs_them_under_mdwe(wire):
    """As systemd runs the service (nobody with CAP_NET_RAW and CAP_NET_ADMIN as ambient
    capabilities) and under PR_SET_MDWE (MemoryDenyWriteExecute=): the supervisor forks its
    workers, they capture, reload and stop cleanly."""
    probe = subprocess.run([sys.executable, "-c", "import ctypes; "
                            "print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"],
                           capture_output=True, text=True)
    if probe.stdout.strip() == "-1":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    lab, tx, rx = wire
    work = lab.dir / "unit"
    proc, notify = start_sensor(lab, rx, "unit", "rp1", work, CONFIG, caps_only=True, mdwe=True)
    sh("tcpreplay", "--topspeed", "-i", "rp0", *CAPTURES, ns=tx, timeout=60)
    db = work / "sensor.db"
    wait_for(lambda: count_rows(db, "transactions") >= 166, 30, "transactions")
    hup = time.monotonic()
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: [t for t in notify.seen("READY=1") if t > hup], 10, "READY after reload")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, (lab.dir / "unit.log").read_text()[-3000:]
    assert count_rows(db, "transactions") == 166  # the sample captures' transactions, once
    _consistent(db)
