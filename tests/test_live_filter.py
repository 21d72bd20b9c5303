"""The kernel BPF filter of the live capture: only TCP to or from a monitored port gets through,
VLAN-tagged frames included; promiscuous mode is on while the socket is open."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from netns import Lab, missing_tools, sh  # noqa: E402
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop  # noqa: E402
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw, raw  # noqa: E402
from scapy.utils import wrpcap  # noqa: E402

from sensor.capture.afpacket import compile_port_filter, run_filter  # noqa: E402
from sensor.decode import LINKTYPE_RAW  # noqa: E402

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def _tcp(seq: int, **kw) -> TCP:
    return TCP(seq=seq, flags="PA", **kw) / Raw(b"GET /v2/ HTTP/1.1\r\n\r\n")


# (name, frame, kept?) — the TCP sequence number marks each frame
FRAMES = [
    ("ipv4 to 5000", E / IP() / _tcp(1, sport=40000, dport=5000), True),
    ("ipv4 from 5000", E / IP() / _tcp(2, sport=5000, dport=40000), True),
    ("ipv4 to 443", E / IP() / _tcp(3, sport=40000, dport=443), True),
    ("ipv4 ssh", E / IP() / _tcp(4, sport=40000, dport=22), False),
    ("udp 5000", E / IP() / UDP(sport=40000, dport=5000) / Raw(b"x" * 8), False),
    ("ipv4 options", E / IP(options=b"\x01\x01\x01\x00") / _tcp(5, dport=5000), True),
    ("802.1Q", E / Dot1Q(vlan=10) / IP() / _tcp(6, dport=5000), True),
    ("802.1Q ssh", E / Dot1Q(vlan=10) / IP() / _tcp(7, dport=22), False),
    ("QinQ", E / Dot1AD(vlan=20) / Dot1Q(vlan=10) / IP() / _tcp(8, sport=5000), True),
    ("QinQ ssh", E / Dot1AD(vlan=20) / Dot1Q(vlan=10) / IP() / _tcp(9, sport=22), False),
    ("ipv6", E / IPv6() / _tcp(10, dport=5000), True),
    ("ipv6 hop-by-hop", E / IPv6() / IPv6ExtHdrHopByHop() / _tcp(11, dport=5000), True),
    ("802.1Q ipv6", E / Dot1Q(vlan=5) / IPv6() / _tcp(12, sport=443), True),
    ("ipv6 ssh", E / IPv6() / _tcp(13, dport=22), False),
    ("later fragment", E / IP(frag=64, proto=6) / Raw(raw(_tcp(14, dport=5000))), False),
]
PORTS = [5000, 443]


def test_bpf_program_keeps_only_monitored_tcp():
    prog = compile_port_filter(PORTS)
    for name, frame, kept in FRAMES:
        assert bool(run_filter(prog, raw(frame))) is kept, name
    three_tags = E / Dot1AD() / Dot1Q() / Dot1Q() / IP() / _tcp(1, dport=5000)
    assert run_filter(prog, raw(three_tags)) == 0  # deeper than the filter looks
    raw_prog = compile_port_filter(PORTS, LINKTYPE_RAW)
    assert run_filter(raw_prog, raw(IP() / _tcp(1, dport=5000)))
    assert not run_filter(raw_prog, raw(IP() / _tcp(1, dport=80)))
    with pytest.raises(ValueError):
        compile_port_filter([])


PROBE = """
import json, sys, time, select
from sensor.capture.afpacket import AfPacketSource
from sensor.decode import Decoder
src = AfPacketSource("rp1", [5000, 443], mechanism=sys.argv[1], buffer_bytes=1 << 20)
flags = int(open("/sys/class/net/rp1/flags").read(), 16)
print("ready", flush=True)
seqs, dec, deadline = [], Decoder(), time.time() + 2
while time.time() < deadline:
    select.select([src.fileno()], [], [], 0.1)
    for ts, lt, buf in src.read():
        seg = dec.decode(lt, buf)
        seqs.append(seg[4] if seg else -1)
stats = src.stats()
src.close()
after = int(open("/sys/class/net/rp1/flags").read(), 16)
print(json.dumps({"seqs": seqs, "promisc": bool(flags & 0x100), "after": bool(after & 0x100),
                  "received": stats.received, "dropped": stats.dropped}), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, AF_PACKET")
@pytest.mark.parametrize("mechanism", ["ring", "recv"])
def test_kernel_filter_on_a_veth(tmp_path, mechanism):
    """The frames above sent through a veth: the kernel keeps exactly the expected ones. An
    outer tag is stripped by the kernel before packet sockets see it (the filter then sees
    the untagged frame); the inner tag of QinQ stays in the frame and the filter skips it."""
    missing = missing_tools("ip", "tcpreplay")
    if missing:
        pytest.fail(f"missing tools (scripts/test installs them): {', '.join(missing)}")
    pcap = tmp_path / "frames.pcap"
    wrpcap(str(pcap), [f for _, f, _ in FRAMES])
    lab = Lab("f")
    try:
        tx, rx = lab.netns("tx"), lab.netns("rx")
        lab.veth(tx, "rp0", rx, "rp1")
        probe = subprocess.Popen(
            ["ip", "netns", "exec", rx, sys.executable, "-c", PROBE, mechanism],
            stdout=subprocess.PIPE, text=True, cwd=str(lab.dir.parent),
            env={**os.environ, "PYTHONPATH": str(__import__("netns").REPO)})
        lab.procs.append(probe)
        assert probe.stdout.readline().strip() == "ready"
        sh("tcpreplay", "-i", "rp0", str(pcap), ns=tx)
        result = json.loads(probe.stdout.readline())
        probe.wait(10)
    finally:
        lab.close()
    expected = sorted(f[TCP].seq for _, f, kept in FRAMES if kept)
    assert sorted(result["seqs"]) == expected
    assert result["received"] == len(expected) and result["dropped"] == 0
    assert result["promisc"] and not result["after"]
