"""The live sensor on a span port built from network namespaces, against the real registry.

Topology (tests/netns.py): Debian's docker-registry twice in one namespace (192.0.2.10 with
htpasswd auth, 192.0.2.11 open), skopeo and curl in another (198.51.100.20, and 203.0.113.50 as a
client from outside), a Linux bridge between them in a "switch" namespace whose two ports are
mirrored with tc mirred onto a third veth: the span port, captured in a fourth namespace.

Two sensors capture the span port at once: one started as root, which drops to nobody after
opening its socket, and one started as nobody with only CAP_NET_RAW and CAP_NET_ADMIN (setpriv),
as systemd runs it. tcpdump captures the same port; its file replayed through `registry-sensor
replay` and the registries' own access logs are the references for "nothing lost".
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from netns import (
    CLI_IP,
    EXT_IP,
    PASSWORD,
    REG_AUTH_IP,
    REG_OPEN_IP,
    Lab,
    build_span_port,
    curl,
    make_oci_image,
    missing_tools,
    sensor_command,
    sh,
    skopeo,
    start_registry,
    start_sensor,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, AF_PACKET"),
]
TOOLS = ("ip", "tc", "docker-registry", "skopeo", "curl", "htpasswd", "tcpdump", "setpriv",
         "unshare", "ethtool")

CONFIG = """\
key_file: fingerprint.key
ports: [5000]
networks:
  internal: [192.0.2.0/24, 198.51.100.0/24, 127.0.0.0/8]
rules:
  paths: [rules.d]
live:
  stats_interval: 1
  flush_interval: 0.5
  user: nobody
"""

MARKER_RULE = """\
rules:
  - id: {id}
    title: "Marker requested by {{src_ip}}"
    severity: low
    description: A request for the {marker} repository (test rule).
    match: {{transport: http, uri: {{{op}: "/v2/{marker}/"}}}}
