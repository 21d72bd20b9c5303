"""Tests for sensor.capture.pcap: the pcap / pcapng reader on the replay edge.

Files come from scapy's writers (an independent source) where scapy can write them, and from
hand-built bytes for what it cannot (big-endian and nanosecond pcap, pcapng with several
interfaces, resolutions, offsets, SPB, unknown blocks, a second section in the other byte
order). tshark, when installed, cross-checks packet counts and timestamps.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import struct
import subprocess
import threading
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import CookedLinux, Ether
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, PcapWriter, wrpcap, wrpcapng

from sensor.capture import pcap as pcap_mod
from sensor.capture.pcap import (
    MAX_RECORD,
    CaptureFormatError,
    CaptureReader,
    CaptureWarning,
    open_capture,
)

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

TSHARK = shutil.which("tshark") or (
    "/usr/bin/tshark" if os.path.exists("/usr/bin/tshark") else None
)

LE, BE = "<", ">"
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228


# -- builders ---------------------------------------------------------------------------------


def pcap_bytes(records, *, order=LE, nano=False, network=LINKTYPE_ETHERNET, snaplen=65535):
    """A classic pcap file; records are (sec, frac, data) or (sec, frac, data, orig_len)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, network)]
    for sec, frac, data, *orig in records:
        out.append(
            struct.pack(order + "IIII", sec, frac, len(data), orig[0] if orig else len(data))
        )
        out.append(data)
    return b"".join(out)


def pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def block(order, btype, body):
    body = pad4(body)
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def shb(order, options=b""):
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1) + options)


def opt(order, code, value):
    return struct.pack(order + "HH", code, len(value)) + pad4(value)


def idb(order, linktype, snaplen=0, *options):
    opts = b"".join(options)
    if opts:
        opts += struct.pack(order + "HH", 0, 0)
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + opts)


def tsresol(order, value):
    return opt(order, 9, bytes([value]))


def tsoffset(order, seconds):
    return opt(order, 14, struct.pack(order + "q", seconds))


def epb(order, iid, units, data, orig=None, options=b""):
    head = struct.pack(
        order + "IIIII", iid, units >> 32, units & 0xFFFFFFFF, len(data), orig or len(data)
    )
    return block(order, 6, head + pad4(data) + options)


def opb(order, iid, units, data):
    head = struct.pack(
        order + "HHIIII", iid, 0, units >> 32, units & 0xFFFFFFFF, len(data), len(data)
    )
    return block(order, 2, head + data)


def spb(order, orig, data):
    return block(order, 3, struct.pack(order + "I", orig) + data)


def exact(units: int, per_second: int, offset: int = 0) -> float:
    """The float nearest to units / per_second + offset seconds."""
    return float(Fraction(units, per_second) + offset)


def read_all(path, **kwargs):
    """(packets, warning lines, reader) for a whole file."""
    lines: list[str] = []
    with open_capture(path, on_warning=lines.append, **kwargs) as reader:
        packets = list(reader)
    return packets, lines, reader


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- a multi-interface, two-section pcapng and what it holds ----------------------------------

# a Name Resolution Block: 10.0.0.1 is "reg", then the end-of-records record
NRB = block(LE, 4, struct.pack(LE + "HH", 1, 8) + bytes([10, 0, 0, 1]) + b"reg\0" + bytes(4))

ETH0_NS = 1_700_000_000_123_456_789  # 10^-9 units
TUN_UNITS = 5 * 2**20 + 2**19 + 1  # 2^-20 units, plus an if_tsoffset of 1.6e9 s
OPB_NS = 1_700_000_001_000_000_001
SLL_US = 1_700_000_002_654_321  # default 10^-6 units


