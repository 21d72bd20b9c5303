"""Per-direction HTTP/1.x message parser: heads parsed, bodies counted and skipped.

Sans-IO, fed by the TCP reassembler with in-order bytes (`feed`), lost ranges (`gap`) and the
end of the stream (`eof`). Header bytes are copied into a capped buffer; body bytes are only
counted, never copied, so a 1 GB blob costs what a 1 KB one does. A gap inside a body shortens
it; a gap anywhere else resyncs at the next message start. A TLS ClientHello at the start of the
client's stream is recognised (with its SNI) and the stream is then left alone.

Events go to a `sink` (txn.Conversation) by method call:
  request_head(head) · request_end(body_bytes, ts) · response_head(head) · response_end(...)
  response_method() -> the method of the request the next response answers (HEAD has no body)
  tls_client_hello(sni, version, ts) · tls_server_hello(ts) · anomaly(kind, detail, ts)
"""

from __future__ import annotations

import re

from .credentials import REDACTED, parse_authorization, redact_uri
from .records import NO_CREDENTIAL, RequestHead, ResponseHead

# Parser states.
HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, UNTIL_CLOSE, RESYNC, OPAQUE, CLOSED = (
    range(10))

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024
_SENSITIVE_HEADERS = frozenset(("authorization", "proxy-authorization", "cookie", "set-cookie"))
_METHODS = rb"(?:GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS|CONNECT|TRACE)"
_REQUEST_START = re.compile(_METHODS + rb" [!-~]")
_REQUEST_START_AFTER_NL = re.compile(rb"\n" + _METHODS + rb" [!-~]")
_RESPONSE_START = re.compile(rb"HTTP/1\.[01] ")
_RESPONSE_START_AFTER_NL = re.compile(rb"\nHTTP/1\.[01] ")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TLS_HANDSHAKE = 0x16
_RESYNC_CARRY = 15  # bytes kept while resynchronising: more than "\nOPTIONS /" needs


