"""Flow identifiers: the Community ID v1 hash (as Zeek, Suricata and Arkime emit) and flow_id.

Computed once per flow, never per packet.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct

IPPROTO_TCP = 6


def ip_text(raw: bytes) -> str:
    """Printable form of a 4- or 16-byte address."""
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def community_id(src: bytes, sport: int, dst: bytes, dport: int, proto: int = IPPROTO_TCP,
                 seed: int = 0) -> str:
    """Community ID v1 (https://github.com/corelight/community-id-spec) of a flow."""
    if (src, sport) > (dst, dport):
        src, sport, dst, dport = dst, dport, src, sport
    data = struct.pack("!H", seed) + src + dst + struct.pack("!BBHH", proto, 0, sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")


def flow_id(src: bytes, sport: int, dst: bytes, dport: int, first_ts: float) -> int:
    """A 63-bit id for one connection: the same capture always gives the same ids."""
    data = src + dst + struct.pack("!HHd", sport, dport, first_ts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1
