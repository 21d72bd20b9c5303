"""Link layer → IPv4/IPv6 → TCP: pull the fields reassembly needs out of one captured frame.

Pure and allocation-light: one call per packet, precompiled structs, offsets into the caller's
buffer instead of copies. Anything that is not TCP over IP is counted by reason and skipped.
"""

from __future__ import annotations

from struct import Struct

# Link types (tcpdump.org/linktypes.html).
LINKTYPE_NULL = 0  # BSD loopback, 4-byte family in host byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_OPENBSD = 12
LINKTYPE_RAW_BSDI = 14
LINKTYPE_LOOP = 108  # OpenBSD loopback, family in network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
VLAN_TAGS = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))

# Address families a BSD loopback header may carry for IPv6 (BSDs disagree).
AF_INET = 2
AF_INET6_VALUES = frozenset((10, 24, 28, 30))

IPPROTO_TCP = 6
# IPv6 extension headers that are walked over to find TCP (RFC 8200 §4).
IPV6_EXT_HEADERS = frozenset((0, 43, 60, 135, 139, 140, 253, 254))
IPV6_FRAGMENT = 44
IPV6_AH = 51

_U16 = Struct("!H")
_U32_LE = Struct("<I")
_U32_BE = Struct("!I")
_IPV4 = Struct("!BBHHHBBH4s4s")
_IPV6 = Struct("!IHBB16s16s")
_TCP = Struct("!HHIIBB")

# Decoded segment: (src_ip, dst_ip, src_port, dst_port, seq, ack, flags, payload_start, payload_end)
# ip addresses are the raw 4 or 16 bytes; flags are the TCP flag byte.
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

SKIP_REASONS = (
    "truncated",
    "link-type",
    "not-ip",
    "not-tcp",
    "ip-fragment",
    "bad-ip-header",
    "bad-tcp-header",
)


class Decoder:
    """Decodes frames into TCP segment tuples; counts what it skips (attribute `skipped`)."""

    __slots__ = ("skipped",)

    def __init__(self) -> None:
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def decode(self, linktype: int, buf: bytes) -> tuple | None:
        """Return the segment tuple described above, or None when the frame is skipped."""
        n = len(buf)
        if linktype == LINKTYPE_ETHERNET:
            if n < 14:
                return self._skip("truncated")
            etype = (buf[12] << 8) | buf[13]
            off = 14
            while etype in VLAN_TAGS:
                if n < off + 4:
                    return self._skip("truncated")
                etype = (buf[off + 2] << 8) | buf[off + 3]
                off += 4
        elif linktype == LINKTYPE_LINUX_SLL:
            if n < 16:
                return self._skip("truncated")
            etype = (buf[14] << 8) | buf[15]
            off = 16
        elif linktype == LINKTYPE_LINUX_SLL2:
            if n < 20:
                return self._skip("truncated")
            etype = (buf[0] << 8) | buf[1]
            off = 20
        elif linktype in (LINKTYPE_RAW, LINKTYPE_RAW_OPENBSD, LINKTYPE_RAW_BSDI,
                          LINKTYPE_IPV4, LINKTYPE_IPV6):
            if n < 1:
                return self._skip("truncated")
            version = buf[0] >> 4
            etype = ETH_IPV4 if version == 4 else ETH_IPV6 if version == 6 else 0
            off = 0
        elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
            if n < 4:
                return self._skip("truncated")
            if linktype == LINKTYPE_LOOP:
                family = _U32_BE.unpack_from(buf, 0)[0]
            else:
                family = _U32_LE.unpack_from(buf, 0)[0]
                if family > 0xFFFF:  # written on a big-endian host
                    family = _U32_BE.unpack_from(buf, 0)[0]
            etype = ETH_IPV4 if family == AF_INET else ETH_IPV6 if family in AF_INET6_VALUES else 0
            off = 4
        else:
            return self._skip("link-type")

        if etype == ETH_IPV4:
            if n < off + 20:
                return self._skip("truncated")
            vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(
                buf, off)
            ihl = (vihl & 0x0F) * 4
            if vihl >> 4 != 4 or ihl < 20 or total < ihl:
                return self._skip("bad-ip-header")
            if frag & 0x3FFF:  # more-fragments flag or a non-zero offset
                return self._skip("ip-fragment")
            if proto != IPPROTO_TCP:
                return self._skip("not-tcp")
            # total may be 0 with TSO super-frames captured on the sending host.
            end = off + total if total and off + total <= n else n
            off += ihl
        elif etype == ETH_IPV6:
            if n < off + 40:
                return self._skip("truncated")
            vtcfl, plen, nxt, _hlim, src, dst = _IPV6.unpack_from(buf, off)
            if vtcfl >> 28 != 6:
                return self._skip("bad-ip-header")
            end = off + 40 + plen if plen and off + 40 + plen <= n else n
            off += 40
            while nxt != IPPROTO_TCP:
                if nxt in IPV6_EXT_HEADERS:
                    if end < off + 8:
                        return self._skip("truncated")
                    nxt, hlen = buf[off], (buf[off + 1] + 1) * 8
                elif nxt == IPV6_AH:
                    if end < off + 8:
                        return self._skip("truncated")
                    nxt, hlen = buf[off], (buf[off + 1] + 2) * 4
                elif nxt == IPV6_FRAGMENT:
                    return self._skip("ip-fragment")
                else:
                    return self._skip("not-tcp")
                off += hlen
        else:
            return self._skip("not-ip")

        if end < off + 20:
            return self._skip("truncated")
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(buf, off)
        thl = (doff >> 4) * 4
        if thl < 20 or off + thl > end:
            return self._skip("bad-tcp-header")
        return (src, dst, sport, dport, seq, ack, flags, off + thl, end)
