"""Shared helpers for crafted-capture tests: TCP conversations built segment by segment.

A `Conn` keeps both sides' sequence numbers and hands out `Seg` records (handshake, data split
into segments, pure ACKs, FIN, RST) with correct seq/ack values. Tests compose, drop, reorder,
duplicate or alter those records as plain lists, then turn them into captured frames with
`frames()` (scapy, any link layer) or `fast_frames()` (struct, Ethernet/IPv4, for the tests that
need thousands of frames), and run them through the engine with `run()`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import cycle

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP, IPOption_NOP, IPOption_RR  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop  # noqa: E402
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether, Loopback  # noqa: E402
from scapy.layers.tls.all import TLS, TLSClientHello, TLSServerHello  # noqa: E402
from scapy.layers.tls.extensions import (  # noqa: E402
    ServerName,
    TLS_Ext_ServerName,
    TLS_Ext_SupportedVersion_CH,
)
from scapy.packet import Packet, Raw  # noqa: E402

from sensor.detect.detector import Detector  # noqa: E402
from sensor.engine import Engine, EngineSettings  # noqa: E402
from sensor.records import Anomaly, Finding, Transaction  # noqa: E402

CLIENT_IP = "10.20.0.5"
SERVER_IP = "10.20.0.9"
CLIENT_IP6 = "2001:db8::5"
SERVER_IP6 = "2001:db8::9"
CLIENT_PORT = 49152
SERVER_PORT = 5000
CLIENT_MAC = "02:00:00:00:00:05"
SERVER_MAC = "02:00:00:00:00:09"
KEY = b"k" * 32
T0 = 1_700_000_000.0
STEP = 0.001

SEQ_MASK = 0xFFFFFFFF

# Link types (tcpdump.org/linktypes.html).
LT_NULL, LT_ETHERNET, LT_RAW, LT_SLL, LT_SLL2 = 0, 1, 101, 113, 276


# -- segments -----------------------------------------------------------------------------


@dataclass
class Seg:
    """One TCP segment of a crafted conversation (ts None: assigned from its place in a list)."""

    from_client: bool
    seq: int
    ack: int
    flags: str  # scapy notation: S, SA, A, PA, FA, R, RA ...
    payload: bytes = b""
    ts: float | None = None

    def altered(self, payload: bytes | None = None, **changes) -> Seg:
        """A copy with other payload (same seq) or other fields."""
        if payload is not None:
            changes["payload"] = payload
        return replace(self, **changes)


class Conn:
    """Both sides of one TCP connection: sequence numbers in, Seg records out."""

    def __init__(self, client_isn: int = 1000, server_isn: int = 7_000_000) -> None:
        self.client_isn = client_isn & SEQ_MASK
        self.server_isn = server_isn & SEQ_MASK
        self.cseq = self.client_isn  # next sequence number each side sends
        self.sseq = self.server_isn

    def _next(self, from_client: bool) -> int:
        return self.cseq if from_client else self.sseq

    def _advance(self, from_client: bool, n: int) -> None:
        if from_client:
            self.cseq = (self.cseq + n) & SEQ_MASK
        else:
            self.sseq = (self.sseq + n) & SEQ_MASK

    def _ack_of(self, from_client: bool) -> int:
        """What a side acknowledges: everything its peer has sent so far."""
        return self.sseq if from_client else self.cseq

    def handshake(self) -> list[Seg]:
        syn = Seg(True, self.cseq, 0, "S")
        self._advance(True, 1)
        syn_ack = Seg(False, self.sseq, self.cseq, "SA")
        self._advance(False, 1)
        return [syn, syn_ack, self.ack(True)]

    def data(self, from_client: bool, payload: bytes, segment_size: int | None = 1448,
             sizes: Iterable[int] | None = None, ack: bool = True) -> list[Seg]:
        """`payload` sent in segments (of segment_size bytes, or of the sizes given, cycled),
        followed by a pure ACK from the peer when `ack`."""
        out = []
        size_iter: Iterator[int] = (cycle(sizes) if sizes is not None
                                    else cycle([segment_size or len(payload) or 1]))
        pos = 0
        while pos < len(payload):
            n = max(1, next(size_iter))
            chunk = payload[pos:pos + n]
            out.append(Seg(from_client, self._next(from_client), self._ack_of(from_client), "PA",
                           chunk))
            self._advance(from_client, len(chunk))
            pos += len(chunk)
        if ack:
            out.append(self.ack(not from_client))
        return out

    def ack(self, from_client: bool) -> Seg:
        """A pure ACK from one side."""
        return Seg(from_client, self._next(from_client), self._ack_of(from_client), "A")

    def fin(self, from_client: bool, ack: bool = True) -> list[Seg]:
        out = [Seg(from_client, self._next(from_client), self._ack_of(from_client), "FA")]
        self._advance(from_client, 1)
        if ack:
            out.append(self.ack(not from_client))
        return out

    def close(self) -> list[Seg]:
        """Client FIN, server FIN, last ACK."""
        return self.fin(True, ack=False) + self.fin(False, ack=False) + [self.ack(True)]

    def rst(self, from_client: bool) -> Seg:
        return Seg(from_client, self._next(from_client), self._ack_of(from_client), "RA")


def tcp_flow(exchanges: Sequence[tuple[bytes, bytes]], segment_size: int | None = 1448,
             handshake: bool = True, close: bool = True, client_isn: int = 1000,
             server_isn: int = 7_000_000, conn: Conn | None = None) -> list[Seg]:
    """A whole connection: handshake, each (request bytes, response bytes) in turn, FIN/FIN/ACK."""
    c = conn or Conn(client_isn, server_isn)
    segs = c.handshake() if handshake else []
    for request, response in exchanges:
        if request:
            segs += c.data(True, request, segment_size)
        if response:
            segs += c.data(False, response, segment_size)
    if close:
        segs += c.close()
    return segs


def data_segs(segs: Sequence[Seg], from_client: bool | None = None) -> list[int]:
    """Indices of the segments that carry payload (from one side, or either)."""
    return [i for i, s in enumerate(segs)
            if s.payload and (from_client is None or s.from_client == from_client)]


def drop(segs: Sequence[Seg], *indices: int) -> list[Seg]:
    gone = set(indices)
    return [s for i, s in enumerate(segs) if i not in gone]


def swap(segs: Sequence[Seg], i: int, j: int) -> list[Seg]:
    out = list(segs)
    out[i], out[j] = out[j], out[i]
    return out


def duplicate(segs: Sequence[Seg], i: int, at: int | None = None,
              payload: bytes | None = None) -> list[Seg]:
    """Insert a retransmission of segment i (optionally with other bytes) at position `at`."""
    out = list(segs)
    out.insert(i + 1 if at is None else at, segs[i].altered(payload))
    return out


# -- frames -------------------------------------------------------------------------------


@dataclass
class Endpoints:
    client: str = CLIENT_IP
    server: str = SERVER_IP
    cport: int = CLIENT_PORT
    sport: int = SERVER_PORT


def _ip_layer(src: str, dst: str, ip: str) -> Packet:
    if ip == "4":
        return IP(src=src, dst=dst)
    if ip == "4opt":  # IPv4 with options: ihl > 5
        return IP(src=src, dst=dst, options=[IPOption_NOP(), IPOption_RR(routers=["1.1.1.1"])])
    if ip == "6":
        return IPv6(src=src, dst=dst)
    if ip == "6ext":  # hop-by-hop and destination options before TCP
        return IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    raise ValueError(ip)


def _link(l3: Packet, link: str, from_client: bool) -> tuple[int, Packet]:
    src_mac, dst_mac = (CLIENT_MAC, SERVER_MAC) if from_client else (SERVER_MAC, CLIENT_MAC)
    v6 = IPv6 in l3
    etype = 0x86DD if v6 else 0x0800
    if link == "ether":
        return LT_ETHERNET, Ether(src=src_mac, dst=dst_mac) / l3
    if link == "vlan":
        return LT_ETHERNET, Ether(src=src_mac, dst=dst_mac) / Dot1Q(vlan=42) / l3
    if link == "qinq":
        return LT_ETHERNET, (Ether(src=src_mac, dst=dst_mac) / Dot1AD(vlan=100)
                             / Dot1Q(vlan=42) / l3)
    if link == "sll":
        return LT_SLL, CookedLinux(pkttype=0 if not from_client else 4, lladdrtype=1,
                                   lladdrlen=6, src=src_mac.replace(":", "").encode(),
                                   proto=etype) / l3
    if link == "sll2":
        return LT_SLL2, CookedLinuxV2(proto=etype, ifindex=2, lladdrtype=1, lladdrlen=6,
                                      pkttype=0) / l3
    if link == "raw":
        return LT_RAW, l3
    if link == "null":  # BSD loopback: address family in host (here little-endian) order
        return LT_NULL, Loopback(type=30 if v6 else 2) / l3
    raise ValueError(link)


def scapy_packet(seg: Seg, link: str = "ether", ip: str = "4",
                 ends: Endpoints | None = None) -> tuple[int, Packet]:
    e = ends or (Endpoints(CLIENT_IP6, SERVER_IP6) if ip.startswith("6") else Endpoints())
    src, dst, sport, dport = ((e.client, e.server, e.cport, e.sport) if seg.from_client
                              else (e.server, e.client, e.sport, e.cport))
    l4 = TCP(sport=sport, dport=dport, seq=seg.seq, ack=seg.ack, flags=seg.flags, window=65535)
    if seg.payload:
        l4 = l4 / Raw(seg.payload)
    return _link(_ip_layer(src, dst, ip) / l4, link, seg.from_client)


def timestamps(segs: Sequence[Seg], t0: float = T0, step: float = STEP) -> list[float]:
    """Each segment's time: its own ts, or t0 + its place in the list times step."""
    return [s.ts if s.ts is not None else t0 + i * step for i, s in enumerate(segs)]


