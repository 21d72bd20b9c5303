"""Secrets never leak: not on stdout or stderr (plain, --json, -v), not in `events` (json or
table), not in any row of any table of the database, not in the raw bytes of the database
files.

pcaps/basic-auth-push.pcap carries alice's Basic credential with the known test password
(10 requests) and a wrong password (2 requests). A crafted capture carries a bearer JWT (sub
`bob`) and a URI with `?access_token=...`. Each test first shows that the secret *is* in the
capture (so a search that finds nothing means something), and that a harmless part of the same
request (the username) does reach the outputs (so the search looks where the data goes).
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from pathlib import Path

import pytest
from conftest import PCAPS, run_cli

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

BASIC_PCAP = PCAPS / "basic-auth-push.pcap"
PASSWORD = "S3cret-Pa55word!"
WRONG_PASSWORD = "wrong-password-1"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forms(password: str, user: str = "alice") -> list[str]:
    """What a leak of this password could look like."""
    return [password, b64(f"{user}:{password}"), b64(password)]


BASIC_SECRETS = forms(PASSWORD) + forms(WRONG_PASSWORD)


# -- running everything and collecting every output ----------------------------------------------

def dump_database(db: Path) -> str:
    """Every row of every table (sqlite_master included), as text."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        parts = []
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert {"transactions", "events", "anomalies"} <= set(tables)
        for (sql,) in conn.execute("SELECT sql FROM sqlite_master"):
            parts.append(str(sql))
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608
                parts.append(repr(row))
        return "\n".join(parts)
    finally:
        conn.close()


def raw_database_files(db: Path) -> dict[str, bytes]:
    files = {}
    for path in [db, *db.parent.glob(db.name + "-*")]:
        files[path.name] = path.read_bytes()
    assert db.name in files
    return files


def collect_outputs(tmp_path: Path, pcap: Path) -> dict[str, str | bytes]:
    """Replay (text, --json, -v) and query (json, table) a capture; every output by name."""
    config = tmp_path / "sensor.yaml"
    config.write_text("key_file: fingerprint.key\n")
    outputs: dict[str, str | bytes] = {}
    runs = {
        "replay": [],
        "replay --json": ["--json"],
        "replay -v": ["-v"],
        "replay -v --json": ["-v", "--json"],
    }
    for name, flags in runs.items():
        db = tmp_path / (name.replace(" ", "_").replace("-", "") + ".db")
        verbose = [f for f in flags if f == "-v"]
        rest = [f for f in flags if f != "-v"]
        rc, out, err = run_cli([*verbose, "replay", pcap, "--db", db, "--config", config, *rest])
        assert rc == 0, err
        outputs[f"{name}: stdout"] = out
        outputs[f"{name}: stderr"] = err
        if name == "replay --json":
            json.loads(out)
        outputs[f"{name}: database rows"] = dump_database(db)
        for fname, data in raw_database_files(db).items():
            outputs[f"{name}: file {fname}"] = data
        for fmt in ("json", "table"):
            rc, out, err = run_cli([*verbose, "events", "--db", db, "--config", config,
                                    "--format", fmt])
            assert rc == 0, err
            outputs[f"{name}: events --format {fmt}: stdout"] = out
            outputs[f"{name}: events --format {fmt}: stderr"] = err
    return outputs


def leaks(outputs: dict[str, str | bytes], secrets: list[str]) -> list[str]:
    found = []
    for name, text in outputs.items():
        data = text if isinstance(text, bytes) else text.encode()
        for secret in secrets:
            if secret.encode() in data:
                found.append(f"{secret!r} in {name}")
    return found


def contains(outputs: dict[str, str | bytes], needle: str, which: str) -> bool:
    text = outputs[which]
    return needle.encode() in (text if isinstance(text, bytes) else text.encode())


# -- Basic credentials (the real capture) ------------------------------------------------------

