#!/usr/bin/env python3
"""Generate a deterministic, realistic Docker Registry workload capture for the benchmark.

    python bench/make_workload.py OUT.pcap [--size 1G] [--blob-size 1M-16M] [--seed 1]

Writes OUT.pcap (classic pcap, microsecond timestamps, Ethernet, little-endian) and a sidecar
OUT.json with what was written: packet and byte counts and every HTTP transaction (method, URI,
status, body sizes, and the packet numbers where each request and response starts and ends).

What is in it: several hundred TCP connections on port 5000 between a few dozen clients
(10.1.x.x and 10.2.x.x) and one registry (10.0.5.20), mixed like a busy CI registry:
  pull      keep-alive: [GET /v2/ 401, GET /v2/ 200], HEAD manifest, GET manifest, GET config
            blob, GET 1-3 layer blobs (multi-MB bodies)
  blob      one GET blob with Connection: close (skopeo-style), the server closes
  push      keep-alive: [login], per layer HEAD blob 404, POST uploads 202 Location,
            PATCH (multi-MB body) 202, PUT ?digest= 201; sometimes a cross-repo mount 201;
            the config blob the same way; PUT manifest 201
  catalog   GET /v2/_catalog?n=100, then tags/list for a few repositories
  pipelined 3-6 HEAD/GET manifest or tags/list requests in one write, answered in order
  manifest  a single HEAD or GET manifest (200 or 404)
  probe     GET /v2/ (401, or 200 with credentials)
Some clients send `Authorization: Basic` with an obviously fake password
("ci-bot:not-a-real-password"); the others are anonymous.

TCP is modelled the way a span port near the registry sees it: three-way handshake with the
usual Linux options (MSS 1460, SACK permitted, timestamps, window scale 7), full-size segments
(MSS 1448 with the timestamp option, so Ethernet frames of at most 1514 bytes), one ACK from the
receiver every two segments (server ACKs ~30 us after the data, client ACKs one RTT later),
responses piggybacking the ACK of their request, FIN teardown (client first on keep-alive
connections, server first after `Connection: close`). Each connection direction is paced at its
own rate (50 Mbit/s to 1 Gbit/s); a few connections run at once and interleave.

Checksums: IPv4 header and TCP checksums are computed and correct (incremental arithmetic, the
payload summed with int.from_bytes modulo 0xFFFF), so tshark and Suricata need no flags for
them; the benchmark still passes Suricata `-k none` as the issue asks.

Determinism: every choice comes from random.Random(seed); the same arguments give a
byte-identical file. The pcap is streamed to disk through a buffered writer; blob bodies are
slices of a 1 MiB pseudo-random pool, never materialised.

Sizes take K, M, G suffixes (binary: 1M = 1 MiB). --blob-size is either one size (each blob
that size +-5%) or a range LO-HI (log-uniform).
"""

from __future__ import annotations

import argparse
import base64
import heapq
import json
import math
import os
import random
import struct
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

GENERATOR_VERSION = 2

MSS = 1448  # 1500 - 20 (IPv4) - 32 (TCP with the timestamp option)
POOL_SIZE = 1 << 20
PORT = 5000
REGISTRY_IP = "10.0.5.20"
REGISTRY_MAC = bytes.fromhex("020a00051400")
ROUTER_MAC = bytes.fromhex("020a000501fe")
HOST = "registry.bench.internal:5000"
START_EPOCH = 1796119200  # 2026-12-01T10:00:00Z
FAKE_PASSWORD = "not-a-real-password"
USERS = ("ci-bot", "deploy", "alice", "bob")

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

# pcap record header, then Ethernet + IPv4 + TCP with the 12-byte timestamp option (66 bytes)
PCAP_FILE_HEADER = struct.Struct("<IHHiIII")
PCAP_REC = struct.Struct("<IIII")
FRAME_HDR = struct.Struct("!12sH BBHHHBBH4s4s HHIIBBHHH BBBBII")
SYN_HDR = struct.Struct("!12sH BBHHHBBH4s4s HHIIBBHHH BBH BB BBII B BBB")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