def frames(segs: Sequence[Seg], link: str = "ether", ip: str = "4",
           ends: Endpoints | None = None, t0: float = T0,
           step: float = STEP) -> list[tuple[float, int, bytes]]:
    """(ts, linktype, frame bytes) for each segment, built with scapy."""
    out = []
    for ts, seg in zip(timestamps(segs, t0, step), segs, strict=True):
        linktype, pkt = scapy_packet(seg, link, ip, ends)
        out.append((ts, linktype, bytes(pkt)))
    return out


_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20}
_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def fast_frame(seg: Seg, ends: Endpoints | None = None) -> bytes:
    """The Ethernet/IPv4/TCP frame scapy would build for `seg`, built with struct (fast)."""
    e = ends or Endpoints()
    c_ip, s_ip = bytes(map(int, e.client.split("."))), bytes(map(int, e.server.split(".")))
    if seg.from_client:
        src, dst, sport, dport, smac, dmac = c_ip, s_ip, e.cport, e.sport, CLIENT_MAC, SERVER_MAC
    else:
        src, dst, sport, dport, smac, dmac = s_ip, c_ip, e.sport, e.cport, SERVER_MAC, CLIENT_MAC
    flags = 0
    for ch in seg.flags:
        flags |= _FLAG_BITS[ch]
    tcp = _TCP.pack(sport, dport, seg.seq, seg.ack, 5 << 4, flags, 65535, 0, 0) + seg.payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    total = 20 + len(tcp)
    iph = _IPV4.pack(0x45, 0, total, 1, 0, 64, 6, 0, src, dst)
    iph = iph[:10] + struct.pack("!H", _csum(iph)) + iph[12:]
    return _ETH.pack(_mac(dmac), _mac(smac), 0x0800) + iph + tcp


