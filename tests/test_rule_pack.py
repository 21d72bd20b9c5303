"""Every rule of the shipped pack on real traffic: a capture where it fires, benign traffic where
it stays quiet.

The captures are pcaps/*.pcap, made by pcaps/make_pcaps.sh from Debian's docker-registry
(distribution 2.8.2) with skopeo and curl (see pcaps/MANIFEST.md); none is crafted. Each replay
runs the CLI (`registry-sensor replay --db … --config …`, config and database in a temp dir).

What a rule must report is worked out a second time, without the sensor, from what tshark reads in
the capture (`Wire`: one HTTP request/response pair, port 5000 decoded as HTTP; TLS ClientHellos
decoded as TLS): the oracle of each rule below counts the matching transactions, or for a
threshold rule the number of times its threshold is reached (a window restarts after it is
reached). Suppression never loses a match: the events of a rule sum (`count`) to that number.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import re
import sqlite3
import subprocess
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from conftest import PCAPS, TSHARK, run_cli

if TSHARK is None:
    pytest.skip("tshark is not installed (CI installs it: apt-get install tshark)",
                allow_module_level=True)

PACK = ("plaintext-basic-auth", "plaintext-bearer-token", "anonymous-push",
        "anonymous-push-attempt", "catalog-enumeration", "tags-enumeration", "external-source",
        "auth-bruteforce", "credential-spraying", "manifest-delete", "blob-delete",
        "cross-repository-mount", "scanner-user-agent", "bulk-pull", "plaintext-registry",
        "tls-registry")
SEVERITY = {
    "plaintext-basic-auth": "high", "plaintext-bearer-token": "high", "anonymous-push": "critical",
    "anonymous-push-attempt": "medium", "catalog-enumeration": "medium",
    "tags-enumeration": "medium", "external-source": "medium", "auth-bruteforce": "high",
    "credential-spraying": "high", "manifest-delete": "high", "blob-delete": "high",
    "cross-repository-mount": "low", "scanner-user-agent": "low", "bulk-pull": "medium",
    "plaintext-registry": "medium", "tls-registry": "info",
}
# The pack's thresholds, as rules/*.yaml ship them (the oracles take them as arguments).
DEFAULTS = {
    "tags-enumeration": {"count": 5, "window": 60},
    "auth-bruteforce": {"count": 10, "window": 60},
    "credential-spraying": {"count": 5, "window": 300},
    "bulk-pull": {"total": 2147483648, "count": 25, "window": 600},
}
# The embedded default of networks.internal (README): what external-source is not.
INTERNAL = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128",
    "169.254.0.0/16", "fe80::/10", "100.64.0.0/10", "fc00::/7")]

TOKEN_SUB = "deploy-bot"  # make_pcaps.sh: TOKEN_SUB
SPRAYED = ["admin", "root", "deploy", "ci", "backup", "registry"]  # make_pcaps.sh: SPRAY_USERS


# -- what tshark reads ----------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """One HTTP request and its response, as tshark's HTTP dissector pairs them."""

    frame: int
    stream: int
    ts: float
    src_ip: str
    src_port: int
    dest_ip: str
    dest_port: int
    method: str
    uri: str
    user_agent: str | None
    authorization: str | None
    status: int | None
    content_length: int | None
    api_version: str | None  # the response's Docker-Distribution-API-Version

    @property
    def path(self) -> str:
        return urlsplit(self.uri).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.uri).query)

    @property
    def scheme(self) -> str:
        """none, basic or bearer; `Basic Og==` (empty user and password) is none."""
        if not self.authorization:
            return "none"
        kind, _, value = self.authorization.partition(" ")
        if kind.lower() == "bearer":
            return "bearer"
        if kind.lower() == "basic":
            return "basic" if self.basic_user() else "none"
        return "other"

    def basic_user(self) -> str | None:
        kind, _, value = (self.authorization or "").partition(" ")
        if kind.lower() != "basic":
            return None
        try:
            user = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user or None

    @property
    def bearer_token(self) -> str | None:
        kind, _, value = (self.authorization or "").partition(" ")
        return value.strip() if kind.lower() == "bearer" else None

    @property
    def username(self) -> str | None:
        if self.scheme == "basic":
            return self.basic_user()
        if self.scheme == "bearer":
            return jwt_claims(self.bearer_token).get("sub")
        return None

    @property
    def route(self) -> tuple[str, str | None]:
        """(what the request does, repository), from method and path alone."""
        path = self.path
        if path in ("/v2/", "/v2"):
            return "base", None
        if path == "/v2/_catalog":
            return "catalog", None
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs|tags)/(.+)", path)
        if m is None:
            return "other", None
        repo, kind, rest = m.groups()
        if kind == "tags":
            return ("tags-list" if rest == "list" else "other"), repo
        if kind == "manifests":
            return f"manifest-{self.method.lower()}", repo
        if rest.startswith("uploads"):
            if self.method == "POST" and "mount" in self.query:
                return "blob-mount", repo
            return f"upload-{self.method.lower()}", repo
        return f"blob-{self.method.lower()}", repo

    @property
    def is_push(self) -> bool:
        op = self.route[0]
        return op.startswith("upload-") or op in ("blob-mount", "manifest-put")