def test_capture_really_holds_the_basic_credentials():
    raw = BASIC_PCAP.read_bytes()
    assert raw.count(f"Authorization: Basic {b64('alice:' + PASSWORD)}".encode()) == 10
    assert raw.count(f"Authorization: Basic {b64('alice:' + WRONG_PASSWORD)}".encode()) == 2
    assert PASSWORD.encode() not in raw  # MANIFEST.md: never literally, only in base64
    # and the search below would see it if it were written anywhere
    # ("alice:" is 6 bytes, so the base64 of the password alone is part of the credential's)
    assert sorted(leaks({"capture": raw}, BASIC_SECRETS)) == sorted(
        f"{s!r} in capture" for s in BASIC_SECRETS if s not in (PASSWORD, WRONG_PASSWORD))


@pytest.fixture(scope="module")
def basic_outputs(tmp_path_factory):
    return collect_outputs(tmp_path_factory.mktemp("basic"), BASIC_PCAP)


def test_basic_password_never_leaks(basic_outputs):
    assert leaks(basic_outputs, BASIC_SECRETS) == []


def test_basic_username_is_reported(basic_outputs):
    """alice is in the events, so the searches above look where credentials would go."""
    events = json.loads(basic_outputs["replay: events --format json: stdout"])
    basic = [e for e in events if e["rule"] == "plaintext-basic-auth"]
    assert basic and all(e["username"] == "alice" for e in basic)
    assert sum(e["count"] for e in basic) == 12
    for name in ("replay: stdout", "replay: events --format table: stdout",
                 "replay: database rows", "replay -v: database rows"):
        assert contains(basic_outputs, "alice", name), name
    # two credentials, told apart only by their keyed fingerprints
    fps = {e["details"]["credential_fingerprint"] for e in basic}
    assert len(fps) == 2
    assert all(len(fp) == 16 and int(fp, 16) >= 0 for fp in fps)


# -- a bearer JWT and an access_token in a URI (crafted) ---------------------------------------

JWT_HEADER = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "test-key"}).encode())
JWT_PAYLOAD = b64url(json.dumps({
    "iss": "token-server.test", "sub": "bob", "aud": "registry.test", "exp": 4102444800,
    "access": [{"type": "repository", "name": "library/demo", "actions": ["pull", "push"]}],
}).encode())
JWT_SIGNATURE = b64url(bytes((i * 37 + 11) % 256 for i in range(64)))
JWT = f"{JWT_HEADER}.{JWT_PAYLOAD}.{JWT_SIGNATURE}"
ACCESS_TOKEN = "SECRETVALUE"
CLIENT, SERVER = "203.0.113.77", "192.0.2.10"  # outside: external-source carries the username


