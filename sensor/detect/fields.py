"""The fields a rule can match, and how each is read from a Transaction.

One table, used by the rule compiler (to reject unknown fields at load time) and by findings
(to fill group keys and details). A TLS session is a Transaction with transport `tls`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..records import Transaction


def _op(attr: str) -> Callable[[Transaction], Any]:
    def get(t: Transaction) -> Any:
        return getattr(t.op, attr) if t.op is not None else None

    return get


FIELDS: dict[str, Callable[[Transaction], Any]] = {
    "ts": lambda t: t.ts,
    "transport": lambda t: t.transport,
    "src_ip": lambda t: t.flow.key.src_ip,
    "src_port": lambda t: t.flow.key.src_port,
    "dest_ip": lambda t: t.flow.key.dest_ip,
    "dest_port": lambda t: t.flow.key.dest_port,
    "community_id": lambda t: t.flow.community_id,
    "flow_id": lambda t: t.flow.flow_id,
    "method": lambda t: t.method,
    "uri": lambda t: t.uri,
    "host": lambda t: t.host,
    "user_agent": lambda t: t.user_agent,
    "status": lambda t: t.status,
    "auth_scheme": lambda t: t.credential.scheme,
    "username": lambda t: t.credential.username,
    "credential_fingerprint": lambda t: t.credential.fingerprint,
    "operation": _op("operation"),
    "action": _op("action"),
    "repository": _op("repository"),
    "reference": _op("reference"),
    "digest": _op("digest"),
    "mount_from": _op("mount_from"),
    "page_size": _op("page_size"),
    "request_body_bytes": lambda t: t.request_body_bytes,
    "response_body_bytes": lambda t: t.response_body_bytes,
    "partial": lambda t: t.partial,
    "content_type": lambda t: t.content_type,
    "api_version": lambda t: t.api_version,
    "tls_sni": lambda t: t.tls_sni,
    "tls_version": lambda t: t.tls_version,
}

# Fields that hold numbers: the ones a `sum` threshold and gt/lt comparisons make sense on.
NUMERIC_FIELDS = frozenset(("ts", "src_port", "dest_port", "flow_id", "status", "page_size",
                            "request_body_bytes", "response_body_bytes"))

# What a finding's details carry from the transaction that triggered it.
DETAIL_FIELDS = ("method", "uri", "status", "user_agent", "host", "operation", "reference",
                 "digest", "mount_from", "page_size", "auth_scheme", "credential_fingerprint",
                 "flow_id", "src_port", "tls_sni", "tls_version")
