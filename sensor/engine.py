"""The hot path: captured frames in, transactions, findings and anomalies out.

Wires decode → tcp → http1 → txn → registry → detect. Sans-IO: the caller supplies each frame
with its timestamp and link type, and receives records through an output object with
`transaction(txn)`, `finding(finding)` and `anomaly(anomaly)` methods. Time is packet time, so a
replay gives the same records every time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .decode import ACK, RST, SYN, Decoder
from .flowhash import community_id, flow_id, ip_text
from .records import Anomaly, Finding, FlowInfo, FlowKey, Transaction
from .tcp import Flow, ReassemblyBudget
from .txn import Conversation


@dataclass(frozen=True, slots=True)
class EngineSettings:
    ports: frozenset[int] = frozenset((5000,))
    idle_timeout: float = 300.0  # seconds of packet time without a segment
    max_held_per_flow: int = 4 << 20  # bytes held out of order in one flow
    max_held_total: int = 64 << 20  # ... in all flows together
    max_header_bytes: int = 64 << 10
    max_pending_requests: int = 64
    expiry_every: int = 8192  # packets between idle-flow sweeps


class Engine:
    """One pipeline instance. Not thread-safe: one thread feeds it."""

    def __init__(self, settings: EngineSettings, key: bytes, detector, out) -> None:
        self.settings = settings
        self.key = key
        self.detector = detector
        self.out = out
        self.decoder = Decoder()
        self.flows: dict[tuple, tuple[Flow, object]] = {}
        self.budget = ReassemblyBudget(settings.max_held_total)
        self.packets = 0
        self.bytes = 0
        self.tcp_packets = 0
        self.other_port_packets = 0
        self.flows_seen = 0
        self.transactions = 0
        self.gaps = 0
        self.findings: Counter[str] = Counter()
        self.anomalies: Counter[str] = Counter()
        self.last_ts = 0.0
        self._until_sweep = settings.expiry_every

    # -- the packet loop ------------------------------------------------------------------

    def packet(self, ts: float, linktype: int, buf: bytes) -> None:
        """Process one captured frame."""
        self.packets += 1
        self.bytes += len(buf)
        self.last_ts = ts
        self._until_sweep -= 1
        if not self._until_sweep:
            self._until_sweep = self.settings.expiry_every
            self.expire(ts)
        seg = self.decoder.decode(linktype, buf)
        if seg is None:
            return
        src, dst, sport, dport, seq, ack, flags, off, end = seg
        self.tcp_packets += 1
        entry = self.flows.get((src, sport, dst, dport))
        if entry is None or (flags & SYN and not flags & ACK and entry[1] is entry[0].client
                             and _is_new_connection(entry[0], seq)):
            if entry is not None:
                self._end_flow(entry[0], ts)
            entry = self._new_flow(src, dst, sport, dport, flags, end > off, ts)
            if entry is None:
                return
        flow, half = entry
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
        flow.last_ts = ts
        flow.table_key = (client, cport, server, sport_)
        client_entry = (flow, flow.client)
        server_entry = (flow, flow.server)
        self.flows[(client, cport, server, sport_)] = client_entry
        self.flows[(server, sport_, client, cport)] = server_entry
        self.flows_seen += 1
        return client_entry if from_client else server_entry

    def _end_flow(self, flow: Flow, ts: float) -> None:
        flow.close(ts)
        client, cport, server, sport = flow.table_key
        for key in ((client, cport, server, sport), (server, sport, client, cport)):
            entry = self.flows.get(key)
            if entry is not None and entry[0] is flow:
                del self.flows[key]

    def expire(self, now: float) -> None:
        """Close flows idle for longer than the timeout (packet time)."""
        limit = now - self.settings.idle_timeout
        idle = {id(f): f for f, _ in self.flows.values() if f.last_ts < limit}
        for flow in idle.values():
            self._end_flow(flow, now)

    def finish(self) -> None:
        """End of input: close every flow and flush what the detector holds."""
        for flow in list({id(f): f for f, _ in self.flows.values()}.values()):
            self._end_flow(flow, self.last_ts)
        for finding in self.detector.flush(self.last_ts):
            self.finding(finding)

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