def conversation(sport: int, request: bytes, response: bytes, t0: float):
    """One TCP connection, handshake to FIN, as scapy packets with timestamps."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    c, s = 1000, 5000
    out = []

    def pkt(from_client, flags, seq, ack, payload=b""):
        ip = IP(src=CLIENT, dst=SERVER) if from_client else IP(src=SERVER, dst=CLIENT)
        ports = dict(sport=sport, dport=5000) if from_client else dict(sport=5000, dport=sport)
        macs = ("02:00:00:00:00:01", "02:00:00:00:00:02")  # explicit: scapy would ARP for them
        ether = Ether(src=macs[0], dst=macs[1]) if from_client else Ether(src=macs[1], dst=macs[0])
        p = ether / ip / TCP(flags=flags, seq=seq, ack=ack, **ports) / payload
        p.time = t0 + len(out) * 0.001
        out.append(p)

    pkt(True, "S", c, 0)
    pkt(False, "SA", s, c + 1)
    pkt(True, "A", c + 1, s + 1)
    pkt(True, "PA", c + 1, s + 1, request)
    pkt(False, "PA", s + 1, c + 1 + len(request), response)
    pkt(True, "FA", c + 1 + len(request), s + 1 + len(response))
    pkt(False, "FA", s + 1 + len(response), c + 2 + len(request))
    pkt(True, "A", c + 2 + len(request), s + 2 + len(response))
    return out


def response(body: bytes = b"{}") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Docker-Distribution-Api-Version: registry/2.0\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


@pytest.fixture(scope="module")
def token_pcap(tmp_path_factory) -> Path:
    from scapy.utils import wrpcap

    bearer = (f"GET /v2/library/demo/manifests/1.0 HTTP/1.1\r\nHost: {SERVER}:5000\r\n"
              f"User-Agent: docker/24.0.7\r\nAuthorization: Bearer {JWT}\r\n"
              f"Accept: application/vnd.oci.image.manifest.v1+json\r\n\r\n").encode()
    query = (f"GET /v2/library/demo/tags/list?n=10&access_token={ACCESS_TOKEN} HTTP/1.1\r\n"
             f"Host: {SERVER}:5000\r\nUser-Agent: docker/24.0.7\r\n\r\n").encode()
    packets = (conversation(40001, bearer, response(), 1_800_000_000.0)
               + conversation(40002, query, response(b'{"name":"library/demo","tags":["1.0"]}'),
                              1_800_000_001.0))
    path = tmp_path_factory.mktemp("crafted") / "tokens.pcap"
    wrpcap(str(path), packets)
    return path


def test_crafted_capture_really_holds_the_tokens(token_pcap):
    raw = token_pcap.read_bytes()
    assert f"Authorization: Bearer {JWT}".encode() in raw
    assert f"access_token={ACCESS_TOKEN} ".encode() in raw
    assert json.loads(base64.urlsafe_b64decode(JWT_PAYLOAD + "=="))["sub"] == "bob"


@pytest.fixture(scope="module")
def token_outputs(tmp_path_factory, token_pcap):
    return collect_outputs(tmp_path_factory.mktemp("tokens"), token_pcap)


def test_tokens_never_leak(token_outputs):
    assert leaks(token_outputs, [JWT, JWT_SIGNATURE, ACCESS_TOKEN]) == []


def test_token_subject_and_redacted_uri_are_reported(token_outputs):
    events = json.loads(token_outputs["replay: events --format json: stdout"])
    assert any(e["username"] == "bob" for e in events), events
    for name in ("replay: database rows", "replay: events --format table: stdout"):
        assert contains(token_outputs, "bob", name), name
    rows = token_outputs["replay: database rows"]
    assert "/v2/library/demo/tags/list?n=10&access_token=" in rows  # redacted, not dropped
    # external-source: the bearer request (first event, bob), then the access_token request
    # (the suppressed follow-up, whose details carry its URI: redacted, not dropped)
    first, follow = sorted((e for e in events if e["rule"] == "external-source"),
                           key=lambda e: e["ts"])
    assert (first["username"], first["details"]["uri"]) == ("bob", "/v2/library/demo/manifests/1.0")
    assert first["details"]["auth_scheme"] == "bearer"
    assert follow["details"]["suppressed"] is True and follow["count"] == 1
    prefix = "/v2/library/demo/tags/list?n=10&access_token="
    assert follow["details"]["uri"].startswith(prefix)
    assert follow["details"]["uri"][len(prefix):] not in ("", ACCESS_TOKEN)


def test_token_transactions(tmp_path, token_pcap, config_path):
    db = tmp_path / "t.db"
    rc, out, err = run_cli(["replay", token_pcap, "--db", db, "--config", config_path, "--json"])
    assert rc == 0, err
    assert json.loads(out)["transactions"] == 2
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT method, uri, status, auth_scheme, username, "
                        "credential_fingerprint FROM transactions ORDER BY ts").fetchall()
    conn.close()
    (m1, u1, s1, a1, n1, f1), (m2, u2, s2, a2, n2, f2) = rows
    assert (m1, u1, s1, a1, n1) == ("GET", "/v2/library/demo/manifests/1.0", 200, "bearer", "bob")
    assert f1 and len(f1) == 16 and f1 not in JWT
    assert (m2, s2, a2, n2, f2) == ("GET", 200, "none", None, None)
    assert u2.startswith("/v2/library/demo/tags/list?n=10&access_token=")
    assert ACCESS_TOKEN not in u2