def multi_pcapng(*, tshark_safe: bool = False) -> tuple[bytes, list[tuple[float, int, bytes]]]:
    """Two sections (little- then big-endian); the first has two interfaces.

    With tshark_safe, leave out what tshark shows differently: SPBs (no timestamp) and custom
    blocks (tshark lists them as records).
    """
    expected = []
    parts = [
        shb(LE, opt(LE, 4, b"test suite") + struct.pack(LE + "HH", 0, 0)),
        idb(LE, LINKTYPE_ETHERNET, 0, opt(LE, 2, b"eth0"), tsresol(LE, 9)),
        NRB,
        idb(
            LE,
            LINKTYPE_RAW,
            1500,
            opt(LE, 3, b"a tunnel"),
            tsresol(LE, 0x94),
            tsoffset(LE, 1_600_000_000),
        ),
        block(LE, 5, struct.pack(LE + "III", 0, 0, 0)),  # ISB
        block(LE, 0x80001234, b"local use block"),
    ]
    if not tshark_safe:
        parts.append(block(LE, 0x40000BAD, struct.pack(LE + "I", 32473) + b"custom"))
    a = bytes(range(60))
    parts.append(epb(LE, 0, ETH0_NS, a))
    expected.append((exact(ETH0_NS, 10**9), LINKTYPE_ETHERNET, a))
    b = b"\x45" + bytes(40)
    parts.append(epb(LE, 1, TUN_UNITS, b, options=opt(LE, 2, struct.pack(LE + "I", 1)) + bytes(4)))
    expected.append((exact(TUN_UNITS, 2**20, 1_600_000_000), LINKTYPE_RAW, b))
    c = b"C" * 33
    parts.append(opb(LE, 0, OPB_NS, c))
    expected.append((exact(OPB_NS, 10**9), LINKTYPE_ETHERNET, c))
    if not tshark_safe:
        d = b"D" * 7
        parts.append(spb(LE, 7, d))  # no timestamp: keeps the previous packet's
        expected.append((exact(OPB_NS, 10**9), LINKTYPE_ETHERNET, d))
    # second section, the other byte order: interfaces start over
    parts += [shb(BE), idb(BE, LINKTYPE_LINUX_SLL, 64)]
    e = b"E" * 64
    parts.append(epb(BE, 0, SLL_US, e, orig=80))
    expected.append((exact(SLL_US, 10**6), LINKTYPE_LINUX_SLL, e))
    if not tshark_safe:
        f = bytes(range(64))
        parts.append(spb(BE, 100, f))  # captured = min(100, snaplen 64, body 64)
        expected.append((exact(SLL_US, 10**6), LINKTYPE_LINUX_SLL, f))
    parts.append(block(BE, 0x80000001, b"trailing local block"))
    return b"".join(parts), expected


# -- pcap -------------------------------------------------------------------------------------


def registry_packets():
    pkts = []
    for i, size in enumerate((0, 1, 17, 300, 1460)):
        p = (
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="10.0.0.1", dst="10.0.0.2")
            / TCP(sport=40000 + i, dport=5000, flags="PA", seq=1000 * i)
            / Raw(bytes((i + j) % 256 for j in range(size)))
        )
        p.time = Decimal(f"1700000000.{i:06d}") + Decimal(i) + Decimal("0.000123")
        pkts.append(p)
    return pkts


def test_scapy_pcap_microseconds(tmp_path):
    pkts = registry_packets()
    path = tmp_path / "scapy.pcap"
    wrpcap(str(path), pkts)
    got, lines, reader = read_all(path)
    assert lines == []
    assert reader.format == "pcap"
    assert [p for _, _, p in got] == [bytes(p) for p in pkts]
    assert {lt for _, lt, _ in got} == {LINKTYPE_ETHERNET}
    for (ts, _, _), p in zip(got, pkts, strict=True):
        micro = int(p.time * 1_000_000)
        assert ts == exact(micro, 10**6)
    assert all(type(p) is bytes for _, _, p in got)


def test_scapy_pcap_nanoseconds(tmp_path):
    pkts = registry_packets()
    for i, p in enumerate(pkts):
        p.time = Decimal("1700000000.123456789") + i
    path = tmp_path / "nano.pcap"
    with PcapWriter(str(path), nano=True) as w:
        for p in pkts:
            w.write(p)
    got, lines, _ = read_all(path)
    assert lines == []
    assert [p for _, _, p in got] == [bytes(p) for p in pkts]
    for i, (ts, _, _) in enumerate(got):
        assert ts == exact(1_700_000_000_123_456_789 + i * 10**9, 10**9)