UAS = (
    "docker/24.0.7 go/go1.20.10 git-commit/311b9ff kernel/6.1.0-13-amd64 os/linux arch/amd64 "
    "UpstreamClient(Docker-Client/24.0.7 \\(linux\\))",
    "containerd/v1.7.2",
    "containers/5.23.1 (github.com/containers/image)",
    "crane/v0.16.1 go/go1.21.0",
    "Go-http-client/1.1",
    "buildkit/v0.12",
)
REPOS = (
    "library/nginx", "library/alpine", "library/python", "library/postgres", "team/app/worker",
    "team/app/api", "ci/build-cache", "platform/web", "platform/gateway", "data/etl",
    "ml/trainer", "ml/inference", "tools/debug", "infra/prometheus", "infra/grafana",
)
TAGS = ("latest", "1.0", "1.1", "2.3.4", "v2.3.5", "main", "stable", "3.12-slim", "16.1")
MT_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_OCI = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ERR_UNAUTHORIZED = (b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required",'
                    b'"detail":null}]}\n')
ERR_BLOB_UNKNOWN = (b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry",'
                    b'"detail":"sha256:%s"}]}\n')
ERR_MANIFEST_UNKNOWN = (b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown",'
                        b'"detail":{"Tag":"%s"}}]}\n')


