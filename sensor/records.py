"""The typed records that cross module boundaries: frozen, slotted, created at message boundaries.

Nothing here holds a password or a token: a credential is reduced to its scheme, its username
and a keyed fingerprint before it becomes a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "low", "medium", "high", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A TCP connection seen from its client: src is the client, dest the monitored server."""

    src_ip: str
    src_port: int
    dest_ip: str
    dest_port: int


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """What every record of one connection shares."""

    key: FlowKey
    flow_id: int
    community_id: str


@dataclass(frozen=True, slots=True)
class Credential:
    """An Authorization header reduced to what may be kept.

    scheme is none, basic, bearer or other; username is the Basic user (or a bearer token's
    `sub` claim), None when unknown; fingerprint is a keyed HMAC of the whole credential.
    """

    scheme: str
    username: str | None = None
    fingerprint: str | None = None


NO_CREDENTIAL = Credential("none")


@dataclass(frozen=True, slots=True)
class RequestHead:
    ts: float
    method: str
    uri: str
    version: str
    host: str | None
    user_agent: str | None
    credential: Credential
    content_length: int | None
    chunked: bool
    expect_continue: bool
    headers: tuple[tuple[str, str], ...]  # lower-cased names; secret-bearing values redacted


@dataclass(frozen=True, slots=True)
class ResponseHead:
    ts: float
    status: int
    reason: str
    version: str
    content_length: int | None
    chunked: bool
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class RegistryOp:
    """A request recognised as a registry API call (distribution v2 / OCI distribution)."""

    operation: str  # base, catalog, tags-list, manifest-get, blob-upload-start, ...
    action: str  # check, list, pull, push, delete
    repository: str | None = None
    reference: str | None = None  # tag or digest for manifests
    digest: str | None = None
    mount_from: str | None = None  # cross-repository mount source
    page_size: int | None = None  # the n= of a paginated list


@dataclass(frozen=True, slots=True)
class Transaction:
    """One request/response pair (transport http), or one TLS session (transport tls)."""

    ts: float
    flow: FlowInfo
    transport: str
    method: str | None = None
    uri: str | None = None
    host: str | None = None
    user_agent: str | None = None
    status: int | None = None
    credential: Credential = NO_CREDENTIAL
    op: RegistryOp | None = None
    request_body_bytes: int = 0
    response_body_bytes: int = 0
    partial: bool = False
    response_ts: float | None = None
    content_type: str | None = None
    location: str | None = None
    api_version: str | None = None  # Docker-Distribution-API-Version: the server is a registry
    tls_sni: str | None = None
    tls_version: str | None = None


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something odd in the traffic (Zeek's weird): recorded, never raised."""

    ts: float
    kind: str
    detail: str
    flow: FlowInfo | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule fired: what the events table stores and what alerts carry."""

    ts: float
    rule: str
    severity: str
    title: str
    src_ip: str | None
    dest_ip: str | None
    dest_port: int | None
    community_id: str | None
    username: str | None
    repository: str | None
    count: int
    details: dict[str, Any] = field(default_factory=dict)
    first_ts: float | None = None