def header_value(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    """The first value of a header (names are lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


class MessageParser:
    """State shared by the request and the response parser of one direction."""

    __slots__ = ("sink", "state", "hbuf", "remaining", "body", "partial", "max_header",
                 "started", "ts0", "_head_scan", "body_left", "length", "lost", "_sink_end")

    is_request = True

    def __init__(self, sink, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        self.sink = sink
        self._sink_end = sink.request_end if self.is_request else sink.response_end
        self.state = HEAD
        self.hbuf = bytearray()
        self.remaining = 0  # bytes left in the current chunk
        self.body = 0  # body bytes seen (chunked and read-until-close bodies)
        # A body of known length is counted down in body_left alone (the engine's fast path
        # does the same); its size is worked out when it ends: length - body_left - lost.
        self.body_left = 0
        self.length = 0
        self.lost = 0
        self.partial = False
        self.max_header = max_header_bytes
        self.started = False  # any byte seen yet (TLS is only looked for at the stream start)
        self.ts0 = 0.0
        self._head_scan = 0

    # -- the three inputs -------------------------------------------------------------------

    def feed(self, buf: bytes, off: int, end: int, ts: float) -> None:
        """In-order stream bytes buf[off:end]."""
        # Fast path: the middle of a body of known length (body_left is 0 in any other state).
        if end - off < self.body_left:
            self.body_left -= end - off
            return
        while off < end:
            state = self.state
            if state == BODY:
                take = min(self.body_left, end - off)
                self.body_left -= take
                off += take
                if not self.body_left:
                    self._end_message(ts)
            elif state == HEAD:
                off = self._feed_head(buf, off, end, ts)
            elif state == UNTIL_CLOSE:
                self.body += end - off
                return
            elif state == CHUNK_DATA:
                take = min(self.remaining, end - off)
                self.remaining -= take
                self.body += take
                off += take
                if not self.remaining:
                    self.state = CHUNK_CRLF
            elif state in (CHUNK_SIZE, CHUNK_CRLF, TRAILERS):
                off = self._feed_chunk_line(buf, off, end, ts)
            elif state == RESYNC:
                off = self._resync(buf, off, end, ts)
            else:  # OPAQUE, CLOSED
                if state == OPAQUE:
                    self._opaque(buf, off, end, ts)
                return

    def gap(self, length: int, ts: float) -> None:
        """`length` stream bytes were lost before the next `feed`."""
        state = self.state
        self.partial = True
        if state == BODY and length <= self.body_left:
            self.body_left -= length
            self.lost += length
            if not self.body_left:
                self._end_message(ts)
            return
        if state == CHUNK_DATA and length <= self.remaining:
            self.remaining -= length
            if not self.remaining:
                self.state = CHUNK_CRLF
            return
        if state == UNTIL_CLOSE:
            return
        if state in (OPAQUE, CLOSED):
            return
        if state == HEAD and self.hbuf:
            self.sink.anomaly("gap-in-headers",
                              f"{length} bytes lost inside a message head; resynchronising", ts)
        elif state != HEAD:
            self.sink.anomaly("gap-in-body",
                              f"{length} bytes lost past the end of a body; resynchronising", ts)
        if state not in (HEAD, RESYNC):
            self._end_message(ts, complete=False)
        self.hbuf.clear()
        self.hbuf += b"\n"  # the end of a gap may be a message start, like a line start
        self._head_scan = 0
        self.state = RESYNC

    def eof(self, ts: float) -> None:
        """The stream ended (FIN, RST, idle timeout or the end of the capture)."""
        state = self.state
        if state == UNTIL_CLOSE:
            self._end_message(ts)
        elif state in (BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS):
            self.sink.anomaly("truncated-body", "stream ended inside a message body", ts)
            self._end_message(ts, complete=False)
        elif state == HEAD and self.hbuf.strip():
            self.sink.anomaly("truncated-head",
                              f"stream ended inside a message head ({len(self.hbuf)} bytes)", ts)
        self.hbuf.clear()
        self.state = CLOSED

    # -- heads ----------------------------------------------------------------------------

    def _feed_head(self, buf: bytes, off: int, end: int, ts: float) -> int:
        hbuf = self.hbuf
        if not hbuf:
            # Tolerate blank lines between messages (RFC 9112 §2.2).
            while off < end and buf[off] in (0x0D, 0x0A):
                off += 1
            if off == end:
                return off
            if not self.started and buf[off] == _TLS_HANDSHAKE:
                self.started = True
                return self._start_tls(buf, off, end, ts)
            self.started = True
            self.ts0 = ts
        start = len(hbuf)
        hbuf += buf[off:end]
        # The blank line is looked for from a little before the new bytes (it may straddle them).
        scan = self._head_scan
        cut = hbuf.find(b"\r\n\r\n", scan)
        term = 4
        lf = hbuf.find(b"\n\n", scan)
        if lf >= 0 and (cut < 0 or lf < cut):
            cut, term = lf, 2
        if cut < 0:
            if len(hbuf) > self.max_header:
                self.sink.anomaly("header-too-long",
                                  f"message head exceeds {self.max_header} bytes", ts)
                hbuf.clear()
                self._head_scan = 0
                self.state = RESYNC
                return end
            if not self._plausible_start(hbuf):
                return self._not_http(ts, end, bytes(hbuf))
            self._head_scan = max(0, len(hbuf) - 3)
            return end
        consumed = cut + term - start  # bytes of this segment that belong to the head
        head = bytes(hbuf[:cut])
        if not self._plausible_start(head):
            return self._not_http(ts, off + consumed, bytes(hbuf[:cut + term]))
        hbuf.clear()
        self._head_scan = 0
        self._on_head(head, ts)
        return off + consumed

    def _not_http(self, ts: float, off: int, scanned: bytes) -> int:
        """`scanned` (the bytes taken for a head, up to `off`) is not HTTP: resync within it."""
        self.sink.anomaly("not-http", "bytes that are not an HTTP/1.x message; resynchronising",
                          ts)
        self.hbuf.clear()
        self._head_scan = 0
        self.state = RESYNC
        after_nl = _REQUEST_START_AFTER_NL if self.is_request else _RESPONSE_START_AFTER_NL
        m = after_nl.search(scanned, 1)
        if m is None:
            self.hbuf += scanned[-_RESYNC_CARRY:]  # a message start may straddle segments
        else:  # a message starts inside what was scanned: parse from there
            self.state = HEAD
            self.feed(scanned, m.start() + 1, len(scanned), ts)
        return off

    def _plausible_start(self, data: bytes | bytearray) -> bool:
        if len(data) < 9:
            return True  # not enough to judge yet ("OPTIONS /" and "HTTP/1.1 " are 9 bytes)
        if self.is_request:
            return _REQUEST_START.match(data) is not None
        return _RESPONSE_START.match(data) is not None

    def _resync(self, buf: bytes, off: int, end: int, ts: float) -> int:
        start_at, after_nl = ((_REQUEST_START, _REQUEST_START_AFTER_NL) if self.is_request
                              else (_RESPONSE_START, _RESPONSE_START_AFTER_NL))
        # hbuf carries the last bytes scanned before this segment: a message start may
        # straddle segments ("\r\nGE" | "T /v2/ ...").
        carry = self.hbuf
        if carry:
            m = after_nl.search(bytes(carry) + bytes(buf[off:off + _RESYNC_CARRY]))
            if m is not None and m.start() + 1 < len(carry):
                del carry[:m.start() + 1]  # the message's first bytes start the head
                self.ts0 = ts
                self._head_scan = 0
                self.state = HEAD
                return off
        if start_at.match(buf, off, end):
            carry.clear()
            self.state = HEAD
            return off
        m = after_nl.search(buf, off, end)
        if m is None:
            carry += buf[max(off, end - _RESYNC_CARRY):end]
            del carry[:-_RESYNC_CARRY]
            return end
        carry.clear()
        self.state = HEAD
        return m.start() + 1

    @staticmethod
    def _split_head(head: bytes) -> tuple[str, tuple[tuple[str, str], ...], list[str]]:
        """Start line, headers (lower-case names) and problems found, from a raw head."""
        text = head.decode("latin-1")
        lines = text.split("\n")
        start_line = lines[0].rstrip("\r")
        headers: list[list[str]] = []
        problems: list[str] = []
        for raw_line in lines[1:]:
            line = raw_line.rstrip("\r")
            if not line:
                continue
            if line[0] in " \t":  # obsolete line folding
                if headers:
                    headers[-1][1] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                # The line may be a credential written wrong: name its size, never its text.
                problems.append(f"malformed header line ({len(line)} bytes)")
                continue
            headers.append([name.lower(), value.strip()])
        return start_line, tuple((n, v) for n, v in headers), problems

    def _body_framing(self, headers: tuple[tuple[str, str], ...],
                      ts: float) -> tuple[int | None, bool]:
        """(content length or None, chunked) from the headers, reporting what is inconsistent."""
        te = None
        lengths = []
        for name, value in headers:
            if name == "transfer-encoding":
                te = value if te is None else te + ", " + value
            elif name == "content-length":
                lengths.append(value)
        chunked = te is not None and te.lower().rsplit(",", 1)[-1].strip() == "chunked"
        length = None
        if lengths:
            values = {v.strip() for item in lengths for v in item.split(",")}
            if len(values) == 1 and (only := values.pop()).isdigit():
                length = int(only)
            else:
                self.sink.anomaly("bad-content-length",
                                  f"unusable Content-Length {', '.join(lengths)[:60]!r}", ts)
        if chunked and lengths:
            self.sink.anomaly("content-length-and-chunked",
                              "both Content-Length and chunked Transfer-Encoding (smuggling risk)",
                              ts)
            length = None
        return length, chunked

    def _start_body(self, length: int | None, chunked: bool, until_close: bool,
                    ts: float) -> None:
        self.body = 0
        if chunked:
            self.state = CHUNK_SIZE
        elif length:
            self.length = self.body_left = length
            self.lost = 0
            self.state = BODY
        elif until_close and length is None:
            self.state = UNTIL_CLOSE
        else:
            self._end_message(ts)

    def _feed_chunk_line(self, buf: bytes, off: int, end: int, ts: float) -> int:
        nl = buf.find(b"\n", off, end)
        if nl < 0:
            self.hbuf += buf[off:end]
            if len(self.hbuf) > MAX_CHUNK_LINE:
                self._chunk_error("chunk line too long", ts)
            return end
        self.hbuf += buf[off:nl]
        line = bytes(self.hbuf).rstrip(b"\r")
        self.hbuf.clear()
        off = nl + 1
        state = self.state
        if state == CHUNK_CRLF:
            if line:
                self._chunk_error("missing CRLF after chunk data", ts)
            else:
                self.state = CHUNK_SIZE
        elif state == CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self._chunk_error(f"bad chunk size {size_text[:20]!r}", ts)
                return off
            if size:
                self.remaining = size
                self.state = CHUNK_DATA
            else:
                self.state = TRAILERS
        elif not line:  # TRAILERS: a blank line ends the message
            self._end_message(ts)
        return off

    def _chunk_error(self, what: str, ts: float) -> None:
        self.sink.anomaly("bad-chunked-encoding", what, ts)
        self.hbuf.clear()
        self._end_message(ts, complete=False)
        self.state = RESYNC

    def _end_message(self, ts: float, complete: bool = True) -> None:
        if self.state == BODY:
            self.body = self.length - self.body_left - self.lost
        self._sink_end(self.body, complete and not self.partial, ts)
        self.body = self.body_left = self.remaining = 0
        self.partial = False
        self.state = HEAD

    def _on_head(self, head: bytes, ts: float) -> None:
        raise NotImplementedError

    def _start_tls(self, buf: bytes, off: int, end: int, ts: float) -> int:
        raise NotImplementedError

    def _opaque(self, buf: bytes, off: int, end: int, ts: float) -> None:
        """Bytes of a stream we no longer parse (TLS, a protocol switch)."""


class RequestParser(MessageParser):
    """The client → server direction."""

    __slots__ = ("key", "tls_buf")
    is_request = True

    def __init__(self, sink, key: bytes, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        super().__init__(sink, max_header_bytes)
        self.key = key
        self.tls_buf: bytearray | None = None

    def _on_head(self, head: bytes, ts: float) -> None:
        start_line, headers, problems = self._split_head(head)
        sink = self.sink
        for problem in problems:
            sink.anomaly("malformed-header", problem, ts)
        parts = start_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            sink.anomaly("bad-request-line",
                         f"request line {redact_uri(start_line)[:80]!r}", ts)
            if len(parts) < 2:
                self.state = RESYNC
                return
            parts = [parts[0], parts[1], "HTTP/1.0"]
        method, uri, version = parts
        credential = NO_CREDENTIAL
        kept: list[tuple[str, str]] = []
        host = user_agent = None
        expect_continue = False
        for name, value in headers:
            if name == "authorization":
                credential, problem = parse_authorization(value, self.key)
                if problem:
                    sink.anomaly("malformed-credential", problem, ts)
            elif name == "host" and host is None:
                host = value
            elif name == "user-agent" and user_agent is None:
                user_agent = value
            elif name == "expect":
                expect_continue = value.lower() == "100-continue"
            kept.append((name, REDACTED if name in _SENSITIVE_HEADERS else value))
        length, chunked = self._body_framing(headers, ts)
        sink.request_head(RequestHead(
            ts=self.ts0, method=method, uri=redact_uri(uri), version=version, host=host,
            user_agent=user_agent, credential=credential, content_length=length,
            chunked=chunked, expect_continue=expect_continue, headers=tuple(kept)))
        self.partial = False
        self._start_body(length, chunked, until_close=False, ts=ts)

    # -- TLS ------------------------------------------------------------------------------

    def _start_tls(self, buf: bytes, off: int, end: int, ts: float) -> int:
        self.tls_buf = bytearray(buf[off:end])
        self.ts0 = ts
        self.state = OPAQUE
        self._try_client_hello(ts)
        return end

    def _opaque(self, buf: bytes, off: int, end: int, ts: float) -> None:
        if self.tls_buf is not None:
            self.tls_buf += buf[off:end]
            self._try_client_hello(ts)

    def _try_client_hello(self, ts: float) -> None:
        data = self.tls_buf
        assert data is not None
        if len(data) < 5:
            return
        record_len = (data[3] << 8) | data[4]
        if len(data) < 5 + record_len and len(data) < 16384:
            return
        sni, version = parse_client_hello(bytes(data))
        self.tls_buf = None
        self.sink.tls_client_hello(sni, version, self.ts0)

    def gap(self, length: int, ts: float) -> None:
        if self.tls_buf is not None:
            self.tls_buf = None
            self.sink.tls_client_hello(None, None, self.ts0)
            return
        MessageParser.gap(self, length, ts)

    def eof(self, ts: float) -> None:
        if self.tls_buf is not None:
            self.tls_buf = None
            self.sink.tls_client_hello(None, None, self.ts0)
        MessageParser.eof(self, ts)


class ResponseParser(MessageParser):
    """The server → client direction."""

    __slots__ = ()
    is_request = False

    def _on_head(self, head: bytes, ts: float) -> None:
        start_line, headers, problems = self._split_head(head)
        sink = self.sink
        for problem in problems:
            sink.anomaly("malformed-header", problem, ts)
        version, _, rest = start_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not (version.startswith("HTTP/") and len(code) == 3 and code.isdigit()):
            sink.anomaly("bad-status-line", f"status line {start_line[:80]!r}", ts)
            self.state = RESYNC
            return
        status = int(code)
        length, chunked = self._body_framing(headers, ts)
        kept = tuple((n, REDACTED if n in _SENSITIVE_HEADERS else v) for n, v in headers)
        method = sink.response_method()
        sink.response_head(ResponseHead(
            ts=self.ts0, status=status, reason=reason, version=version, content_length=length,
            chunked=chunked, headers=kept))
        self.partial = False
        if status < 200:
            if status == 101:
                self.state = OPAQUE  # protocol switch: nothing more we can read
            return  # interim response: the final one follows
        if method == "HEAD" or status in (204, 304):
            self._end_message(ts)
        elif method == "CONNECT" and status < 300:
            self._end_message(ts)
            self.state = OPAQUE
        else:
            self._start_body(length, chunked, until_close=True, ts=ts)

    def _start_tls(self, buf: bytes, off: int, end: int, ts: float) -> int:
        self.state = OPAQUE
        self.sink.tls_server_hello(ts)
        return end


_TLS_VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv1.0", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2",
                 0x0304: "TLSv1.3"}


def parse_client_hello(data: bytes) -> tuple[str | None, str | None]:
    """(server name, highest offered version) from the first TLS record; Nones where absent."""
    try:
        if data[0] != _TLS_HANDSHAKE or data[5] != 1:  # handshake record, ClientHello
            return None, None
        pos = 9
        version = (data[pos] << 8) | data[pos + 1]
        pos += 2 + 32
        pos += 1 + data[pos]  # session id
        pos += 2 + ((data[pos] << 8) | data[pos + 1])  # cipher suites
        pos += 1 + data[pos]  # compression methods
        ext_end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
        pos += 2
        sni = None
        while pos + 4 <= min(ext_end, len(data)):
            etype = (data[pos] << 8) | data[pos + 1]
            elen = (data[pos + 2] << 8) | data[pos + 3]
            body = data[pos + 4:pos + 4 + elen]
            if etype == 0 and len(body) >= 5 and body[2] == 0:  # server_name, host_name
                nlen = (body[3] << 8) | body[4]
                sni = body[5:5 + nlen].decode("ascii", "replace")
            elif etype == 43 and body:  # supported_versions
                offered = [(body[i] << 8) | body[i + 1] for i in range(1, 1 + body[0] - 1, 2)]
                known = [v for v in offered if v in _TLS_VERSIONS]
                if known:
                    version = max(known)
            pos += 4 + elen
        return sni, _TLS_VERSIONS.get(version, f"0x{version:04x}")
    except IndexError:
        return None, None
