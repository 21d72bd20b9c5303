"""Live capture: AF_PACKET sockets with the monitored-port filter compiled to classic BPF.

One `AfPacketSource` per interface. The socket is created with protocol 0 (it receives nothing),
the BPF program is attached, and only then is it bound with ETH_P_ALL, so not one unrelated frame
is queued before the filter is in place. The filter keeps TCP over IPv4/IPv6 to or from a
monitored port, behind up to two in-band VLAN tags (802.1Q, 802.1ad, 0x9100); a tag the kernel
has already stripped into the packet's metadata (the usual case: `skb_vlan_untag` runs before
packet taps) leaves an untagged frame, which the same program matches. Non-first IPv4 fragments
carry no ports and are dropped; IPv6 is followed through one hop-by-hop, routing or destination
options header.

Two ways to read, chosen with `mechanism`:
- "recv": a plain non-blocking `recv` per frame with a large socket receive buffer
  (SO_RCVBUFFORCE needs CAP_NET_ADMIN; without it the kernel caps SO_RCVBUF at rmem_max).
  Timestamps are the wall clock when Python reads the frame.
- "ring": a TPACKET_V3 memory-mapped ring; the kernel fills whole blocks, Python walks them with
  no system call per frame, and each frame carries its kernel timestamp.
The default is the ring: see the README ("capture mechanism") for the measurement behind it.

`stats()` reads PACKET_STATISTICS (the kernel resets it on every read) and returns the totals
since the socket was opened: frames that passed the filter (dropped ones included) and frames the
kernel dropped because the buffer or ring was full.

With `live.workers` > 1, each worker process has its own socket per interface, all of them
members of one PACKET_FANOUT group per interface in PACKET_FANOUT_HASH mode: the kernel picks the
member from a flow hash that is symmetric (the flow dissector's hash with the addresses and ports
put in a canonical order), so both directions of a TCP connection reach the same worker. Such a
socket is made `paused` (a filter that accepts nothing) until every member has joined, so no
frame is seen twice while the group forms; set_ports() then attaches the real filter. (The
first fragment of a fragmented IPv4 segment carries no ports the hash can use, so it may reach
another worker than its connection; later fragments are dropped by the filter anyway.)
"""

from __future__ import annotations

import array
import contextlib
import mmap
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..decode import LINKTYPE_ETHERNET, LINKTYPE_RAW

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000  # the kernel picks an unused group id (Linux 4.15+)
PACKET_MR_PROMISC = 1
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772

DEFAULT_SNAPLEN = 262144  # GRO/TSO frames reach 64 KiB; tcpdump's default
VLAN_ETHERTYPES = (0x8100, 0x88A8, 0x9100)
MAX_INBAND_TAGS = 2
MAX_PORTS = 100  # keeps every BPF jump within its 8-bit offset

# -- classic BPF ----------------------------------------------------------------------------

BPF_LD_H_ABS, BPF_LD_B_ABS = 0x28, 0x30
BPF_LD_H_IND, BPF_LD_B_IND = 0x48, 0x50
BPF_LDX_IMM = 0x01
BPF_ALU_AND_K, BPF_ALU_LSH_K, BPF_ALU_RSH_K = 0x54, 0x64, 0x74
BPF_ALU_ADD_K, BPF_ALU_ADD_X = 0x04, 0x0C
BPF_TAX, BPF_TXA = 0x07, 0x87
BPF_JEQ_K, BPF_JSET_K, BPF_JA = 0x15, 0x45, 0x05
BPF_RET_K = 0x06

Insn = tuple[int, int, int, int]  # code, jt, jf, k