@pytest.mark.parametrize("order", [LE, BE])
@pytest.mark.parametrize("nano", [False, True])
def test_handbuilt_pcap_both_orders_and_resolutions(tmp_path, order, nano):
    per_second = 10**9 if nano else 10**6
    records = [
        (1_700_000_000, per_second - 1, b"\x01" * 60),
        (1_700_000_001, 0, b""),
        (4_000_000_000, 5, bytes(range(256)) * 6),
    ]
    # upper bits of the link-type field carry FCS information, not the link type
    data = pcap_bytes(records, order=order, nano=nano, network=LINKTYPE_RAW | 0x1C000000)
    got, lines, reader = read_all(write(tmp_path, "h.pcap", data))
    assert lines == []
    assert got == [
        (exact(sec * per_second + frac, per_second), LINKTYPE_RAW, pkt)
        for sec, frac, pkt in records
    ]
    assert reader.bytes_read == reader.size == len(data)
    assert reader.packets == 3


def test_pcap_with_no_records(tmp_path):
    got, lines, reader = read_all(write(tmp_path, "empty.pcap", pcap_bytes([])))
    assert got == [] and lines == []
    assert reader.bytes_read == 24


def test_pcap_captured_length_shorter_than_original(tmp_path):
    data = pcap_bytes([(1, 2, b"abc", 1514)])
    got, _, _ = read_all(write(tmp_path, "snap.pcap", data))
    assert got == [(exact(1_000_002, 10**6), LINKTYPE_ETHERNET, b"abc")]


# -- pcapng -----------------------------------------------------------------------------------


def test_scapy_pcapng(tmp_path):
    pkts = registry_packets()
    path = tmp_path / "scapy.pcapng"
    wrpcapng(str(path), pkts)
    got, lines, reader = read_all(path)
    assert lines == []
    assert reader.format == "pcapng"
    assert [p for _, _, p in got] == [bytes(p) for p in pkts]
    for (ts, lt, _), p in zip(got, pkts, strict=True):
        assert lt == LINKTYPE_ETHERNET
        assert ts == pytest.approx(float(p.time), abs=1e-6)


def test_scapy_pcapng_several_interfaces(tmp_path):
    eth = Ether() / IP(dst="10.0.0.1") / TCP(dport=5000) / Raw(b"GET /v2/ HTTP/1.1\r\n\r\n")
    eth.time, eth.sniffed_on = Decimal("1700000000.25"), "eth0"
    raw = IP(dst="10.0.0.2") / TCP(dport=5000)
    raw.time, raw.sniffed_on = Decimal("1700000001.5"), "tun0"
    sll = CookedLinux() / IP(dst="10.0.0.3")
    sll.time, sll.sniffed_on = Decimal("1700000002.75"), "any"
    path = tmp_path / "ifaces.pcapng"
    with PcapNgWriter(str(path)) as w:
        for p in (eth, raw, sll, eth):
            w.write(p)
    got, lines, _ = read_all(path)
    assert lines == []
    assert got == [
        (1700000000.25, LINKTYPE_ETHERNET, bytes(eth)),
        (1700000001.5, LINKTYPE_IPV4, bytes(raw)),
        (1700000002.75, LINKTYPE_LINUX_SLL, bytes(sll)),
        (1700000000.25, LINKTYPE_ETHERNET, bytes(eth)),
    ]


def test_pcapng_interfaces_resolutions_offsets_sections(tmp_path):
    data, expected = multi_pcapng()
    got, lines, reader = read_all(write(tmp_path, "multi.pcapng", data))
    assert lines == []
    assert got == expected
    assert reader.bytes_read == reader.size == len(data)
    assert reader.packets == len(expected)