def fast_frames(segs: Sequence[Seg], ends: Endpoints | None = None, t0: float = T0,
                step: float = STEP) -> list[tuple[float, int, bytes]]:
    return [(ts, LT_ETHERNET, fast_frame(seg, ends))
            for ts, seg in zip(timestamps(segs, t0, step), segs, strict=True)]


# -- running the engine ---------------------------------------------------------------------


@dataclass
class Recorder:
    """The engine's output object: keeps every record."""

    transactions: list[Transaction] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)

    def transaction(self, txn: Transaction) -> None:
        self.transactions.append(txn)

    def finding(self, finding: Finding) -> None:
        self.findings.append(finding)

    def anomaly(self, anomaly: Anomaly) -> None:
        self.anomalies.append(anomaly)

    @property
    def kinds(self) -> list[str]:
        return [a.kind for a in self.anomalies]

    @property
    def http(self) -> list[Transaction]:
        return [t for t in self.transactions if t.transport == "http"]


def make_engine(settings: EngineSettings | None = None) -> tuple[Engine, Recorder]:
    out = Recorder()
    return Engine(settings or EngineSettings(), KEY, Detector([]), out), out


def run(frame_list: Iterable[tuple[float, int, bytes]], settings: EngineSettings | None = None,
        finish: bool = True) -> tuple[Engine, Recorder]:
    """Feed frames to a fresh engine (then end the input when `finish`)."""
    engine, out = make_engine(settings)
    for ts, linktype, buf in frame_list:
        engine.packet(ts, linktype, buf)
    if finish:
        engine.finish()
    return engine, out


