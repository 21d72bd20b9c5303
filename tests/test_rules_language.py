"""The rule language: load errors, operators, thresholds, distinct, sums, suppression, exceptions.

Semantics are tested at their edges: count - 1 and count, the window boundary (a match exactly
`window` seconds older than the newest is outside it), suppression expiry (quiet while
ts < fired + period, firing again at fired + period).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sensor.config import DEFAULT_INTERNAL, builtin_rules_dir, load_config
from sensor.detect.detector import Detector
from sensor.detect.rules import load_rules, parse_networks
from sensor.records import Credential, FlowInfo, FlowKey, RegistryOp, Transaction
from sensor.registry import classify
from sensor.yamlfile import ConfigError

NETWORKS = parse_networks({"internal": list(DEFAULT_INTERNAL), "scanners": ["198.51.100.0/24"]},
                          "<test>")


def txn(ts: float = 1000.0, src: str = "10.0.0.5", dest: str = "10.0.0.1", method: str = "GET",
        uri: str = "/v2/", status: int | None = 200, user: str | None = None,
        scheme: str = "none", ua: str | None = "docker/24.0", body: int = 0,
        op: RegistryOp | None = None) -> Transaction:
    flow = FlowInfo(FlowKey(src, 40000, dest, 5000), 1, "1:test")
    cred = Credential(scheme, user, "fp-" + (user or "")) if scheme != "none" else Credential(
        "none")
    return Transaction(ts=ts, flow=flow, transport="http", method=method, uri=uri,
                       user_agent=ua, status=status, credential=cred,
                       op=op if op is not None else classify(method, uri),
                       response_body_bytes=body)


def rules_from(tmp_path: Path, body: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return load_rules([path], NETWORKS)


def detector(tmp_path: Path, body: str) -> Detector:
    return Detector(rules_from(tmp_path, body))


BASE = """\
rules:
  - id: t
    title: "t {src_ip}"
    severity: low
    description: d
