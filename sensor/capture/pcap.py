"""Capture files in: a fast, bounded-memory reader for pcap and pcapng.

This is the replay edge of the hot path. `open_capture` checks the file's magic eagerly (so the
CLI can refuse a bad file before any work starts) and returns a `CaptureReader`; iterating it
yields ``(ts, linktype, packet)`` for every packet record, where ``ts`` is epoch seconds as a
float, ``linktype`` the LINKTYPE_* value of the packet's interface and ``packet`` a ``bytes``
copy of the captured data.

The file is read through read-only ``mmap`` windows (8 MiB by default, offsets aligned to
``mmap.ALLOCATIONGRANULARITY``), remapped whenever a record crosses the end of the current
window, so a 10 GB capture replays in the same memory as a 10 MB one. A file that cannot be
mapped is read with plain buffered reads through the same window logic.

A damaged capture is an anomaly, not a crash: a truncated last record or a corrupt record
stops the iteration after everything before it was yielded, and reports one line through
``on_warning`` (also kept in ``CaptureReader.warnings``).

Formats: pcap (microsecond magic 0xa1b2c3d4 and nanosecond 0xa1b23c4d, either byte order) and
pcapng (several sections with their own byte order, several interfaces each with its own
linktype, ``if_tsresol`` and ``if_tsoffset``; Enhanced, Simple and obsolete Packet Blocks;
every other block type skipped by its length).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO

__all__ = ["CaptureFormatError", "CaptureReader", "CaptureWarning", "open_capture"]

DEFAULT_WINDOW = 8 << 20
# Largest packet record believed: bigger ones mean a corrupt length field, not a packet.
MAX_RECORD = 256 << 20

_GRANULARITY = mmap.ALLOCATIONGRANULARITY
_MADV_SEQUENTIAL: int | None = getattr(mmap, "MADV_SEQUENTIAL", None)

# pcap: magic as read little-endian -> (struct byte order, fraction units per second)
_PCAP_MAGICS = {
    0xA1B2C3D4: ("<", 1_000_000),
    0xD4C3B2A1: (">", 1_000_000),
    0xA1B23C4D: ("<", 1_000_000_000),
    0x4D3CB2A1: (">", 1_000_000_000),
}
_PCAP_HEADER_LEN = 24

# pcapng block types
_SHB = 0x0A0D0D0A  # the same read in either byte order
_IDB = 1
_OPB = 2  # obsolete Packet Block
_SPB = 3
_EPB = 6
_BOM_LE = b"\x4d\x3c\x2b\x1a"
_BOM_BE = b"\x1a\x2b\x3c\x4d"
_SHB_MIN_LEN = 28
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

_PEEK_LEN = 28  # enough for a pcap global header and a minimal Section Header Block


def _structs(order: str) -> dict[str, struct.Struct]:
    return {
        "pcap_hdr": struct.Struct(order + "IHHiIII"),
        "pcap_rec": struct.Struct(order + "IIII"),
        "block": struct.Struct(order + "II"),
        "epb": struct.Struct(order + "IIIII"),  # interface, ts high, ts low, caplen, len
        "opb": struct.Struct(order + "HHIIII"),  # interface, drops, ts high, ts low, caplen, len
        "u16": struct.Struct(order + "H"),
        "u32": struct.Struct(order + "I"),
        "i64": struct.Struct(order + "q"),
        "idb": struct.Struct(order + "HHI"),  # linktype, reserved, snaplen
        "opt": struct.Struct(order + "HH"),
    }


_LE = _structs("<")
_BE = _structs(">")
_U32_LE = _LE["u32"]


class CaptureFormatError(Exception):
    """The file is not a pcap or pcapng capture, or its header cannot be read.

    The message is a single line that names the file.
    """


@dataclass(frozen=True, slots=True)
class CaptureWarning:
    """Something odd in a capture file that stopped the replay early (truncation, corruption)."""

    path: str
    offset: int
    message: str


def _show(path: str) -> str:
    """The path as it goes into a one-line message."""
    return path if path.isprintable() else repr(path)


class _Windows:
    """Hands out buffers covering a requested byte range of the file: mmap windows or reads.

    `get(pos, need)` returns ``(buf, base)`` where ``buf[i]`` is file byte ``base + i`` and
    ``buf`` covers ``[pos, pos + need)``, or as much of it as the file holds (``buf`` ends at
    EOF). Positions only move forward. The previous window is released first, so callers must
    not keep views into it (they keep unpacked ints and ``bytes`` copies).
    """

    __slots__ = ("_fh", "_size", "window", "_mm", "_rbuf", "_rbase", "use_mmap")

    def __init__(self, fh: IO[bytes], size: int, window: int, peek: bytes, use_mmap: bool):
        self._fh = fh
        self._size = size
        self.window = window
        self._mm: mmap.mmap | None = None
        # read mode: the file position is just past `peek`, which holds bytes [0, len(peek)).
        self._rbuf = peek
        self._rbase = 0
        self.use_mmap = use_mmap

    def get(self, pos: int, need: int) -> tuple[bytes | mmap.mmap, int]:
        if self.use_mmap:
            return self._map(pos, need)
        return self._read(pos, need)

    def _map(self, pos: int, need: int) -> tuple[bytes | mmap.mmap, int]:
        self.release()
        base = pos - pos % _GRANULARITY
        length = min(self._size - base, max(self.window, pos - base + need))
        if length <= 0:
            return b"", pos
        mm = mmap.mmap(self._fh.fileno(), length, access=mmap.ACCESS_READ, offset=base)
        if _MADV_SEQUENTIAL is not None:
            mm.madvise(_MADV_SEQUENTIAL)
        self._mm = mm
        return mm, base

    def _read(self, pos: int, need: int) -> tuple[bytes | mmap.mmap, int]:
        buf, base = self._rbuf, self._rbase
        read = self._fh.read
        end = base + len(buf)
        if pos >= end:
            # skip [end, pos) without holding it: discard in window-sized reads
            gap = pos - end
            while gap:
                chunk = read(min(gap, self.window))
                if not chunk:
                    break
                gap -= len(chunk)
            buf, base = b"", pos - gap
            if gap:  # EOF before pos
                self._rbuf, self._rbase = buf, base
                return buf, base
        else:
            buf, base = buf[pos - base :], pos
        want = max(self.window, need) - len(buf)
        if want > 0:
            buf += read(want)
        self._rbuf, self._rbase = buf, base
        return buf, base

    def release(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            mm.close()
        self._rbuf = b""


class CaptureReader:
    """An open pcap or pcapng file; iterate it once for ``(ts, linktype, packet)`` tuples.

    ``size`` is the file size in bytes (0 when unknown, e.g. a pipe); ``bytes_read`` is the
    file offset reached so far, for a progress bar, and ``packets`` the packets yielded: both
    are brought up to date whenever a new window is mapped (every ``window`` bytes, which keeps
    the per-packet loop free of attribute stores) and when the iteration ends. ``format`` is
    ``"pcap"`` or ``"pcapng"``; ``warnings`` holds what was reported through ``on_warning``.
    """

    def __init__(
        self,
        path: str,
        fh: IO[bytes],
        size: int,
        fmt: str,
        peek: bytes,
        window: int,
        use_mmap: bool,
        on_warning: Callable[[str], None] | None,
    ) -> None:
        self.path = path
        self.size = size
        self.format = fmt
        self.bytes_read = 0
        self.packets = 0
        self.warnings: list[CaptureWarning] = []
        self._fh = fh
        self._peek = peek
        self._windows = _Windows(fh, size, window, peek, use_mmap)
        self._on_warning = on_warning
        self._gen: Generator[tuple[float, int, bytes], None, None] | None = None
        self._closed = False

    # -- public ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[float, int, bytes]]:
        """The packets, in file order. A reader is one pass: iterating again continues it."""
        if self._gen is None:
            if self._closed:
                raise ValueError(f"{_show(self.path)}: capture is closed")
            records = self._pcap_records if self.format == "pcap" else self._pcapng_records
            self._gen = records()
        return self._gen

    def close(self) -> None:
        """Release the window and the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._gen is not None:
            self._gen.close()
        self._windows.release()
        self._fh.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CaptureReader {self.format} {self.path!r} {self.bytes_read}/{self.size}>"

    # -- internals ---------------------------------------------------------------------------

    def _warn(self, offset: int, what: str, packets: int) -> None:
        message = f"{_show(self.path)}: {what} at offset {offset}: kept {packets} packets before it"
        self.warnings.append(CaptureWarning(self.path, offset, message))
        if self._on_warning is not None:
            self._on_warning(message)

    def _finish(self, offset: int, packets: int) -> None:
        self.bytes_read = offset
        self.packets = packets
        self._windows.release()

    def _pcap_records(self) -> Generator[tuple[float, int, bytes], None, None]:
        peek = self._peek
        order, units = _PCAP_MAGICS[_U32_LE.unpack_from(peek)[0]]
        structs = _LE if order == "<" else _BE
        linktype = structs["pcap_hdr"].unpack_from(peek)[6] & 0xFFFF
        rec = structs["pcap_rec"].unpack_from
        get = self._windows.get
        maxlen = MAX_RECORD

        buf, base = get(_PCAP_HEADER_LEN, 16)
        blen = len(buf)
        rel = _PCAP_HEADER_LEN - base
        n = 0
        try:
            while True:
                if rel + 16 > blen:
                    pos = base + rel
                    self.bytes_read = pos
                    self.packets = n
                    buf, base = get(pos, 16)
                    blen = len(buf)
                    rel = pos - base
                    if rel + 16 > blen:
                        if rel < blen:
                            self._warn(pos, "truncated record", n)
                        return
                sec, frac, incl, _orig = rec(buf, rel)
                start = rel + 16
                end = start + incl
                if end > blen or incl > maxlen:
                    pos = base + rel
                    if incl > maxlen:
                        self._warn(pos, f"corrupt record (captured length {incl})", n)
                        return
                    self.bytes_read = pos
                    self.packets = n
                    buf, base = get(pos, 16 + incl)
                    blen = len(buf)
                    rel = pos - base
                    start = rel + 16
                    end = start + incl
                    if end > blen:
                        self._warn(pos, "truncated record", n)
                        return
                yield (sec * units + frac) / units, linktype, buf[start:end]
                n += 1
                rel = end
        finally:
            self._finish(base + min(rel, blen), n)

    def _pcapng_records(self) -> Generator[tuple[float, int, bytes], None, None]:
        get = self._windows.get
        window = self._windows.window
        maxlen = MAX_RECORD
        structs = _LE
        block = structs["block"].unpack_from
        epb = structs["epb"].unpack_from
        # per interface: (linktype, snaplen, units per second, if_tsoffset in units)
        ifaces: list[tuple[int, int, int, int]] = []
        last_ts = 0.0

        buf, base = get(0, _SHB_MIN_LEN)
        blen = len(buf)
        rel = 0
        n = 0
        try:
            while True:
                if rel + 12 > blen:
                    pos = base + rel
                    self.bytes_read = pos
                    self.packets = n
                    buf, base = get(pos, 12)
                    blen = len(buf)
                    rel = pos - base
                    if rel + 12 > blen:
                        if rel < blen:
                            self._warn(pos, "truncated block", n)
                        return
                btype, blk = block(buf, rel)
                if btype == _SHB:
                    bom = buf[rel + 8 : rel + 12]
                    if bom == _BOM_LE:
                        structs = _LE
                    elif bom == _BOM_BE:
                        structs = _BE
                    else:
                        self._warn(
                            base + rel, f"corrupt section header (byte order {bom.hex()})", n
                        )
                        return
                    block = structs["block"].unpack_from
                    epb = structs["epb"].unpack_from
                    blk = block(buf, rel)[1]
                    ifaces = []
                end = rel + blk
                if end > blen or blk & 3 or blk < 12:
                    pos = base + rel
                    if blk & 3 or blk < 12:
                        self._warn(pos, f"corrupt block (type {btype:#x}, length {blk})", n)
                        return
                    if blk > window and btype not in (_EPB, _SPB, _OPB, _IDB, _SHB):
                        # skip a big block we do not read: only check that it ends in the file
                        buf, base = get(pos + blk - 4, 4)
                        blen = len(buf)
                        rel = pos + blk - base
                        if rel > blen:
                            self._warn(pos, "truncated block", n)
                            return
                        continue
                    if blk > maxlen + 64:
                        self._warn(pos, f"corrupt block (type {btype:#x}, length {blk})", n)
                        return
                    self.bytes_read = pos
                    self.packets = n
                    buf, base = get(pos, blk)
                    blen = len(buf)
                    rel = pos - base
                    end = rel + blk
                    if end > blen:
                        self._warn(pos, "truncated block", n)
                        return
                if btype == _EPB:
                    if blk < 32:
                        self._warn(base + rel, f"corrupt enhanced packet block (length {blk})", n)
                        return
                    iid, hi, lo, cap, _orig = epb(buf, rel + 8)
                    if cap > blk - 32:
                        self._warn(base + rel, f"corrupt packet (captured length {cap})", n)
                        return
                    try:
                        linktype, _snap, units, offset = ifaces[iid]
                    except IndexError:
                        self._warn(base + rel, f"packet on undeclared interface {iid}", n)
                        return
                    last_ts = ((hi << 32 | lo) + offset) / units
                    yield last_ts, linktype, buf[rel + 28 : rel + 28 + cap]
                    n += 1
                elif btype == _SPB:
                    if blk < 16 or not ifaces:
                        what = "no interface" if blk >= 16 else f"length {blk}"
                        self._warn(base + rel, f"corrupt simple packet block ({what})", n)
                        return
                    cap = min(structs["u32"].unpack_from(buf, rel + 8)[0], blk - 16)
                    snap = ifaces[0][1]
                    if snap:
                        cap = min(cap, snap)
                    # an SPB carries no timestamp: keep packet time from going back
                    yield last_ts, ifaces[0][0], buf[rel + 12 : rel + 12 + cap]
                    n += 1
                elif btype == _IDB:
                    if blk < 20:
                        self._warn(base + rel, f"corrupt interface block (length {blk})", n)
                        return
                    ifaces.append(_interface(structs, buf, rel, blk))
                elif btype == _OPB:
                    if blk < 32:
                        self._warn(base + rel, f"corrupt packet block (length {blk})", n)
                        return
                    iid, _drops, hi, lo, cap, _orig = structs["opb"].unpack_from(buf, rel + 8)
                    if cap > blk - 32:
                        self._warn(base + rel, f"corrupt packet (captured length {cap})", n)
                        return
                    try:
                        linktype, _snap, units, offset = ifaces[iid]
                    except IndexError:
                        self._warn(base + rel, f"packet on undeclared interface {iid}", n)
                        return
                    last_ts = ((hi << 32 | lo) + offset) / units
                    yield last_ts, linktype, buf[rel + 28 : rel + 28 + cap]
                    n += 1
                elif btype == _SHB and blk < _SHB_MIN_LEN:
                    self._warn(base + rel, f"corrupt section header (length {blk})", n)
                    return
                rel = end
        finally:
            self._finish(base + min(rel, blen), n)