class _Asm:
    """A tiny classic-BPF assembler: forward jumps to named labels, resolved at the end."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0) -> None:
        self.code.append((code, 0, 0, k))

    def jump(self, code: int, k: int, jt: object, jf: object) -> None:
        self.code.append((code, jt, jf, k))

    def ja(self, label: str) -> None:
        self.code.append((BPF_JA, 0, 0, label))  # type: ignore[arg-type]

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> list[Insn]:
        out: list[Insn] = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            def rel(target: object, pc: int = pc) -> int:
                if target is None or target == 0:
                    return 0
                dist = self.labels[target] - pc - 1  # type: ignore[index]
                if not 0 <= dist <= 255:
                    raise ValueError(f"BPF jump to {target} out of range ({dist})")
                return dist
            if code == BPF_JA:
                out.append((code, 0, 0, self.labels[k] - pc - 1))  # type: ignore[index]
            else:
                out.append((code, rel(jt), rel(jf), k))
        return out


def compile_port_filter(ports: Iterable[int], linktype: int = LINKTYPE_ETHERNET,
                        snaplen: int = DEFAULT_SNAPLEN) -> list[Insn]:
    """Classic BPF: accept TCP segments with a source or destination port in `ports`.

    Register X holds the offset of the current header (L3, then L4) from the frame start; every
    load after the first uses it, so VLAN tags shift everything without separate code paths.
    """
    ports = sorted(set(ports))
    if not ports or len(ports) > MAX_PORTS:
        raise ValueError(f"between 1 and {MAX_PORTS} ports can be filtered")
    a = _Asm()
    if linktype == LINKTYPE_ETHERNET:
        a.op(BPF_LDX_IMM, 12)  # X = offset of the (innermost so far) ethertype
        a.op(BPF_LD_H_ABS, 12)
        for depth in range(MAX_INBAND_TAGS + 1):
            a.jump(BPF_JEQ_K, 0x0800, "eth-ipv4", 0)
            a.jump(BPF_JEQ_K, 0x86DD, "eth-ipv6", 0)
            if depth == MAX_INBAND_TAGS:
                a.ja("reject")
                break
            for i, tag in enumerate(VLAN_ETHERTYPES):
                last = i == len(VLAN_ETHERTYPES) - 1
                a.jump(BPF_JEQ_K, tag, f"tag{depth}", "reject" if last else 0)
            a.label(f"tag{depth}")  # a tag: the next ethertype is 4 bytes on
            a.op(BPF_TXA)
            a.op(BPF_ALU_ADD_K, 4)
            a.op(BPF_TAX)
            a.op(BPF_LD_H_IND, 0)
        for name in ("ipv4", "ipv6"):  # X = offset of the L3 header, 2 past the ethertype
            a.label(f"eth-{name}")
            a.op(BPF_TXA)
            a.op(BPF_ALU_ADD_K, 2)
            a.op(BPF_TAX)
            a.ja(name)
    elif linktype == LINKTYPE_RAW:
        a.op(BPF_LDX_IMM, 0)
        a.op(BPF_LD_B_ABS, 0)
        a.op(BPF_ALU_RSH_K, 4)
        a.jump(BPF_JEQ_K, 4, "ipv4", 0)
        a.jump(BPF_JEQ_K, 6, "ipv6", "reject")
    else:
        raise ValueError(f"link type {linktype} cannot be filtered")

    # IPv4: protocol TCP, not a later fragment; X += IHL * 4
    a.label("ipv4")
    a.op(BPF_LD_B_IND, 9)
    a.jump(BPF_JEQ_K, 6, 0, "reject")
    a.op(BPF_LD_H_IND, 6)
    a.jump(BPF_JSET_K, 0x1FFF, "reject", 0)
    a.op(BPF_LD_B_IND, 0)
    a.op(BPF_ALU_AND_K, 0x0F)
    a.op(BPF_ALU_LSH_K, 2)
    a.op(BPF_ALU_ADD_X)
    a.op(BPF_TAX)
    a.ja("ports")

    # IPv6: next header TCP, or one hop-by-hop / routing / destination-options header first
    a.label("ipv6")
    a.op(BPF_LD_B_IND, 6)
    a.jump(BPF_JEQ_K, 6, "ipv6-tcp", 0)
    a.jump(BPF_JEQ_K, 0, "ipv6-ext", 0)
    a.jump(BPF_JEQ_K, 43, "ipv6-ext", 0)
    a.jump(BPF_JEQ_K, 60, "ipv6-ext", "reject")
    a.label("ipv6-ext")
    a.op(BPF_LD_B_IND, 40)  # the extension header's next header
    a.jump(BPF_JEQ_K, 6, 0, "reject")
    a.op(BPF_LD_B_IND, 41)  # its length in 8-byte units, not counting the first 8
    a.op(BPF_ALU_ADD_K, 1)
    a.op(BPF_ALU_LSH_K, 3)
    a.op(BPF_ALU_ADD_X)
    a.op(BPF_TAX)  # X = offset of the extension header; the fixed 40 bytes follow below
    a.label("ipv6-tcp")
    a.op(BPF_TXA)
    a.op(BPF_ALU_ADD_K, 40)
    a.op(BPF_TAX)

    # TCP: either port monitored
    a.label("ports")
    a.op(BPF_LD_H_IND, 0)
    for port in ports:
        a.jump(BPF_JEQ_K, port, "accept", 0)
    a.op(BPF_LD_H_IND, 2)
    for i, port in enumerate(ports):
        a.jump(BPF_JEQ_K, port, "accept", "reject" if i == len(ports) - 1 else 0)
    a.label("reject")
    a.op(BPF_RET_K, 0)
    a.label("accept")
    a.op(BPF_RET_K, snaplen)
    return [insn for insn in a.assemble()]


def run_filter(prog: list[Insn], frame: bytes) -> int:
    """Interpret `prog` over `frame` (tests and `--check-filter`): the number of bytes kept."""
    a = x = 0
    pc = 0
    n = len(frame)
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code in (BPF_LD_H_ABS, BPF_LD_B_ABS, BPF_LD_H_IND, BPF_LD_B_IND):
            off = k if code in (BPF_LD_H_ABS, BPF_LD_B_ABS) else (x + k) & 0xFFFFFFFF
            size = 2 if code in (BPF_LD_H_ABS, BPF_LD_H_IND) else 1
            if off + size > n:
                return 0  # an out-of-bounds load ends the program with 0, as in the kernel
            a = int.from_bytes(frame[off:off + size], "big")
        elif code == BPF_LDX_IMM:
            x = k
        elif code == BPF_ALU_AND_K:
            a &= k
        elif code == BPF_ALU_LSH_K:
            a = (a << k) & 0xFFFFFFFF
        elif code == BPF_ALU_RSH_K:
            a >>= k
        elif code == BPF_ALU_ADD_K:
            a = (a + k) & 0xFFFFFFFF
        elif code == BPF_ALU_ADD_X:
            a = (a + x) & 0xFFFFFFFF
        elif code == BPF_TAX:
            x = a
        elif code == BPF_TXA:
            a = x
        elif code == BPF_JA:
            pc += k
        elif code == BPF_JEQ_K:
            pc += jt if a == k else jf
        elif code == BPF_JSET_K:
            pc += jt if a & k else jf
        elif code == BPF_RET_K:
            return min(k, n)
        else:
            raise ValueError(f"unknown BPF opcode {code:#x}")


def _fprog(prog: list[Insn]) -> tuple[bytes, array.array]:
    """struct sock_fprog for setsockopt; the instruction array must outlive the call."""
    insns = array.array("B", b"".join(struct.pack("HBBI", *i) for i in prog))
    address, _ = insns.buffer_info()
    return struct.pack("HL", len(prog), address), insns


def attach_filter(sock: socket.socket, prog: list[Insn]) -> None:
    fprog, keep = _fprog(prog)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del keep


# -- sources --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KernelStats:
    received: int  # frames that passed the filter, dropped ones included (tcpdump's "received")
    dropped: int  # frames the kernel dropped: the buffer or the ring was full


class CaptureError(Exception):
    """A capture socket could not be set up: one line, naming the interface."""


class AfPacketSource:
    """One interface, captured through AF_PACKET. Not thread-safe."""

    def __init__(self, interface: str, ports: Iterable[int], *, promiscuous: bool = True,
                 buffer_bytes: int = 64 << 20, mechanism: str = "ring",
                 snaplen: int = DEFAULT_SNAPLEN, block_bytes: int = 1 << 20,
                 paused: bool = False) -> None:
        if mechanism not in ("ring", "recv"):
            raise ValueError(f"unknown capture mechanism {mechanism!r}")
        self.interface = interface
        self.mechanism = mechanism
        self.snaplen = snaplen
        self.promiscuous = promiscuous
        self.buffer_bytes = buffer_bytes
        self.rcvbuf = 0  # the receive buffer the kernel granted (recv)
        self.last_error = 0  # errno of the last socket error read() met (recv)
        self.received = 0
        self.dropped = 0
        self._ring: mmap.mmap | None = None
        self._block = 0
        self._stats_size = 12 if mechanism == "ring" else 8
        self.fanout_group: int | None = None
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing yet
        except PermissionError:
            raise CaptureError(f"{interface}: cannot open a packet socket: CAP_NET_RAW is "
                               f"needed") from None
        self.sock = sock
        try:
            try:
                ifindex = socket.if_nametoindex(interface)
            except OSError:
                raise CaptureError(f"{interface}: no such interface") from None
            self.ifindex = ifindex
            hatype = _hardware_type(interface)
            if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
                self.linktype = LINKTYPE_ETHERNET
            else:  # tun and friends: no link header; read from the network header on
                sock.close()
                sock = self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
                self.linktype = LINKTYPE_RAW
            self.filter = compile_port_filter(ports, self.linktype, snaplen)
            attach_filter(sock, [(BPF_RET_K, 0, 0, 0)] if paused else self.filter)
            if hatype == ARPHRD_LOOPBACK:  # every frame would show up twice
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            if mechanism == "ring":
                self._setup_ring(buffer_bytes, block_bytes)
            else:
                self._setup_rcvbuf(buffer_bytes)
            sock.bind((interface, ETH_P_ALL))
            if promiscuous:
                mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            sock.setblocking(False)
        except CaptureError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise CaptureError(f"{interface}: {exc.strerror or exc}") from None

    # -- setup ----------------------------------------------------------------------------

    def _setup_rcvbuf(self, size: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:  # no CAP_NET_ADMIN: capped at net.core.rmem_max
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def _setup_ring(self, size: int, block: int) -> None:
        page = mmap.PAGESIZE
        block = max(page, block // page * page)
        while block < self.snaplen + 4096:  # one frame must fit in a block
            block *= 2
        nblocks = max(2, size // block)
        self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        # tpacket_req3: block size, block count, frame size, frame count, block retire
        # timeout (ms), private area per block, feature flags
        req = struct.pack("7I", block, nblocks, 2048, block * nblocks // 2048, 20, 0, 0)
        self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self._ring = mmap.mmap(self.sock.fileno(), block * nblocks, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self._block_size = block
        self._nblocks = nblocks
        self.rcvbuf = block * nblocks

    # -- reading --------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int = 512) -> list[tuple[float, int, bytes]]:
        """Frames ready now (at most about `limit`), without blocking: (ts, linktype, frame)."""
        if self._ring is not None:
            return self._read_ring()
        out = []
        recv = self.sock.recv
        snaplen = self.snaplen
        linktype = self.linktype
        now = time.time()
        try:
            for _ in range(limit):
                out.append((now, linktype, recv(snaplen)))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # ENETDOWN and friends: the pending error, now cleared
            self.check_alive()
            self.last_error = exc.errno or 0
        return out

    def _read_ring(self) -> list[tuple[float, int, bytes]]:
        """Every frame of the next ready block, which is then handed back to the kernel."""
        ring = self._ring
        assert ring is not None
        base = self._block * self._block_size
        status, count, first = struct.unpack_from("3I", ring, base + 8)
        if not status & TP_STATUS_USER:
            return []
        out = []
        linktype = self.linktype
        unpack = _V3_HDR.unpack_from
        off = base + first
        for _ in range(count):
            nxt, sec, nsec, snap, _len, _st, mac = unpack(ring, off)
            start = off + mac
            out.append((sec + nsec * 1e-9, linktype, ring[start:start + snap]))
            off += nxt
        struct.pack_into("I", ring, base + 8, TP_STATUS_KERNEL)
        self._block = (self._block + 1) % self._nblocks
        return out

    def ready(self) -> bool:
        """Whether read() has something without waiting (the ring's next block is full)."""
        if self._ring is None:
            return False
        status = struct.unpack_from("I", self._ring, self._block * self._block_size + 8)[0]
        return bool(status & TP_STATUS_USER)

    def stats(self) -> KernelStats:
        """Totals since the socket was opened (the kernel's counters reset on each read)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, self._stats_size)
        packets, drops = struct.unpack_from("II", raw)
        self.received += packets  # the kernel adds drops into tp_packets already
        self.dropped += drops
        return KernelStats(self.received, self.dropped)

    def check_error(self) -> int:
        """After POLLERR: read (and so clear) the socket's pending error; its errno, or 0.
        An interface that no longer exists is a CaptureError; a link that went down is not
        (capture resumes when it comes back)."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.check_alive()
        return err

    def check_alive(self) -> None:
        """CaptureError when the interface is gone, or was replaced by another of that name
        (the socket stays bound to the old one and would never see a frame again)."""
        try:
            index = socket.if_nametoindex(self.interface)
        except OSError:
            raise CaptureError(f"{self.interface}: the interface is gone") from None
        if index != self.ifindex:
            raise CaptureError(f"{self.interface}: the interface was replaced (index "
                               f"{self.ifindex} -> {index}): a restart binds to the new one")

    def join_fanout(self, group: int | None = None) -> int:
        """Join PACKET_FANOUT group `group` in hash mode (None: a new group, its id picked by
        the kernel; 0 is a valid id); returns the group id, for the other members to join.
        Needs a bound socket."""
        if group is not None:
            self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | PACKET_FANOUT_HASH << 16)
        else:
            self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT,
                                 (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
            group = self.sock.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
        self.fanout_group = group
        return group

    def set_ports(self, ports: Iterable[int]) -> None:
        """Re-attach the filter for a new set of ports (no privilege needed)."""
        prog = compile_port_filter(ports, self.linktype, self.snaplen)
        attach_filter(self.sock, prog)
        self.filter = prog

    def close(self) -> None:
        if self._ring is not None:
            with contextlib.suppress(BufferError):
                self._ring.close()
            self._ring = None
        self.sock.close()

    def __repr__(self) -> str:
        return f"<AfPacketSource {self.interface} {self.mechanism}>"


_V3_HDR = struct.Struct("IIIIIIH")  # tpacket3_hdr up to tp_mac


def _hardware_type(interface: str) -> int:
    """ARPHRD_* of the interface, read from a throwaway bind of a packet socket."""
    probe = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        probe.bind((interface, 0))
        return probe.getsockname()[3]
    finally:
        probe.close()


def wait_readable(sources: list[AfPacketSource], extra_fds: Iterable[int],
                  timeout: float) -> list[tuple[int, int]]:
    """poll() the sources and extra fds: (fd, events) of those readable or in error."""
    poller = select.poll()
    for src in sources:
        poller.register(src.fileno(), select.POLLIN | select.POLLERR)
    for fd in extra_fds:
        poller.register(fd, select.POLLIN)
    try:
        return poller.poll(max(0, int(timeout * 1000)))
    except InterruptedError:
        return []