"""


# -- loading errors name file, line, rule and problem -------------------------------------------

@pytest.mark.parametrize(("body", "line", "message"), [
    ("    match: {nosuchfield: 1}\n", 6, "unknown field 'nosuchfield'"),
    ("    match: {status: {between: [1, 2]}}\n", 6, "unknown operator 'between'"),
    ("    match: {src_ip: {in_net: nowhere}}\n", 6, "unknown network set 'nowhere'"),
    ("    match: {uri: {regex: '('}}\n", 6, "bad regex"),
    ("    match: {status: {gt: high}}\n", 6, "gt needs a number"),
    ("    match: {status: 200}\n    threshold: {count: 0, window: 5}\n", 7,
     "threshold.count must be a positive whole number"),
    ("    match: {status: 200}\n    threshold: {count: 2}\n", 7, "threshold needs 'window'"),
    ("    match: {status: 200}\n    threshold: {sum: uri, total: 5, window: 5}\n", 7,
     "'uri' is not a numeric field"),
    ("    match: {status: 200}\n    suppress: {period: -1}\n", 7, "suppress.period"),
    ("    match: {status: 200}\n    except: {hosts: [a]}\n", 7, "except: unknown key 'hosts'"),
    ("    match: {status: 200}\n    colour: red\n", 2, "unknown key 'colour'"),
])
def test_rule_errors_name_file_line_rule(tmp_path: Path, body: str, line: int,
                                         message: str) -> None:
    with pytest.raises(ConfigError) as info:
        rules_from(tmp_path, BASE + body)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{tmp_path / 'r.yaml'}:{line}: rule 't': ")
    assert message in text


def test_bad_yaml_and_duplicate_ids(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"r\.yaml:4: invalid YAML: expected ',' or ']'"):
        rules_from(tmp_path, "rules:\n  - id: a\n    title: [unclosed\n  - id: b\n")
    dup = BASE + "    match: {status: 200}\n" + BASE.split("\n", 1)[1] + "    match: {status: 1}\n"
    with pytest.raises(ConfigError, match=r"r\.yaml:7: rule 't': duplicate id \(first defined "
                                          r"at .*r\.yaml:2\)"):
        rules_from(tmp_path, dup)
    with pytest.raises(ConfigError, match="title: unknown field {nope}"):
        rules_from(tmp_path, BASE.replace("t {src_ip}", "t {nope}") + "    match: {status: 1}\n")
    with pytest.raises(ConfigError, match="severity 'urgent'"):
        rules_from(tmp_path, BASE.replace("low", "urgent") + "    match: {status: 1}\n")


def test_shipped_pack_loads_and_has_every_rule_of_the_pack() -> None:
    rules = load_rules([builtin_rules_dir()], NETWORKS)
    ids = {r.id for r in rules}
    assert ids == {
        "plaintext-basic-auth", "plaintext-bearer-token", "anonymous-push",
        "anonymous-push-attempt", "catalog-enumeration", "tags-enumeration", "external-source",
        "auth-bruteforce", "credential-spraying", "manifest-delete", "blob-delete",
        "cross-repository-mount", "scanner-user-agent", "bulk-pull", "plaintext-registry",
        "tls-registry"}
    for rule in rules:
        assert len(rule.description) > 80, rule.id  # says what it means and what to do


# -- operators ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("match", "hit", "miss"), [
    ("{method: PUT}", txn(method="PUT"), txn(method="GET")),
    ("{status: {ne: 200}}", txn(status=404), txn(status=200)),
    ("{status: {in: [401, 403]}}", txn(status=403), txn(status=404)),
    ("{status: {not_in: [401, 403]}}", txn(status=404), txn(status=401)),
    ("{user_agent: {regex: '^curl/'}}", txn(ua="curl/8"), txn(ua="xcurl/8")),
    ("{user_agent: {regex: ['^a', '(?i)^B']}}", txn(ua="bee"), txn(ua="cee")),
    ("{status: {gte: 200, lt: 300}}", txn(status=299), txn(status=300)),
    ("{status: {gt: 200, lte: 201}}", txn(status=201), txn(status=200)),
    ("{username: {exists: true}}", txn(user="a", scheme="basic"), txn()),
    ("{username: {exists: false}}", txn(), txn(user="a", scheme="basic")),
    ("{src_ip: {in_net: scanners}}", txn(src="198.51.100.7"), txn(src="198.51.101.7")),
    ("{src_ip: {not_in_net: internal}}", txn(src="203.0.113.9"), txn(src="172.31.255.1")),
    ("{src_ip: {not_in_net: internal}}", txn(src="2001:db8::1"), txn(src="fd00::1")),
    ("{any: [{method: PUT}, {method: DELETE}]}", txn(method="DELETE"), txn(method="GET")),
    ("{all: [{method: GET}, {status: 200}]}", txn(), txn(status=404)),
    ("{not: {method: GET}}", txn(method="HEAD"), txn()),
    ("{operation: manifest-put, action: push}", txn(method="PUT", uri="/v2/a/manifests/1"),
     txn(method="GET", uri="/v2/a/manifests/1")),
])
def test_operators(tmp_path: Path, match: str, hit: Transaction, miss: Transaction) -> None:
    det = detector(tmp_path, BASE + f"    match: {match}\n")
    assert [f.rule for f in det.evaluate(hit)] == ["t"]
    assert det.evaluate(miss) == []


def test_status_missing_never_matches_numeric(tmp_path: Path) -> None:
    det = detector(tmp_path, BASE + "    match: {status: {lt: 500}}\n")
    assert det.evaluate(txn(status=None)) == []


# -- thresholds ---------------------------------------------------------------------------------

THRESHOLD = BASE + """\
    match: {status: 401}
    threshold: {count: 3, window: 10, by: [src_ip]}
