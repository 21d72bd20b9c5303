"""The hot path: captured frames in, transactions, findings and anomalies out.

Wires decode → tcp → http1 → txn → registry → detect. Sans-IO: the caller supplies each frame
with its timestamp and link type, and receives records through an output object with
`transaction(txn)`, `finding(finding)` and `anomaly(anomaly)` methods. Time is packet time, so a
replay gives the same records every time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from struct import Struct

from .decode import ACK, LINKTYPE_ETHERNET, RST, SYN, Decoder
from .flowhash import community_id, flow_id, ip_text
from .records import Anomaly, Finding, FlowInfo, FlowKey, Transaction
from .tcp import SEQ_MASK, Flow, Half, ReassemblyBudget
from .txn import Conversation

# Ethernet type, then the IPv4 and TCP header fields the fast path needs, read in one call for
# the frames that make up nearly all registry traffic: untagged Ethernet, IPv4 without options.
# The addresses and ports are not unpacked: bytes 26-37 of such a frame (source address,
# destination address, source port, destination port) are the flow table's key as they are.
_ETH_IPV4_TCP = Struct("!HBxH2xHxB2x8x4xI4xH").unpack_from
_ETH_IPV4_TCP_LEN = 12 + 36
_ETH_IPV4 = 0x0800
_IPV4_NO_OPTIONS = 0x45
_IPV4_TCP = 6
_FRAGMENTED = 0x3FFF
# TCP flags byte masked with FIN|SYN|RST|ACK equal to ACK alone: an ordinary segment.
_FLAG_MASK = 0x17
_PLAIN_ACK = 0x10
_PORTS = Struct("!HH").pack


def flow_key(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The flow table's key for one direction: addresses then ports, as they sit on the wire."""
    return src + dst + _PORTS(sport, dport)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    ports: frozenset[int] = frozenset((5000,))
    idle_timeout: float = 300.0  # seconds of packet time without a segment
    max_held_per_flow: int = 4 << 20  # bytes held out of order in one flow
    max_held_total: int = 64 << 20  # ... in all flows together
    max_header_bytes: int = 64 << 10
    max_pending_requests: int = 64
    expiry_every: float = 10.0  # seconds of packet time between idle-flow sweeps