def run_segs(segs: Sequence[Seg], **kwargs) -> tuple[Engine, Recorder]:
    """Segments → fast Ethernet/IPv4 frames → engine."""
    settings = kwargs.pop("settings", None)
    finish = kwargs.pop("finish", True)
    return run(fast_frames(segs, **kwargs), settings, finish)


def without_times(txn: Transaction) -> Transaction:
    return replace(txn, ts=0.0, response_ts=None)


# -- HTTP and TLS payloads ----------------------------------------------------------------------


def request(method: str, uri: str, headers: Sequence[tuple[str, str]] = (),
            body: bytes = b"", host: str = "registry.example:5000",
            content_length: bool | None = None) -> bytes:
    """An HTTP/1.1 request; Content-Length added when there is a body (or when asked)."""
    lines = [f"{method} {uri} HTTP/1.1", f"Host: {host}", "User-Agent: docker/24.0.7"]
    lines += [f"{k}: {v}" for k, v in headers]
    if content_length or (content_length is None and body):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def response(status: int, reason: str = "", headers: Sequence[tuple[str, str]] = (),
             body: bytes = b"", content_length: bool | None = None) -> bytes:
    """An HTTP/1.1 response; Content-Length added when there is a body (or when asked)."""
    lines = [f"HTTP/1.1 {status} {reason or 'X'}",
             "Docker-Distribution-Api-Version: registry/2.0"]
    lines += [f"{k}: {v}" for k, v in headers]
    if content_length or (content_length is None and body):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*chunks: bytes, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A chunked body: each chunk framed, then the last chunk and trailers."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return out + b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"


def client_hello(sni: str | None = "registry.example.com") -> bytes:
    ext = [TLS_Ext_SupportedVersion_CH(versions=[0x0304, 0x0303])]
    if sni is not None:
        ext.insert(0, TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())]))
    return bytes(TLS(msg=[TLSClientHello(ciphers=[0x1301, 0xC02F], ext=ext)]))


def server_hello() -> bytes:
    return bytes(TLS(msg=[TLSServerHello(cipher=0x1301)]))


DIGEST = "sha256:" + "ab" * 32
DIGEST2 = "sha256:" + "cd" * 32


# -- a registry session: login, push (chunked PATCH, Expect: 100-continue), list, delete ------

REPO = "team/app/worker"
UPLOAD_UUID = "6f3c1f4e-3b7a-4c59-9d0b-2b2a6a5f1e11"
LAYER = bytes(range(256)) * 12 + b"tail"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = (b'{"schemaVersion":2,"mediaType":"' + MANIFEST_TYPE.encode()
            + b'","config":{"digest":"' + DIGEST.encode() + b'","size":2},"layers":[]}')
AUTH = [("Authorization", "Basic YWxpY2U6czNjcmV0")]  # alice:s3cret
ERRORS = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
TAGS = (b'{"name":"team/app/worker",', b'"tags":["v1","v2"]}')
CATALOG = b'{"repositories":["team/app/worker"]}'


