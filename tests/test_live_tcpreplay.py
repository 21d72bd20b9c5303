"""The live sensor fed by tcpreplay at top speed on a veth: packets sent, seen, dropped.

The sample captures (all of pcaps/*.pcap, 823 frames) are replayed LOOPS times in a row into one
end of a veth pair; the sensor captures the other end, in another namespace. The numbers are
printed, not asserted as a speed; what is asserted is the bookkeeping: every frame sent reached
the kernel's counters, and every frame the kernel did not drop reached the engine.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from netns import (
    PASSWORD,
    REPO,
    Lab,
    count_rows,
    replay_wire,
    sensor_command,
    sh,
    start_sensor,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: network namespaces, AF_PACKET")
LOOPS = 60
CAPTURES = sorted(str(p) for p in (REPO / "pcaps").glob("*.pcap"))
CONFIG = """\
key_file: fingerprint.key
ports: [5000]
live:
  stats_interval: 1
  user: nobody
  capture: {capture}
  buffer_size: {buffer}
"""


@pytest.fixture
def wire():
    with replay_wire("t") as made:
        yield made


def _replay(lab: Lab, tx: str, rx: str, name: str, capture: str, buffer: str) -> dict:
    work = lab.dir / name
    proc, _notify = start_sensor(lab, rx, name, "rp1", work,
                                 CONFIG.format(capture=capture, buffer=buffer))
    out = sh("tcpreplay", "--topspeed", f"--loop={LOOPS}", "-i", "rp0", *CAPTURES, ns=tx,
             timeout=120).stdout
    sent = int(re.search(r"Actual: (\d+) packets", out).group(1))
    rate = re.search(r"Rated: .*?([\d.]+) pps", out).group(1)
    db = work / "sensor.db"

    def latest() -> dict | None:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute("SELECT * FROM stats ORDER BY ts DESC LIMIT 1").fetchone()
        finally:
            conn.close()
        return dict(row) if row else None

    # wait until the kernel counted every frame and the sensor worked through its backlog
    wait_for(lambda: (r := latest()) and r["kernel_received"] >= sent
             and r["packets"] + r["kernel_dropped"] >= r["kernel_received"], 60,
             "the sensor to catch up")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(25) == 0
    final = latest()
    log = (lab.dir / f"{name}.log").read_text()
    return {"sent": sent, "rate": float(rate), "final": final, "log": log, "db": db}


def _report(capsys, label: str, r: dict) -> None:
    f = r["final"]
    with capsys.disabled():
        print(f"\n[tcpreplay {label}] sent {r['sent']} packets at {r['rate']:,.0f} pps; "
              f"kernel received {f['kernel_received']}, dropped {f['kernel_dropped']}; "
              f"sensor saw {f['packets']} packets, {f['transactions']} transactions, "
              f"{f['flows']} flows; RSS {f['rss_bytes'] / 1e6:.0f} MB")


@pytest.mark.parametrize("capture", ["ring", "recv"])
def test_tcpreplay_top_speed(wire, capsys, capture):
    lab, tx, rx = wire
    r = _replay(lab, tx, rx, capture, capture, "64MiB")
    f = r["final"]
    _report(capsys, f"{capture}, 64 MiB", r)
    assert f["kernel_received"] == r["sent"]  # the filter let every frame through (port 5000)
    assert f["packets"] == f["kernel_received"] - f["kernel_dropped"]  # nothing lost after it
    assert f["transactions"] > 0 and f["flows_open"] == 0
    if f["kernel_dropped"] == 0:  # then exactly LOOPS times what one offline pass records
        once = lab.dir / "once.db"
        sh(*sensor_command("replay", *CAPTURES, "--db", str(once), "--config",
                           str(lab.dir / capture / "sensor.yaml")))
        conn = sqlite3.connect(once)
        per_loop = conn.execute("SELECT count(*) FROM transactions").fetchone()[0]
        conn.close()
        assert f["transactions"] == per_loop * LOOPS


def test_capture_loss_is_logged_stored_and_raised(wire, capsys):
    """A receive buffer far too small for a burst: drops are logged, in the stats table, and
    a capture-loss finding is raised once (when they start)."""
    lab, tx, rx = wire
    r = _replay(lab, tx, rx, "tiny", "recv", "64KiB")
    f = r["final"]
    _report(capsys, "recv, 64 KiB: drops on purpose", r)
    assert f["kernel_dropped"] > 0
    assert f["packets"] == f["kernel_received"] - f["kernel_dropped"]
    assert "the kernel dropped" in r["log"]
    conn = sqlite3.connect(r["db"])
    events = conn.execute("SELECT title, details FROM events WHERE rule = 'capture-loss'")
    events = events.fetchall()
    conn.close()
    assert len(events) == 1 and "rp1" in events[0][0]
    status = Path(r["db"])
    assert status.exists()


@pytest.mark.parametrize("capture", ["ring", "recv"])
def test_interface_gone_ends_the_run(wire, capture):
    """The span port disappears: the sensor records what it has and exits 1 (systemd's
    Restart=on-failure brings it back), instead of spinning on a dead socket."""
    lab, tx, rx = wire
    work = lab.dir / "gone"
    proc, _notify = start_sensor(lab, rx, "gone", "rp1", work,
                                 CONFIG.format(capture=capture, buffer="1MiB"))
    sh("tcpreplay", "-i", "rp0", *CAPTURES, ns=tx)
    db = work / "sensor.db"

    wait_for(lambda: count_rows(db, "transactions"), 10, "transactions")
    sh("ip", "link", "del", "rp0", ns=tx)
    assert proc.wait(15) == 1
    log = (lab.dir / "gone.log").read_text()
    assert "rp1: the interface is gone" in log
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM transactions").fetchone()[0] > 0
    conn.close()


RECEIVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from alert_receivers import HttpReceiver
with HttpReceiver() as r:
    print(r.url(), flush=True)
    sys.stdin.readline()  # until the test is done
    for request in r.requests:
        print(request["raw"].decode(errors="replace").replace("\\n", " "), flush=True)
"""


def test_live_findings_are_alerted(wire):
    """Findings of the live sensor reach an apprise target (a JSON webhook on the sensor
    namespace's loopback), and what is still queued at SIGTERM is delivered before exit."""
    lab, tx, rx = wire
    receiver = lab.spawn(sys.executable, "-c", RECEIVER, str(REPO / "tests"), ns=rx,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    url = receiver.stdout.readline().decode().strip()
    assert url.startswith("json://127.0.0.1:")
    config = CONFIG.format(capture="ring", buffer="8MiB") + (
        f"alerts:\n  targets:\n    - name: hook\n      url: {url}\n")
    work = lab.dir / "alerts"
    proc, _notify = start_sensor(lab, rx, "alerts", "rp1", work, config)
    basic = [c for c in CAPTURES if c.endswith("basic-auth-push.pcap")]
    sh("tcpreplay", "-i", "rp0", *basic, ns=tx)
    db = work / "sensor.db"

    wait_for(lambda: count_rows(db, "events"), 10, "findings")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(25) == 0
    out, _ = receiver.communicate(b"\n", timeout=10)
    payloads = out.decode().splitlines()
    assert payloads, (lab.dir / "alerts.log").read_text()[-2000:]
    assert any("plaintext-basic-auth" in p for p in payloads)
    assert not any(PASSWORD in p for p in payloads)
