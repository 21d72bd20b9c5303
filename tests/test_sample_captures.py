"""The sample captures (pcaps/, see pcaps/MANIFEST.md) replay to their expected findings.

tests/expected/<capture>.yaml says, for every rule of rules/core.yaml, which suppression groups
must appear and how many times each one fired (the matching transactions; for a threshold rule,
the times its threshold was reached); it was written from MANIFEST.md and the rule semantics, not
from the sensor's output. The same numbers are derived a second time here,
independently, from what tshark reads in the capture (conftest.tshark_view), and both are held
against the sensor's events table. Then the CLI around it: the --json summary, `events`, several
files in one run, bad input files, a truncated capture, a broken config, file modes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import os
import re
import shutil
import sqlite3
import stat
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from conftest import PCAPS, REPO, SAMPLE_CAPTURES, TSHARK, run_cli, tshark_view

EXPECTED = Path(__file__).parent / "expected"
RULES_DIR = REPO / "sensor" / "rules"
# The rules of rules/core.yaml: every expected file says what each of them must do.
RULE_IDS = ("plaintext-basic-auth", "anonymous-push", "anonymous-push-attempt",
            "catalog-enumeration", "external-source")
# Rules of the other packs that an expected file may also name (derive_groups knows them).
DERIVABLE = (*RULE_IDS, "tags-enumeration", "tls-registry")
# The embedded default of networks.internal (config.py / README): what external-source is not.
INTERNAL = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128",
    "169.254.0.0/16", "fe80::/10", "100.64.0.0/10", "fc00::/7")]
CAPTURE_IDS = [p.name for p in SAMPLE_CAPTURES]
requires_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")


def expected_for(pcap: Path) -> dict:
    return yaml.safe_load((EXPECTED / f"{pcap.stem}.yaml").read_text())


@functools.cache
def rule_specs() -> dict[str, dict]:
    """The shipped rules as their YAML says them (sensor/rules/*.yaml): id → rule mapping."""
    specs: dict[str, dict] = {}
    for path in sorted(RULES_DIR.glob("*.yaml")):
        for rule in yaml.safe_load(path.read_text())["rules"]:
            specs[rule["id"]] = rule
    return specs


def has_threshold(rule: str) -> bool:
    spec = rule_specs()[rule]
    return "threshold" in spec or any("threshold" in t for t in spec.get("triggers", ()))


def read_tables(db: Path) -> dict[str, list[dict]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {t: [dict(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY rowid")]  # noqa: S608
                for t in ("transactions", "events", "anomalies")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def shared_key(tmp_path_factory) -> Path:
    """One fingerprint key for every replay of sensor_run (and the several-files run), so that
    the same credential has the same fingerprint in all of them."""
    return tmp_path_factory.mktemp("key") / "fingerprint.key"


@pytest.fixture(scope="module")
def sensor_run(tmp_path_factory, shared_key):
    """Each capture replayed once for this module: name → (summary, tables, stdout, stderr, db)."""
    cache: dict[str, tuple] = {}

    def run(pcap: Path):
        if pcap.name not in cache:
            tmp = tmp_path_factory.mktemp(pcap.stem)
            (tmp / "sensor.yaml").write_text(f"key_file: {shared_key}\n")
            db = tmp / "sensor.db"
            rc, out, err = run_cli(["replay", pcap, "--db", db, "--config",
                                    tmp / "sensor.yaml", "--json"])
            assert rc == 0, err
            cache[pcap.name] = (json.loads(out), read_tables(db), out, err, db)
        return cache[pcap.name]

    return run


def test_every_capture_has_an_expected_file():
    assert {p.stem for p in SAMPLE_CAPTURES} == {p.stem for p in EXPECTED.glob("*.yaml")}
    for pcap in SAMPLE_CAPTURES:
        exp = expected_for(pcap)
        assert exp["capture"] == pcap.name
        assert set(RULE_IDS) <= set(exp["rules"]), pcap.name
        assert set(exp["rules"]) <= set(DERIVABLE), pcap.name
        for rule, spec in exp["rules"].items():
            if spec["groups"]:
                # group_by is the rule's own suppress.by (details.<f> or f: the same field)
                assert [f.removeprefix("details.") for f in spec["group_by"]] == \
                    rule_specs()[rule]["suppress"]["by"], (pcap.name, rule)
                for want in spec["groups"]:
                    assert set(want) == {"matches", "first", "carry"}, (pcap.name, rule)
                    assert want["matches"] >= 1, (pcap.name, rule)


def test_multi_trigger_rules_are_split_by_trigger():
    """Every rule with several triggers that the expected files cover has a TRIGGER_OF reader,
    naming as many triggers as the rule has."""
    for rule in DERIVABLE:
        triggers = rule_specs()[rule].get("triggers")
        assert (rule in TRIGGER_OF) == (triggers is not None), rule
        if triggers is not None:
            assert len(TRIGGER_NAMES[rule]) == len(triggers), rule


# -- an independent reading of the capture (tshark), by the rules' own words ------------------

def _basic(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) of a Basic credential, None for no or another scheme."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(authorization[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def _anonymous(authorization: str | None) -> bool:
    """No credential: no header, or `Basic Og==` (empty user and password)."""
    return authorization is None or _basic(authorization) == ("", "")


def _push_repository(method: str, uri: str) -> str | None:
    """The repository of a push operation (upload start/mount, chunk, commit, manifest PUT)."""
    path = urlsplit(uri).path
    if method == "POST" and (m := re.fullmatch(r"/v2/(.+)/blobs/uploads/?", path)):
        return m.group(1)
    if method in ("PATCH", "PUT") and (m := re.fullmatch(r"/v2/(.+)/blobs/uploads/[^/]+", path)):
        return m.group(1)
    if method == "PUT" and (m := re.fullmatch(r"/v2/(.+)/manifests/[^/]+", path)):
        return m.group(1)
    return None


def _internal(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in INTERNAL)


def tshark_transactions(pcap: Path) -> list[dict]:
    """Every transaction in tshark's reading: HTTP request/response pairs and TLS ClientHellos
    (with the status of the plaintext 400 that answered a probe)."""
    view = tshark_view(pcap)
    out = [dict(r, transport="http") for r in view.requests]
    orphan_status = {r["stream"]: r["status"] for r in view.orphan_responses}
    for hello in view.client_hellos:
        client_ip, client_port, server_ip, server_port = view.streams[hello["stream"]]
        out.append({"frame": hello["frame"], "transport": "tls", "src_ip": client_ip,
                    "src_port": client_port, "dest_ip": server_ip, "dest_port": server_port,
                    "method": None, "uri": None, "authorization": None, "sni": hello["sni"],
                    "status": orphan_status.get(hello["stream"])})
    return sorted(out, key=lambda t: t["frame"])


def derive_groups(pcap: Path, rule: str) -> dict[tuple, dict]:
    """rule → {group key: {"matches": n, "first": the first matching transaction}}."""
    groups: dict[tuple, dict] = {}

    def hit(key, txn):
        group = groups.setdefault(key, {"matches": 0, "first": txn})
        group["matches"] += 1

    txns = tshark_transactions(pcap)
    http = [t for t in txns if t["transport"] == "http"]
    for t in http:
        flow = (t["src_ip"], t["dest_ip"], t["dest_port"])
        if rule == "plaintext-basic-auth":
            # suppress.by [src_ip, dest_ip, dest_port, username]: every password of one user
            # (a wrong one, a right one, twenty guesses) is one group
            cred = _basic(t["authorization"])
            if cred is not None and cred[0]:
                hit((*flow, cred[0]), t)
        elif rule in ("anonymous-push", "anonymous-push-attempt"):
            repo = _push_repository(t["method"], t["uri"])
            if repo is None or not _anonymous(t["authorization"]) or t["status"] is None:
                continue
            if rule == "anonymous-push" and 200 <= t["status"] < 300:
                hit((*flow, repo), t)
            if rule == "anonymous-push-attempt" and t["status"] in (401, 403):
                hit((*flow, repo), t)
        elif rule == "catalog-enumeration":
            path, query = urlsplit(t["uri"]).path, parse_qs(urlsplit(t["uri"]).query)
            listing = path.rstrip("/") == "/v2/_catalog" or path.endswith("/tags/list")
            oversized = any(n.isdigit() and int(n) > 1000 for n in query.get("n", []))
            if listing and oversized:  # trigger 1: CVE-2023-2253 page size
                hit((*flow, "oversized"), t)
            elif path.rstrip("/") == "/v2/_catalog":  # trigger 2: the catalog
                hit((*flow, "catalog"), t)
    if rule == "tags-enumeration":
        # threshold: 5 distinct repositories within 60 s by (src_ip, dest_ip); reset once reached
        seen: dict[tuple, dict[str, float]] = defaultdict(dict)
        for t in http:
            m = re.fullmatch(r"/v2/(.+)/tags/list", urlsplit(t["uri"]).path)
            if m is None:
                continue
            window = seen[(t["src_ip"], t["dest_ip"])]
            window.pop(m.group(1), None)
            window[m.group(1)] = t["ts"]
            for repo in [r for r, ts in window.items() if ts <= t["ts"] - 60]:
                del window[repo]
            if len(window) >= 5:
                window.clear()
                hit((t["src_ip"], t["dest_ip"], t["dest_port"], "tags-list"), t)
    if rule == "tls-registry":  # a TLS session the server answered in TLS
        for t in txns:
            if t["transport"] == "tls" and t["status"] is None:
                hit((t["dest_ip"], t["dest_port"], t["sni"]), t)
    if rule == "external-source":
        for t in txns:
            if not _internal(t["src_ip"]):
                hit((t["src_ip"], t["dest_ip"], t["dest_port"]), t)
    return groups


# -- the sensor's events, split into suppression groups ---------------------------------------

def field_of(event: dict, name: str):
    if name.startswith("details."):
        return event["details"].get(name[len("details."):])
    if name in event:
        return event[name]
    return event["details"].get(name)  # method, uri, status … live in details


# A rule with several triggers keeps separate suppression groups per trigger: the detector
# keys a group by (trigger, suppress.by), so an oversized catalog page (CVE-2023-2253) is its
# own event even right after a plain listing by the same client (test_rule_pack relies on it).
# Which trigger made an event, read back from the event: its details come from the transaction
# that fired it (for a follow-up, the last one swallowed, which fired the same trigger). Each
# reader is the rule's triggers in order, the first that matches (sensor/rules/*.yaml).
TRIGGER_NAMES = {"catalog-enumeration": ("oversized", "catalog")}
TRIGGER_OF = {
    "catalog-enumeration": lambda e: (
        "oversized" if field_of(e, "operation") in ("catalog", "tags-list")
        and (field_of(e, "page_size") or 0) > 1000 else "catalog"),
}


def group_key(event: dict, rule: str, group_by: list[str]) -> tuple:
    """The suppression group of an event: its trigger (several triggers only), then group_by."""
    key = tuple(json.dumps(field_of(event, f)) for f in group_by)
    if rule not in TRIGGER_OF:
        return key
    trigger = TRIGGER_OF[rule](event)
    assert trigger in TRIGGER_NAMES[rule], (rule, trigger)
    return (trigger, *key)


def sensor_groups(events: list[dict], rule: str, group_by: list[str]) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e["rule"] == rule:
            groups[group_key(e, rule, group_by)].append(e)
    return [sorted(g, key=lambda e: e["ts"]) for g in groups.values()]


def parsed_events(tables) -> list[dict]:
    return [dict(e, details=json.loads(e["details"] or "{}")) for e in tables["events"]]


def check_suppression_shape(group: list[dict], rule: str) -> int:
    """First event count 1; at most one follow-up, suppressed, with the rest. Returns the sum."""
    first, *rest = group
    assert first["count"] == 1 and not first["details"].get("suppressed"), (rule, first)
    assert len(rest) <= 1, f"{rule}: more than one follow-up event in one suppression window"
    for follow in rest:
        assert follow["details"].get("suppressed") is True, (rule, follow)
        assert follow["count"] >= 1
        assert follow["ts"] >= first["ts"]
    return sum(e["count"] for e in group)


# -- the expected findings --------------------------------------------------------------------

@pytest.mark.parametrize("pcap", SAMPLE_CAPTURES, ids=CAPTURE_IDS)
def test_findings_match_expected_file(pcap, sensor_run):
    exp = expected_for(pcap)
    _, tables, *_ = sensor_run(pcap)
    events = parsed_events(tables)
    for rule, spec in exp["rules"].items():
        wanted = spec["groups"]
        if not wanted:
            assert [e for e in events if e["rule"] == rule] == [], f"{rule} must not fire"
            continue
        got = sensor_groups(events, rule, spec["group_by"])
        assert len(got) == len(wanted), f"{rule}: {len(got)} groups, expected {len(wanted)}"
        unmatched = list(got)
        for want in wanted:
            candidates = [g for g in unmatched
                          if all(field_of(g[0], k) == v for k, v in want["first"].items())]
            assert len(candidates) == 1, f"{rule}: no single group whose first event has " \
                                         f"{want['first']}: {[g[0] for g in unmatched]}"
            group = candidates[0]
            unmatched.remove(group)
            assert check_suppression_shape(group, rule) == want["matches"], rule
            assert len(group) == (1 if want["matches"] == 1 else 2)
            for event in group:
                for key, value in want["carry"].items():
                    assert field_of(event, key) == value, (rule, key, event)


@requires_tshark
@pytest.mark.parametrize("pcap", SAMPLE_CAPTURES, ids=CAPTURE_IDS)
def test_findings_match_tshark_derivation(pcap, sensor_run):
    """Each rule's groups, as derived from tshark's reading, are the sensor's groups: same first
    transaction (connection, method, URI, status), same number of matches; and the expected file
    agrees with both."""
    exp = expected_for(pcap)
    _, tables, *_ = sensor_run(pcap)
    events = parsed_events(tables)
    for rule, spec in exp["rules"].items():
        derived = derive_groups(pcap, rule)
        assert sorted(g["matches"] for g in derived.values()) == sorted(
            g["matches"] for g in spec["groups"]), f"{rule}: expected file vs tshark"
        if not derived:
            continue
        theirs = Counter(
            (g["first"]["src_port"], g["first"]["method"], g["first"]["uri"],
             g["first"]["status"], g["matches"]) for g in derived.values())
        ours = Counter()
        for group in sensor_groups(events, rule, spec["group_by"]):
            total = check_suppression_shape(group, rule)
            first = group[0]
            ours[(first["details"].get("src_port"), first["details"].get("method"),
                  first["details"].get("uri"), first["details"].get("status"), total)] += 1
        assert ours == theirs, rule


@pytest.mark.parametrize("pcap", SAMPLE_CAPTURES, ids=CAPTURE_IDS)
def test_tables_and_summary(pcap, sensor_run):
    exp = expected_for(pcap)
    summary, tables, out, err, _ = sensor_run(pcap)
    transports = Counter(t["transport"] for t in tables["transactions"])
    assert {k: v for k, v in exp["transactions"].items() if v} == dict(transports)
    total = sum(exp["transactions"].values())
    assert len(tables["transactions"]) == total == summary["transactions"]
    assert dict(Counter(a["kind"] for a in tables["anomalies"])) == exp["anomalies"]
    assert summary["anomalies"] == exp["anomalies"]
    assert summary["packets"] == exp["packets"]
    assert summary["flows"] == exp["flows"]
    assert summary["gaps"] == 0 and summary["warnings"] == [] and not summary["interrupted"]
    assert summary["files"] == [str(pcap)]
    findings = {rule: sum(1 if g["matches"] == 1 else 2 for g in spec["groups"])
                for rule, spec in exp["rules"].items()}
    assert {r: summary["findings"].get(r, 0) for r in findings} == findings
    assert Counter(e["rule"] for e in tables["events"] if e["rule"] in findings) == {
        r: n for r, n in findings.items() if n}
    usernames = {t["username"] for t in tables["transactions"] if t["username"] is not None}
    assert usernames == set(exp["usernames"])
    assert all(t["partial"] == 0 for t in tables["transactions"])
    assert err == ""


@requires_tshark
@pytest.mark.parametrize("pcap", SAMPLE_CAPTURES, ids=CAPTURE_IDS)
def test_summary_counts_match_tshark(pcap, sensor_run):
    summary, *_ = sensor_run(pcap)
    view = tshark_view(pcap)
    assert summary["packets"] == view.frames == expected_for(pcap)["packets"]
    assert summary["tcp_packets"] == view.frames  # the filter was `tcp port 5000`
    assert summary["flows"] == len(view.streams)
    assert summary["transactions"] == len(view.requests) + len(view.client_hellos)


# -- the CLI ----------------------------------------------------------------------------------

def test_replay_text_output(replay):
    rc, out, err, db = replay(PCAPS / "external-client.pcap")
    assert rc == 0, err
    events = read_tables(db)["events"]
    assert f"findings ({len(events)}):" in out
    for line in ("packets:      207", "flows:        18", "transactions: 19",
                 "anomalies:    tls-to-plaintext-server 2", f"database:     {db}"):
        assert line in out
    summary_line = next(li for li in out.splitlines() if li.startswith("findings:"))
    for part in ("anonymous-push 2", "external-source 2", "catalog-enumeration 1"):
        assert part in summary_line
    finding_lines = [li for li in out.splitlines() if " -> 192.0.2.10:5000 " in li]
    assert len(finding_lines) == len(events)
    assert all("203.0.113.50 -> 192.0.2.10:5000" in li for li in finding_lines)
    assert sum("anonymous-push " in li and "repo=library/demo" in li
               for li in finding_lines) == 2


def test_events_json_and_filters(replay, config_path):
    rc, _, err, db = replay(PCAPS / "external-client.pcap")
    assert rc == 0, err
    tables = read_tables(db)

    rc, out, err = run_cli(["events", "--db", db, "--config", config_path, "--format", "json"])
    assert rc == 0, err
    rows = json.loads(out)
    assert len(rows) == len(tables["events"])
    assert sorted(r["ts"] for r in rows) == sorted(e["ts"] for e in tables["events"])
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    core = [r for r in rows if r["rule"] in RULE_IDS]
    assert Counter(r["rule"] for r in core) == {"anonymous-push": 2, "external-source": 2,
                                                "catalog-enumeration": 1}
    for r in core:
        assert isinstance(r["details"], dict)
        assert (r["src_ip"], r["dest_ip"], r["dest_port"]) == ("203.0.113.50", "192.0.2.10", 5000)
    assert sum(r["count"] for r in rows if r["rule"] == "external-source") == 19

    rc, out, _ = run_cli(["events", "--db", db, "--config", config_path, "--format", "json",
                          "--rule", "anonymous-push"])
    assert rc == 0
    pushes = json.loads(out)
    assert [r["rule"] for r in pushes] == ["anonymous-push"] * 2
    assert sum(r["count"] for r in pushes) == 7
    assert {r["repository"] for r in pushes} == {"library/demo"}

    rc, out, _ = run_cli(["events", "--db", db, "--config", config_path, "--format", "json",
                          "--rule", "anonymous-push", "--rule", "catalog-enumeration"])
    assert Counter(r["rule"] for r in json.loads(out)) == {"anonymous-push": 2,
                                                           "catalog-enumeration": 1}

    # --since: epoch seconds and an ISO time, taken from the capture's own timeline
    cut = sorted(r["ts"] for r in rows)[2]
    rc, out, _ = run_cli(["events", "--db", db, "--config", config_path, "--format", "json",
                          "--since", repr(cut)])
    assert rc == 0
    assert [r["ts"] for r in json.loads(out)] == sorted(r["ts"] for r in rows if r["ts"] >= cut)
    iso = datetime.fromtimestamp(int(cut), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rc, out, _ = run_cli(["events", "--db", db, "--config", config_path, "--format", "json",
                          "--since", iso])
    assert len(json.loads(out)) == len(rows)  # the whole capture is within that second or after
    rc, out, _ = run_cli(["events", "--db", db, "--config", config_path, "--format", "json",
                          "--since", repr(max(r["ts"] for r in rows) + 1)])
    assert json.loads(out) == []
    rc, out, err = run_cli(["events", "--db", db, "--config", config_path, "--since", "soon"])
    assert rc == 2 and len(err.splitlines()) == 1 and "--since" in err


def test_events_table(replay, config_path):
    rc, _, err, db = replay(PCAPS / "basic-auth-push.pcap")
    assert rc == 0, err
    rc, out, err = run_cli(["events", "--db", db, "--config", config_path])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TS", "SEVERITY", "RULE", "SRC_IP"]
    assert "USERNAME" in lines[0] and "COUNT" in lines[0]
    assert len(lines) - 1 == len(read_tables(db)["events"])
    rc, out, err = run_cli(["events", "--db", db, "--config", config_path,
                            "--rule", "plaintext-basic-auth"])
    assert rc == 0, err
    header, *body = out.splitlines()
    # suppress.by ends with username: alice's two credentials (the wrong password twice, the
    # right one ten times) are one group, so one event and its suppressed follow-up
    assert len(body) == 2
    assert all("plaintext-basic-auth" in line and " alice " in line for line in body)
    at = header.index("COUNT")  # columns are aligned under their headers
    assert sum(int(line[at:].split()[0]) for line in body) == 12
    rc, out, _ = run_cli(["events", "--db", db, "--config", config_path, "--rule",
                          "external-source"])
    assert rc == 0 and "(no events)" in out


def test_events_without_database(tmp_path, config_path):
    rc, out, err = run_cli(["events", "--db", tmp_path / "none.db", "--config", config_path])
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and "none.db" in err
    assert not (tmp_path / "none.db").exists()


def test_replay_several_files_in_one_run(tmp_path, sensor_run, shared_key):
    config = tmp_path / "sensor.yaml"
    config.write_text(f"key_file: {shared_key}\n")  # the singles' key: same fingerprints
    db = tmp_path / "all.db"
    rc, out, err = run_cli(["replay", *SAMPLE_CAPTURES, "--db", db, "--config", config,
                            "--json"])
    assert rc == 0, err
    summary = json.loads(out)
    singles = [sensor_run(p) for p in SAMPLE_CAPTURES]
    assert summary["files"] == [str(p) for p in SAMPLE_CAPTURES]
    for key in ("packets", "flows", "transactions"):
        assert summary[key] == sum(s[0][key] for s in singles), key
    tables = read_tables(db)
    events = parsed_events(tables)
    assert len(tables["transactions"]) == summary["transactions"]
    assert summary["findings"] == dict(Counter(e["rule"] for e in events))

    # One run keeps one detector for all its files, so suppression groups do not stop at a file's
    # end: a group that several captures share is one group. They do share some: 127.0.0.1 →
    # 127.0.0.1:5000 as alice (plaintext-basic-auth) in basic-auth-push, auth-bruteforce,
    # blob-mount and registry-delete; catalog listings by 127.0.0.1 in catalog-tags-enumeration
    # and scanner-user-agents; plaintext-registry for 127.0.0.1:5000 in nearly every file.
    # Suppression never loses a match, so for every rule without a threshold (whose matches do
    # not depend on what came before), per suppression group across files:
    #   sum of `count` in the one run == sum over the files of that group's matches
    # (a file's matches per group are the sums of its own replay, which the tests above hold
    # against the expected files and tshark).
    plain = [r for r in rule_specs() if not has_threshold(r)]
    assert set(RULE_IDS) <= set(plain)
    for rule in plain:
        by = rule_specs()[rule]["suppress"]["by"]
        assert rule in TRIGGER_OF or "triggers" not in rule_specs()[rule], rule
        per_file = Counter()
        for s in singles:
            for e in parsed_events(s[1]):
                if e["rule"] == rule:
                    per_file[group_key(e, rule, by)] += e["count"]
        merged = defaultdict(list)
        for e in events:
            if e["rule"] == rule:
                merged[group_key(e, rule, by)].append(e)
        assert {k: sum(e["count"] for e in g) for k, g in merged.items()} == dict(per_file), rule

    # And the shape, for the core rules: all thirteen captures lie within one suppression
    # period of each other, so each merged group is one event (count 1) plus, when it matched
    # more than once, one suppressed follow-up with the rest, whatever file each match came
    # from. (Files are replayed in the order given, not in time order, so the follow-up is
    # told by its flag, not by its time.)
    times = [t["ts"] for t in tables["transactions"]]
    for rule in RULE_IDS:
        by = rule_specs()[rule]["suppress"]["by"]
        assert max(times) - min(times) < rule_specs()[rule]["suppress"]["period"], rule
        merged = defaultdict(list)
        for e in events:
            if e["rule"] == rule:
                merged[group_key(e, rule, by)].append(e)
        for key, group in merged.items():
            firsts = [e for e in group if not e["details"].get("suppressed")]
            follows = [e for e in group if e["details"].get("suppressed")]
            assert [e["count"] for e in firsts] == [1], (rule, key)
            assert len(follows) == (0 if sum(e["count"] for e in group) == 1 else 1), (rule, key)
    # the shared group the change was about: alice's Basic credentials to 127.0.0.1:5000,
    # 12 (basic-auth-push) + 20 (auth-bruteforce) + 12 (blob-mount) + 5 (registry-delete)
    alice = [e for e in events if e["rule"] == "plaintext-basic-auth"
             and (e["dest_ip"], e["username"]) == ("127.0.0.1", "alice")]
    assert len(alice) == 2 and sum(e["count"] for e in alice) == 12 + 20 + 12 + 5


def test_not_a_capture(replay, tmp_path):
    readme = REPO / "README.md"
    rc, out, err, db = replay(PCAPS / "basic-auth-push.pcap", readme)
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert str(readme) in err
    # files are checked before any is read: nothing replayed
    assert not db.exists() or read_tables(db)["transactions"] == []


def test_missing_file(replay, tmp_path):
    missing = tmp_path / "nope.pcap"
    rc, out, err, _ = replay(missing)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and str(missing) in err


def test_truncated_capture(replay, tmp_path, sensor_run):
    src = PCAPS / "basic-auth-push.pcap"
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(src.read_bytes()[:-10])
    rc, out, err, db = replay(cut, json=True)
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and str(cut) in lines[0] and "trunc" in lines[0].lower(), err
    summary = json.loads(out)
    assert summary["packets"] == 168 - 1  # the last record lost its tail
    assert len(summary["warnings"]) == 1
    # The lost record is the last of the capture: a bare ACK/FIN after the last response.
    _, full, *_ = sensor_run(src)
    got = read_tables(db)["transactions"]

    def key(t):
        return (t["transport"], t["src_port"], t["method"], t["uri"], t["status"])

    assert Counter(map(key, got)) == Counter(map(key, full["transactions"]))


def test_broken_config(tmp_path, replay):
    bad = tmp_path / "bad.yaml"
    bad.write_text("key_file: fingerprint.key\nports: [5000\nrules: {}\n")
    rc, out, err = run_cli(["replay", PCAPS / "basic-auth-push.pcap", "--db",
                            tmp_path / "x.db", "--config", bad])
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert re.search(re.escape(str(bad)) + r":3\b", lines[0]), lines[0]
    assert not (tmp_path / "x.db").exists()


def test_config_error_names_the_key_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("key_file: fingerprint.key\n# a comment\nports: 70000\n")
    rc, _, err = run_cli(["replay", PCAPS / "basic-auth-push.pcap", "--db",
                          tmp_path / "x.db", "--config", bad])
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{bad}:3:" in err, err


@pytest.fixture
def permissive_umask():
    old = os.umask(0o022)  # what a shell usually has: files 0644 unless the sensor says otherwise
    yield
    os.umask(old)


def test_file_modes(tmp_path, permissive_umask):
    state = tmp_path / "state"
    config = tmp_path / "sensor.yaml"
    config.write_text("key_file: state/fingerprint.key\n")
    db = tmp_path / "db" / "sensor.db"
    rc, _, err = run_cli(["replay", PCAPS / "basic-auth-push.pcap", "--db", db,
                          "--config", config])
    assert rc == 0, err
    for path in (db, state / "fingerprint.key", *db.parent.glob("sensor.db-*")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len((state / "fingerprint.key").read_bytes()) >= 16
    # A second run keeps the key (same fingerprints) and the mode.
    key = (state / "fingerprint.key").read_bytes()
    rc, _, err = run_cli(["replay", PCAPS / "basic-auth-push.pcap", "--db", db,
                          "--config", config])
    assert rc == 0, err
    assert (state / "fingerprint.key").read_bytes() == key
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    fps = {t["credential_fingerprint"] for t in read_tables(db)["transactions"]
           if t["username"]}
    assert len(fps) == 2  # two credentials of alice, same fingerprints in both runs


def test_existing_database_is_tightened(tmp_path, config_path):
    db = tmp_path / "loose.db"
    db.touch()
    db.chmod(0o644)
    rc, _, err = run_cli(["replay", PCAPS / "anonymous-push-rejected.pcap", "--db", db,
                          "--config", config_path])
    assert rc == 0, err
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_copy_of_capture_under_another_name(tmp_path, replay):
    """The file name does not matter; only the magic does."""
    copy = tmp_path / "capture.data"
    shutil.copy(PCAPS / "anonymous-push-rejected.pcap", copy)
    rc, out, err, _ = replay(copy, json=True)
    assert rc == 0, err
    findings = json.loads(out)["findings"]
    assert {r: n for r, n in findings.items() if r in RULE_IDS} == {"anonymous-push-attempt": 1}