def registry_session() -> list[tuple[bytes, bytes]]:
    """Request/response byte pairs of one keep-alive connection (the last ends at FIN)."""
    up = f"/v2/{REPO}/blobs/uploads/{UPLOAD_UUID}"
    return [
        (request("GET", "/v2/"),
         response(401, "Unauthorized", [("WWW-Authenticate", 'Basic realm="Registry Realm"'),
                                        ("Content-Type", "application/json")], ERRORS)),
        (request("GET", "/v2/", AUTH), response(200, "OK", body=b"{}")),
        (request("HEAD", f"/v2/{REPO}/blobs/{DIGEST}", AUTH),
         response(404, "Not Found", [("Content-Length", "157")])),
        (request("POST", f"/v2/{REPO}/blobs/uploads/", AUTH, content_length=True),
         response(202, "Accepted", [("Location", up), ("Docker-Upload-UUID", UPLOAD_UUID),
                                    ("Range", "0-0")], content_length=True)),
        (request("PATCH", up, AUTH + [("Content-Type", "application/octet-stream"),
                                      ("Transfer-Encoding", "chunked")])
         + chunked(LAYER[:1000], LAYER[1000:1001], LAYER[1001:]),
         response(202, "Accepted", [("Location", up), ("Range", f"0-{len(LAYER) - 1}")],
                  content_length=True)),
        (request("PUT", f"{up}?digest={DIGEST}", AUTH, content_length=True),
         response(201, "Created", [("Location", f"/v2/{REPO}/blobs/{DIGEST}"),
                                   ("Docker-Content-Digest", DIGEST)], content_length=True)),
        (request("PUT", f"/v2/{REPO}/manifests/v1",
                 AUTH + [("Content-Type", MANIFEST_TYPE), ("Expect", "100-continue"),
                         ("Content-Length", str(len(MANIFEST)))]),
         b"HTTP/1.1 100 Continue\r\n\r\n"),
        (MANIFEST,
         response(201, "Created", [("Location", f"/v2/{REPO}/manifests/{DIGEST2}"),
                                   ("Docker-Content-Digest", DIGEST2)], content_length=True)),
        (request("GET", f"/v2/{REPO}/tags/list?n=50", AUTH),
         response(200, "OK", [("Content-Type", "application/json"),
                              ("Transfer-Encoding", "chunked")]) + chunked(*TAGS)),
        (request("DELETE", f"/v2/{REPO}/manifests/{DIGEST2}", AUTH),
         response(202, "Accepted", content_length=True)),
        (request("GET", f"/v2/{REPO}/manifests/v1", AUTH + [("If-None-Match", f'"{DIGEST}"')]),
         response(304, "Not Modified", [("ETag", f'"{DIGEST}"'), ("Content-Length", "900")])),
        (request("GET", "/v2/_catalog?n=100", AUTH),
         response(200, "OK", [("Content-Type", "application/json"), ("Connection", "close")],
                  CATALOG, content_length=False)),
    ]


# (method, uri, status, operation, request body bytes, response body bytes, username)
SESSION_EXPECTED = [
    ("GET", "/v2/", 401, "base", 0, len(ERRORS), None),
    ("GET", "/v2/", 200, "base", 0, 2, "alice"),
    ("HEAD", f"/v2/{REPO}/blobs/{DIGEST}", 404, "blob-head", 0, 0, "alice"),
    ("POST", f"/v2/{REPO}/blobs/uploads/", 202, "blob-upload-start", 0, 0, "alice"),
    ("PATCH", f"/v2/{REPO}/blobs/uploads/{UPLOAD_UUID}", 202, "blob-upload-chunk", len(LAYER), 0,
     "alice"),
    ("PUT", f"/v2/{REPO}/blobs/uploads/{UPLOAD_UUID}?digest={DIGEST}", 201, "blob-upload-commit",
     0, 0, "alice"),
    ("PUT", f"/v2/{REPO}/manifests/v1", 201, "manifest-put", len(MANIFEST), 0, "alice"),
    ("GET", f"/v2/{REPO}/tags/list?n=50", 200, "tags-list", 0, sum(map(len, TAGS)), "alice"),
    ("DELETE", f"/v2/{REPO}/manifests/{DIGEST2}", 202, "manifest-delete", 0, 0, "alice"),
    ("GET", f"/v2/{REPO}/manifests/v1", 304, "manifest-get", 0, 0, "alice"),
    ("GET", "/v2/_catalog?n=100", 200, "catalog", 0, len(CATALOG), "alice"),
]


def summary(txn: Transaction) -> tuple:
    """The fields SESSION_EXPECTED lists, from a transaction."""
    return (txn.method, txn.uri, txn.status, txn.op.operation if txn.op else None,
            txn.request_body_bytes, txn.response_body_bytes, txn.credential.username)
