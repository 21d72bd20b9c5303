"""HTTP/1.x parsing and request/response pairing: the parser alone, then through the engine.

The parser is sans-IO, so the first half of this file feeds it bytes directly with a recording
sink; the second half crafts whole connections (tests/craft.py) for what depends on both
directions: pipelining, keep-alive, HEAD/1xx/204/304 framing, read-until-close, TLS.
"""

from __future__ import annotations

from collections import deque

import pytest
from craft import (
    AUTH,
    DIGEST,
    LAYER,
    MANIFEST,
    REPO,
    SESSION_EXPECTED,
    UPLOAD_UUID,
    Conn,
    chunked,
    client_hello,
    fast_frames,
    registry_session,
    request,
    response,
    run,
    run_segs,
    server_hello,
    tcp_flow,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.engine import EngineSettings
from sensor.http1 import RequestParser, ResponseParser, parse_client_hello

KEY = b"k" * 32
UP = f"/v2/{REPO}/blobs/uploads/{UPLOAD_UUID}"
GET_BASE = request("GET", "/v2/")
OK_BASE = response(200, "OK", body=b"{}")


class Sink:
    """Records every parser event; answers response_method from the requests it was told of."""

    def __init__(self, methods=()) -> None:
        self.events: list[tuple] = []
        self.methods = deque(methods)

    def request_head(self, head):
        self.events.append(("request_head", head))

    def request_end(self, body_bytes, complete, ts):
        self.events.append(("request_end", body_bytes, complete))

    def response_method(self):
        return self.methods[0] if self.methods else None

    def response_head(self, head):
        self.events.append(("response_head", head))
        if head.status >= 200 and self.methods:
            self.methods.popleft()

    def response_end(self, body_bytes, complete, ts):
        self.events.append(("response_end", body_bytes, complete))

    def tls_client_hello(self, sni, version, ts):
        self.events.append(("tls_client_hello", sni, version))

    def tls_server_hello(self, ts):
        self.events.append(("tls_server_hello",))

    def anomaly(self, kind, detail, ts):
        self.events.append(("anomaly", kind))

    @property
    def kinds(self):
        return [e[1] for e in self.events if e[0] == "anomaly"]

    def ends(self, name):
        return [e[1:] for e in self.events if e[0] == name]

    def heads(self, name):
        return [e[1] for e in self.events if e[0] == name]


def _feed(parser_cls, data: bytes, cuts=None, methods=(), eof=True, **kwargs) -> Sink:
    """Feed `data` in pieces ending at `cuts` (None: all at once); then eof."""
    sink = Sink(methods)
    parser = (parser_cls(sink, KEY, **kwargs) if parser_cls is RequestParser
              else parser_cls(sink, **kwargs))
    points = sorted(set(cuts or ())) + [len(data)]
    start = 0
    for point in points:
        if point > start:
            parser.feed(data, start, point, 5.0)
            start = point
    if eof:
        parser.eof(6.0)
    return sink


SESSION = registry_session()
REQUESTS = b"".join(req for req, _ in SESSION)
RESPONSES = b"".join(resp for _, resp in SESSION)
METHODS = [m for m, *_ in SESSION_EXPECTED]


# -- the parser alone: one byte at a time is the same as all at once ---------------------------


def test_request_stream_whole_gives_the_expected_messages():
    sink = _feed(RequestParser, REQUESTS)
    heads = sink.heads("request_head")
    assert [(h.method, h.uri) for h in heads] == [(m, u) for m, u, *_ in SESSION_EXPECTED]
    assert sink.ends("request_end") == [(e[4], True) for e in SESSION_EXPECTED]
    assert sink.kinds == []
    patch = heads[4]
    assert (patch.chunked, patch.content_length) == (True, None)
    put = heads[6]
    assert (put.expect_continue, put.content_length) == (True, len(MANIFEST))
    assert heads[1].credential.username == "alice"
    assert ("authorization", "[redacted]") in heads[1].headers
    assert heads[0].user_agent == "docker/24.0.7"
    assert heads[0].host == "registry.example:5000"


def test_response_stream_whole_gives_the_expected_messages():
    sink = _feed(ResponseParser, RESPONSES, methods=METHODS)
    heads = sink.heads("response_head")
    assert [h.status for h in heads] == [401, 200, 404, 202, 202, 201, 100, 201, 200, 202, 304,
                                          200]
    assert sink.ends("response_end") == [(e[5], True) for e in SESSION_EXPECTED]
    assert heads[2].content_length == 157  # the HEAD answer: announced, never sent
    assert heads[8].chunked is True
    assert heads[0].header("www-authenticate") == 'Basic realm="Registry Realm"'
    assert sink.kinds == []


@pytest.mark.parametrize(("cls", "data", "methods"), [
    (RequestParser, REQUESTS, ()),
    (ResponseParser, RESPONSES, METHODS),
], ids=["requests", "responses"])
def test_one_byte_at_a_time_gives_the_same_events(cls, data, methods):
    whole = _feed(cls, data, methods=methods).events
    one_by_one = _feed(cls, data, cuts=range(1, len(data)), methods=methods).events
    assert one_by_one == whole
    assert len(whole) > 20


@settings(max_examples=50, deadline=None)
@given(req_cuts=st.lists(st.integers(1, len(REQUESTS) - 1), max_size=60),
       resp_cuts=st.lists(st.integers(1, len(RESPONSES) - 1), max_size=60))
def test_any_split_gives_the_same_events(req_cuts, resp_cuts):
    assert (_feed(RequestParser, REQUESTS, cuts=req_cuts).events
            == _feed(RequestParser, REQUESTS).events)
    assert (_feed(ResponseParser, RESPONSES, cuts=resp_cuts, methods=METHODS).events
            == _feed(ResponseParser, RESPONSES, methods=METHODS).events)


@pytest.mark.parametrize("method", ["OPTIONS", "CONNECT", "DELETE", "TRACE"])
def test_long_method_names_split_early_are_not_taken_for_junk(method):
    data = request(method, "/v2/") + request("GET", "/v2/")
    for cut in range(1, 12):
        sink = _feed(RequestParser, data, cuts=[cut])
        assert [h.method for h in sink.heads("request_head")] == [method, "GET"], cut
        assert sink.kinds == []


def test_response_status_line_split_after_the_version():
    data = response(200, "OK", body=b"{}")
    for cut in range(1, 12):
        sink = _feed(ResponseParser, data, cuts=[cut], methods=["GET"])
        assert [h.status for h in sink.heads("response_head")] == [200], cut
        assert sink.kinds == []


def test_every_two_way_split_of_a_chunked_body():
    body = chunked(b"a" * 17, b"b" * 256, b"c", trailers=[("Docker-Content-Digest", DIGEST)])
    data = (request("PATCH", UP, [("Transfer-Encoding", "chunked")]) + body
            + request("PUT", f"{UP}?digest={DIGEST}", content_length=True))
    whole = _feed(RequestParser, data).events
    assert [e for e in whole if e[0] == "request_end"] == [
        ("request_end", 17 + 256 + 1, True), ("request_end", 0, True)]
    for cut in range(1, len(data)):
        assert _feed(RequestParser, data, cuts=[cut]).events == whole, cut


def test_lf_only_line_endings_and_folded_headers():
    data = (b"GET /v2/library/alpine/tags/list HTTP/1.1\nHost: r\nUser-Agent: skopeo/1.14\n"
            b"X-Folded: a\n  b\n\n")
    sink = _feed(RequestParser, data)
    (head,) = sink.heads("request_head")
    assert (head.method, head.uri, head.user_agent) == (
        "GET", "/v2/library/alpine/tags/list", "skopeo/1.14")
    assert ("x-folded", "a b") in head.headers


# -- the parser alone: gaps, caps and bad framing -----------------------------------------------


def test_gap_inside_a_body_shortens_it():
    sink = Sink()
    p = RequestParser(sink, KEY)
    data = request("PATCH", UP, body=b"x" * 1000) + GET_BASE
    head_len = data.index(b"\r\n\r\n") + 4
    p.feed(data, 0, head_len + 100, 1.0)
    p.gap(300, 1.0)
    p.feed(data, head_len + 400, len(data), 1.0)
    assert sink.ends("request_end") == [(700, False), (0, True)]
    assert [h.method for h in sink.heads("request_head")] == ["PATCH", "GET"]
    assert sink.kinds == []


def test_gap_in_headers_resyncs_inside_the_next_segment():
    first = request("GET", f"/v2/{REPO}/manifests/v1", [("Accept", "x" * 40)])
    second = request("HEAD", f"/v2/{REPO}/blobs/{DIGEST}")
    data = first + second
    sink = Sink()
    p = RequestParser(sink, KEY)
    p.feed(data, 0, 30, 1.0)
    p.gap(20, 1.0)
    p.feed(data, 50, len(data), 1.0)  # rest of the first head, then the second request
    assert sink.kinds == ["gap-in-headers"]
    assert [(h.method, h.uri) for h in sink.heads("request_head")] == [
        ("HEAD", f"/v2/{REPO}/blobs/{DIGEST}")]
    assert sink.ends("request_end") == [(0, True)]


def test_gap_past_the_end_of_a_body_resyncs():
    data = request("PUT", UP, body=b"y" * 100) + request("GET", "/v2/x/tags/list") + GET_BASE
    head_len = data.index(b"\r\n\r\n") + 4
    sink = Sink()
    p = RequestParser(sink, KEY)
    p.feed(data, 0, head_len + 50, 1.0)
    p.gap(80, 1.0)  # the rest of the body and the start of the second request
    p.feed(data, head_len + 130, len(data), 1.0)
    assert sink.kinds == ["gap-in-body"]
    assert sink.ends("request_end") == [(50, False), (0, True)]
    assert [h.uri for h in sink.heads("request_head")] == [UP, "/v2/"]


def test_resync_finds_a_message_start_split_across_feeds():
    """After a gap, the next request may begin in one segment and continue in the next."""
    lost = request("GET", "/v2/lost/manifests/v1")
    data = lost + request("GET", f"/v2/{REPO}/tags/list")
    sink_whole = Sink()
    p = RequestParser(sink_whole, KEY)
    p.feed(data, 0, 10, 1.0)
    p.gap(10, 1.0)
    p.feed(data, 20, len(data), 1.0)
    assert [h.uri for h in sink_whole.heads("request_head")] == [f"/v2/{REPO}/tags/list"]
    for cut in range(len(lost) - 3, len(lost) + 8):
        sink = Sink()
        p = RequestParser(sink, KEY)
        p.feed(data, 0, 10, 1.0)
        p.gap(10, 1.0)
        p.feed(data, 20, cut, 1.0)
        p.feed(data, cut, len(data), 1.0)
        assert sink.events == sink_whole.events, cut


def test_header_too_long_is_an_anomaly_and_the_next_message_is_found():
    big = request("GET", "/v2/", [("X-Pad", "a" * 100_000)])
    data = big + request("GET", f"/v2/{REPO}/tags/list")
    sink = _feed(RequestParser, data, cuts=range(1448, len(data), 1448))
    assert sink.kinds == ["header-too-long"]
    assert [h.uri for h in sink.heads("request_head")] == [f"/v2/{REPO}/tags/list"]
    sink = _feed(RequestParser, data, max_header_bytes=200_000)
    assert [h.uri for h in sink.heads("request_head")] == ["/v2/", f"/v2/{REPO}/tags/list"]


def test_content_length_and_chunked_is_an_anomaly_and_chunked_wins():
    data = (request("PATCH", UP, [("Transfer-Encoding", "chunked"), ("Content-Length", "5")])
            + chunked(b"z" * 40) + GET_BASE)
    sink = _feed(RequestParser, data)
    assert sink.kinds == ["content-length-and-chunked"]
    assert sink.ends("request_end") == [(40, True), (0, True)]
    head = sink.heads("request_head")[0]
    assert (head.chunked, head.content_length) == (True, None)


def test_conflicting_content_lengths_are_an_anomaly():
    data = request("PUT", UP, [("Content-Length", "3"), ("Content-Length", "4")]) + b"abcd"
    sink = _feed(RequestParser, data, eof=False)
    assert sink.kinds == ["bad-content-length"]
    assert sink.heads("request_head")[0].content_length is None


def test_bad_chunk_size_is_an_anomaly_and_resyncs():
    data = (request("PATCH", UP, [("Transfer-Encoding", "chunked")]) + b"zz\r\nabc\r\n0\r\n\r\n"
            + GET_BASE)
    sink = _feed(RequestParser, data)
    assert sink.kinds == ["bad-chunked-encoding"]
    assert sink.ends("request_end") == [(0, False), (0, True)]
    assert [h.uri for h in sink.heads("request_head")] == [UP, "/v2/"]


@pytest.mark.parametrize("junk", [
    b"\x00\x01garbage that is not http at all\r\n",
    b"\x00\x01" + b"binary body tail " * 20 + b"\r\n",
], ids=["short", "long"])
def test_not_http_is_an_anomaly_and_resyncs_in_the_same_segment(junk):
    data = junk + GET_BASE + request("DELETE", f"/v2/{REPO}/manifests/{DIGEST}")
    sink = _feed(RequestParser, data)
    assert sink.kinds == ["not-http"]
    assert [h.uri for h in sink.heads("request_head")] == [
        "/v2/", f"/v2/{REPO}/manifests/{DIGEST}"]
    assert _feed(RequestParser, data, cuts=range(1, len(data))).events == sink.events


def test_not_http_response_side_resyncs():
    data = b"...tail of a body we never saw the start of\r\n" + OK_BASE
    sink = _feed(ResponseParser, data, methods=["GET"])
    assert sink.kinds == ["not-http"]
    assert sink.ends("response_end") == [(2, True)]
    assert _feed(ResponseParser, data, cuts=range(1, len(data)), methods=["GET"]).events == (
        sink.events)


def test_eof_inside_a_body_or_a_head():
    sink = _feed(ResponseParser, response(200, body=b"q" * 100)[:-40], methods=["GET"])
    assert sink.kinds == ["truncated-body"]
    assert sink.ends("response_end") == [(60, False)]
    sink = _feed(RequestParser, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    assert sink.kinds == ["truncated-head"]
    assert sink.heads("request_head") == []


def test_until_close_body_ends_at_eof():
    data = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + b"r" * 333
    sink = _feed(ResponseParser, data, cuts=[10, 100], methods=["GET"])
    assert sink.ends("response_end") == [(333, True)]
    assert sink.kinds == []


def test_interim_responses_before_the_final_one():
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            + response(201, "Created", content_length=True))
    sink = _feed(ResponseParser, data, methods=["PUT"])
    assert [h.status for h in sink.heads("response_head")] == [100, 103, 201]
    assert sink.ends("response_end") == [(0, True)]


def test_client_hello_split_across_feeds():
    hello = client_hello("registry.internal")
    for cut in (1, 3, 5, 9, 40, len(hello) - 1):
        sink = _feed(RequestParser, hello + b"\x17\x03\x03\x00\x05hello", cuts=[cut])
        assert sink.events == [("tls_client_hello", "registry.internal", "TLSv1.3")], cut


def test_parse_client_hello_without_sni_and_garbage():
    assert parse_client_hello(client_hello(None)) == (None, "TLSv1.3")
    assert parse_client_hello(client_hello("a.example")[:20]) == (None, None)
    assert parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == (None, None)


# -- through the engine: pairing -------------------------------------------------------------


def _summ(out):
    return [(t.method, t.uri, t.status, t.request_body_bytes, t.response_body_bytes, t.partial)
            for t in out.transactions]


def test_keep_alive_session():
    engine, out = run_segs(tcp_flow(SESSION))
    assert len(out.transactions) == len(SESSION_EXPECTED)
    assert engine.flows_seen == 1
    assert len({t.flow.flow_id for t in out.transactions}) == 1
    assert [(t.method, t.status) for t in out.transactions] == [
        (e[0], e[2]) for e in SESSION_EXPECTED]
    assert out.anomalies == []


def test_pipelining_three_requests_in_one_segment_with_a_head():
    manifest = f"/v2/{REPO}/manifests/v1"
    blob = f"/v2/{REPO}/blobs/{DIGEST}"
    requests = (request("GET", manifest) + request("HEAD", blob)
                + request("GET", f"/v2/{REPO}/tags/list"))
    responses = (response(200, "OK", [("Content-Type", "application/json")], body=b"M" * 321)
                 + response(200, "OK", [("Content-Length", "77777777")])  # HEAD: no body
                 + response(200, "OK", body=b'{"tags":[]}'))
    c = Conn()
    segs = c.handshake() + c.data(True, requests, segment_size=None)
    segs += c.data(False, responses, segment_size=None) + c.close()
    assert sum(1 for s in segs if s.payload) == 2
    engine, out = run_segs(segs)
    assert _summ(out) == [
        ("GET", manifest, 200, 0, 321, False),
        ("HEAD", blob, 200, 0, 0, False),
        ("GET", f"/v2/{REPO}/tags/list", 200, 0, 11, False),
    ]
    assert [t.op.operation for t in out.transactions] == ["manifest-get", "blob-head",
                                                          "tags-list"]
    assert out.transactions[0].content_type == "application/json"
    assert out.anomalies == []


def test_pipelined_responses_split_across_segments_at_odd_places():
    requests = request("GET", "/v2/") + request("HEAD", f"/v2/{REPO}/manifests/v1") + GET_BASE
    responses = OK_BASE + response(404, "Not Found", [("Content-Length", "96")]) + OK_BASE
    for size in (1, 7, 29, 64):
        segs = tcp_flow([(requests, responses)], segment_size=size)
        _, out = run_segs(segs)
        assert [(t.method, t.status, t.response_body_bytes) for t in out.transactions] == [
            ("GET", 200, 2), ("HEAD", 404, 0), ("GET", 200, 2)], size


def test_chunked_upload_and_chunked_response_split_everywhere():
    body = chunked(LAYER[:700], LAYER[700:701], LAYER[701:1500])
    req = request("PATCH", UP, [("Transfer-Encoding", "chunked")]) + body
    resp = (response(202, "Accepted", [("Transfer-Encoding", "chunked"), ("Location", UP)])
            + chunked(b"ok", b"!"))
    for cut in range(len(req) - len(body) - 2, len(req)):
        c = Conn()
        segs = c.handshake() + c.data(True, req, sizes=[cut, len(req)])
        segs += c.data(False, resp, sizes=[len(resp) - cut % 23 - 1, 500]) + c.close()
        _, out = run_segs(segs)
        assert _summ(out) == [("PATCH", UP, 202, 1500, 3, False)], cut


def test_expect_100_continue_then_the_final_201():
    put = f"/v2/{REPO}/manifests/v1"
    head = request("PUT", put, [("Expect", "100-continue"),
                                ("Content-Length", str(len(MANIFEST)))])
    c = Conn()
    segs = c.handshake() + c.data(True, head)
    segs += c.data(False, b"HTTP/1.1 100 Continue\r\n\r\n")
    segs += c.data(True, MANIFEST)
    segs += c.data(False, response(201, "Created", [("Location", put)], content_length=True))
    segs += c.close()
    _, out = run_segs(segs)
    assert _summ(out) == [("PUT", put, 201, len(MANIFEST), 0, False)]
    assert out.transactions[0].location == put
    assert out.transactions[0].op.operation == "manifest-put"


def test_early_401_before_the_request_body_ends():
    c = Conn()
    segs = c.handshake()
    req = request("PUT", f"{UP}?digest={DIGEST}", body=LAYER)
    data = c.data(True, req, segment_size=1000, ack=False)
    segs += data[:1]
    segs += c.data(False, response(401, "Unauthorized", body=b"{}"))
    segs += data[1:] + [c.ack(False)] + c.data(True, GET_BASE) + c.data(False, OK_BASE)
    _, out = run_segs(segs + c.close())
    assert _summ(out) == [("PUT", f"{UP}?digest={DIGEST}", 401, len(LAYER), 2, False),
                          ("GET", "/v2/", 200, 0, 2, False)]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses_even_with_a_content_length(status):
    resp = response(status, "X", [("Content-Length", "4096")])
    segs = tcp_flow([(request("GET", f"/v2/{REPO}/manifests/v1"), resp), (GET_BASE, OK_BASE)])
    _, out = run_segs(segs)
    assert _summ(out) == [("GET", f"/v2/{REPO}/manifests/v1", status, 0, 0, False),
                          ("GET", "/v2/", 200, 0, 2, False)]
    assert out.anomalies == []


def test_head_response_with_content_length_then_keep_alive():
    blob = f"/v2/{REPO}/blobs/{DIGEST}"
    segs = tcp_flow([(request("HEAD", blob),
                      response(200, "OK", [("Content-Length", "52428800"),
                                           ("Docker-Content-Digest", DIGEST)])),
                     (request("GET", blob), response(200, "OK", body=b"L" * 900))])
    _, out = run_segs(segs)
    assert _summ(out) == [("HEAD", blob, 200, 0, 0, False), ("GET", blob, 200, 0, 900, False)]


def test_read_until_close_response_ends_at_fin():
    body = b'{"repositories":[' + b'"r",' * 500 + b'"z"]}'
    segs = tcp_flow([(request("GET", "/v2/_catalog?n=1000"),
                      b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)])
    engine, out = run(fast_frames(segs), finish=False)
    assert _summ(out) == [("GET", "/v2/_catalog?n=1000", 200, 0, len(body), False)]
    assert out.transactions[0].op.page_size == 1000


def test_header_too_long_through_the_engine():
    big = request("GET", "/v2/", [("X-Pad", "a" * 100_000)])
    segs = tcp_flow([(big, response(431, "Request Header Fields Too Large", body=b"too big")),
                     (request("GET", f"/v2/{REPO}/tags/list"), OK_BASE)])
    engine, out = run_segs(segs)
    assert "header-too-long" in out.kinds
    assert _summ(out) == [(None, None, 431, 0, 7, True),
                          ("GET", f"/v2/{REPO}/tags/list", 200, 0, 2, False)]
    assert engine.budget.used == 0


def test_content_length_and_chunked_through_the_engine():
    req = (request("PATCH", UP, [("Content-Length", "10"), ("Transfer-Encoding", "chunked")])
           + chunked(b"p" * 300, b"q" * 20))
    _, out = run_segs(tcp_flow([(req, response(202, content_length=True)),
                                (GET_BASE, OK_BASE)], segment_size=100))
    assert out.kinds == ["content-length-and-chunked"]
    assert _summ(out) == [("PATCH", UP, 202, 320, 0, False), ("GET", "/v2/", 200, 0, 2, False)]


def test_too_many_pending_requests_is_bounded():
    requests = b"".join(request("GET", f"/v2/r{i}/tags/list") for i in range(6))
    _, out = run_segs(tcp_flow([(requests, b"")]),
                      settings=EngineSettings(max_pending_requests=4))
    assert out.kinds.count("too-many-pending-requests") == 2
    assert [(t.uri, t.status, t.partial) for t in out.transactions] == [
        (f"/v2/r{i}/tags/list", None, True) for i in range(6)]


def test_credentials_reach_the_transaction_without_the_secret():
    bearer = "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJib2IifQ.sig"
    segs = tcp_flow([(request("GET", "/v2/", AUTH), OK_BASE),
                     (request("GET", "/v2/", [("Authorization", "Basic Og==")]), OK_BASE),
                     (request("GET", "/v2/", [("Authorization", bearer)]), OK_BASE)])
    _, out = run_segs(segs)
    creds = [t.credential for t in out.transactions]
    assert [(c.scheme, c.username) for c in creds] == [("basic", "alice"), ("none", None),
                                                       ("bearer", "bob")]
    assert creds[0].fingerprint and "s3cret" not in repr(out.transactions)


# -- through the engine: TLS on the registry port ---------------------------------------------


def test_tls_client_hello_becomes_a_tls_transaction():
    c = Conn()
    segs = c.handshake() + c.data(True, client_hello("registry.example.com"))
    segs += c.data(False, server_hello() + b"\x17\x03\x03\x00\x10" + b"e" * 16)
    segs += c.data(True, b"\x17\x03\x03\x00\x20" + b"f" * 32) + c.close()
    _, out = run_segs(segs)
    (txn,) = out.transactions
    assert (txn.transport, txn.tls_sni, txn.tls_version, txn.host) == (
        "tls", "registry.example.com", "TLSv1.3", "registry.example.com")
    assert (txn.method, txn.status, txn.partial) == (None, None, False)
    assert txn.flow.key.dest_port == 5000
    assert out.anomalies == []


def test_tls_client_hello_split_over_segments_without_an_answer():
    segs = tcp_flow([(client_hello("r.example"), b"")], segment_size=7)
    _, out = run_segs(segs)
    assert [(t.transport, t.tls_sni, t.status) for t in out.transactions] == [
        ("tls", "r.example", None)]


def test_plaintext_server_answering_a_client_hello():
    answer = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Connection: close\r\n\r\n400 Bad Request")
    segs = tcp_flow([(client_hello("registry.example.com"), answer)])
    engine, out = run(fast_frames(segs), finish=False)
    assert out.kinds == ["tls-to-plaintext-server"]
    assert [(t.transport, t.tls_sni, t.status) for t in out.transactions] == [
        ("tls", "registry.example.com", 400)]
    assert engine.open_flows == 0
