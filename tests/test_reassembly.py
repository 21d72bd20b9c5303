"""TCP reassembly through the engine: order, retransmission, loss, pickup, close, time and caps.

Every test crafts one or more connections segment by segment (tests/craft.py), changes what the
capture saw (dropped, reordered, duplicated or altered segments), and checks the transactions
and anomalies that come out against the deliver/gap/eof contract of DESIGN.md.
"""

from __future__ import annotations

from craft import (
    DIGEST,
    REPO,
    SESSION_EXPECTED,
    STEP,
    T0,
    UPLOAD_UUID,
    Conn,
    Endpoints,
    Seg,
    data_segs,
    drop,
    fast_frames,
    make_engine,
    registry_session,
    request,
    response,
    run,
    run_segs,
    summary,
    swap,
    tcp_flow,
    without_times,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.engine import EngineSettings

BLOB = bytes(range(251)) * 20  # 5020 bytes, no CR/LF runs that look like message ends
UP = f"/v2/{REPO}/blobs/uploads/{UPLOAD_UUID}"
GET_BASE = request("GET", "/v2/")
OK_BASE = response(200, "OK", body=b"{}")


def _assert_clean(engine) -> None:
    """Nothing left held out of order once the input has ended."""
    assert engine.budget.used == 0
    assert engine.open_flows == 0


def _http(out):
    return [(t.method, t.uri, t.status, t.request_body_bytes, t.response_body_bytes, t.partial)
            for t in out.transactions]


# -- order ----------------------------------------------------------------------------------------


def test_out_of_order_request_segments_are_reassembled():
    c = Conn()
    req = request("PUT", f"{UP}?digest={DIGEST}", body=BLOB)
    segs = c.handshake()
    data = c.data(True, req, segment_size=700, ack=False)
    assert len(data) >= 8
    segs += data[::-1] + [c.ack(False)]  # every segment but the first arrives early
    segs += c.data(False, response(201, "Created", content_length=True))
    segs += c.close()
    engine, out = run_segs(segs)
    assert _http(out) == [("PUT", f"{UP}?digest={DIGEST}", 201, len(BLOB), 0, False)]
    assert out.anomalies == []
    assert engine.gaps == 0
    _assert_clean(engine)


def test_out_of_order_response_segments_are_reassembled():
    c = Conn()
    segs = c.handshake() + c.data(True, request("GET", f"/v2/{REPO}/blobs/{DIGEST}"))
    resp = c.data(False, response(200, "OK", body=BLOB), segment_size=1000, ack=False)
    segs += [resp[2], resp[0], resp[4], resp[1], resp[3]] + resp[5:] + [c.ack(True)]
    segs += c.close()
    engine, out = run_segs(segs)
    assert _http(out) == [("GET", f"/v2/{REPO}/blobs/{DIGEST}", 200, 0, len(BLOB), False)]
    assert out.anomalies == []
    _assert_clean(engine)


# -- retransmission -------------------------------------------------------------------------------


def test_exact_retransmissions_give_no_anomaly_and_no_duplicate():
    segs = tcp_flow([(request("GET", f"/v2/{REPO}/manifests/v1"), response(200, body=b"m" * 3000)),
                     (GET_BASE, OK_BASE)], segment_size=1000)
    # Every data segment is sent twice, and the first request once more at the very end.
    doubled: list[Seg] = []
    for s in segs:
        doubled += [s, s] if s.payload else [s]
    first_request = segs[data_segs(segs, True)[0]]
    doubled.insert(len(doubled) - 3, first_request)
    engine, out = run_segs(doubled)
    assert _http(out) == [
        ("GET", f"/v2/{REPO}/manifests/v1", 200, 0, 3000, False),
        ("GET", "/v2/", 200, 0, 2, False),
    ]
    assert out.anomalies == []
    _assert_clean(engine)


def test_overlapping_retransmission_with_different_bytes_first_seen_wins():
    uri = f"/v2/{REPO}/manifests/v1"
    req = request("GET", uri)
    c = Conn()
    segs = c.handshake()
    data = c.data(True, req, segment_size=30, ack=False)
    forged = req.replace(b"manifests/v1", b"manifests/v6")
    assert len(forged) == len(req) and 30 <= req.index(b"v1 HTTP") < 60
    # After the first two segments, a retransmission covering both (and 10 new bytes) that
    # differs in the already-delivered part (in the most recently delivered segment: only that
    # one is kept by reference for the comparison).
    retrans = data[0].altered(payload=forged[:70])
    segs += data[:2] + [retrans] + data[2:] + [c.ack(False)]
    segs += c.data(False, response(200, body=b"{}")) + c.close()
    engine, out = run_segs(segs)
    assert [(t.method, t.uri, t.status, t.partial) for t in out.transactions] == [
        ("GET", uri, 200, False)]
    assert out.transactions[0].op.repository == REPO
    assert out.kinds == ["overlap-mismatch"]
    _assert_clean(engine)


def test_retransmission_of_a_held_segment_with_different_bytes_first_copy_kept():
    req = request("GET", "/v2/", [("X-Pad", "p" * 20)])
    c = Conn()
    segs = c.handshake()
    data = c.data(True, req, segment_size=30, ack=False)
    assert b"docker/24.0.7" in data[2].payload
    forged = data[2].altered(payload=data[2].payload.replace(b"docker", b"evil!!"))
    # Segment 2 arrives early, then a different copy of it, then the hole is filled.
    segs += [data[2], forged, data[0], data[1]] + data[3:] + [c.ack(False)]
    segs += c.data(False, OK_BASE) + c.close()
    engine, out = run_segs(segs)
    assert len(out.transactions) == 1
    assert out.transactions[0].user_agent == "docker/24.0.7"
    assert out.kinds == ["overlap-mismatch"]
    _assert_clean(engine)


def test_retransmission_in_a_body_with_different_bytes_is_flagged_and_not_double_counted():
    c = Conn()
    segs = c.handshake() + c.data(True, request("GET", f"/v2/{REPO}/blobs/{DIGEST}"))
    resp = c.data(False, response(200, body=BLOB), segment_size=1000, ack=False)
    changed = resp[3].altered(payload=bytes(len(resp[3].payload)))
    segs += resp[:4] + [changed] + resp[4:] + [c.ack(True)] + c.close()
    engine, out = run_segs(segs)
    assert _http(out) == [("GET", f"/v2/{REPO}/blobs/{DIGEST}", 200, 0, len(BLOB), False)]
    assert out.kinds == ["overlap-mismatch"]


# -- loss -------------------------------------------------------------------------------------


def test_lost_segment_in_a_request_body_shortens_it_and_the_next_request_is_parsed():
    req = request("PATCH", UP, [("Content-Type", "application/octet-stream")], body=BLOB)
    c = Conn()
    segs = c.handshake()
    data = c.data(True, req, segment_size=1000)  # ends with the server's ACK of everything
    lost = data[2]
    assert lost.payload and req.index(b"\r\n\r\n") + 4 < 1000  # the lost bytes are body bytes
    segs += drop(data, 2)
    segs += c.data(False, response(202, "Accepted", [("Location", UP)], content_length=True))
    segs += c.data(True, GET_BASE) + c.data(False, response(404, body=b"nope")) + c.close()
    engine, out = run_segs(segs)
    first, second = out.transactions
    assert (first.method, first.status, first.request_body_bytes, first.partial) == (
        "PATCH", 202, len(BLOB) - len(lost.payload), True)
    assert first.op.operation == "blob-upload-chunk"
    assert (second.method, second.uri, second.status, second.response_body_bytes) == (
        "GET", "/v2/", 404, 4)
    assert engine.gaps == 1
    assert "gap-in-headers" not in out.kinds and "gap-in-body" not in out.kinds
    _assert_clean(engine)


def test_lost_segment_in_a_response_body():
    c = Conn()
    segs = c.handshake() + c.data(True, request("GET", f"/v2/{REPO}/blobs/{DIGEST}"))
    resp = c.data(False, response(200, body=BLOB), segment_size=1000)
    segs += drop(resp, 3) + c.data(True, GET_BASE) + c.data(False, OK_BASE) + c.close()
    engine, out = run_segs(segs)
    first, second = out.transactions
    assert (first.status, first.response_body_bytes, first.partial) == (
        200, len(BLOB) - len(resp[3].payload), True)
    assert (second.method, second.uri, second.status, second.response_body_bytes) == (
        "GET", "/v2/", 200, 2)
    assert engine.gaps == 1
    _assert_clean(engine)


def test_lost_segment_in_headers_resyncs_at_the_next_request():
    req1 = request("GET", f"/v2/{REPO}/manifests/v1", [("Accept", "a" * 200)] + [
        ("Accept", "b" * 200)])
    c = Conn()
    segs = c.handshake()
    data = c.data(True, req1, segment_size=250, ack=False)
    assert len(data) > 1 and b"\r\n\r\n" not in data[0].payload
    segs += [data[0], c.ack(False)]  # the rest of the head is never captured
    segs += c.data(False, response(200, "OK", body=b"m" * 300))
    segs += c.data(True, request("GET", f"/v2/{REPO}/tags/list"))
    segs += c.data(False, response(200, "OK", body=b"t" * 40)) + c.close()
    engine, out = run_segs(segs)
    assert "gap-in-headers" in out.kinds
    orphan, recovered = out.transactions
    # The first response is kept, marked partial, without a request.
    assert (orphan.method, orphan.status, orphan.response_body_bytes, orphan.partial) == (
        None, 200, 300, True)
    assert (recovered.method, recovered.uri, recovered.status, recovered.response_body_bytes) == (
        "GET", f"/v2/{REPO}/tags/list", 200, 40)
    assert recovered.op.operation == "tags-list"
    assert engine.gaps == 1
    _assert_clean(engine)


def test_lost_bytes_before_a_fin_are_given_up_when_the_peer_acks_them():
    c = Conn()
    segs = c.handshake() + c.data(True, request("GET", "/v2/_catalog"))
    resp = c.data(False, response(200, "OK", [("Connection", "close")], body=BLOB,
                                  content_length=False), segment_size=1000, ack=False)
    segs += resp[:-1]  # the last data segment is lost
    segs += c.fin(False, ack=True)  # the client's ACK covers the lost bytes and the FIN
    segs += c.fin(True, ack=True)
    engine, out = run(fast_frames(segs), finish=False)
    assert [(t.status, t.response_body_bytes, t.partial) for t in out.transactions] == [
        (200, len(BLOB) - len(resp[-1].payload), True)]
    assert engine.gaps == 1
    assert engine.open_flows == 0


def test_reassembly_cap_gives_up_the_hole():
    c = Conn()
    req = request("PATCH", UP, body=BLOB)
    segs = c.handshake()
    data = c.data(True, req, segment_size=500)
    segs += drop(data, 1)  # the hole is at the start of the body; the rest is held
    segs += c.data(False, response(202, content_length=True)) + c.close()
    engine, out = run_segs(segs, settings=EngineSettings(max_held_per_flow=1200))
    assert "reassembly-cap" in out.kinds
    assert [(t.method, t.status, t.request_body_bytes, t.partial) for t in out.transactions] == [
        ("PATCH", 202, len(BLOB) - 500, True)]
    _assert_clean(engine)


def test_global_reassembly_budget_is_shared_and_released():
    flows = []
    for port in (40001, 40002):
        c = Conn()
        segs = c.handshake()
        data = c.data(True, request("PATCH", UP, body=BLOB), segment_size=500)
        segs += drop(data, 1) + c.data(False, response(202, content_length=True)) + c.close()
        flows.append(fast_frames(segs, Endpoints(cport=port)))
    # Interleave the two connections packet by packet.
    mixed = [f for pair in zip(*flows, strict=True) for f in pair]
    engine, out = run(mixed, EngineSettings(max_held_total=3000))
    assert out.kinds.count("reassembly-cap") >= 2
    assert [t.request_body_bytes for t in out.transactions] == [len(BLOB) - 500] * 2
    _assert_clean(engine)


# -- pickup ----------------------------------------------------------------------------------------


def test_midstream_pickup_marks_transactions_partial():
    segs = tcp_flow([(request("GET", f"/v2/{REPO}/manifests/v1"), response(200, body=b"x" * 10)),
                     (GET_BASE, OK_BASE)])
    engine, out = run_segs(segs[3:])  # no SYN, SYN-ACK or ACK
    assert _http(out) == [
        ("GET", f"/v2/{REPO}/manifests/v1", 200, 0, 10, True),
        ("GET", "/v2/", 200, 0, 2, True),
    ]
    assert out.kinds == ["midstream-pickup"]
    assert engine.flows_seen == 1
    _assert_clean(engine)


def test_midstream_pickup_inside_a_body_resyncs_at_the_next_message():
    c = Conn()
    c.handshake()
    c.data(True, request("GET", f"/v2/{REPO}/blobs/{DIGEST}"))
    resp = c.data(False, response(200, body=BLOB), segment_size=1000)
    segs = resp[3:] + c.data(True, GET_BASE) + c.data(False, OK_BASE) + c.close()
    engine, out = run_segs(segs)
    assert [(t.method, t.uri, t.status, t.response_body_bytes, t.partial)
            for t in out.transactions] == [("GET", "/v2/", 200, 2, True)]
    assert out.kinds[0] == "midstream-pickup"
    assert "not-http" in out.kinds
    _assert_clean(engine)


# -- close: FIN, RST, idle timeout -----------------------------------------------------------


def test_fin_from_both_sides_ends_the_flow_and_an_until_close_body():
    segs = tcp_flow([(request("GET", "/v2/_catalog"),
                      response(200, "OK", [("Connection", "close")], body=BLOB,
                               content_length=False))], segment_size=1000)
    engine, out = run(fast_frames(segs), finish=False)
    assert _http(out) == [("GET", "/v2/_catalog", 200, 0, len(BLOB), False)]
    assert engine.open_flows == 0  # removed at the FIN, not at the end of the input
    assert out.anomalies == []
    # The last ACK after both FINs opens nothing.
    assert engine.flows_seen == 1


def test_fin_with_data_and_fin_before_the_last_data_segment():
    c = Conn()
    segs = c.handshake() + c.data(True, request("GET", "/v2/_catalog"))
    resp = c.data(False, response(200, "OK", body=BLOB, content_length=False), segment_size=1000,
                  ack=False)
    last = resp[-1].altered(flags="FPA")  # the last data segment carries the FIN
    c.sseq = (c.sseq + 1) & 0xFFFFFFFF
    segs += resp[:-2] + [last, resp[-2], c.ack(True)] + c.fin(True)
    engine, out = run(fast_frames(segs), finish=False)
    assert _http(out) == [("GET", "/v2/_catalog", 200, 0, len(BLOB), False)]
    assert engine.open_flows == 0
    assert out.anomalies == []


def test_half_close_client_fin_before_the_response():
    c = Conn()
    segs = c.handshake() + c.data(True, request("GET", f"/v2/{REPO}/tags/list"))
    segs += c.fin(True)  # the client is done sending
    segs += c.data(False, response(200, body=b"{}")) + c.fin(False)
    engine, out = run(fast_frames(segs), finish=False)
    assert _http(out) == [("GET", f"/v2/{REPO}/tags/list", 200, 0, 2, False)]
    assert engine.open_flows == 0


def test_rst_in_the_middle_of_a_response_body():
    c = Conn()
    segs = c.handshake() + c.data(True, request("GET", f"/v2/{REPO}/blobs/{DIGEST}"))
    resp = c.data(False, response(200, body=BLOB), segment_size=1000, ack=False)
    segs += resp[:3] + [c.rst(False)]
    head_len = response(200, body=BLOB).index(b"\r\n\r\n") + 4
    engine, out = run(fast_frames(segs), finish=False)
    assert _http(out) == [("GET", f"/v2/{REPO}/blobs/{DIGEST}", 200, 0, 3000 - head_len, True)]
    assert "truncated-body" in out.kinds
    assert engine.open_flows == 0
    # A late data packet of the reset connection can only start a new, mid-stream flow.
    engine.packet(9e9, 1, fast_frames([resp[3]])[0][2])
    assert engine.flows_seen == 2 and len(out.transactions) == 1


def test_rst_in_the_middle_of_an_upload():
    c = Conn()
    segs = c.handshake()
    data = c.data(True, request("PATCH", UP, body=BLOB), segment_size=1000, ack=False)
    segs += data[:2] + [c.rst(True)]
    head_len = request("PATCH", UP, body=BLOB).index(b"\r\n\r\n") + 4
    engine, out = run(fast_frames(segs), finish=False)
    assert _http(out) == [("PATCH", UP, None, 2000 - head_len, 0, True)]
    assert "truncated-body" in out.kinds
    assert engine.open_flows == 0


def _idle_scenario():
    a = Conn()
    segs_a = a.handshake() + a.data(True, request("GET", f"/v2/{REPO}/manifests/v1"), ack=False)
    b = Conn(client_isn=50, server_isn=60)
    segs_b = tcp_flow([(GET_BASE, OK_BASE)], conn=b)
    fa = fast_frames(segs_a, Endpoints(cport=41000), t0=100.0)
    fb = fast_frames(segs_b, Endpoints(cport=42000), t0=100.0 + 301.0)
    return fa, fb


def test_idle_flow_is_closed_by_a_later_packet_of_another_flow():
    fa, fb = _idle_scenario()
    engine, out = make_engine(EngineSettings(idle_timeout=300.0, expiry_every=1))
    for ts, lt, buf in fa:
        engine.packet(ts, lt, buf)
    assert engine.open_flows == 1 and out.transactions == []
    engine.packet(*fb[0])  # 301 s later, another connection's SYN
    assert [(t.method, t.status, t.partial, t.flow.key.src_port) for t in out.transactions] == [
        ("GET", None, True, 41000)]
    assert engine.open_flows == 1  # only the new connection
    for frame in fb[1:]:
        engine.packet(*frame)
    assert [(t.uri, t.status) for t in out.transactions] == [
        (f"/v2/{REPO}/manifests/v1", None), ("/v2/", 200)]
    assert engine.open_flows == 0


def test_idle_timeout_is_in_packet_time_and_deterministic():
    fa, fb = _idle_scenario()
    results = []
    for _ in range(2):
        engine, out = make_engine(EngineSettings(idle_timeout=300.0, expiry_every=1))
        for frame in fa + fb:
            engine.packet(*frame)
        results.append(out.transactions)
    assert results[0] == results[1]
    assert results[0][0].response_ts is None
    # Within the timeout nothing is closed early.
    engine, out = make_engine(EngineSettings(idle_timeout=400.0, expiry_every=1))
    for frame in fa + fb:
        engine.packet(*frame)
    assert [t.flow.key.src_port for t in out.transactions] == [42000]
    assert engine.open_flows == 1


def test_a_packet_within_the_timeout_keeps_a_flow_alive():
    fa, fb = _idle_scenario()
    keepalive = (100.0 + 200.0, fa[-1][1], fa[-1][2])  # a retransmission at +200 s
    engine, out = make_engine(EngineSettings(idle_timeout=300.0, expiry_every=1))
    for frame in fa + [keepalive] + fb:
        engine.packet(*frame)
    assert [t.flow.key.src_port for t in out.transactions] == [42000]
    assert engine.open_flows == 1


# -- sequence numbers, connection reuse ----------------------------------------------------------


def test_sequence_number_wraparound_in_both_directions():
    c = Conn(client_isn=2**32 - 1500, server_isn=2**32 - 3)
    req = request("PUT", f"{UP}?digest={DIGEST}", body=BLOB)
    segs = c.handshake()
    data = c.data(True, req, segment_size=1000, ack=False)
    assert any(s.seq < 2000 for s in data) and any(s.seq > 2**32 - 2000 for s in data)
    segs += swap(data, 1, 2) + [c.ack(False)]  # reordered across the wrap
    resp = c.data(False, response(200, body=BLOB), segment_size=1000)
    segs += drop(resp, 4) + c.close()
    engine, out = run_segs(segs)
    assert _http(out) == [("PUT", f"{UP}?digest={DIGEST}", 200, len(BLOB),
                           len(BLOB) - len(resp[4].payload), True)]
    assert engine.gaps == 1
    assert "midstream-pickup" not in out.kinds
    _assert_clean(engine)


def test_new_syn_on_a_closed_four_tuple_is_a_new_connection_and_syn_retransmit_is_not():
    first = tcp_flow([(GET_BASE, OK_BASE)], client_isn=10, server_isn=20)
    first.insert(1, first[0])  # SYN retransmitted
    second = tcp_flow([(request("GET", "/v2/_catalog"), OK_BASE)], client_isn=90000,
                      server_isn=80000)
    engine, out = run_segs(first + second)
    assert engine.flows_seen == 2
    assert [(t.uri, t.status, t.partial) for t in out.transactions] == [
        ("/v2/", 200, False), ("/v2/_catalog", 200, False)]
    assert out.transactions[0].flow.flow_id != out.transactions[1].flow.flow_id


# -- segmentation never changes the records ----------------------------------------------------


def _session(sizes=None, segment_size=None, client_isn=1000, server_isn=7_000_000):
    c = Conn(client_isn, server_isn)
    segs = c.handshake()
    for req, resp in registry_session():
        segs += c.data(True, req, segment_size, sizes=sizes)
        segs += c.data(False, resp, segment_size, sizes=sizes)
    return segs + c.close()


def _records(segs):
    engine, out = run_segs(segs)
    _assert_clean(engine)
    return [without_times(t) for t in out.transactions], out.kinds


def test_whole_messages_give_the_expected_session():
    txns, kinds = _records(_session(segment_size=65000))
    assert [summary(t) for t in txns] == SESSION_EXPECTED
    assert not any(t.partial for t in txns)
    assert kinds == []


def test_one_byte_segments_give_the_same_records_as_one_big_segment():
    whole = _records(_session(segment_size=65000))
    tiny = _records(_session(segment_size=1))
    assert tiny == whole


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=12),
       client_isn=st.integers(0, 2**32 - 1), server_isn=st.integers(0, 2**32 - 1))
def test_any_segmentation_gives_the_same_records(sizes, client_isn, server_isn):
    whole = _records(_session(segment_size=65000))
    assert _records(_session(sizes=sizes, client_isn=client_isn, server_isn=server_isn)) == whole


def test_records_carry_packet_times():
    """Request time is the first byte of the request, response time the first of the response."""
    segs = _session(segment_size=65000)
    engine, out = run_segs(segs)
    first_data = [s for s in segs if s.payload]
    times = {i: T0 + i * STEP for i in range(len(segs))}
    req_ts = times[segs.index(first_data[0])]
    resp_ts = times[segs.index(first_data[1])]
    assert (out.transactions[0].ts, out.transactions[0].response_ts) == (req_ts, resp_ts)
    stamps = [(t.ts, t.response_ts) for t in out.transactions]
    assert stamps == sorted(stamps) and all(r > q for q, r in stamps)