def parse_size(text: str) -> int:
    """'1G' -> 1073741824, '200M', '512K', '1000' (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in UNITS and not t[-1:].isdigit() else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 50M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value * UNITS[unit])


def parse_blob_size(text: str) -> tuple[int, int]:
    """'2M' -> (2M*0.95, 2M*1.05); '1M-16M' -> (1M, 16M)."""
    if "-" in text:
        lo_text, hi_text = text.split("-", 1)
        lo, hi = parse_size(lo_text), parse_size(hi_text)
        if lo > hi:
            raise argparse.ArgumentTypeError(f"blob size range is reversed: {text!r}")
        return lo, hi
    size = parse_size(text)
    return int(size * 0.95), int(size * 1.05)


def ip4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def _words(b: bytes) -> int:
    return int.from_bytes(b, "big") % 65535


# -- TCP/IP frames ------------------------------------------------------------------------------

class Side:
    """One direction of a connection: addresses, sequence numbers, precomputed checksum parts."""

    __slots__ = ("macs", "src", "dst", "sport", "dport", "ttl", "ipid", "ip_const", "tcp_const",
                 "seq", "win", "tsbase", "tsval", "peer", "ack_delay", "rate")

    def __init__(self, src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int,
                 dport: int, ttl: int, isn: int, ipid: int, tsbase: int, win: int) -> None:
        self.macs = dst_mac + src_mac
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.ttl = ttl
        self.ipid = ipid
        # IPv4 header words that never change: version/ihl/tos, DF, ttl/proto, addresses.
        self.ip_const = (0x4500 + 0x4000 + (ttl << 8 | 6) + _words(src) + _words(dst)) % 65535
        # TCP pseudo-header + header words that never change: addresses, proto, ports, the
        # option kinds (NOP NOP, TS 10).
        self.tcp_const = (_words(src) + _words(dst) + 6 + sport + dport + 0x0101 + 0x080A) % 65535
        self.seq = isn
        self.win = win
        self.tsbase = tsbase
        self.tsval = 0  # the last TSval sent: the peer echoes it
        self.peer: Side = self
        self.ack_delay = 30_000
        self.rate = 1e9

    def frame(self, flags: int, payload: bytes, ts_ns: int) -> bytes:
        """One Ethernet frame from this side carrying `payload`; advances seq."""
        plen = len(payload)
        tot = 52 + plen
        ipid = self.ipid = (self.ipid + 1) & 0xFFFF
        s = (self.ip_const + tot + ipid) % 65535
        ipck = 65535 - s if s else 0
        ms = ts_ns // 1_000_000
        tsval = self.tsval = (self.tsbase + ms) & 0xFFFFFFFF
        peer = self.peer
        tsecr = peer.tsval
        seq = self.seq
        ack = peer.seq
        win = self.win
        p = int.from_bytes(payload, "big") % 65535 if plen else 0
        if plen & 1:
            p = (p << 8) % 65535
        s = (self.tcp_const + 32 + plen + seq + ack + (0x8000 | flags) + win + tsval + tsecr
             + p) % 65535
        tcpck = 65535 - s if s else 0
        self.seq = (seq + plen + (flags & FIN)) & 0xFFFFFFFF
        return FRAME_HDR.pack(self.macs, 0x0800, 0x45, 0, tot, ipid, 0x4000, self.ttl, 6, ipck,
                              self.src, self.dst, self.sport, self.dport, seq, ack, 0x80, flags,
                              win, tcpck, 0, 1, 1, 8, 10, tsval, tsecr) + payload

    def syn(self, flags: int, ts_ns: int) -> bytes:
        """SYN or SYN-ACK with MSS 1460, SACK permitted, timestamps, window scale 7."""
        tot = 60
        ipid = self.ipid = (self.ipid + 1) & 0xFFFF
        s = (self.ip_const + tot + ipid) % 65535
        ipck = 65535 - s if s else 0
        tsval = self.tsval = (self.tsbase + ts_ns // 1_000_000) & 0xFFFFFFFF
        ack = self.peer.seq if flags & ACK else 0
        tsecr = self.peer.tsval if flags & ACK else 0
        args = [self.macs, 0x0800, 0x45, 0, tot, ipid, 0x4000, self.ttl, 6, ipck, self.src,
                self.dst, self.sport, self.dport, self.seq, ack, 0xA0, flags, 64240, 0, 0,
                2, 4, 1460, 4, 2, 8, 10, tsval, tsecr, 1, 3, 3, 7]
        raw = SYN_HDR.pack(*args)
        tcp = raw[34:]
        s = (_words(self.src) + _words(self.dst) + 6 + len(tcp) + _words(tcp)) % 65535
        args[19] = 65535 - s if s else 0
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return SYN_HDR.pack(*args)


# -- HTTP messages ------------------------------------------------------------------------------

@dataclass
class Txn:
    """One request/response pair as written (also the sidecar record)."""

    id: int
    conn: int
    method: str
    uri: str
    status: int
    req_head: bytes
    req_body: bytes | int  # bytes, or a length of pseudo-random body
    resp_head: bytes
    resp_body: bytes | int
    marks: dict[str, int] = field(default_factory=dict)

    def record(self, client: str, cport: int) -> dict:
        rb = self.req_body if isinstance(self.req_body, int) else len(self.req_body)
        sb = self.resp_body if isinstance(self.resp_body, int) else len(self.resp_body)
        return {"id": self.id, "conn": self.conn, "client": client, "client_port": cport,
                "method": self.method, "uri": self.uri, "status": self.status,
                "request_body_bytes": rb, "response_body_bytes": sb, **self.marks}


def http_date(ts_ns: int) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(ts_ns // 1_000_000_000))


def request_head(method: str, uri: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {uri} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response_head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


REASONS = {200: "OK", 201: "Created", 202: "Accepted", 401: "Unauthorized", 404: "Not Found"}


# -- connections --------------------------------------------------------------------------------

@dataclass
class Client:
    ip: str
    mac: bytes
    ua: str
    auth: str | None
    next_port: int
    routed: bool


class Workload:
    """Plans connections (scripts of HTTP exchanges) from one seeded random generator."""

    def __init__(self, seed: int, blob_lo: int, blob_hi: int) -> None:
        self.rng = rng = random.Random(seed)
        base = rng.randbytes(POOL_SIZE)
        self.pool = base + base[:MSS]
        self.blob_lo, self.blob_hi = blob_lo, blob_hi
        self.clients: list[Client] = []
        for i in range(36):
            if i < 24:
                ip = f"10.1.{i // 10}.{11 + i}"
                routed = False
            else:
                ip = f"10.2.{3 + i % 3}.{100 + i}"
                routed = True
            mac = bytes.fromhex("0242") + ip4(ip)
            auth = None
            if rng.random() < 0.45:
                user = USERS[i % len(USERS)]
                token = base64.b64encode(f"{user}:{FAKE_PASSWORD}".encode()).decode()
                auth = f"Basic {token}"
            self.clients.append(Client(ip, mac, rng.choice(UAS), auth,
                                       rng.randint(33000, 52000), routed))
        self.txn_id = 0
        self.conn_id = 0
        self.records: list[dict] = []
        self.digests = {repo: [self.digest() for _ in range(6)] for repo in REPOS}

    # random bits -------------------------------------------------------------------------------

    def digest(self) -> str:
        return "sha256:" + self.rng.randbytes(32).hex()

    def blob_size(self) -> int:
        lo, hi = self.blob_lo, self.blob_hi
        if hi <= lo * 1.2:
            return self.rng.randint(lo, hi)
        return int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def state_token(self, repo: str, uuid: str, offset: int) -> str:
        blob = json.dumps({"Name": repo, "UUID": uuid, "Offset": offset,
                           "StartedAt": "2026-12-01T10:00:00Z"}, separators=(",", ":"))
        mac = base64.urlsafe_b64encode(self.rng.randbytes(32)).decode().rstrip("=")
        return mac + base64.urlsafe_b64encode(blob.encode()).decode().replace("=", "%3D")

    def uuid(self) -> str:
        h = self.rng.randbytes(16).hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    # transactions ------------------------------------------------------------------------------

    def txn(self, conn: int, method: str, uri: str, req_headers: list[tuple[str, str]],
            req_body: bytes | int, status: int, resp_headers: list[tuple[str, str]],
            resp_body: bytes | int, client: Client, close: bool = False,
            head_only_length: int | None = None, anonymous: bool = False) -> Txn:
        """Build a transaction; Content-Length headers are added from the bodies."""
        rh = [("User-Agent", client.ua)]
        if client.auth and not anonymous:
            rh.append(("Authorization", client.auth))
        rh += req_headers
        req_len = req_body if isinstance(req_body, int) else len(req_body)
        if method in ("POST", "PUT", "PATCH"):
            rh.append(("Content-Length", str(req_len)))
        if close:
            rh.append(("Connection", "close"))
        resp_len = resp_body if isinstance(resp_body, int) else len(resp_body)
        sh = list(resp_headers)
        sh.append(("Content-Length", str(head_only_length if head_only_length is not None
                                         else resp_len)))
        sh.append(("Docker-Distribution-Api-Version", "registry/2.0"))
        sh.append(("Date", "%DATE%"))
        if close:
            sh.append(("Connection", "close"))
        self.txn_id += 1
        return Txn(self.txn_id, conn, method, uri, status, request_head(method, uri, rh),
                   req_body, response_head(status, REASONS[status], sh), resp_body)

    def login(self, conn: int, c: Client) -> list[Txn]:
        """GET /v2/: a 401 challenge, then 200 with credentials (or just 401 when anonymous)."""
        challenge = [("Content-Type", "application/json; charset=utf-8"),
                     ("Www-Authenticate", 'Basic realm="registry-bench"')]
        first = self.txn(conn, "GET", "/v2/", [], b"", 401, challenge, ERR_UNAUTHORIZED, c,
                         anonymous=True)
        if not c.auth:
            return [first]
        second = self.txn(conn, "GET", "/v2/", [], b"", 200,
                          [("Content-Type", "application/json; charset=utf-8")], b"{}", c)
        return [first, second]

    def manifest_body(self, repo: str, layers: list[tuple[str, int]], config: tuple[str, int]
                      ) -> bytes:
        doc = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
               "config": {"mediaType": MT_CONFIG, "size": config[1], "digest": config[0]},
               "layers": [{"mediaType": MT_LAYER, "size": n, "digest": d} for d, n in layers]}
        return json.dumps(doc, indent=3).encode()

    def blob_get(self, conn: int, c: Client, repo: str, digest: str, size: int,
                 close: bool = False) -> Txn:
        return self.txn(conn, "GET", f"/v2/{repo}/blobs/{digest}", [], b"", 200,
                        [("Accept-Ranges", "bytes"), ("Cache-Control", "max-age=31536000"),
                         ("Content-Type", "application/octet-stream"),
                         ("Docker-Content-Digest", digest), ("Etag", f'"{digest}"'),
                         ("X-Content-Type-Options", "nosniff")], size, c, close=close)

    def manifest_get(self, conn: int, c: Client, repo: str, ref: str, method: str = "GET",
                     exists: bool = True) -> Txn:
        accept = [("Accept", f"{MT_MANIFEST}, {MT_OCI}, "
                             "application/vnd.docker.distribution.manifest.list.v2+json")]
        if not exists:
            body = ERR_MANIFEST_UNKNOWN % ref.encode()
            return self.txn(conn, method, f"/v2/{repo}/manifests/{ref}", accept, b"", 404,
                            [("Content-Type", "application/json; charset=utf-8")],
                            body if method == "GET" else b"", c,
                            head_only_length=len(body) if method == "HEAD" else None)
        layers = [(self.digest(), self.blob_size()) for _ in range(self.rng.randint(1, 4))]
        body = self.manifest_body(repo, layers, (self.digest(), self.rng.randint(1500, 9000)))
        digest = self.digest()
        return self.txn(conn, method, f"/v2/{repo}/manifests/{ref}", accept, b"", 200,
                        [("Content-Type", MT_MANIFEST), ("Docker-Content-Digest", digest),
                         ("Etag", f'"{digest}"')], body if method == "GET" else b"", c,
                        head_only_length=len(body) if method == "HEAD" else None)

    def tags_list(self, conn: int, c: Client, repo: str) -> Txn:
        tags = sorted(self.rng.sample(TAGS, self.rng.randint(1, len(TAGS))))
        body = json.dumps({"name": repo, "tags": tags}).encode() + b"\n"
        return self.txn(conn, "GET", f"/v2/{repo}/tags/list", [], b"", 200,
                        [("Content-Type", "application/json; charset=utf-8")], body, c)

    def upload(self, conn: int, c: Client, repo: str, size: int) -> list[Txn]:
        """HEAD 404, POST 202, PATCH 202, PUT 201: one monolithic-chunk blob upload."""
        digest = self.digest()
        hexd = digest.split(":")[1]
        miss = ERR_BLOB_UNKNOWN % hexd.encode()
        out = [self.txn(conn, "HEAD", f"/v2/{repo}/blobs/{digest}", [], b"", 404,
                        [("Content-Type", "application/json; charset=utf-8")], b"", c,
                        head_only_length=len(miss))]
        uuid = self.uuid()
        loc = f"/v2/{repo}/blobs/uploads/{uuid}?_state={self.state_token(repo, uuid, 0)}"
        out.append(self.txn(conn, "POST", f"/v2/{repo}/blobs/uploads/", [], b"", 202,
                            [("Docker-Upload-Uuid", uuid), ("Location", f"http://{HOST}{loc}"),
                             ("Range", "0-0")], b"", c))
        loc2 = f"/v2/{repo}/blobs/uploads/{uuid}?_state={self.state_token(repo, uuid, size)}"
        out.append(self.txn(conn, "PATCH", loc, [("Content-Type", "application/octet-stream")],
                            size, 202, [("Docker-Upload-Uuid", uuid),
                                        ("Location", f"http://{HOST}{loc2}"),
                                        ("Range", f"0-{size - 1}")], b"", c))
        out.append(self.txn(conn, "PUT", f"{loc2}&digest=sha256%3A{hexd}",
                            [("Content-Type", "application/octet-stream")], b"", 201,
                            [("Docker-Content-Digest", digest),
                             ("Location", f"http://{HOST}/v2/{repo}/blobs/{digest}")], b"", c))
        return out

    # connection scripts ------------------------------------------------------------------------
    # A script is a list of steps: ("seq", [txn...]) sequential keep-alive exchanges,
    # ("pipe", [txn...]) requests written together then answered in order, and finally
    # ("close", "client"|"server").

    KINDS = (("pull", 15), ("blob", 10), ("push", 9), ("catalog", 7), ("pipelined", 7),
             ("manifest", 30), ("probe", 22))

    def plan(self, budget: int) -> tuple[Client, int, list[tuple[str, object]]]:
        """The next connection; layer blobs stop once `budget` bytes are used (min. one)."""
        rng = self.rng
        self.conn_id += 1
        conn = self.conn_id
        c = rng.choice(self.clients)
        kind = rng.choices([k for k, _ in self.KINDS], [w for _, w in self.KINDS])[0]
        repo = rng.choice(REPOS)
        steps: list[tuple[str, object]] = []
        if kind == "pull":
            txns = self.login(conn, c) if rng.random() < 0.5 else []
            tag = rng.choice(TAGS)
            txns.append(self.manifest_get(conn, c, repo, tag, "HEAD"))
            txns.append(self.manifest_get(conn, c, repo, self.digest()))
            txns.append(self.blob_get(conn, c, repo, self.digest(), rng.randint(1500, 9000)))
            used = 0
            for _ in range(rng.randint(1, 3)):
                if used >= budget:
                    break
                size = self.blob_size()
                used += size
                txns.append(self.blob_get(conn, c, repo, self.digest(), size))
            steps = [("seq", txns), ("close", "client")]
        elif kind == "blob":
            steps = [("seq", [self.blob_get(conn, c, repo, rng.choice(self.digests[repo]),
                                            self.blob_size(), close=True)]), ("close", "server")]
        elif kind == "push":
            txns = self.login(conn, c) if c.auth else []
            layers = []
            used = 0
            for _ in range(rng.randint(1, 2)):
                if used >= budget:
                    break
                size = self.blob_size()
                used += size
                up = self.upload(conn, c, repo, size)
                layers.append((up[-1].uri.rsplit("%3A", 1)[1], size))
                txns += up
            if rng.random() < 0.3:  # cross-repo mount of a base layer
                d = rng.choice(self.digests["library/alpine"])
                txns.append(self.txn(conn, "POST", f"/v2/{repo}/blobs/uploads/?mount={d}"
                                     "&from=library/alpine", [], b"", 201,
                                     [("Docker-Content-Digest", d),
                                      ("Location", f"http://{HOST}/v2/{repo}/blobs/{d}")],
                                     b"", c))
            cfg_size = rng.randint(1500, 9000)
            txns += self.upload(conn, c, repo, cfg_size)
            body = self.manifest_body(repo, [("sha256:" + h, n) for h, n in layers],
                                      (self.digest(), cfg_size))
            mdig = self.digest()
            tag = rng.choice(TAGS)
            txns.append(self.txn(conn, "PUT", f"/v2/{repo}/manifests/{tag}",
                                 [("Content-Type", MT_MANIFEST)], body, 201,
                                 [("Docker-Content-Digest", mdig),
                                  ("Location", f"http://{HOST}/v2/{repo}/manifests/{mdig}")],
                                 b"", c))
            steps = [("seq", txns), ("close", "client")]
        elif kind == "catalog":
            repos = sorted(REPOS)
            body = json.dumps({"repositories": repos}).encode() + b"\n"
            txns = [self.txn(conn, "GET", "/v2/_catalog?n=100", [], b"", 200,
                             [("Content-Type", "application/json; charset=utf-8")], body, c)]
            txns += [self.tags_list(conn, c, r) for r in rng.sample(REPOS, rng.randint(2, 6))]
            steps = [("seq", txns), ("close", "client")]
        elif kind == "pipelined":
            txns = []
            for _ in range(rng.randint(3, 6)):
                r = rng.choice(REPOS)
                roll = rng.random()
                if roll < 0.4:
                    txns.append(self.manifest_get(conn, c, r, rng.choice(TAGS), "HEAD",
                                                  exists=rng.random() < 0.85))
                elif roll < 0.7:
                    txns.append(self.tags_list(conn, c, r))
                else:
                    txns.append(self.manifest_get(conn, c, r, rng.choice(TAGS)))
            steps = [("pipe", txns), ("close", "client")]
        elif kind == "manifest":
            method = rng.choice(("HEAD", "GET"))
            txn = self.manifest_get(conn, c, repo, rng.choice(TAGS), method,
                                    exists=rng.random() < 0.8)
            steps = [("seq", [txn]), ("close", "client")]
        else:  # probe
            steps = [("seq", self.login(conn, c)), ("close", "client")]
        port = c.next_port
        c.next_port = 32768 + (port + rng.randint(1, 7) - 32768) % 28232  # Linux's range
        return c, port, steps

    def estimate(self, steps: list[tuple[str, object]]) -> int:
        """Approximate pcap bytes for a script (payload + per-frame overhead + ACKs)."""
        total = 6 * 90
        for kind, txns in steps:
            if kind == "close":
                continue
            for t in txns:  # type: ignore[union-attr]
                for head, body in ((t.req_head, t.req_body), (t.resp_head, t.resp_body)):
                    n = len(head) + (body if isinstance(body, int) else len(body))
                    segs = -(-n // MSS)
                    total += n + segs * 82 + (segs // 2) * 82
        return total


def connection(w: Workload, c: Client, cport: int, steps: list, start_ns: int
               ) -> Generator[tuple[int, bytes, list | None], None, None]:
    """Yield (ts_ns, frame, marks) for one whole TCP connection, in time order."""
    rng = w.rng
    pool = w.pool
    rtt = rng.randint(150_000, 1_500_000)  # client <-> capture point, ns
    cli = Side(ROUTER_MAC if c.routed else c.mac, REGISTRY_MAC, ip4(c.ip), ip4(REGISTRY_IP),
               cport, PORT, 63 if c.routed else 64, rng.getrandbits(32), rng.getrandbits(16),
               rng.getrandbits(32), rng.choice((501, 1024, 2048, 3000)))
    srv = Side(REGISTRY_MAC, ROUTER_MAC if c.routed else c.mac, ip4(REGISTRY_IP), ip4(c.ip),
               PORT, cport, 64, rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(32),
               rng.choice((509, 1024, 2048, 3000)))
    cli.peer, srv.peer = srv, cli
    cli.ack_delay = rtt  # the client's ACKs reach the capture point one RTT after the data
    srv.ack_delay = rng.randint(15_000, 60_000)
    cli.rate = rng.choice((50e6, 100e6, 200e6, 400e6, 500e6))
    srv.rate = rng.choice((100e6, 250e6, 500e6, 800e6, 1e9))
    t = start_ns

    # handshake
    yield t, cli.syn(SYN, t), None
    t += srv.ack_delay
    yield t, srv.syn(SYN | ACK, t), None
    t += rtt
    yield t, cli.frame(ACK, b"", t), None
    t += rng.randint(20_000, 300_000)

    def send(side: Side, pieces: list, t: int, marks: dict[int, list], final_ack: bool
             ) -> Generator[tuple[int, bytes, list | None], None, int]:
        """One write: `pieces` (bytes or (shift, length) of pool bytes) in MSS segments, with
        the receiver's ACK every two segments. Returns the time after the last frame."""
        peer = side.peer
        delay = peer.ack_delay
        ns_per_byte = 8e9 / side.rate
        acks: list[tuple[int, int]] = []  # (ts, ack value) not yet emitted
        frame = side.frame
        total = sum(p if isinstance(p, int) else (len(p) if isinstance(p, bytes) else p[1])
                    for p in pieces)
        nseg = -(-total // MSS)
        pending = b""

        def chunks() -> Iterator[bytes]:
            nonlocal pending
            for p in pieces:
                if isinstance(p, bytes):
                    pending += p
                    while len(pending) >= MSS:
                        yield pending[:MSS]
                        pending = pending[MSS:]
                    continue
                shift, n = p
                o = 0
                if pending:
                    k = min(MSS - len(pending), n)
                    s = (shift + o) % POOL_SIZE
                    pending += pool[s:s + k]
                    o += k
                    if len(pending) == MSS:
                        yield pending
                        pending = b""
                while n - o >= MSS:
                    s = (shift + o) % POOL_SIZE
                    yield pool[s:s + MSS]
                    o += MSS
                if o < n:
                    s = (shift + o) % POOL_SIZE
                    pending = pool[s:s + n - o]
            if pending:
                yield pending

        for seg, payload in enumerate(chunks(), 1):
            while acks and acks[0][0] <= t:
                at, av = acks.pop(0)
                saved = side.seq
                side.seq = av
                yield at, peer.frame(ACK, b"", at), None
                side.seq = saved
            flags = ACK | PSH if seg == nseg else ACK
            yield t, frame(flags, payload, t), marks.get(seg)
            t += int((len(payload) + 66) * ns_per_byte) + 1
            if not seg & 1 or (seg == nseg and final_ack):
                acks.append((t + delay, side.seq))
        last = t
        for at, av in acks:
            saved = side.seq
            side.seq = av
            yield at, peer.frame(ACK, b"", at), None
            side.seq = saved
            last = max(last, at)
        return last

    def pieces_of(msgs: list[tuple[Txn, str]]) -> tuple[list, dict[int, list]]:
        """Pieces of one write and the segment numbers where each message starts/ends."""
        pieces: list = []
        marks: dict[int, list] = {}
        off = 0
        for txn, role in msgs:
            if role == "req":
                head, body = txn.req_head, txn.req_body
            else:
                head, body = txn.resp_head.replace(b"%DATE%", http_date(t).encode()), \
                    txn.resp_body
            n = len(head) + (body if isinstance(body, int) else len(body))
            marks.setdefault(off // MSS + 1, []).append((txn, role + "_first"))
            marks.setdefault((off + n - 1) // MSS + 1, []).append((txn, role + "_last"))
            pieces.append(head)
            if isinstance(body, int):
                if body:
                    pieces.append((rng.randrange(POOL_SIZE), body))
            elif body:
                pieces.append(body)
            off += n
        return pieces, marks

    for kind, txns in steps:
        if kind == "close":
            if txns == "server":
                first, second = srv, cli
                t += rng.randint(5_000, 50_000)
            else:
                first, second = cli, srv
                t += rng.randint(100_000, 3_000_000)
            yield t, first.frame(FIN | ACK, b"", t), None
            t += second.ack_delay
            yield t, second.frame(FIN | ACK, b"", t), None
            t += first.ack_delay
            yield t, first.frame(ACK, b"", t), None
            return
        groups = [[x] for x in txns] if kind == "seq" else [list(txns)]
        for group in groups:
            pieces, marks = pieces_of([(x, "req") for x in group])
            t = yield from send(cli, pieces, t, marks, final_ack=False)
            for x in group:
                t += srv.ack_delay + rng.randint(50_000, 800_000)  # server think time
                if x.method == "PUT" and "digest=" in x.uri:
                    t += rng.randint(2_000_000, 8_000_000)  # digest verification
                pieces, marks = pieces_of([(x, "resp")])
                t = yield from send(srv, pieces, t, marks, final_ack=True)
            t += rng.randint(50_000, 2_000_000)  # client think time


def generate(path: Path, size: int, blob: tuple[int, int], seed: int, concurrency: int = 6,
             sidecar: Path | None = None, quiet: bool = False) -> dict:
    """Write the workload to `path` and its sidecar; return the sidecar's summary."""
    w = Workload(seed, *blob)
    rng = w.rng
    sidecar = sidecar or path.with_suffix(".json")
    tmp = path.with_name(path.name + ".part")
    heap: list = []
    planned = 24
    t_next = START_EPOCH * 1_000_000_000
    conns = 0
    clients: dict[int, tuple[str, int]] = {}
    all_txns: list[Txn] = []

    def start(at: int) -> bool:
        nonlocal planned, conns
        if planned >= size:
            return False
        c, port, steps = w.plan(size - planned)
        planned += w.estimate(steps)
        conns += 1
        clients[w.conn_id] = (c.ip, port)
        for kind, txns in steps:
            if kind != "close":
                all_txns.extend(txns)  # type: ignore[arg-type]
        gen = connection(w, c, port, steps, at)
        item = next(gen)
        heapq.heappush(heap, (item[0], w.conn_id, item[1], item[2], gen))
        return True

    for _ in range(concurrency):
        if not start(t_next):
            break
        t_next += rng.randint(100_000, 5_000_000)

    packets = 0
    frame_bytes = 0
    last_us = 0
    started = time.monotonic()
    rec = PCAP_REC.pack
    with open(tmp, "wb", buffering=16 << 20) as fh:
        fh.write(PCAP_FILE_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        write = fh.write
        while heap:
            ts, cid, frame, marks, gen = heapq.heappop(heap)
            us = ts // 1000
            if us < last_us:  # cannot happen: each connection is in order, the heap merges
                raise AssertionError("timestamps went back")
            last_us = us
            n = len(frame)
            write(rec(us // 1_000_000, us % 1_000_000, n, n))
            write(frame)
            packets += 1
            frame_bytes += n
            if marks:
                for txn, what in marks:
                    txn.marks.setdefault(what, packets)  # 1-based packet number
            try:
                item = next(gen)
            except StopIteration:
                start(ts + int(rng.expovariate(1 / 3_000_000)))
                continue
            heapq.heappush(heap, (item[0], cid, item[1], item[2], gen))
            if not quiet and packets % 200_000 == 0:
                sys.stderr.write(f"\r{fh.tell() / 1e6:,.0f} MB, {packets:,} packets ")
                sys.stderr.flush()
        file_bytes = fh.tell()
    os.replace(tmp, path)
    if not quiet:
        sys.stderr.write(f"\r{file_bytes / 1e6:,.1f} MB, {packets:,} packets, {conns} "
                         f"connections, {len(all_txns)} transactions in "
                         f"{time.monotonic() - started:.1f} s\n")
    methods: dict[str, int] = {}
    for txn in all_txns:
        methods[txn.method] = methods.get(txn.method, 0) + 1
    summary = {
        "generator_version": GENERATOR_VERSION,
        "file": str(path),
        "seed": seed,
        "size_target": size,
        "blob_size": list(blob),
        "packets": packets,
        "frame_bytes": frame_bytes,
        "file_bytes": file_bytes,
        "connections": conns,
        "transactions": len(all_txns),
        "methods": dict(sorted(methods.items())),
        "first_ts": START_EPOCH,
        "last_ts": last_us / 1e6,
    }
    doc = dict(summary)
    doc["txns"] = [t.record(*clients[t.conn]) for t in all_txns]
    tmp_side = sidecar.with_name(sidecar.name + ".part")
    tmp_side.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp_side, sidecar)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", type=Path, help="the pcap to write (sidecar: same name, .json)")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"),
                    help="approximate capture size (default 1G; K/M/G are binary)")
    ap.add_argument("--blob-size", type=parse_blob_size, default=parse_blob_size("1M-16M"),
                    help="layer blob size: one size (+-5%%) or LO-HI log-uniform "
                         "(default 1M-16M)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--concurrency", type=int, default=6,
                    help="connections open at once, interleaved (default 6)")
    ap.add_argument("--sidecar", type=Path, help="where to write the JSON of expectations")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary = generate(args.output, args.size, args.blob_size, args.seed, args.concurrency,
                       args.sidecar, args.quiet)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