@dataclass(frozen=True)
class Hello:
    """A TLS ClientHello to the registry port (tshark decoding the port as TLS)."""

    stream: int
    ts: float
    src_ip: str
    dest_ip: str
    dest_port: int
    sni: str | None
    answered_in_http: bool  # the server answered in plain HTTP (a plaintext registry)


@dataclass(frozen=True)
class Capture:
    name: str
    http: tuple[Wire, ...]
    hellos: tuple[Hello, ...]


def jwt_claims(token: str | None) -> dict:
    if not token or token.count(".") != 2:
        return {}
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _tshark(pcap: Path, decode: str, display: str, fields: list[str]) -> list[list[str]]:
    args = [TSHARK, "-r", str(pcap), "-d", f"tcp.port==5000,{decode}", "-Y", display,
            "-o", 'uat:custom_http_header_fields:"Docker-Distribution-Api-Version","api"',
            "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=\x1f"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    for row in rows:
        # one HTTP message per frame in these captures: an aggregated value would misalign fields
        assert not any("\x1f" in v for v in row), f"{pcap.name}: several messages in a frame: {row}"
    return rows


FIELDS = ["frame.number", "tcp.stream", "frame.time_epoch", "ip.src", "tcp.srcport", "ip.dst",
          "tcp.dstport", "http.request.method", "http.request.uri", "http.user_agent",
          "http.authorization", "http.request_in", "http.response.code",
          "http.content_length_header", "http.header.Docker-Distribution-Api-Version"]


@functools.cache
def capture(name: str) -> Capture:
    pcap = PCAPS / name
    assert pcap.exists(), f"{pcap} is missing: sudo pcaps/make_pcaps.sh rule-pack"
    requests: dict[int, dict] = {}
    responses = []
    hello_frames = False
    # HTTP messages, and the client's first TLS record bytes (0x16: a handshake) on the port
    for row in _tshark(pcap, "http", "http || (tcp.dstport == 5000 && tcp.payload[0] == 0x16)",
                       FIELDS):
        (frame, stream, ts, src, sport, dst, dport, method, uri, ua, auth, request_in, code,
         length, api) = row
        if method:
            requests[int(frame)] = dict(
                frame=int(frame), stream=int(stream), ts=float(ts), src_ip=src,
                src_port=int(sport), dest_ip=dst, dest_port=int(dport), method=method, uri=uri,
                user_agent=ua or None, authorization=auth or None, status=None,
                content_length=None, api_version=None)
        elif code:
            responses.append((int(stream), int(request_in) if request_in else None, int(code),
                              int(length) if length else None, api or None))
        else:
            hello_frames = True
    orphan_streams = set()
    for stream, request_in, code, length, api in responses:
        req = requests.get(request_in) if request_in is not None else None
        if req is None:
            orphan_streams.add(stream)
            continue
        req.update(status=code, content_length=length, api_version=api)
    hellos: tuple[Hello, ...] = ()
    if hello_frames:
        hello_fields = ["tcp.stream", "frame.time_epoch", "ip.src", "ip.dst", "tcp.dstport",
                        "tls.handshake.extensions_server_name"]
        hellos = tuple(
            Hello(int(stream), float(ts), src, dst, int(dport), sni or None,
                  int(stream) in orphan_streams)
            for stream, ts, src, dst, dport, sni in _tshark(
                pcap, "tls", "tls.handshake.type == 1", hello_fields))
    unanswered = [r["frame"] for r in requests.values() if r["status"] is None]
    assert not unanswered, f"{name}: tshark paired no response with frames {unanswered}"
    http = tuple(Wire(**r) for _, r in sorted(requests.items()))
    return Capture(name, http, hellos)


# -- oracles: what each rule must report, from the wire ------------------------------------


def internal(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in INTERNAL if net.version == addr.version)


def crossings(items: Iterable[tuple[float, tuple, object]], *, window: float, count: int = 0,
              distinct: bool = False, total: float = 0) -> int:
    """How many times a threshold is reached: items are (ts, group, value) in time order; a
    group's window restarts once the threshold is reached. value: ignored (count), the value
    (distinct), or the amount (total)."""
    reached = 0
    times: dict[tuple, deque] = defaultdict(deque)
    seen: dict[tuple, dict] = defaultdict(dict)
    sums: dict[tuple, deque] = defaultdict(deque)
    for ts, group, value in items:
        if total:
            q = sums[group]
            q.append((ts, value))
            while q and q[0][0] <= ts - window:
                q.popleft()
            if sum(v for _, v in q) >= total:
                reached += 1
                q.clear()
        elif distinct:
            values = seen[group]
            values[value] = ts
            for stale in [v for v, t in values.items() if t <= ts - window]:
                del values[stale]
            if len(values) >= count:
                reached += 1
                values.clear()
        else:
            q = times[group]
            q.append(ts)
            while q and q[0] <= ts - window:
                q.popleft()
            if len(q) >= count:
                reached += 1
                q.clear()
    return reached


def pair(w: Wire) -> tuple:
    return (w.src_ip, w.dest_ip)


def _anonymous(w: Wire) -> bool:
    return w.scheme == "none"


def _page_size(w: Wire) -> int | None:
    n = w.query.get("n")
    return int(n[0]) if n and n[0].isdigit() else None


GENERIC_CLIENTS = ("curl/", "python-requests/", "Mozilla/5.0 zgrab/")  # in these captures

# rule → (the HTTP transactions it matches); threshold rules are counted in expected() below
MATCHES: dict[str, Callable[[Wire], bool]] = {
    "plaintext-basic-auth": lambda w: w.scheme == "basic",
    "plaintext-bearer-token": lambda w: w.scheme == "bearer",
    "anonymous-push": lambda w: _anonymous(w) and w.is_push and 200 <= (w.status or 0) < 300,
    "anonymous-push-attempt": lambda w: _anonymous(w) and w.is_push and w.status in (401, 403),
    "catalog-enumeration": lambda w: w.route[0] == "catalog" or (
        w.route[0] == "tags-list" and (_page_size(w) or 0) > 1000),
    "manifest-delete": lambda w: w.route[0] == "manifest-delete",
    "blob-delete": lambda w: w.route[0] == "blob-delete",
    "cross-repository-mount": lambda w: w.route[0] == "blob-mount",
    "scanner-user-agent": lambda w: re.match(r"/v2(/|$)", w.path) is not None
    and (w.user_agent or "").startswith(GENERIC_CLIENTS),
    "plaintext-registry": lambda w: w.api_version is not None,
    "external-source": lambda w: not internal(w.src_ip),
    "auth-bruteforce": lambda w: w.status == 401 and w.scheme in ("basic", "bearer", "other"),
    "credential-spraying": lambda w: w.scheme == "basic",
    "tags-enumeration": lambda w: w.route[0] == "tags-list",
    "bulk-blobs": lambda w: w.route[0] == "blob-get" and 200 <= (w.status or 0) < 300,
    "bulk-manifests": lambda w: w.route[0] in ("manifest-get", "manifest-head")
    and 200 <= (w.status or 0) < 300,
}


def matching(cap: Capture, rule: str) -> list[Wire]:
    return [w for w in cap.http if MATCHES[rule](w)]


def expected(cap: Capture, rule: str, **th) -> int:
    """What the rule's events must add up to on this capture (thresholds: the pack's, or th)."""
    th = {**DEFAULTS.get(rule, {}), **th}
    if rule == "external-source":  # every session, TLS ones too
        return (len(matching(cap, rule))
                + sum(1 for h in cap.hellos if not internal(h.src_ip)))
    if rule == "tls-registry":  # TLS sessions, except a ClientHello answered in plain HTTP
        return sum(1 for h in cap.hellos if not h.answered_in_http)
    if rule == "auth-bruteforce":
        return crossings(((w.ts, pair(w), None) for w in matching(cap, rule)),
                         window=th["window"], count=th["count"])
    if rule == "credential-spraying":
        return crossings(((w.ts, pair(w), w.username) for w in matching(cap, rule)),
                         window=th["window"], count=th["count"], distinct=True)
    if rule == "tags-enumeration":
        return crossings(((w.ts, pair(w), w.route[1]) for w in matching(cap, rule)),
                         window=th["window"], count=th["count"], distinct=True)
    if rule == "bulk-pull":
        blobs = crossings(((w.ts, pair(w), w.content_length or 0)
                           for w in matching(cap, "bulk-blobs")),
                          window=th["window"], total=th["total"])
        repos = crossings(((w.ts, pair(w), w.route[1]) for w in matching(cap, "bulk-manifests")),
                          window=th["window"], count=th["count"], distinct=True)
        return blobs + repos
    return len(matching(cap, rule))


# -- the sensor's side ----------------------------------------------------------------------


@dataclass
class Run:
    events: list[dict]
    stdout: str
    stderr: str
    db: Path

    def of(self, rule: str) -> list[dict]:
        return [e for e in self.events if e["rule"] == rule]


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """replay(capture, overrides=None) → Run; one replay per distinct input in this module."""
    cache: dict[str, Run] = {}

    def run(name: str, overrides: dict | None = None) -> Run:
        key = json.dumps([name, overrides], sort_keys=True)
        if key not in cache:
            tmp = tmp_path_factory.mktemp("replay")
            config = {"key_file": "fingerprint.key"}
            if overrides:
                config["rules"] = {"overrides": overrides}
            (tmp / "sensor.yaml").write_text(yaml.safe_dump(config))
            db = tmp / "sensor.db"
            rc, out, err = run_cli(["replay", PCAPS / name, "--db", db,
                                    "--config", tmp / "sensor.yaml"])
            assert rc == 0, err
            conn = sqlite3.connect(db)
            conn.row_factory = sqlite3.Row
            try:
                events = [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY rowid")]
            finally:
                conn.close()
            for e in events:
                e["details"] = json.loads(e["details"]) if e["details"] else {}
            cache[key] = Run(events, out, err, db)
        return cache[key]

    return run


def check_events(run: Run, cap: Capture, rule: str, want: int) -> list[dict]:
    """The rule's events add up to `want`, and say who did it to whom, as the wire does."""
    events = run.of(rule)
    assert want > 0, f"{cap.name} holds nothing {rule} should fire on: wrong capture?"
    assert sum(e["count"] for e in events) == want, (rule, [(e["count"], e["details"].get(
        "uri")) for e in events])
    assert events, rule
    sessions = [(w.src_ip, w.dest_ip, w.dest_port) for w in cap.http]
    sessions += [(h.src_ip, h.dest_ip, h.dest_port) for h in cap.hellos]
    for e in events:
        assert e["severity"] == SEVERITY[rule]
        assert (e["src_ip"], e["dest_ip"], e["dest_port"]) in sessions
        assert e["count"] >= 1
    return events


# -- firing: every rule, on a capture made for it (or one of the core six) -------------------

FIRES = [  # (rule, capture, overrides)
    ("plaintext-basic-auth", "basic-auth-push.pcap", None),
    ("plaintext-bearer-token", "bearer-token-push.pcap", None),
    ("anonymous-push", "anonymous-push-pull.pcap", None),
    ("anonymous-push-attempt", "anonymous-push-rejected.pcap", None),
    ("catalog-enumeration", "catalog-tags-enumeration.pcap", None),
    ("catalog-enumeration", "scanner-user-agents.pcap", None),
    ("tags-enumeration", "catalog-tags-enumeration.pcap", None),
    ("external-source", "external-client.pcap", None),
    ("auth-bruteforce", "auth-bruteforce.pcap", None),
    ("credential-spraying", "credential-spraying.pcap", None),
    ("manifest-delete", "registry-delete.pcap", None),
    ("blob-delete", "registry-delete.pcap", None),
    ("cross-repository-mount", "blob-mount.pcap", None),
    ("scanner-user-agent", "scanner-user-agents.pcap", None),
    ("bulk-pull", "bulk-pull.pcap", {"bulk-pull": {"threshold": {"total": 4096}}}),
    ("plaintext-registry", "anonymous-push-pull.pcap", None),
    ("plaintext-registry", "registry-delete.pcap", None),
    ("tls-registry", "tls-registry.pcap", None),
]


def _oracle_thresholds(rule: str, overrides: dict | None) -> dict:
    return dict((overrides or {}).get(rule, {}).get("threshold", {}))


@pytest.mark.parametrize(("rule", "name", "overrides"), FIRES,
                         ids=[f"{r}@{n.removesuffix('.pcap')}" for r, n, _ in FIRES])
def test_rule_fires_on_real_traffic(replay, rule, name, overrides):
    cap = capture(name)
    want = expected(cap, rule, **_oracle_thresholds(rule, overrides))
    check_events(replay(name, overrides), cap, rule, want)


def test_every_rule_of_the_pack_fires_and_stays_quiet_somewhere():
    loaded = rules_loaded()
    assert set(loaded) == set(PACK), "the pack changed: give the new rule a capture here"
    assert {r for r, _, _ in FIRES} == set(PACK)
    assert {r for r, _ in QUIET} == set(PACK)
    assert {rid: sev for rid, (sev, _) in loaded.items()} == SEVERITY
    assert {status for _, status in loaded.values()} == {"enabled"}


def rules_loaded() -> dict[str, tuple[str, str]]:
    """`registry-sensor rules list`, as id → (severity, status)."""
    rc, out, err = run_cli(["rules", "list"])
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {words[0]: (words[1], words[2]) for words in rows}


# -- quiet: benign traffic --------------------------------------------------------------------

QUIET = [  # (rule, benign capture): what makes the quiet meaningful is in the comment
    ("plaintext-basic-auth", "anonymous-push-rejected.pcap"),  # skopeo's `Basic Og==`
    ("plaintext-basic-auth", "bearer-token-push.pcap"),  # a credential, but a bearer one
    ("plaintext-bearer-token", "basic-auth-push.pcap"),  # Basic credentials only
    ("anonymous-push", "basic-auth-push.pcap"),  # a push, authenticated
    ("anonymous-push", "bearer-token-push.pcap"),  # a push with a token
    ("anonymous-push-attempt", "anonymous-push-pull.pcap"),  # anonymous pushes accepted
    ("anonymous-push-attempt", "basic-auth-push.pcap"),  # 401s: a ping, a wrong password
    ("catalog-enumeration", "anonymous-push-pull.pcap"),
    ("catalog-enumeration", "bulk-pull.pcap"),
    ("tags-enumeration", "anonymous-push-pull.pcap"),
    ("tags-enumeration", "bulk-pull.pcap"),
    ("external-source", "anonymous-push-pull.pcap"),  # loopback
    ("external-source", "registry-delete.pcap"),  # 127.0.0.2 too
    ("auth-bruteforce", "basic-auth-push.pcap"),  # two wrong passwords, then the right one
    ("auth-bruteforce", "credential-spraying.pcap"),  # six 401s: fewer than ten
    ("credential-spraying", "basic-auth-push.pcap"),  # one user
    ("credential-spraying", "auth-bruteforce.pcap"),  # twenty passwords, one user
    ("manifest-delete", "anonymous-push-pull.pcap"),
    ("manifest-delete", "blob-mount.pcap"),
    ("blob-delete", "anonymous-push-pull.pcap"),
    ("blob-delete", "blob-mount.pcap"),
    ("cross-repository-mount", "anonymous-push-pull.pcap"),  # uploads without mount
    ("cross-repository-mount", "bearer-token-push.pcap"),
    ("scanner-user-agent", "anonymous-push-pull.pcap"),  # skopeo only
    ("scanner-user-agent", "bulk-pull.pcap"),
    ("bulk-pull", "bulk-pull.pcap"),  # four small pulls: far below the pack's thresholds
    ("bulk-pull", "anonymous-push-pull.pcap"),
    ("plaintext-registry", "tls-registry.pcap"),
    ("tls-registry", "anonymous-push-pull.pcap"),  # skopeo's ClientHellos, answered in HTTP
    ("tls-registry", "bulk-pull.pcap"),
]


@pytest.mark.parametrize(("rule", "name"), QUIET,
                         ids=[f"{r}@{n.removesuffix('.pcap')}" for r, n in QUIET])
def test_rule_quiet_on_benign_traffic(replay, rule, name):
    cap = capture(name)
    assert expected(cap, rule) == 0, f"{name} is not benign for {rule}"
    assert replay(name).of(rule) == []


def test_quiet_captures_hold_what_makes_them_meaningful():
    rejected = capture("anonymous-push-rejected.pcap")
    assert [w.authorization for w in rejected.http if w.authorization] == ["Basic Og=="]
    assert any(w.scheme == "bearer" for w in capture("bearer-token-push.pcap").http)
    basic = capture("basic-auth-push.pcap")
    assert sum(1 for w in basic.http if w.is_push and w.scheme == "basic") == 7
    assert sum(1 for w in basic.http if w.status == 401 and w.scheme == "basic") == 2
    assert sum(1 for w in capture("credential-spraying.pcap").http if w.status == 401) == 6
    assert {w.username for w in capture("auth-bruteforce.pcap").http} == {"alice"}
    pushpull = capture("anonymous-push-pull.pcap")
    assert sum(1 for w in pushpull.http if w.route[0] == "upload-post") == 2
    assert sum(1 for h in pushpull.hellos if h.answered_in_http) == 2
    bulk = capture("bulk-pull.pcap")
    assert sum(1 for h in bulk.hellos if h.answered_in_http) == 4
    assert {w.user_agent for w in bulk.http} == {"skopeo/1.9.3"}


# -- the details of each firing ---------------------------------------------------------------


def test_bearer_token_names_the_jwt_subject_and_never_leaks_the_token(replay):
    cap = capture("bearer-token-push.pcap")
    tokens = {w.bearer_token for w in cap.http if w.bearer_token}
    assert len(tokens) == 1
    token = tokens.pop()
    assert jwt_claims(token)["sub"] == TOKEN_SUB
    carriers = matching(cap, "plaintext-bearer-token")
    # the registry accepted it: the push committed, the curl pull got its manifest
    assert {(w.method, w.route[0], w.status) for w in carriers} >= {
        ("PUT", "manifest-put", 201), ("GET", "manifest-get", 200), ("GET", "base", 200)}
    run = replay("bearer-token-push.pcap")
    events = check_events(run, cap, "plaintext-bearer-token", len(carriers))
    assert {e["username"] for e in events} == {TOKEN_SUB}
    assert {e["details"]["auth_scheme"] for e in events} == {"bearer"}
    assert len({e["details"]["credential_fingerprint"] for e in events}) == 1
    assert events[0]["repository"] == "library/tokendemo"
    assert f"Bearer token of {TOKEN_SUB} sent in clear text" in events[0]["title"]

    rc, listed, err = run_cli(["events", "--db", run.db, "--format", "json"])
    assert rc == 0, err
    header, claims, signature = token.split(".")
    stored = b"".join(p.read_bytes() for p in run.db.parent.glob(run.db.name + "*"))
    for secret in (token, signature, claims, header[:64]):
        for where, text in (("stdout", run.stdout), ("stderr", run.stderr),
                            ("events", listed)):
            assert secret not in text, f"token material in {where}"
        assert secret.encode() not in stored, "token material in the database"


def test_auth_bruteforce_twenty_wrong_passwords(replay):
    cap = capture("auth-bruteforce.pcap")
    failed = matching(cap, "auth-bruteforce")
    assert len(failed) == 20 and {w.username for w in failed} == {"alice"}
    assert sum(1 for w in failed if w.route[0] == "base") == 12
    assert sum(1 for w in failed if w.route[0] == "manifest-get") == 8
    events = check_events(replay("auth-bruteforce.pcap"), cap, "auth-bruteforce", 20 // 10)
    # the 10th failure fires; the 20th reaches the threshold again inside the hour: suppressed,
    # reported at the end of input
    first, follow = events
    assert first["ts"] == pytest.approx(failed[9].ts, abs=0.01)
    assert first["details"]["matched"] == 10 and first["details"]["threshold"] == 10
    assert first["username"] == "alice"
    assert first["count"] == 1 and "suppressed" not in first["details"]
    assert follow["details"].get("suppressed") is True and follow["count"] == 1
    assert follow["ts"] == pytest.approx(failed[19].ts, abs=0.01)


def test_credential_spraying_six_usernames_one_password(replay):
    cap = capture("credential-spraying.pcap")
    tried = matching(cap, "credential-spraying")
    assert [w.username for w in tried] == SPRAYED
    passwords = {base64.b64decode(w.authorization.split()[1]).partition(b":")[2] for w in tried}
    assert len(passwords) == 1
    (event,) = check_events(replay("credential-spraying.pcap"), cap, "credential-spraying", 1)
    assert event["username"] == SPRAYED[4]  # the fifth distinct username reaches 5
    assert event["details"]["distinct_field"] == "username"
    assert sorted(event["details"]["distinct_values"]) == sorted(SPRAYED[:5])
    # each username has its own credential: six events of plaintext-basic-auth, one each
    basic = replay("credential-spraying.pcap").of("plaintext-basic-auth")
    assert sorted(e["username"] for e in basic) == sorted(SPRAYED)


def test_deletes_accepted_and_refused(replay):
    cap = capture("registry-delete.pcap")
    run = replay("registry-delete.pcap")
    manifests = check_events(run, cap, "manifest-delete", 2)
    blobs = check_events(run, cap, "blob-delete", 3)
    by_dest = {e["dest_ip"]: e for e in manifests}
    assert by_dest["127.0.0.1"]["details"]["status"] == 202  # storage.delete.enabled: true
    assert by_dest["127.0.0.2"]["details"]["status"] == 405  # deletes disabled
    for e in manifests + blobs:
        assert (e["src_ip"], e["dest_port"]) == ("127.0.0.1", 5000)
        assert e["username"] == "alice" and e["repository"] == "library/demo"
        assert e["details"]["method"] == "DELETE"
    assert {e["details"]["digest"] for e in manifests} == {
        w.path.rsplit("/", 1)[1] for w in matching(cap, "manifest-delete")}
    per_dest = defaultdict(int)
    for e in blobs:
        per_dest[e["dest_ip"], e["details"]["status"]] += e["count"]
    assert per_dest == {("127.0.0.1", 202): 2, ("127.0.0.2", 405): 1}
    # the two accepted blob deletes: one event, one suppressed follow-up
    accepted = [e for e in blobs if e["dest_ip"] == "127.0.0.1"]
    assert [bool(e["details"].get("suppressed")) for e in accepted] == [False, True]


def test_cross_repository_mount_from_curl_and_from_skopeo(replay):
    cap = capture("blob-mount.pcap")
    mounts = matching(cap, "cross-repository-mount")
    assert [(w.user_agent.split("/")[0], w.status) for w in mounts] == [("curl", 201),
                                                                       ("skopeo", 201)]
    # skopeo percent-encodes the query: from=team%2Fbase&mount=sha256%3A…
    assert "from=team%2Fbase" in mounts[1].uri
    events = check_events(replay("blob-mount.pcap"), cap, "cross-repository-mount", 2)
    assert {(e["repository"], e["details"]["mount_from"]) for e in events} == {
        ("team/app", "team/base"), ("team/copy", "team/base")}
    assert {e["username"] for e in events} == {"alice"}
    digests = {unquote(w.query["mount"][0]) for w in mounts}
    assert {e["details"]["digest"] for e in events} == digests
    assert "Layer mounted into team/copy from team/base" in events[-1]["title"]


def test_scanner_user_agents(replay):
    cap = capture("scanner-user-agents.pcap")
    events = check_events(replay("scanner-user-agents.pcap"), cap, "scanner-user-agent", 5)
    per_agent = defaultdict(int)
    for e in events:
        per_agent[e["details"]["user_agent"]] += e["count"]
    assert per_agent == {"Mozilla/5.0 zgrab/0.x": 2, "python-requests/2.31.0": 3}


def test_catalog_page_above_the_maximum_is_the_cve_2023_2253_pattern(replay):
    cap = capture("scanner-user-agents.pcap")
    (big,) = [w for w in cap.http if (_page_size(w) or 0) > 1000]
    assert big.status == 400  # distribution 2.8.2 refuses n > 1000 (PAGINATION_NUMBER_INVALID)
    events = check_events(replay("scanner-user-agents.pcap"), cap, "catalog-enumeration", 3)
    (oversized,) = [e for e in events if e["details"].get("page_size") == 100000]
    assert oversized["details"]["status"] == 400 and oversized["count"] == 1


def test_catalog_enumeration_counts_every_page(replay):
    cap = capture("catalog-tags-enumeration.pcap")
    pages = matching(cap, "catalog-enumeration")
    assert [w.uri for w in pages][:2] == ["/v2/_catalog", "/v2/_catalog?n=2"] and len(pages) == 4
    events = check_events(replay("catalog-tags-enumeration.pcap"), cap, "catalog-enumeration", 4)
    assert {e["details"]["operation"] for e in events} == {"catalog"}
    assert {e["username"] for e in events} == {None}


def test_external_source_names_the_outside_client(replay):
    cap = capture("external-client.pcap")
    events = check_events(replay("external-client.pcap"), cap, "external-source",
                          len(cap.http) + len(cap.hellos))
    assert {(e["src_ip"], e["dest_ip"], e["dest_port"]) for e in events} == {
        ("203.0.113.50", "192.0.2.10", 5000)}


def test_anonymous_push_and_attempt_name_the_repository(replay):
    accepted = check_events(replay("anonymous-push-pull.pcap"), capture("anonymous-push-pull.pcap"),
                            "anonymous-push", 7)
    assert {e["repository"] for e in accepted} == {"library/demo"}
    assert {e["username"] for e in accepted} == {None}
    cap = capture("anonymous-push-rejected.pcap")
    (refused,) = check_events(replay("anonymous-push-rejected.pcap"), cap,
                              "anonymous-push-attempt", 1)
    assert refused["repository"] == "library/evil" and refused["details"]["status"] == 401
    assert refused["details"]["method"] == "POST"


def test_plaintext_registry_once_per_server(replay):
    cap = capture("registry-delete.pcap")
    events = check_events(replay("registry-delete.pcap"), cap, "plaintext-registry",
                          len(cap.http))
    per_server = defaultdict(int)
    for e in events:
        per_server[e["dest_ip"], e["dest_port"]] += e["count"]
    assert per_server == {("127.0.0.1", 5000): 5, ("127.0.0.2", 5000): 3}
    assert sum(1 for e in events if not e["details"].get("suppressed")) == 2


def test_tls_registry_names_the_sni(replay):
    cap = capture("tls-registry.pcap")
    assert cap.http == () and len(cap.hellos) == 10
    assert {h.sni for h in cap.hellos} == {"registry.test"}
    events = check_events(replay("tls-registry.pcap"), cap, "tls-registry", 10)
    assert {e["details"]["tls_sni"] for e in events} == {"registry.test"}
    assert "(SNI registry.test): contents not visible" in events[0]["title"]


# -- thresholds at their edges on real traffic -------------------------------------------------


def tags_override(count: int) -> dict:
    return {"tags-enumeration": {"threshold": {"count": count}}}


@pytest.mark.parametrize(("count", "fires"), [(5, True), (6, True), (7, False)],
                         ids=["default-5", "count-6", "count-7"])
def test_tags_enumeration_threshold_edge(replay, count, fires):
    """Six repositories' tags listed: a threshold of 6 is reached, 7 (count - 1 = 6) is not."""
    cap = capture("catalog-tags-enumeration.pcap")
    repos = [w.route[1] for w in matching(cap, "tags-enumeration")]
    assert repos == [f"team/app-{i}" for i in range(1, 7)]
    overrides = None if count == 5 else tags_override(count)
    run = replay("catalog-tags-enumeration.pcap", overrides)
    want = expected(cap, "tags-enumeration", count=count)
    assert want == (1 if fires else 0)
    if not fires:
        assert run.of("tags-enumeration") == []
        return
    (event,) = check_events(run, cap, "tags-enumeration", want)
    assert event["repository"] == repos[count - 1]
    assert sorted(event["details"]["distinct_values"]) == sorted(repos[:count])
    assert event["details"]["distinct_count"] == count


def blob_bytes(cap: Capture) -> list[int]:
    return [w.content_length for w in matching(cap, "bulk-blobs")]


def test_bulk_pull_byte_total_edge(replay):
    """The pack's total lowered to the exact bytes of the four pulls fires once, on the last blob;
    one byte more stays quiet."""
    cap = capture("bulk-pull.pcap")
    sizes = blob_bytes(cap)
    assert len(sizes) == 8 and all(sizes)  # a layer and a config per image
    total = sum(sizes)
    at = replay("bulk-pull.pcap", {"bulk-pull": {"threshold": {"total": total}}})
    (event,) = check_events(at, cap, "bulk-pull", expected(cap, "bulk-pull", total=total))
    assert event["details"]["sum"] == total and event["details"]["matched"] == 8
    assert event["details"]["digest"] == matching(cap, "bulk-blobs")[-1].path.rsplit("/", 1)[1]
    above = replay("bulk-pull.pcap", {"bulk-pull": {"threshold": {"total": total + 1}}})
    assert expected(cap, "bulk-pull", total=total + 1) == 0
    assert above.of("bulk-pull") == []


def test_bulk_pull_few_kilobytes_fires_on_every_layer(replay):
    cap = capture("bulk-pull.pcap")
    run = replay("bulk-pull.pcap", {"bulk-pull": {"threshold": {"total": 4096}}})
    events = check_events(run, cap, "bulk-pull", expected(cap, "bulk-pull", total=4096))
    assert sum(e["count"] for e in events) == 4  # each 6 KiB layer crosses 4 KiB on its own
    assert events[0]["repository"] == "team/svc-1"
    assert [bool(e["details"].get("suppressed")) for e in events] == [False, True]


def _bulk_triggers(count: int) -> dict:
    """bulk-pull's two triggers with the distinct-repository count lowered, given whole: a
    `threshold: {count: N}` override would also land in the byte-sum trigger (see below)."""
    ok = {"gte": 200, "lt": 300}
    return {"bulk-pull": {"triggers": [
        {"match": {"transport": "http", "operation": "blob-get", "status": ok},
         "threshold": {"sum": "response_body_bytes", "total": 2147483648, "window": 600,
                       "by": ["src_ip", "dest_ip"]}},
        {"match": {"transport": "http", "operation": {"in": ["manifest-get", "manifest-head"]},
                   "status": ok},
         "threshold": {"count": count, "distinct": "repository", "window": 600,
                       "by": ["src_ip", "dest_ip"]}}]}}


@pytest.mark.parametrize(("count", "fires"), [(4, True), (5, False)])
def test_bulk_pull_repository_count_edge(replay, count, fires):
    cap = capture("bulk-pull.pcap")
    repos = [w.route[1] for w in matching(cap, "bulk-manifests")]
    assert repos == [f"team/svc-{i}" for i in range(1, 5)]
    run = replay("bulk-pull.pcap", _bulk_triggers(count))
    want = expected(cap, "bulk-pull", count=count)
    if not fires:
        assert want == 0 and run.of("bulk-pull") == []
        return
    (event,) = check_events(run, cap, "bulk-pull", want)
    assert event["repository"] == "team/svc-4"
    assert sorted(event["details"]["distinct_values"]) == repos


def test_bulk_pull_count_override_through_threshold(replay):
    run = replay("bulk-pull.pcap", {"bulk-pull": {"threshold": {"count": 4}}})
    assert len(run.of("bulk-pull")) == 1