def _interface(
    structs: dict[str, struct.Struct], buf: bytes | mmap.mmap, rel: int, blk: int
) -> tuple[int, int, int, int]:
    """An Interface Description Block → (linktype, snaplen, units per second, offset in units)."""
    linktype, _reserved, snaplen = structs["idb"].unpack_from(buf, rel + 8)
    units = 1_000_000
    offset = 0
    opt = structs["opt"].unpack_from
    pos = rel + 16
    end = rel + blk - 4
    while pos + 4 <= end:
        code, length = opt(buf, pos)
        pos += 4
        if code == 0 or pos + length > end:
            break
        if code == _OPT_IF_TSRESOL and length >= 1:
            res = buf[pos]
            units = 2 ** (res & 0x7F) if res & 0x80 else 10 ** (res & 0x7F)
        elif code == _OPT_IF_TSOFFSET and length >= 8:
            offset = structs["i64"].unpack_from(buf, pos)[0]
        pos += (length + 3) & ~3
    return linktype, snaplen, units, offset * units


def open_capture(
    path: str | os.PathLike[str],
    *,
    window: int = DEFAULT_WINDOW,
    on_warning: Callable[[str], None] | None = None,
) -> CaptureReader:
    """Open a pcap or pcapng file and check its header now.

    Raises `CaptureFormatError` (one line, naming the file) when the file cannot be opened or
    read, is empty or too short for a header, or does not start with a pcap or pcapng magic.
    ``window`` is the size of the mmap window in bytes; ``on_warning`` receives one line per
    truncated or corrupt record (iteration then stops).
    """
    name = os.fsdecode(os.fspath(path))
    if window < 1:
        raise ValueError(f"window must be positive, not {window}")
    try:
        fh = open(name, "rb")  # noqa: SIM115 - the reader owns it
    except OSError as exc:
        raise CaptureFormatError(f"{_show(name)}: cannot open: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fh.fileno())
        peek = fh.read(_PEEK_LEN)
    except OSError as exc:
        fh.close()
        raise CaptureFormatError(f"{_show(name)}: cannot read: {exc.strerror or exc}") from exc
    try:
        fmt = _check_header(name, peek)
    except CaptureFormatError:
        fh.close()
        raise
    regular = stat.S_ISREG(st.st_mode)
    size = st.st_size if regular else 0
    use_mmap = regular and size > 0
    if use_mmap:
        try:  # can this file be mapped at all? (some file systems refuse)
            mmap.mmap(fh.fileno(), min(size, _GRANULARITY), access=mmap.ACCESS_READ).close()
        except (OSError, ValueError):
            use_mmap = False
    return CaptureReader(name, fh, size, fmt, peek, window, use_mmap, on_warning)


def _check_header(name: str, peek: bytes) -> str:
    """Which format the first bytes announce: "pcap" or "pcapng"; else CaptureFormatError."""
    shown = _show(name)
    if not peek:
        raise CaptureFormatError(f"{shown}: not a pcap or pcapng file (empty file)")
    if len(peek) < 4:
        raise CaptureFormatError(
            f"{shown}: not a pcap or pcapng file (only {len(peek)} bytes: 0x{peek.hex()})"
        )
    magic = _U32_LE.unpack_from(peek)[0]
    if magic in _PCAP_MAGICS:
        if len(peek) < _PCAP_HEADER_LEN:
            raise CaptureFormatError(
                f"{shown}: truncated pcap header ({len(peek)} of {_PCAP_HEADER_LEN} bytes)"
            )
        return "pcap"
    if magic == _SHB:
        if len(peek) < _SHB_MIN_LEN:
            raise CaptureFormatError(
                f"{shown}: truncated pcapng section header ({len(peek)} of {_SHB_MIN_LEN} bytes)"
            )
        bom = peek[8:12]
        if bom == _BOM_LE:
            structs = _LE
        elif bom == _BOM_BE:
            structs = _BE
        else:
            raise CaptureFormatError(
                f"{shown}: not a pcapng file (bad byte-order magic 0x{bom.hex()})"
            )
        blk = structs["u32"].unpack_from(peek, 4)[0]
        if blk & 3 or blk < _SHB_MIN_LEN:
            raise CaptureFormatError(f"{shown}: corrupt pcapng section header (length {blk})")
        return "pcapng"
    raise CaptureFormatError(f"{shown}: not a pcap or pcapng file (magic 0x{peek[:4].hex()})")