def test_pcapng_big_endian_first_section(tmp_path):
    data = (
        shb(BE)
        + idb(BE, LINKTYPE_RAW, 0, tsresol(BE, 3))
        + epb(BE, 0, 1_700_000_000_001, b"x" * 5)
        + shb(LE)
        + idb(LE, LINKTYPE_ETHERNET, 0, tsresol(LE, 0x80))  # 2^0: whole seconds
        + epb(LE, 0, 1_700_000_009, b"y" * 6)
    )
    got, lines, _ = read_all(write(tmp_path, "be.pcapng", data))
    assert lines == []
    assert got == [
        (exact(1_700_000_000_001, 1000), LINKTYPE_RAW, b"x" * 5),
        (1_700_000_009.0, LINKTYPE_ETHERNET, b"y" * 6),
    ]


def test_pcapng_negative_tsoffset(tmp_path):
    data = (
        shb(LE)
        + idb(LE, LINKTYPE_ETHERNET, 0, tsoffset(LE, -100))
        + epb(LE, 0, 1_000_000_500_000, b"p")
    )
    got, _, _ = read_all(write(tmp_path, "neg.pcapng", data))
    assert got == [(999_900.5, LINKTYPE_ETHERNET, b"p")]


def test_pcapng_spb_uses_interface_zero_snaplen(tmp_path):
    data = (
        shb(LE)
        + idb(LE, LINKTYPE_RAW, 5)
        + idb(LE, LINKTYPE_ETHERNET, 0)
        + spb(LE, 1000, b"abcde")  # snaplen 5 of interface 0, not the padded body of 8
        + spb(LE, 3, b"xyz")  # original length shorter than the padded body
        + spb(LE, 10, b"")  # body shorter than both: what is there
    )
    got, lines, _ = read_all(write(tmp_path, "spb.pcapng", data))
    assert lines == []
    assert got == [
        (0.0, LINKTYPE_RAW, b"abcde"),
        (0.0, LINKTYPE_RAW, b"xyz"),
        (0.0, LINKTYPE_RAW, b""),
    ]


def test_pcapng_new_section_forgets_interfaces(tmp_path):
    data = (
        shb(LE)
        + idb(LE, 1)
        + idb(LE, 101)
        + epb(LE, 1, 10**6, b"ok")
        + shb(LE)
        + idb(LE, 113)
        + epb(LE, 1, 10**6, b"gone")
    )
    path = write(tmp_path, "reset.pcapng", data)
    got, lines, reader = read_all(path)
    assert got == [(1.0, 101, b"ok")]
    assert len(lines) == 1
    assert "undeclared interface 1" in lines[0]
    assert reader.warnings == [
        CaptureWarning(str(path), len(data) - len(epb(LE, 1, 10**6, b"gone")), lines[0])
    ]


def test_pcapng_section_without_interfaces(tmp_path):
    data = shb(LE) + spb(LE, 3, b"abc")
    got, lines, _ = read_all(write(tmp_path, "noif.pcapng", data))
    assert got == [] and len(lines) == 1 and "no interface" in lines[0]


# -- truncation and corruption ----------------------------------------------------------------


def pcap_sample():
    records = [(1_700_000_000 + i, i, bytes([i]) * (50 + 37 * i)) for i in range(6)]
    return pcap_bytes(records), records


def record_ends_pcap(data: bytes) -> list[int]:
    ends, pos = [24], 24
    while pos < len(data):
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
        ends.append(pos)
    return ends


def block_ends_pcapng(data: bytes) -> list[int]:
    ends, pos, order = [], 0, LE
    while pos < len(data):
        if data[pos : pos + 4] == b"\x0a\x0d\x0d\x0a":
            order = LE if data[pos + 8 : pos + 12] == b"\x4d\x3c\x2b\x1a" else BE
        pos += struct.unpack_from(order + "I", data, pos + 4)[0]
        ends.append(pos)
    return ends


@pytest.mark.parametrize("where", ["data", "header"])
def test_pcap_truncated_last_record(tmp_path, where):
    data, records = pcap_sample()
    last = record_ends_pcap(data)[-2]
    cut = data[:-3] if where == "data" else data[: last + 10]
    path = write(tmp_path, f"cut-{where}.pcap", cut)
    got, lines, reader = read_all(path)
    assert [p for _, _, p in got] == [r[2] for r in records[:-1]]
    assert lines == [f"{path}: truncated record at offset {last}: kept 5 packets before it"]
    assert reader.warnings[0].offset == last
    assert reader.packets == 5


