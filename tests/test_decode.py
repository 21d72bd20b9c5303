"""Link layer → IP → TCP decoding, and what the engine does with what it cannot use.

Frames are built with scapy (an independent encoder) for every link type and IP variant the
decoder claims, then either decoded alone (field by field) or run through the engine end to end.
"""

from __future__ import annotations

import struct

import pytest
from craft import (
    CLIENT_IP,
    CLIENT_IP6,
    CLIENT_MAC,
    CLIENT_PORT,
    LT_ETHERNET,
    LT_NULL,
    LT_RAW,
    SERVER_IP,
    SERVER_IP6,
    SERVER_MAC,
    SERVER_PORT,
    Conn,
    Endpoints,
    Seg,
    fast_frame,
    frames,
    request,
    response,
    run,
    scapy_packet,
    tcp_flow,
    without_times,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from sensor.decode import ACK, FIN, PSH, RST, SYN, Decoder
from sensor.engine import EngineSettings

MANIFEST_URI = "/v2/library/alpine/manifests/3.19"
EXCHANGE = [(
    request("GET", MANIFEST_URI, [("Accept", "application/vnd.oci.image.manifest.v1+json")]),
    response(200, "OK", [("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
                         ("Docker-Content-Digest", "sha256:" + "1" * 64)], body=b"m" * 517),
)]
LINKS = ["ether", "vlan", "qinq", "sll", "sll2", "raw", "null"]
IPS = ["4", "4opt", "6", "6ext"]


def _one(seg: Seg, link: str = "ether", ip: str = "4") -> tuple[int, bytes]:
    linktype, pkt = scapy_packet(seg, link, ip)
    return linktype, bytes(pkt)


DATA_SEG = Seg(True, 123456789, 987654321, "PA", b"GET /v2/ HTTP/1.1\r\n\r\n")
ETH = Ether(src=CLIENT_MAC, dst=SERVER_MAC)  # explicit addresses: scapy resolves nothing


# -- the decoder alone -----------------------------------------------------------------------


@pytest.mark.parametrize("ip", IPS)
@pytest.mark.parametrize("link", LINKS)
def test_decoder_fields_for_every_link_and_ip_variant(link, ip):
    linktype, buf = _one(DATA_SEG, link, ip)
    dec = Decoder()
    seg = dec.decode(linktype, buf)
    assert seg is not None, dec.skipped
    src, dst, sport, dport, seq, ack, flags, off, end = seg
    v6 = ip.startswith("6")
    assert len(src) == len(dst) == (16 if v6 else 4)
    assert (sport, dport, seq, ack) == (CLIENT_PORT, SERVER_PORT, 123456789, 987654321)
    assert flags == PSH | ACK
    assert buf[off:end] == DATA_SEG.payload
    assert end == len(buf)  # nothing after the payload in these frames
    assert not any(dec.skipped.values())


@pytest.mark.parametrize("ip", IPS)
@pytest.mark.parametrize("link", LINKS)
def test_engine_end_to_end_for_every_link_and_ip_variant(link, ip):
    engine, out = run(frames(tcp_flow(EXCHANGE), link, ip))
    assert out.anomalies == []
    assert len(out.transactions) == 1
    txn = out.transactions[0]
    v6 = ip.startswith("6")
    key = txn.flow.key
    assert (key.src_ip, key.src_port) == ((CLIENT_IP6 if v6 else CLIENT_IP), CLIENT_PORT)
    assert (key.dest_ip, key.dest_port) == ((SERVER_IP6 if v6 else SERVER_IP), SERVER_PORT)
    assert (txn.method, txn.uri, txn.status) == ("GET", MANIFEST_URI, 200)
    assert txn.response_body_bytes == 517
    assert txn.partial is False
    assert txn.op.operation == "manifest-get" and txn.op.repository == "library/alpine"
    assert engine.summary()["skipped"] == {}
    assert engine.open_flows == 0


def test_ipv4_options_shift_the_tcp_header():
    linktype, buf = _one(DATA_SEG, "ether", "4opt")
    assert buf[14] & 0x0F > 5  # the frame really has options
    seg = Decoder().decode(linktype, buf)
    assert buf[seg[7]:seg[8]] == DATA_SEG.payload


def test_ipv6_extension_headers_are_walked():
    linktype, buf = _one(DATA_SEG, "ether", "6ext")
    assert buf[14 + 6] == 0  # next header: hop-by-hop
    seg = Decoder().decode(linktype, buf)
    assert seg[2:4] == (CLIENT_PORT, SERVER_PORT)
    assert buf[seg[7]:seg[8]] == DATA_SEG.payload


def test_addresses_are_raw_bytes():
    dec = Decoder()
    seg4 = dec.decode(*_one(DATA_SEG, "raw", "4"))
    assert seg4[:2] == (bytes([10, 20, 0, 5]), bytes([10, 20, 0, 9]))
    seg6 = dec.decode(*_one(DATA_SEG, "raw", "6"))
    assert seg6[0] == bytes.fromhex("20010db8" + "0" * 22 + "05")


def test_flags_are_the_tcp_flag_byte():
    dec = Decoder()
    for text, bits in (("S", SYN), ("SA", SYN | ACK), ("FA", FIN | ACK), ("R", RST)):
        seg = dec.decode(LT_ETHERNET, fast_frame(Seg(True, 1, 2, text)))
        assert seg[6] == bits
        assert seg[7] == seg[8]  # no payload


def test_ethernet_padding_is_not_payload():
    """A 54-byte ACK padded to the 60-byte Ethernet minimum carries no payload."""
    buf = fast_frame(Seg(False, 5, 6, "A"))
    assert len(buf) == 54
    seg = Decoder().decode(LT_ETHERNET, buf + b"\0" * 6)
    assert seg[7] == seg[8] == 54
    pkt6 = bytes(ETH / IPv6(src=SERVER_IP6, dst=CLIENT_IP6) / TCP(flags="A"))
    seg6 = Decoder().decode(LT_ETHERNET, pkt6 + b"\xee" * 8)
    assert seg6[7] == seg6[8] == len(pkt6)


def test_bsd_loopback_family_in_either_byte_order_and_openbsd_loop():
    body = bytes(IP(src=CLIENT_IP, dst=SERVER_IP) / TCP(sport=1, dport=SERVER_PORT) / Raw(b"x"))
    body6 = bytes(IPv6(src=CLIENT_IP6, dst=SERVER_IP6) / TCP(sport=1, dport=SERVER_PORT)
                  / Raw(b"y"))
    dec = Decoder()
    for family, data in ((2, body), (24, body6), (28, body6), (30, body6)):
        for header, linktype in ((struct.pack("<I", family), LT_NULL),
                                 (struct.pack(">I", family), LT_NULL),
                                 (struct.pack(">I", family), 108)):
            seg = dec.decode(linktype, header + data)
            assert seg is not None and (header + data)[seg[7]:seg[8]] in (b"x", b"y")
    assert dec.decode(LT_NULL, struct.pack("<I", 7) + body) is None
    assert dec.skipped["not-ip"] == 1


def test_raw_ip_other_version_is_not_ip():
    dec = Decoder()
    assert dec.decode(LT_RAW, b"\x50" + b"\0" * 40) is None
    assert dec.skipped["not-ip"] == 1


def test_unknown_link_type_is_counted():
    dec = Decoder()
    assert dec.decode(147, fast_frame(DATA_SEG)) is None
    assert dec.skipped["link-type"] == 1


# -- what is skipped -----------------------------------------------------------------------------


def test_non_tcp_and_other_port_traffic_is_counted_and_skipped():
    eth = Ether(src=CLIENT_MAC, dst=SERVER_MAC)
    junk = [
        eth / IP(src=CLIENT_IP, dst=SERVER_IP) / UDP(sport=5000, dport=5000) / Raw(b"GET /v2/ "),
        eth / IP(src=CLIENT_IP, dst=SERVER_IP) / ICMP(),
        eth / IPv6(src=CLIENT_IP6, dst=SERVER_IP6) / UDP(sport=53, dport=5000),
        Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=CLIENT_IP, pdst=SERVER_IP),
        eth / IP(src=CLIENT_IP, dst=SERVER_IP) / TCP(sport=40000, dport=80, flags="S"),
        eth / IP(src=CLIENT_IP, dst=SERVER_IP) / TCP(sport=40000, dport=80, flags="PA")
        / Raw(request("GET", "/v2/")),
    ]
    engine, out = run((1.0 + i, LT_ETHERNET, bytes(p)) for i, p in enumerate(junk))
    summary = engine.summary()
    assert summary["skipped"] == {"not-tcp": 3, "not-ip": 1, "other-port": 2}
    assert summary["tcp_packets"] == 2
    assert summary["flows"] == 0
    assert out.transactions == [] and out.anomalies == []


def test_monitored_ports_come_from_settings():
    segs = tcp_flow(EXCHANGE)
    settings = EngineSettings(ports=frozenset((5000, 443)))
    _, out = run(frames(segs), settings)
    assert len(out.transactions) == 1
    engine, out = run(frames(segs), EngineSettings(ports=frozenset((8080,))))
    assert out.transactions == []
    assert engine.other_port_packets == len(segs)


def test_ip_fragments_are_skipped_and_counted():
    eth = Ether(src=CLIENT_MAC, dst=SERVER_MAC)
    tcp = TCP(sport=CLIENT_PORT, dport=SERVER_PORT, flags="PA") / Raw(b"GET /v2/ HTTP/1.1\r\n\r\n")
    first = eth / IP(src=CLIENT_IP, dst=SERVER_IP, flags="MF", frag=0) / tcp
    later = eth / IP(src=CLIENT_IP, dst=SERVER_IP, frag=3, proto=6) / Raw(b"z" * 16)
    v6 = (eth / IPv6(src=CLIENT_IP6, dst=SERVER_IP6) / IPv6ExtHdrFragment(m=1, offset=0)
          / tcp)
    v6_after_hbh = (eth / IPv6(src=CLIENT_IP6, dst=SERVER_IP6) / IPv6ExtHdrHopByHop()
                    / IPv6ExtHdrFragment(m=0, offset=5) / Raw(b"q" * 8))
    engine, out = run((1.0 + i, LT_ETHERNET, bytes(p))
                      for i, p in enumerate((first, later, v6, v6_after_hbh)))
    assert engine.decoder.skipped["ip-fragment"] == 4
    assert engine.tcp_packets == 0
    assert out.transactions == []


def _frame_kinds() -> list[tuple[int, bytes]]:
    seg = Seg(True, 1, 2, "PA", b"GET /v2/ HTTP/1.1\r\n\r\n")
    kinds = [_one(seg, link, ip) for link, ip in
             (("qinq", "6ext"), ("vlan", "4opt"), ("sll2", "6"), ("sll", "4"), ("null", "6"))]
    return kinds + [(LT_ETHERNET, bytes(ETH / IPv6() / IPv6ExtHdrFragment() / TCP()))]


@pytest.mark.parametrize(("linktype", "buf"), _frame_kinds(),
                         ids=["qinq-ipv6ext", "vlan-ipv4opt", "sll2-ipv6", "sll-ipv4",
                              "null-ipv6", "ipv6-fragment"])
def test_every_truncation_of_a_frame_is_skipped_not_raised(linktype, buf):
    """caplen shorter than the headers claim, at every possible cut."""
    dec = Decoder()
    decoded = 0
    for cut in range(len(buf)):
        seg = dec.decode(linktype, buf[:cut])
        if seg is not None:  # only a cut inside the payload may still decode
            decoded += 1
            assert seg[7] <= seg[8] == cut
    assert dec.skipped["truncated"] > 0
    assert sum(dec.skipped.values()) + decoded == len(buf)  # every frame counted once


def test_truncated_frames_are_classified():
    dec = Decoder()
    full = fast_frame(DATA_SEG)  # 14 + 20 + 20 + payload
    assert dec.decode(LT_ETHERNET, full[:10]) is None
    assert dec.decode(LT_ETHERNET, full[:14 + 12]) is None  # inside the IP header
    assert dec.decode(LT_ETHERNET, full[:14 + 20 + 8]) is None  # inside the TCP header
    assert dec.skipped["truncated"] == 3
    # IPv4 header with options (ihl 15) cut short of them.
    opt = bytearray(full[:14 + 20 + 20])
    opt[14] = 0x4F
    assert dec.decode(LT_ETHERNET, bytes(opt)) is None
    assert dec.skipped["truncated"] == 4
    # A cut inside the payload decodes what was captured.
    seg = dec.decode(LT_ETHERNET, full[:-5])
    assert full[seg[7]:seg[8]] == DATA_SEG.payload[:-5]


def test_bad_headers_are_classified():
    dec = Decoder()
    full = bytearray(fast_frame(DATA_SEG))
    bad_ihl = bytearray(full)
    bad_ihl[14] = 0x44  # ihl 16 bytes < 20
    assert dec.decode(LT_ETHERNET, bytes(bad_ihl)) is None
    short_total = bytearray(full)
    short_total[16:18] = (10).to_bytes(2, "big")  # total length < header length
    assert dec.decode(LT_ETHERNET, bytes(short_total)) is None
    assert dec.skipped["bad-ip-header"] == 2
    bad_doff = bytearray(full)
    bad_doff[14 + 20 + 12] = 0x40  # data offset 16 bytes < 20
    assert dec.decode(LT_ETHERNET, bytes(bad_doff)) is None
    assert dec.skipped["bad-tcp-header"] == 1


def test_truncated_frames_in_a_flow_do_not_crash_the_engine():
    segs = tcp_flow(EXCHANGE)
    fl = frames(segs)
    fl.insert(3, (fl[3][0], LT_ETHERNET, fl[3][2][:30]))
    fl.insert(3, (fl[3][0], LT_ETHERNET, fl[3][2][:14 + 20 + 3]))
    engine, out = run(fl)
    assert engine.decoder.skipped["truncated"] == 2
    assert [(t.method, t.status, t.partial) for t in out.transactions] == [("GET", 200, False)]


def test_vlan_tag_truncated_after_the_tag():
    buf = bytes(ETH / Dot1Q(vlan=1) / Dot1Q(vlan=2))[:20]
    dec = Decoder()
    assert dec.decode(LT_ETHERNET, buf) is None
    assert dec.skipped["truncated"] == 1


# -- which side is the server ------------------------------------------------------------------


def _key(out):
    k = out.transactions[0].flow.key
    return (k.src_ip, k.src_port, k.dest_ip, k.dest_port)


EXPECTED_KEY = (CLIENT_IP, CLIENT_PORT, SERVER_IP, SERVER_PORT)


def test_server_side_is_the_monitored_port_from_the_syn():
    _, out = run(frames(tcp_flow(EXCHANGE)))
    assert _key(out) == EXPECTED_KEY


def test_server_side_when_the_first_packet_is_the_syn_ack():
    segs = tcp_flow(EXCHANGE)[1:]  # the client's SYN was not captured
    assert segs[0].flags == "SA"
    _, out = run(frames(segs))
    assert _key(out) == EXPECTED_KEY
    txn = out.transactions[0]
    assert (txn.method, txn.status, txn.response_body_bytes) == ("GET", 200, 517)
    # The SYN-ACK acknowledges the client's ISN: no client byte is missing.
    assert txn.partial is False
    assert "midstream-pickup" not in [a.kind for a in out.anomalies]


def test_server_side_when_the_first_packet_is_server_data():
    """Picked up mid-stream with the server's response: the response's sender is the server."""
    c = Conn()
    c.handshake()
    c.data(True, EXCHANGE[0][0])  # not captured
    resp = c.data(False, EXCHANGE[0][1])
    nxt = c.data(True, request("GET", "/v2/_catalog")) + c.data(False, response(200, body=b"{}"))
    engine, out = run(frames(resp + nxt))
    assert _key(out) == EXPECTED_KEY
    first, second = out.transactions
    assert (first.method, first.status, first.response_body_bytes, first.partial) == (
        None, 200, 517, True)
    assert (second.method, second.uri, second.status) == ("GET", "/v2/_catalog", 200)
    assert out.kinds.count("midstream-pickup") == 1


def test_server_side_when_both_ports_look_ephemeral_but_source_is_monitored():
    """A client that itself uses port 5000 as its source talks to server port 5000."""
    _, out = run(frames(tcp_flow(EXCHANGE), ends=Endpoints(cport=5000)))
    k = out.transactions[0].flow.key
    assert (k.src_ip, k.dest_ip) == (CLIENT_IP, SERVER_IP)
    assert out.transactions[0].status == 200


# -- through a capture file ------------------------------------------------------------------------


@pytest.mark.parametrize(("link", "ip"), [("null", "4"), ("sll2", "6ext"), ("raw", "6"),
                                          ("sll", "4opt"), ("qinq", "4")])
def test_pcap_written_by_scapy_replays_the_same(tmp_path, link, ip):
    """wrpcap with the frame's link type → the pcap reader → the engine: same records."""
    from scapy.utils import wrpcap

    from sensor.capture.pcap import open_capture

    segs = tcp_flow(EXCHANGE)
    frame_list = frames(segs, link, ip)
    linktype = frame_list[0][1]
    path = tmp_path / f"{link}.pcap"
    packets = [scapy_packet(s, link, ip)[1] for s in segs]
    for pkt, (ts, _, _) in zip(packets, frame_list, strict=True):
        pkt.time = ts
    wrpcap(str(path), packets, linktype=linktype)
    with open_capture(path) as reader:
        read = [(ts, lt, bytes(buf)) for ts, lt, buf in reader]
    assert [lt for _, lt, _ in read] == [linktype] * len(segs)
    assert [buf for _, _, buf in read] == [buf for _, _, buf in frame_list]
    _, from_file = run(read)
    _, direct = run(frame_list)
    assert list(map(without_times, from_file.transactions)) == list(
        map(without_times, direct.transactions))
    assert [(t.method, t.status, t.response_body_bytes) for t in from_file.transactions] == [
        ("GET", 200, 517)]