"""


def test_threshold_count_minus_one_and_count(tmp_path: Path) -> None:
    det = detector(tmp_path, THRESHOLD)
    assert det.evaluate(txn(ts=0, status=401)) == []
    assert det.evaluate(txn(ts=1, status=401)) == []  # count - 1
    fired = det.evaluate(txn(ts=2, status=401))  # count
    assert len(fired) == 1 and fired[0].details["matched"] == 3
    assert fired[0].details["first_seen"] == 0
    # the window starts again after firing
    assert det.evaluate(txn(ts=3, status=401)) == []


def test_threshold_groups_are_separate(tmp_path: Path) -> None:
    det = detector(tmp_path, THRESHOLD)
    for i in range(2):
        assert det.evaluate(txn(ts=i, status=401, src="10.0.0.1")) == []
        assert det.evaluate(txn(ts=i, status=401, src="10.0.0.2")) == []
    assert len(det.evaluate(txn(ts=3, status=401, src="10.0.0.2"))) == 1


def test_threshold_window_boundary(tmp_path: Path) -> None:
    det = detector(tmp_path, THRESHOLD)
    det.evaluate(txn(ts=0, status=401))
    det.evaluate(txn(ts=5, status=401))
    # exactly `window` after the first: the first has left the window
    assert det.evaluate(txn(ts=10, status=401)) == []
    # just inside: 5, 10 and 14.999 are within 10 s
    assert len(det.evaluate(txn(ts=14.999, status=401))) == 1


def test_distinct_threshold(tmp_path: Path) -> None:
    det = detector(tmp_path, BASE + """\
    match: {operation: tags-list}
    threshold: {count: 3, distinct: repository, window: 60, by: [src_ip]}
""")
    tags = "/v2/{}/tags/list"
    assert det.evaluate(txn(ts=0, uri=tags.format("a"))) == []
    assert det.evaluate(txn(ts=1, uri=tags.format("a"))) == []  # same value: still one
    assert det.evaluate(txn(ts=2, uri=tags.format("b"))) == []  # count - 1 distinct
    fired = det.evaluate(txn(ts=3, uri=tags.format("team/c")))
    assert len(fired) == 1
    assert sorted(fired[0].details["distinct_values"]) == ["a", "b", "team/c"]
    # window boundary: a value last seen exactly 60 s ago no longer counts
    det2 = detector(tmp_path, BASE + """\
    match: {operation: tags-list}
    threshold: {count: 2, distinct: repository, window: 60}
""")
    det2.evaluate(txn(ts=0, uri=tags.format("a")))
    assert det2.evaluate(txn(ts=60, uri=tags.format("b"))) == []
    assert len(det2.evaluate(txn(ts=61, uri=tags.format("c")))) == 1


def test_sum_threshold(tmp_path: Path) -> None:
    det = detector(tmp_path, BASE + """\
    match: {operation: blob-get}
    threshold: {sum: response_body_bytes, total: 1000, window: 10}
""")
    blob = "/v2/a/blobs/sha256:" + "0" * 64
    assert det.evaluate(txn(ts=0, uri=blob, body=600)) == []
    assert det.evaluate(txn(ts=10, uri=blob, body=399)) == []  # the 600 left the window
    assert det.evaluate(txn(ts=11, uri=blob, body=600)) == []  # 999: one byte short
    fired = det.evaluate(txn(ts=12, uri=blob, body=1))
    assert len(fired) == 1 and fired[0].details["sum"] == 1000


# -- suppression --------------------------------------------------------------------------------

SUPPRESS = BASE + """\
    match: {status: 401}
    suppress: {period: 100, by: [src_ip]}
"""


def test_suppression_counts_and_expires(tmp_path: Path) -> None:
    det = detector(tmp_path, SUPPRESS)
    first = det.evaluate(txn(ts=0, status=401))
    assert [f.count for f in first] == [1]
    for ts in (1, 50, 99.999):  # inside the period: quiet, counted
        assert det.evaluate(txn(ts=ts, status=401)) == []
    assert det.evaluate(txn(ts=5, status=401, src="10.9.9.9"))  # another group fires
    again = det.evaluate(txn(ts=100, status=401))  # expiry: fires and carries the count
    assert len(again) == 1
    assert again[0].count == 4 and again[0].details["suppressed_before"] == 3
    assert again[0].first_ts == 1
    assert det.evaluate(txn(ts=150, status=401)) == []
    tail = det.flush(200)  # what was still counted is reported at the end
    assert [(f.count, f.details["suppressed"]) for f in tail] == [(1, True)]
    assert det.flush(300) == []


def test_exceptions(tmp_path: Path) -> None:
    det = detector(tmp_path, BASE + """\
    match: {status: 401}
    except:
      networks: [scanners, 10.1.0.0/16]
      usernames: [ci-bot]
      user_agents: ["^trivy/"]