def test_pcapng_truncated_last_block(tmp_path):
    data, expected = multi_pcapng()
    ends = block_ends_pcapng(data)
    # cut inside the last packet block (the trailing local block and the SPB go too)
    last_packet_start = ends[-3]
    path = write(tmp_path, "cut.pcapng", data[: last_packet_start + 20])
    got, lines, _ = read_all(path)
    assert got == expected[:-1]
    assert lines == [
        f"{path}: truncated block at offset {last_packet_start}: kept {len(expected) - 1}"
        " packets before it"
    ]


def test_pcapng_block_length_past_eof(tmp_path):
    good = shb(LE) + idb(LE, 1) + epb(LE, 0, 10**6, b"one")
    bad = struct.pack(LE + "IIIIIII", 6, 1000, 0, 0, 2 * 10**6, 4, 4) + b"two!"
    got, lines, _ = read_all(write(tmp_path, "past.pcapng", good + bad))
    assert got == [(1.0, 1, b"one")]
    assert len(lines) == 1 and f"truncated block at offset {len(good)}" in lines[0]


@pytest.mark.parametrize("name, builder", [("pcap", pcap_sample), ("pcapng", multi_pcapng)])
def test_every_cut_point(tmp_path, name, builder):
    """Cut a valid file at every length: a prefix of the packets, one warning unless on a bound."""
    data, _ = builder()
    full, _, _ = read_all(write(tmp_path, f"full.{name}", data))
    ends = record_ends_pcap(data) if name == "pcap" else block_ends_pcapng(data)
    first = 24 if name == "pcap" else 28
    path = tmp_path / f"cut.{name}"
    for k in range(first):
        path.write_bytes(data[:k])
        with pytest.raises(CaptureFormatError):
            open_capture(path)
    for k in range(first, len(data) + 1):
        path.write_bytes(data[:k])
        got, lines, reader = read_all(path)
        assert got == full[: len(got)]
        assert len(lines) == (0 if k in ends else 1), k
        assert reader.bytes_read <= k


def test_pcap_absurd_captured_length_mid_file(tmp_path):
    data, records = pcap_sample()
    ends = record_ends_pcap(data)
    corrupt = bytearray(data)
    struct.pack_into("<I", corrupt, ends[3] + 8, MAX_RECORD + 1)
    path = write(tmp_path, "absurd.pcap", bytes(corrupt))
    got, lines, _ = read_all(path)
    assert [p for _, _, p in got] == [r[2] for r in records[:3]]
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: corrupt record (captured length {MAX_RECORD + 1})")
    assert f"offset {ends[3]}: kept 3 packets" in lines[0]


@pytest.mark.parametrize("length", [13, 8, 0, 30])
def test_pcapng_bad_block_length_mid_file(tmp_path, length):
    head = shb(LE) + idb(LE, 1) + epb(LE, 0, 10**6, b"one")
    tail = epb(LE, 0, 2 * 10**6, b"two")
    bad = struct.pack(LE + "II", 0x80000001, length) + bytes(24)
    got, lines, _ = read_all(write(tmp_path, "badlen.pcapng", head + bad + tail))
    assert got == [(1.0, 1, b"one")]
    assert len(lines) == 1 and f"corrupt block (type 0x80000001, length {length})" in lines[0]
    assert f"offset {len(head)}: kept 1 packets" in lines[0]


def test_pcapng_captured_length_beyond_block(tmp_path):
    head = shb(LE) + idb(LE, 1) + epb(LE, 0, 10**6, b"one")
    bad = bytearray(epb(LE, 0, 2 * 10**6, b"two!"))
    struct.pack_into(LE + "I", bad, 20, 400)
    got, lines, _ = read_all(write(tmp_path, "caplen.pcapng", head + bytes(bad)))
    assert got == [(1.0, 1, b"one")]
    assert len(lines) == 1 and "corrupt packet (captured length 400)" in lines[0]


