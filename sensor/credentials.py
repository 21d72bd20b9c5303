"""Authorization headers reduced to what may be kept: scheme, username, keyed fingerprint.

The raw header value enters here and never leaves: the password of a Basic credential and the
whole of a bearer token are dropped; an HMAC under the installation's secret key lets the same
credential be recognised across transactions without keeping it. Query-string parameters that
carry secrets are redacted from URIs the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re

from .records import NO_CREDENTIAL, Credential

FINGERPRINT_HEX_CHARS = 16
REDACTED = "[redacted]"
# Query parameters that carry a secret in token-server and presigned-URL traffic.
_SECRET_QUERY = re.compile(
    r"(?i)(?<=[?&])(password|passwd|pass|secret|token|access_token|refresh_token|"
    r"client_secret|x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig)="
    r"[^&#]*"
)


def fingerprint(key: bytes, scheme: str, secret: bytes) -> str:
    """Keyed fingerprint of a credential: the same credential always maps to the same value."""
    mac = hmac.new(key, scheme.encode() + b"\0" + secret, hashlib.sha256)
    return mac.hexdigest()[:FINGERPRINT_HEX_CHARS]


def parse_authorization(value: str, key: bytes) -> tuple[Credential, str | None]:
    """Reduce an Authorization header value to a Credential.

    Returns the credential and an anomaly description (or None) when the header is malformed.
    `Basic Og==` (empty user and password, sent by some clients without credentials) is anonymous.
    """
    scheme, _, param = value.strip().partition(" ")
    scheme_lower = scheme.lower()
    param = param.strip()
    raw = param.encode("latin-1", "replace")
    if scheme_lower == "basic":
        try:
            decoded = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return Credential("basic", None, fingerprint(key, "basic", raw)), (
                "malformed Basic credential (not base64)")
        user, sep, password = decoded.partition(b":")
        if not sep:
            return Credential("basic", None, fingerprint(key, "basic", raw)), (
                "malformed Basic credential (no ':' separator)")
        if not user and not password:
            return NO_CREDENTIAL, None
        username = user.decode("utf-8", "replace")
        return Credential("basic", username, fingerprint(key, "basic", decoded)), None
    if scheme_lower == "bearer":
        return Credential("bearer", _jwt_subject(param), fingerprint(key, "bearer", raw)), None
    if not scheme:
        return NO_CREDENTIAL, None
    return Credential("other", None, fingerprint(key, scheme_lower, raw)), None


def _jwt_subject(token: str) -> str | None:
    """The `sub` claim of a JWT bearer token (the registry token server's username), unverified."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) and sub else None


def redact_uri(uri: str) -> str:
    """The URI with the values of secret-bearing query parameters replaced."""
    if "?" not in uri:
        return uri
    path, _, query = uri.partition("?")
    return path + "?" + _SECRET_QUERY.sub(lambda m: m.group(1) + "=" + REDACTED, query)
