"""TCP flows and per-direction stream reassembly, in packet time.

Each direction (a `Half`) hands its HTTP parser in-order bytes (`feed`), the size of a range that
was lost (`gap`), or the end of the stream (`eof`): Zeek's deliver/gap/eof contract. In-order
segments go straight through without a copy; out-of-order ones are copied and held within a
per-flow and a global byte cap. Retransmissions are compared with what was seen first (the
first-seen bytes win; different bytes are an anomaly). A hole is given up on, and reported as a
gap, when the peer acknowledges data beyond it, when a cap is reached, or when the flow ends.
"""

from __future__ import annotations

from .decode import ACK, FIN, RST, SYN
from .http1 import RequestParser, ResponseParser
from .records import FlowInfo

SEQ_MASK = 0xFFFFFFFF
HALF_SPACE = 0x80000000


def seq_diff(a: int, b: int) -> int:
    """a - b in sequence space (positive when a is after b)."""
    d = (a - b) & SEQ_MASK
    return d - 0x100000000 if d >= HALF_SPACE else d


class ReassemblyBudget:
    """The global cap on bytes held out of order, shared by every flow."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Half:
    """One direction of a flow: reassembly state and the parser it feeds."""

    __slots__ = ("flow", "peer", "parser", "next_seq", "isn_seen", "held", "held_bytes",
                 "fin_seq", "closed", "last", "seen")

    def __init__(self, flow: Flow, parser) -> None:
        self.flow = flow
        self.peer: Half = self  # the other direction, set by Flow
        self.parser = parser
        self.next_seq: int | None = None
        self.isn_seen = False
        self.held: dict[int, bytes] = {}
        self.held_bytes = 0
        self.fin_seq: int | None = None
        self.closed = False
        # The most recently delivered segment, kept by reference to check retransmissions:
        # (seq, buf, payload start, payload end).
        self.last: tuple[int, bytes, int, int] = (0, b"", 0, 0)
        self.seen = 0.0  # packet time of the latest segment in this direction

    def segment(self, seq: int, flags: int, buf: bytes, off: int, end: int, ts: float) -> None:
        """A segment travelling in this direction (payload buf[off:end])."""
        if flags & SYN:
            if self.next_seq is None or not self.isn_seen:
                self.next_seq = (seq + 1) & SEQ_MASK
                self.isn_seen = True
            seq = (seq + 1) & SEQ_MASK
        nxt = self.next_seq
        if end > off:
            if self.closed:
                return
            if nxt is None:  # picked up mid-stream
                nxt = self.next_seq = seq
                self.flow.note_midstream(ts)
            if seq == nxt:
                self._deliver(seq, buf, off, end, ts)
                if self.held:
                    self._drain(ts)
            else:
                d = seq_diff(seq, nxt)
                if d > 0:
                    self._hold(seq, buf[off:end], ts)
                else:
                    self._overlap(seq, buf, off, end, ts)
        if flags & FIN:
            self.fin_seq = (seq + (end - off)) & SEQ_MASK
        if self.fin_seq is not None and not self.closed and self.next_seq in (None, self.fin_seq):
            self.close(ts)

    def _deliver(self, seq: int, buf: bytes, off: int, end: int, ts: float) -> None:
        self.next_seq = (seq + end - off) & SEQ_MASK
        self.last = (seq, buf, off, end)
        self.parser.feed(buf, off, end, ts)

    def _overlap(self, seq: int, buf: bytes, off: int, end: int, ts: float) -> None:
        """A segment starting before next_seq: compare what was seen, deliver what is new."""
        behind = -seq_diff(seq, self.next_seq)
        # Compare with the last delivered segment where the two overlap.
        last_seq, last_buf, last_off, last_end = self.last
        last_len = last_end - last_off
        rel = seq_diff(seq, last_seq)
        lo = max(rel, 0)
        hi = min(rel + (end - off), last_len)
        if hi > lo:
            old = last_buf[last_off + lo:last_off + hi]
            new = buf[off + lo - rel:off + hi - rel]
            if old != new:
                self.flow.anomaly("overlap-mismatch",
                                  f"retransmitted bytes differ from the first copy "
                                  f"({hi - lo} bytes compared); first copy kept", ts)
        if end - off > behind:
            self._deliver(self.next_seq, buf, off + behind, end, ts)
            if self.held:
                self._drain(ts)

    def _hold(self, seq: int, data: bytes, ts: float) -> None:
        held = self.held
        old = held.get(seq)
        if old is not None:
            if old[:len(data)] != data[:len(old)]:
                self.flow.anomaly("overlap-mismatch",
                                  "out-of-order retransmission differs from the first copy; "
                                  "first copy kept", ts)
            if len(data) <= len(old):
                return
            self._release(len(old))
        held[seq] = data
        self.held_bytes += len(data)
        budget = self.flow.budget
        budget.used += len(data)
        if self.held_bytes > self.flow.max_held or budget.used > budget.limit:
            self.flow.anomaly("reassembly-cap",
                              f"{self.held_bytes} bytes held out of order; giving up the hole",
                              ts)
            self.skip_hole(ts)

    def _release(self, n: int) -> None:
        self.held_bytes -= n
        self.flow.budget.used -= n

    def _drain(self, ts: float) -> None:
        """Deliver held segments that have become in order."""
        held = self.held
        while held:
            nxt = self.next_seq
            data = held.pop(nxt, None)
            if data is not None:
                self._release(len(data))
                self._deliver(nxt, data, 0, len(data), ts)
                continue
            progressed = False
            for seq in sorted(held, key=lambda s: seq_diff(s, nxt)):
                d = seq_diff(seq, nxt)
                if d > 0:
                    break
                data = held.pop(seq)
                self._release(len(data))
                self._overlap(seq, data, 0, len(data), ts)
                progressed = True
                break
            if not progressed:
                return

    def skip_hole(self, ts: float, upto: int | None = None) -> None:
        """Give up on the missing bytes before the first held segment (or up to `upto`)."""
        if self.next_seq is None:
            return
        target = upto
        if self.held:
            first = min(self.held, key=lambda s: seq_diff(s, self.next_seq))
            if target is None or seq_diff(first, target) < 0:
                target = first
        if target is None:
            return
        lost = seq_diff(target, self.next_seq)
        if lost <= 0:
            return
        self.flow.note_gap()
        side = "client" if self is self.flow.client else "server"
        self.flow.anomaly("content-gap", f"{lost} bytes of the {side} stream were not captured",
                          ts)
        self.next_seq = target
        self.parser.gap(lost, ts)
        self._drain(ts)

    def peer_acked(self, ack: int, ts: float) -> None:
        """The other side acknowledged up to `ack`: a hole it covers was lost by the capture."""
        nxt = self.next_seq
        if nxt is None or self.closed or seq_diff(ack, nxt) <= 0:
            return
        if self.held:
            first = min(self.held, key=lambda s: seq_diff(s, nxt))
            if seq_diff(ack, first) >= 0:
                self.skip_hole(ts, first)
        elif self.fin_seq is not None and seq_diff(ack, self.fin_seq) > 0:
            # The last bytes before the FIN never reached us, but the peer has them all.
            self.skip_hole(ts, self.fin_seq)
            self.close(ts)

    def close(self, ts: float) -> None:
        """End of this direction: deliver what is held (with gaps), then eof."""
        if self.closed:
            return
        while self.held:
            self.skip_hole(ts)
        self.closed = True
        self.parser.eof(ts)


class Flow:
    """One TCP connection: its two halves and the conversation they feed."""

    __slots__ = ("info", "conv", "client", "server", "budget", "max_held",
                 "sink", "midstream", "table_keys")

    def __init__(self, info: FlowInfo, conv, key: bytes, budget: ReassemblyBudget,
                 max_held: int, max_header: int, sink) -> None:
        self.info = info
        self.conv = conv
        self.client = Half(self, RequestParser(conv, key, max_header))
        self.server = Half(self, ResponseParser(conv, max_header))
        self.client.peer = self.server
        self.server.peer = self.client
        self.budget = budget
        self.max_held = max_held
        self.sink = sink  # counters owner (the engine)
        self.midstream = False
        self.table_keys: tuple[bytes, bytes] = (b"", b"")  # its two entries in the flow table

    @property
    def last_ts(self) -> float:
        """Packet time of the flow's latest segment."""
        return max(self.client.seen, self.server.seen)

    def anomaly(self, kind: str, detail: str, ts: float) -> None:
        self.conv.anomaly(kind, detail, ts)

    def note_midstream(self, ts: float) -> None:
        self.conv.partial = True
        if not self.midstream:
            self.midstream = True
            self.anomaly("midstream-pickup", "flow picked up without its handshake", ts)

    def note_gap(self) -> None:
        self.conv.partial = True
        self.sink.gaps += 1

    def packet(self, half: Half, seq: int, ack: int, flags: int, buf: bytes, off: int, end: int,
               ts: float) -> bool:
        """Process one segment of this flow; True when the flow has ended."""
        half.seen = ts
        if flags & RST:
            self.close(ts)
            return True
        if flags & ACK:
            peer = half.peer
            if flags & SYN and peer.next_seq is None:
                # A SYN-ACK whose SYN was not captured: its ack is where the peer's stream
                # starts, so the peer's first bytes are not a mid-stream pickup.
                peer.next_seq = ack
                peer.isn_seen = True
            if peer.held or peer.fin_seq is not None:
                peer.peer_acked(ack, ts)
        if end > off or flags & (SYN | FIN):
            half.segment(seq, flags, buf, off, end, ts)
        return self.client.closed and self.server.closed

    def close(self, ts: float) -> None:
        """Close both directions and flush the conversation."""
        self.client.close(ts)
        self.server.close(ts)
        self.conv.close(ts)