def test_random_corruption_never_raises(tmp_path):
    data, _ = multi_pcapng()
    rng = random.Random(1234)
    path = tmp_path / "fuzz.pcapng"
    for _ in range(400):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(28, len(mutated))] = rng.randrange(256)
        path.write_bytes(bytes(mutated))
        got, lines, _ = read_all(path, window=4096)
        assert len(lines) <= 1
        assert all(isinstance(p, bytes) and isinstance(ts, float) for ts, _, p in got)


# -- not a capture ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, hint",
    [
        (b"", "empty file"),
        (b"\xd4\xc3\xb2", "only 3 bytes"),
        (b"GET /v2/ HTTP/1.1\r\nHost: registry\r\n\r\n" * 3, "magic 0x47455420"),
        (b"\xd4\xc3\xb2\xa1" + bytes(16), "truncated pcap header"),
        (b"\x0a\x0d\x0d\x0a\x1c\0\0\0\x4d\x3c\x2b\x1a", "truncated pcapng section header"),
        (shb(LE)[:8] + b"\xde\xad\xbe\xef" + shb(LE)[12:], "bad byte-order magic 0xdeadbeef"),
        (b"\x0a\x0d\x0d\x0a\x1d\0\0\0\x4d\x3c\x2b\x1a" + bytes(20), "corrupt pcapng section"),
    ],
)
def test_not_a_capture(tmp_path, content, hint):
    path = write(tmp_path, "notes.txt", content)
    with pytest.raises(CaptureFormatError) as err:
        open_capture(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert hint in message
    assert "\n" not in message


def test_missing_file_and_directory(tmp_path):
    for path in (tmp_path / "missing.pcap", tmp_path):
        with pytest.raises(CaptureFormatError) as err:
            open_capture(path)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_path_with_newline_stays_one_line(tmp_path):
    path = write(tmp_path, "bad\nname.pcap", b"nope")
    with pytest.raises(CaptureFormatError) as err:
        open_capture(path)
    assert "\n" not in str(err.value)


# -- windows, memory and the reader object ----------------------------------------------------

VARIED = [0, 1, 3, 60, 1514, 4080, 4095, 4096, 4097, 9000, 70_000, 5, 1500, 65_535, 2, 12_345]


def varied_pcap():
    return pcap_bytes([(1_700_000_000 + i, i * 1000, bytes([i]) * n) for i, n in enumerate(VARIED)])


def varied_pcapng():
    parts = [shb(LE), idb(LE, 1), idb(LE, 101, 0, tsresol(LE, 9))]
    for i, n in enumerate(VARIED):
        parts.append(epb(LE, i % 2, 1_700_000_000 * 10**6 + i, bytes([i]) * n))
        if i % 5 == 0:  # non-packet blocks of all sizes too, one bigger than the window
            parts.append(block(LE, 0x80000002, bytes(n)))
    parts.append(spb(LE, 9000, bytes(range(256)) * 40))
    return b"".join(parts)


@pytest.mark.parametrize("name, builder", [("pcap", varied_pcap), ("pcapng", varied_pcapng)])
@pytest.mark.parametrize("window", [1, 4096, 5000, 65_536])
def test_small_windows_match_big_window(tmp_path, name, builder, window):
    path = write(tmp_path, f"varied.{name}", builder())
    reference, lines, _ = read_all(path)
    assert lines == []
    assert len(reference) == len(VARIED) + (name == "pcapng")
    assert [len(p) for _, _, p in reference][: len(VARIED)] == VARIED
    got, lines, reader = read_all(path, window=window)
    assert lines == []
    assert got == reference
    assert reader.bytes_read == reader.size


def test_big_skipped_block_truncated(tmp_path):
    head = shb(LE) + idb(LE, 1) + epb(LE, 0, 10**6, b"one")
    big = block(LE, 0x80000003, bytes(20_000))
    path = write(tmp_path, "bigcut.pcapng", head + big[:-100])
    got, lines, _ = read_all(path, window=4096)
    assert got == [(1.0, 1, b"one")]
    assert len(lines) == 1 and f"truncated block at offset {len(head)}" in lines[0]


def test_unmappable_file_falls_back_to_reads(tmp_path, monkeypatch):
    path = write(tmp_path, "varied.pcapng", varied_pcapng())
    reference, _, _ = read_all(path)

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(pcap_mod.mmap, "mmap", refuse)
    for window in (1, 4096, 1 << 20):
        got, lines, reader = read_all(path, window=window)
        assert lines == [] and got == reference
        assert reader.bytes_read == reader.size
    cut = write(tmp_path, "cut.pcapng", varied_pcapng()[:-7])
    got, lines, _ = read_all(cut, window=4096)
    assert got == reference[:-1] and len(lines) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe(tmp_path):
    data, expected = multi_pcapng()
    fifo = tmp_path / "pipe.pcapng"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        got, lines, reader = read_all(fifo, window=64)
    finally:
        writer.join(5)
    assert got == expected and lines == []
    assert reader.size == 0 and reader.bytes_read == len(data)


def test_reader_object(tmp_path):
    data = varied_pcap()
    path = write(tmp_path, "varied.pcap", data)
    reader = open_capture(path, window=4096)  # a PathLike
    assert isinstance(reader, CaptureReader)
    assert reader.path == str(path) and reader.size == len(data) and reader.bytes_read == 0
    progress, packets = [], []
    for item in reader:
        packets.append(item)
        progress.append(reader.bytes_read)
    assert progress == sorted(progress) and progress[-1] <= len(data)
    assert 0 < progress[len(progress) // 2] < len(data)  # moves during the replay
    assert reader.bytes_read == len(data)
    assert list(reader) == []  # one pass
    reader.close()
    reader.close()
    # the packets are copies: still whole once the mapping is gone
    assert [len(p) for _, _, p in packets] == VARIED


def test_close_mid_iteration(tmp_path):
    path = write(tmp_path, "varied.pcap", varied_pcap())
    with open_capture(path, window=4096) as reader:
        it = iter(reader)
        first = next(it)
        second = next(it)
    assert (first[2], second[2]) == (b"", b"\x01")
    assert list(it) == []
    closed = open_capture(path)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        iter(closed)


def test_warning_without_callback(tmp_path):
    data, _ = pcap_sample()
    path = write(tmp_path, "cut.pcap", data[:-1])
    with open_capture(path) as reader:
        assert len(list(reader)) == 5
    assert len(reader.warnings) == 1 and "truncated record" in reader.warnings[0].message


# -- tshark as a second opinion ---------------------------------------------------------------


def tshark_frames(path: Path) -> list[tuple[float, int]]:
    result = subprocess.run(
        [TSHARK, "-r", str(path), "-T", "fields", "-e", "frame.time_epoch", "-e", "frame.cap_len"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    rows = [line.split("\t") for line in result.stdout.splitlines() if line.strip()]
    return [(float(ts), int(caplen)) for ts, caplen in rows]


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_tshark_agrees(tmp_path):
    pcap_path = tmp_path / "scapy.pcap"
    wrpcap(str(pcap_path), registry_packets())
    ng_data, _ = multi_pcapng(tshark_safe=True)
    files = [
        pcap_path,
        write(
            tmp_path, "nano-be.pcap", pcap_bytes([(1, 999_999_999, b"n" * 70)], order=BE, nano=True)
        ),
        write(tmp_path, "multi.pcapng", ng_data),
        write(tmp_path, "varied.pcapng", varied_pcapng()[: -len(spb(LE, 9000, bytes(10240)))]),
    ]
    for path in files:
        ours, lines, _ = read_all(path)
        theirs = tshark_frames(path)
        assert lines == []
        assert len(ours) == len(theirs), path
        for (ts, _, pkt), (their_ts, their_len) in zip(ours, theirs, strict=True):
            assert len(pkt) == their_len
            assert ts == pytest.approx(their_ts, abs=1e-6)