""")
    assert det.evaluate(txn(status=401, src="198.51.100.3")) == []
    assert det.evaluate(txn(status=401, src="10.1.2.3")) == []
    assert det.evaluate(txn(status=401, user="ci-bot", scheme="basic")) == []
    assert det.evaluate(txn(status=401, ua="trivy/0.50")) == []
    assert len(det.evaluate(txn(status=401, src="10.2.2.3", user="eve", scheme="basic"))) == 1


def test_disabled_rules_are_not_evaluated_and_swap_is_atomic(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, BASE + "    enabled: false\n    match: {status: 401}\n")
    det = Detector(rules)
    assert det.rules == ()
    assert det.evaluate(txn(status=401)) == []
    det.replace_rules(rules_from(tmp_path, SUPPRESS, "s.yaml"))
    assert len(det.evaluate(txn(status=401))) == 1
    # swapping in the same rule keeps its suppression state
    det.replace_rules(rules_from(tmp_path, SUPPRESS, "s.yaml"))
    assert det.evaluate(txn(ts=1001, status=401)) == []


def test_title_placeholders_filled(tmp_path: Path) -> None:
    det = detector(tmp_path, BASE.replace("t {src_ip}", "{username} on {repository}")
                   + "    match: {method: PUT}\n")
    f = det.evaluate(txn(method="PUT", uri="/v2/team/app/manifests/1", user="bob",
                         scheme="basic"))
    assert f[0].title == "bob on team/app"
    assert det.evaluate(txn(method="PUT", uri="/v2/"))[0].title == "? on ?"


# -- config overrides and the CLI ---------------------------------------------------------------

def test_override_threshold_reaches_triggers(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rules:\n  overrides:\n    bulk-pull:\n      threshold: {window: 5}\n"
                   "    external-source: {enabled: false}\n")
    config = load_config(cfg)
    rules = {r.id: r for r in load_rules(config.rule_paths, config.networks,
                                         config.rule_overrides)}
    assert [t.threshold.window for t in rules["bulk-pull"].triggers] == [5.0, 5.0]
    assert rules["bulk-pull"].triggers[0].threshold.total == 2147483648
    assert not rules["external-source"].enabled
    # count goes to the counting trigger only, total to the summing one only
    cfg.write_text("rules:\n  overrides:\n    bulk-pull:\n"
                   "      threshold: {count: 4, total: 1000}\n")
    config = load_config(cfg)
    rules = {r.id: r for r in load_rules(config.rule_paths, config.networks,
                                         config.rule_overrides)}
    by_sum, by_count = rules["bulk-pull"].triggers
    assert (by_sum.threshold.sum, by_sum.threshold.total, by_sum.threshold.count) == (
        "response_body_bytes", 1000.0, 0)
    assert (by_count.threshold.distinct, by_count.threshold.count) == ("repository", 4)
    cfg.write_text("rules:\n  overrides:\n    no-such-rule: {enabled: false}\n")
    config = load_config(cfg)
    with pytest.raises(ConfigError, match="no-such-rule"):
        load_rules(config.rule_paths, config.networks, config.rule_overrides)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sensor.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_rules_check_and_list(tmp_path: Path) -> None:
    ok = run_cli("rules", "check")
    assert ok.returncode == 0 and "16 rules" in ok.stdout
    listing = run_cli("rules", "list")
    assert listing.returncode == 0
    assert "tls-registry" in listing.stdout and "info" in listing.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(BASE + "    match: {statuss: 401}\n")
    bad = run_cli("rules", "check", str(broken))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{broken}:6: rule 't': unknown field 'statuss'" in lines[0]


def test_config_errors_name_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ports: [5000]\nnetworks:\n  internal: [10.0.0.0/33]\n")
    bad = run_cli("rules", "list", "--config", str(cfg))
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"registry-sensor: error: {cfg}:3: networks.internal: "
                                  f"'10.0.0.0/33' is not an IP network")
    cfg.write_text("ports: [5000]\nreassembly:\n  idle_timeot: 5\n")
    bad = run_cli("rules", "list", "--config", str(cfg))
    assert bad.returncode == 2 and f"{cfg}:3: reassembly.idle_timeot: unknown key" in bad.stderr