"""


@pytest.fixture(scope="module")
def span():
    missing = missing_tools(*TOOLS)
    if missing:
        pytest.fail(f"missing tools (scripts/test installs them): {', '.join(missing)}")
    lab = Lab("s")
    try:
        port = build_span_port(lab)
        logs = {
            "auth": start_registry(lab, port.reg, REG_AUTH_IP, "auth", auth=True),
            "open": start_registry(lab, port.reg, REG_OPEN_IP, "open", auth=False),
        }
        # reachability from the client namespace, before any sensor starts
        for ip in (REG_AUTH_IP, REG_OPEN_IP):
            wait_for(lambda ip=ip: curl(port.cli, "-o", "/dev/null", "-w", "%{http_code}",
                                        "--max-time", "2", f"http://{ip}:5000/v2/") in
                     ("200", "401"), 10, f"registry {ip} from the client namespace")
        yield lab, port, logs
    finally:
        lab.close()


def _workdir(lab: Lab, name: str, rules: str | None = None) -> Path:
    work = lab.dir / name
    (work / "rules.d").mkdir(parents=True)
    (work / "rules.d" / "marker.yaml").write_text(
        rules or MARKER_RULE.format(id="test-marker-one", marker="marker-one", op="regex"))
    return work


def _rows(db: Path, sql: str, params=()) -> list[dict]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    except sqlite3.OperationalError:
        return []  # the tables are not there yet
    finally:
        conn.close()


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


TXN_KEY = ("src_ip", "dest_ip", "dest_port", "transport", "method", "uri", "status", "username",
           "auth_scheme", "operation", "repository", "request_body_bytes",
           "response_body_bytes", "partial")


def _transactions(db: Path) -> Counter:
    return Counter(tuple(r[k] for k in TXN_KEY) for r in _rows(db, "SELECT * FROM transactions"))


def _events(db: Path) -> Counter:
    """Findings per (rule, client, user, repository), weighted by count (suppression folds)."""
    out: Counter = Counter()
    for r in _rows(db, "SELECT * FROM events WHERE rule != 'capture-loss'"):
        out[(r["rule"], r["src_ip"], r["username"], r["repository"])] += r["count"]
    return out


ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/1\.[01]" (\d{3}) ')


def _access_log(path: Path, skip: int = 0) -> Counter:
    """(method, path, status) of the requests the registry logged after the first skip bytes."""
    text = path.read_bytes()[skip:].decode()
    return Counter(m.groups() for m in map(ACCESS_LINE.search, text.splitlines()) if m)


def test_span_port_end_to_end(span, capsys):
    lab, port, logs = span
    image = make_oci_image(lab.dir / "img", "team/app")
    log_start = {name: path.stat().st_size for name, path in logs.items()}  # readiness probes
    pcap = lab.dir / "span.pcap"
    tcpdump_log = lab.dir / "tcpdump.log"
    tcpdump = lab.spawn("tcpdump", "-i", port.span, "-w", str(pcap), "-U", "-Z", "root",
                        "-B", "8192", "tcp port 5000", ns=port.sensor, log=tcpdump_log)
    wait_for(lambda: "listening on" in tcpdump_log.read_text(), 10, "tcpdump")

    root_dir, caps_dir = _workdir(lab, "sensor-root"), _workdir(lab, "sensor-caps")
    a, notify_a = start_sensor(lab, port.sensor, "root", port.span, root_dir, CONFIG)
    b, notify_b = start_sensor(lab, port.sensor, "caps", port.span, caps_dir, CONFIG,
                               caps_only=True)
    db_a, db_b = root_dir / "sensor.db", caps_dir / "sensor.db"

    # privileges: the root-started one kept nothing; the other has exactly its two capabilities
    st_a, st_b = _proc_status(a.pid), _proc_status(b.pid)
    assert st_a["Uid"].split() == ["65534"] * 4 and st_a["Gid"].split() == ["65534"] * 4
    assert int(st_a["CapEff"], 16) == int(st_a["CapPrm"], 16) == 0
    assert st_a["Groups"].strip() == ""
    assert st_b["Uid"].split() == ["65534"] * 4
    net_raw_admin = (1 << 13) | (1 << 12)
    assert int(st_b["CapEff"], 16) == net_raw_admin
    promisc = int(sh("cat", f"/sys/class/net/{port.span}/flags", ns=port.sensor).stdout, 16)
    assert promisc & 0x100, "the span port is not in promiscuous mode"

    def txns(db: Path, where: str, *params) -> list[dict]:
        return _rows(db, f"SELECT * FROM transactions WHERE {where}", params)

    def events(db: Path, rule: str, **match) -> list[dict]:
        rows = _rows(db, "SELECT * FROM events WHERE rule = ?", (rule,))
        return [r for r in rows if all(r[k] == v for k, v in match.items())]

    # 1. a push with credentials: the transactions and the plaintext password finding appear
    #    in SQLite while the sensor runs
    skopeo(lab, port.cli, "copy", "-q", "--dest-tls-verify=false", "--dest-creds",
           f"alice:{PASSWORD}", f"oci:{image}:1.0",
           f"docker://{REG_AUTH_IP}:5000/team/private:1.0")
    for db in (db_a, db_b):
        wait_for(lambda db=db: txns(db, "operation = 'manifest-put' AND username = 'alice' "
                                        "AND status = 201 AND src_ip = ?", CLI_IP),
                 10, "the authenticated manifest PUT in SQLite")
        wait_for(lambda db=db: events(db, "plaintext-basic-auth", username="alice"), 10,
                 "plaintext-basic-auth for alice")

    # 2. an anonymous push to the open registry is accepted: critical
    skopeo(lab, port.cli, "copy", "-q", "--dest-tls-verify=false", "--dest-no-creds",
           f"oci:{image}:1.0", f"docker://{REG_OPEN_IP}:5000/library/open:1.0")
    wait_for(lambda: events(db_a, "anonymous-push", repository="library/open",
                            dest_ip=REG_OPEN_IP), 10, "anonymous-push")

    # 3. an anonymous push to the registry with auth is refused
    refused = skopeo(lab, port.cli, "copy", "-q", "--dest-tls-verify=false", "--dest-no-creds",
                     f"oci:{image}:1.0", f"docker://{REG_AUTH_IP}:5000/library/evil:1.0",
                     check=False)
    assert refused.returncode != 0
    # (skopeo gives up at the 401 of its first probe; a client that tries anyway:)
    code = curl(port.cli, "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
                "Content-Length: 0", f"http://{REG_AUTH_IP}:5000/v2/library/evil/blobs/uploads/")
    assert code == "401"
    wait_for(lambda: events(db_a, "anonymous-push-attempt", dest_ip=REG_AUTH_IP), 10,
             "anonymous-push-attempt")

    # 4. catalog enumeration from outside
    curl(port.cli, "-o", "/dev/null", "-o", "/dev/null", f"http://{REG_OPEN_IP}:5000/v2/",
         f"http://{REG_OPEN_IP}:5000/v2/_catalog", source=EXT_IP)
    curl(port.cli, "-o", "/dev/null", "-u", f"alice:{PASSWORD}",
         f"http://{REG_AUTH_IP}:5000/v2/_catalog?n=10", source=EXT_IP)
    wait_for(lambda: events(db_a, "catalog-enumeration", src_ip=EXT_IP), 10,
             "catalog-enumeration")
    wait_for(lambda: events(db_a, "external-source", src_ip=EXT_IP), 10, "external-source")
    assert not events(db_a, "external-source", src_ip=CLI_IP)  # internal per the config

    # housekeeping while running: stats rows, watchdog pings, status command
    wait_for(lambda: _rows(db_a, "SELECT * FROM stats WHERE interface = ?", (port.span,)), 5,
             "a stats row")
    assert len(notify_a.seen("WATCHDOG=1")) >= 2 and notify_a.seen("STATUS=")
    status = sh(*sensor_command("status", "--db", str(db_a)), env={"PATH": os.environ["PATH"]})
    assert port.span in status.stdout and "kernel received" in status.stdout

    # stop: let the last FIN/ACKs pass, stop tcpdump, SIGTERM both sensors
    time.sleep(1.0)
    lab.stop(tcpdump, signal.SIGINT)
    started = time.monotonic()
    for proc in (a, b):
        proc.send_signal(signal.SIGTERM)
    rcs = [proc.wait(25) for proc in (a, b)]
    stop_seconds = time.monotonic() - started
    log_a = (lab.dir / "root.log").read_text()
    assert rcs == [0, 0], log_a[-3000:]
    assert stop_seconds < 20
    assert notify_a.seen("STOPPING=1")
    assert "dropped privileges to nobody" in log_a

    # a consistent database, private files
    for work in (root_dir, caps_dir):
        db = work / "sensor.db"
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        for path in (db, work / "fingerprint.key"):
            st = path.stat()
            assert st.st_mode & 0o777 == 0o600, path
            assert st.st_uid == 65534, path
        raw = db.read_bytes()
        assert PASSWORD.encode() not in raw

    # nothing lost: the same transactions and findings as the tcpdump capture replayed
    replay_db = lab.dir / "replay.db"
    replay_cfg = lab.dir / "replay.yaml"
    replay_cfg.write_text(CONFIG.replace("rules.d", str(root_dir / "rules.d")))
    out = sh(*sensor_command("replay", str(pcap), "--db", str(replay_db), "--config",
                             str(replay_cfg)), env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0
    live_a, live_b, replayed = (_transactions(d) for d in (db_a, db_b, replay_db))
    assert sum(replayed.values()) > 30
    assert live_a == replayed, (live_a - replayed, replayed - live_a)
    assert live_b == replayed
    assert _events(db_a) == _events(replay_db) == _events(db_b)

    # ... and every request the registries logged
    for name, ip in (("auth", REG_AUTH_IP), ("open", REG_OPEN_IP)):
        logged = _access_log(logs[name], log_start[name])
        seen = Counter((r["method"], r["uri"], str(r["status"])) for r in _rows(
            db_a, "SELECT * FROM transactions WHERE transport = 'http' AND method IS NOT NULL "
                  "AND dest_ip = ?", (ip,)))
        # the access log has the path as requested; the sensor redacts secrets in queries
        # (e.g. _state tokens), so compare method, path and status
        strip: Counter = Counter()
        for (method, uri, status), n in logged.items():
            strip[(method, uri.split("?")[0], status)] += n
        seen_strip: Counter = Counter()
        for (method, uri, status), n in seen.items():
            seen_strip[(method, uri.split("?")[0], status)] += n
        assert seen_strip == strip, (name, strip - seen_strip, seen_strip - strip)

    stats = _rows(db_a, "SELECT * FROM stats ORDER BY ts DESC LIMIT 1")[0]
    with capsys.disabled():
        print(f"\n[live span] transactions {sum(live_a.values())}, findings "
              f"{dict(Counter(r['rule'] for r in _rows(db_a, 'SELECT rule FROM events')))}, "
              f"kernel received {stats['kernel_received']}, dropped {stats['kernel_dropped']}, "
              f"stopped in {stop_seconds:.2f} s")


def test_sighup_reloads_rules_without_restart(span):
    lab, port, _logs = span
    work = _workdir(lab, "sensor-hup")
    proc, notify = start_sensor(lab, port.sensor, "hup", port.span, work, CONFIG)
    db = work / "sensor.db"
    log = lab.dir / "hup.log"
    rules = work / "rules.d" / "marker.yaml"

    def get(marker: str) -> None:
        curl(port.cli, "-o", "/dev/null", f"http://{REG_OPEN_IP}:5000/v2/{marker}/tags/list")

    def fired(rule: str) -> int:
        return sum(r["count"] for r in _rows(db, "SELECT count FROM events WHERE rule = ?",
                                             (rule,)))

    get("marker-one")
    wait_for(lambda: fired("test-marker-one") == 1, 10, "the first rule")

    # a changed rule file: the new rule fires, the old one is gone; same process
    rules.write_text(MARKER_RULE.format(id="test-marker-two", marker="marker-two", op="regex"))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in log.read_text(), 10, "the reload")
    get("marker-one")
    get("marker-two")
    wait_for(lambda: fired("test-marker-two") == 1, 10, "the new rule")
    wait_for(lambda: len(_rows(db, "SELECT * FROM transactions WHERE uri LIKE "
                                   "'/v2/marker-one/%'")) == 2, 5, "the second marker-one")
    assert fired("test-marker-one") == 1

    # a broken rule file: the old rules stay, the error is logged with the file and line
    rules.write_text(MARKER_RULE.format(id="test-marker-three", marker="marker-two",
                                        op="frobnicate"))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in log.read_text(), 10, "the failed reload")
    failure = [line for line in log.read_text().splitlines() if "reload failed" in line][0]
    assert "marker.yaml" in failure and "frobnicate" in failure
    get("marker-two")
    wait_for(lambda: fired("test-marker-two") == 2, 10, "the kept rule")
    assert proc.poll() is None
    assert len(notify.seen("READY=1")) >= 3  # start, and after each reload
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(25) == 0