class Engine:
    """One pipeline instance. Not thread-safe: one thread feeds it."""

    def __init__(self, settings: EngineSettings, key: bytes, detector, out) -> None:
        self.settings = settings
        self.key = key
        self.detector = detector
        self.out = out
        self.decoder = Decoder()
        # flow_key(src, dst, sport, dport) → the Half of the flow that direction feeds
        self.flows: dict[bytes, Half] = {}
        self.budget = ReassemblyBudget(settings.max_held_total)
        self.packets = 0
        self.bytes = 0
        self.other_port_packets = 0
        self.flows_seen = 0
        self.transactions = 0
        self.gaps = 0
        self.findings: Counter[str] = Counter()
        self.anomalies: Counter[str] = Counter()
        self.last_ts = 0.0
        self._sweep_at = float("-inf")

    # -- the packet loop ------------------------------------------------------------------

    def packet(self, ts: float, linktype: int, buf: bytes) -> None:
        """Process one captured frame."""
        self.run(((ts, linktype, buf),))

    def run(self, frames: Iterable[tuple[float, int, bytes]]) -> None:
        """Process captured frames in order: the packet loop.

        A pure ACK, or an in-order segment in the middle of a body of known length, on a known
        flow, is handled here with one unpack and no parser call; everything else goes through
        `_packet`. Counters live in locals while the loop runs and are stored when it ends.
        """
        flows_get = self.flows.get
        slow = self._packet
        packets = self.packets
        nbytes = self.bytes
        ts = self.last_ts
        sweep_at = self._sweep_at
        try:
            for ts, linktype, buf in frames:
                packets += 1
                n = len(buf)
                nbytes += n
                if ts >= sweep_at:
                    sweep_at = ts + self.settings.expiry_every
                    self.last_ts = ts
                    self.expire(ts)
                if linktype == LINKTYPE_ETHERNET and n >= _ETH_IPV4_TCP_LEN:
                    etype, vihl, total, frag, proto, seq, offflags = _ETH_IPV4_TCP(buf, 12)
                    if (etype == _ETH_IPV4 and vihl == _IPV4_NO_OPTIONS and proto == _IPV4_TCP
                            and offflags & _FLAG_MASK == _PLAIN_ACK and not frag & _FRAGMENTED
                            and 14 + total <= n):
                        half = flows_get(buf[26:38])
                        if half is not None:
                            peer = half.peer
                            # an ACK matters to the other direction only while it has a hole
                            if not peer.held and (peer.fin_seq is None or peer.closed):
                                payload = total - 20 - ((offflags >> 10) & 0x3C)
                                if payload == 0:
                                    half.seen = ts
                                    continue
                                if payload > 0 and seq == half.next_seq and not half.held:
                                    parser = half.parser
                                    if payload < parser.body_left:
                                        parser.body_left -= payload
                                        half.next_seq = (seq + payload) & SEQ_MASK
                                        start = 14 + total - payload
                                        half.last = (seq, buf, start, start + payload)
                                        half.seen = ts
                                        continue
                self.last_ts = ts
                slow(ts, linktype, buf)
        finally:
            self.packets = packets
            self.bytes = nbytes
            self.last_ts = ts
            self._sweep_at = sweep_at

    def _packet(self, ts: float, linktype: int, buf: bytes) -> None:
        """The general path for one frame: full decode, flow set-up, reassembly."""
        seg = self.decoder.decode(linktype, buf)
        if seg is None:
            return
        src, dst, sport, dport, seq, ack, flags, off, end = seg
        half = self.flows.get(flow_key(src, dst, sport, dport))
        if half is None or (flags & SYN and not flags & ACK and half is half.flow.client
                            and _is_new_connection(half.flow, seq)):
            if half is not None:
                self._end_flow(half.flow, ts)
            half = self._new_flow(src, dst, sport, dport, flags, end > off, ts)
            if half is None:
                return
        flow = half.flow
        if flow.packet(half, seq, ack, flags, buf, off, end, ts):
            self._end_flow(flow, ts)

    # -- flow table -----------------------------------------------------------------------

    def _new_flow(self, src: bytes, dst: bytes, sport: int, dport: int, flags: int,
                  has_payload: bool, ts: float):
        ports = self.settings.ports
        if dport in ports and not (sport in ports and flags & SYN and flags & ACK):
            client, cport, server, sport_ = src, sport, dst, dport
            from_client = True
        elif sport in ports:
            client, cport, server, sport_ = dst, dport, src, sport
            from_client = False
        else:
            self.other_port_packets += 1
            return None
        if not (has_payload or flags & SYN) or flags & RST:
            return None  # a stray ACK/FIN/RST does not open a flow
        info = FlowInfo(
            key=FlowKey(ip_text(client), cport, ip_text(server), sport_),
            flow_id=flow_id(client, cport, server, sport_, ts),
            community_id=community_id(client, cport, server, sport_),
        )
        s = self.settings
        conv = Conversation(info, self, s.max_pending_requests)
        flow = Flow(info, conv, self.key, self.budget, s.max_held_per_flow, s.max_header_bytes,
                    self)
        flow.client.seen = flow.server.seen = ts
        flow.table_keys = (flow_key(client, server, cport, sport_),
                           flow_key(server, client, sport_, cport))
        self.flows[flow.table_keys[0]] = flow.client
        self.flows[flow.table_keys[1]] = flow.server
        self.flows_seen += 1
        return flow.client if from_client else flow.server

    def _end_flow(self, flow: Flow, ts: float) -> None:
        flow.close(ts)
        for key in flow.table_keys:
            half = self.flows.get(key)
            if half is not None and half.flow is flow:
                del self.flows[key]

    def expire(self, now: float) -> None:
        """Close flows idle for longer than the timeout (packet time)."""
        limit = now - self.settings.idle_timeout
        idle = {id(h.flow): h.flow for h in self.flows.values() if h.flow.last_ts < limit}
        for flow in idle.values():
            self._end_flow(flow, now)

    def finish(self) -> None:
        """End of input: close every flow and flush what the detector holds."""
        for flow in list({id(h.flow): h.flow for h in self.flows.values()}.values()):
            self._end_flow(flow, self.last_ts)
        for finding in self.detector.flush(self.last_ts):
            self.finding(finding)

    @property
    def tcp_packets(self) -> int:
        return self.packets - sum(self.decoder.skipped.values())

    @property
    def open_flows(self) -> int:
        return len(self.flows) // 2

    # -- outputs (called by conversations) ----------------------------------------------

    def transaction(self, txn: Transaction) -> None:
        self.transactions += 1
        self.out.transaction(txn)
        for finding in self.detector.evaluate(txn):
            self.finding(finding)

    def finding(self, finding: Finding) -> None:
        self.findings[finding.rule] += 1
        self.out.finding(finding)

    def anomaly(self, anomaly: Anomaly) -> None:
        self.anomalies[anomaly.kind] += 1
        self.out.anomaly(anomaly)

    def summary(self) -> dict:
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "tcp_packets": self.tcp_packets,
            "skipped": {k: v for k, v in self.decoder.skipped.items() if v}
            | ({"other-port": self.other_port_packets} if self.other_port_packets else {}),
            "flows": self.flows_seen,
            "transactions": self.transactions,
            "gaps": self.gaps,
            "findings": dict(sorted(self.findings.items())),
            "anomalies": dict(sorted(self.anomalies.items())),
        }


def _is_new_connection(flow: Flow, seq: int) -> bool:
    """A SYN on a known flow starts a new connection unless it retransmits the first SYN."""
    client = flow.client
    return client.closed or (client.isn_seen and client.next_seq != (seq + 1) & 0xFFFFFFFF)
