"""Request/response pairing for one connection: HTTP messages in, Transactions out.

Requests queue in arrival order (pipelining) within a bound; each final response pairs with the
oldest unanswered request, interim 1xx responses are noted on it, and a transaction is emitted
once both of its messages are complete (a 401 may arrive before the request body ends). Responses
with no request (a flow picked up mid-stream) and requests with no response (the flow ended)
still become transactions, marked partial. A TLS ClientHello becomes a TLS transaction.
"""

from __future__ import annotations

from collections import deque

from .http1 import header_value
from .records import NO_CREDENTIAL, Anomaly, FlowInfo, RequestHead, ResponseHead, Transaction
from .registry import classify

DEFAULT_MAX_PENDING = 64


class _Exchange:
    """One request and its response while they are still arriving (internal, mutable)."""

    __slots__ = ("request", "response", "request_body", "response_body", "request_done",
                 "response_done", "partial", "interim", "end_ts")

    def __init__(self, request: RequestHead | None) -> None:
        self.request = request
        self.response: ResponseHead | None = None
        self.request_body = 0
        self.response_body = 0
        self.request_done = request is None
        self.response_done = False
        self.partial = request is None
        self.interim: list[int] = []
        self.end_ts = 0.0


class Conversation:
    """The HTTP sink of both parsers of one flow; emits through `out` (the engine)."""

    __slots__ = ("flow", "out", "pending", "max_pending", "partial", "tls", "tls_refused")

    def __init__(self, flow: FlowInfo, out, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.flow = flow
        self.out = out
        self.pending: deque[_Exchange] = deque()
        self.max_pending = max_pending
        self.partial = False  # set by reassembly: mid-stream pickup or bytes lost
        self.tls: tuple[str | None, str | None, float] | None = None
        self.tls_refused = False

    # -- from the request parser ----------------------------------------------------------

    def request_head(self, head: RequestHead) -> None:
        if len(self.pending) >= self.max_pending:
            self.anomaly("too-many-pending-requests",
                         f"more than {self.max_pending} requests without a response", head.ts)
            self._emit(self.pending.popleft(), partial=True)
        self.pending.append(_Exchange(head))

    def request_end(self, body_bytes: int, complete: bool, ts: float) -> None:
        for ex in self.pending:
            if not ex.request_done:
                ex.request_body = body_bytes
                ex.request_done = True
                ex.partial |= not complete
                break
        self._emit_ready()

    # -- from the response parser ---------------------------------------------------------

    def response_method(self) -> str | None:
        ex = self._awaiting_response()
        return ex.request.method if ex is not None and ex.request is not None else None

    def response_head(self, head: ResponseHead) -> None:
        if self.tls is not None:
            # A plaintext server answering a ClientHello (Go's net/http says 400).
            self.tls_refused = True
            self._emit_tls(head.ts, status=head.status)
            return
        ex = self._awaiting_response()
        if head.status < 200:
            if ex is not None:
                ex.interim.append(head.status)
            return
        if ex is None:
            ex = _Exchange(None)
            self.pending.append(ex)
        ex.response = head

    def response_end(self, body_bytes: int, complete: bool, ts: float) -> None:
        if self.tls_refused:
            return
        for ex in self.pending:
            if ex.response is not None and not ex.response_done:
                ex.response_body = body_bytes
                ex.response_done = True
                ex.partial |= not complete
                ex.end_ts = ts
                break
        self._emit_ready()

    # -- TLS --------------------------------------------------------------------------------

    def tls_client_hello(self, sni: str | None, version: str | None, ts: float) -> None:
        self.tls = (sni, version, ts)

    def tls_server_hello(self, ts: float) -> None:
        if self.tls is not None:
            self._emit_tls(ts, status=None)

    def _emit_tls(self, ts: float, status: int | None) -> None:
        assert self.tls is not None
        sni, version, hello_ts = self.tls
        self.tls = None
        if status is not None:
            self.anomaly("tls-to-plaintext-server",
                         f"client sent a TLS ClientHello; the server answered in plain HTTP "
                         f"({status})", ts)
        self.out.transaction(Transaction(
            ts=hello_ts, flow=self.flow, transport="tls", host=sni, status=status,
            partial=self.partial, response_ts=ts, tls_sni=sni, tls_version=version))

    # -- shared ---------------------------------------------------------------------------

    def anomaly(self, kind: str, detail: str, ts: float) -> None:
        self.out.anomaly(Anomaly(ts=ts, kind=kind, detail=detail, flow=self.flow))

    def close(self, ts: float) -> None:
        """The flow ended: emit what is still pending, complete or not."""
        if self.tls is not None:
            self._emit_tls(ts, status=None)
        while self.pending:
            ex = self.pending.popleft()
            # A request with no (complete) response, or a response cut short, is partial.
            self._emit(ex, partial=not (ex.request_done and ex.response_done))

    def _awaiting_response(self) -> _Exchange | None:
        for ex in self.pending:
            if ex.response is None:
                return ex
        return None

    def _emit_ready(self) -> None:
        pending = self.pending
        while pending and pending[0].request_done and pending[0].response_done:
            self._emit(pending.popleft(), partial=False)

    def _emit(self, ex: _Exchange, partial: bool) -> None:
        req, resp = ex.request, ex.response
        content_type = location = api_version = None
        if resp is not None:
            content_type = header_value(resp.headers, "content-type")
            location = header_value(resp.headers, "location")
            api_version = header_value(resp.headers, "docker-distribution-api-version")
        method = req.method if req is not None else None
        uri = req.uri if req is not None else None
        self.out.transaction(Transaction(
            ts=req.ts if req is not None else resp.ts if resp is not None else ex.end_ts,
            flow=self.flow,
            transport="http",
            method=method,
            uri=uri,
            host=req.host if req is not None else None,
            user_agent=req.user_agent if req is not None else None,
            status=resp.status if resp is not None else None,
            credential=req.credential if req is not None else NO_CREDENTIAL,
            op=classify(method, uri),
            request_body_bytes=ex.request_body,
            response_body_bytes=ex.response_body,
            partial=partial or ex.partial or self.partial,
            response_ts=resp.ts if resp is not None else None,
            content_type=content_type,
            location=location,
            api_version=api_version,
        ))
