"""Registry API classification: method + URI → RegistryOp (distribution v2 / OCI distribution).

Routes are named after distribution's own (`registry/api/v2/routes.go`) and found from the end
of the path, because repository names have several segments (`team/app/worker`).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

from .records import RegistryOp

_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_ROUTES = re.compile(
    r"^/v2/(?P<name>.+?)/(?:"
    r"(?P<tags>tags/list)"
    r"|manifests/(?P<manifest>[^/]+)"
    r"|blobs/uploads/(?P<upload>[^/]*)"
    r"|blobs/(?P<blob>[^/]+)"
    r"|referrers/(?P<referrers>[^/]+)"
    r")/?$"
)

_MANIFEST_OPS = {"GET": ("manifest-get", "pull"), "HEAD": ("manifest-head", "pull"),
                 "PUT": ("manifest-put", "push"), "DELETE": ("manifest-delete", "delete")}
_BLOB_OPS = {"GET": ("blob-get", "pull"), "HEAD": ("blob-head", "pull"),
             "DELETE": ("blob-delete", "delete")}
_UPLOAD_OPS = {"PATCH": ("blob-upload-chunk", "push"), "PUT": ("blob-upload-commit", "push"),
               "GET": ("blob-upload-status", "push"), "DELETE": ("blob-upload-cancel", "push")}


def _page_size(query: dict[str, list[str]]) -> int | None:
    values = query.get("n")
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        return -1  # present but not a number: the registry answers 400


def _is_digest(ref: str) -> bool:
    return _DIGEST.match(ref) is not None


def classify(method: str | None, uri: str | None) -> RegistryOp | None:
    """The registry operation a request performs, or None when it is not a registry API call."""
    if not method or not uri:
        return None
    parts = urlsplit(uri)
    path = unquote(parts.path) or "/"
    if path != "/v2" and not path.startswith("/v2/"):
        return None  # /v2foo, /v20/... are not the v2 API
    query = parse_qs(parts.query, keep_blank_values=True)
    if path in ("/v2", "/v2/"):
        return RegistryOp("base", "check")
    if path.rstrip("/") == "/v2/_catalog":
        return RegistryOp("catalog", "list", page_size=_page_size(query))
    m = _ROUTES.match(path)
    if m is None:
        return RegistryOp("unknown", "unknown")
    name = m.group("name")
    if m.group("tags"):
        return RegistryOp("tags-list", "list", repository=name, page_size=_page_size(query))
    if (ref := m.group("manifest")) is not None:
        op, action = _MANIFEST_OPS.get(method, ("manifest-other", "unknown"))
        return RegistryOp(op, action, repository=name, reference=ref,
                          digest=ref if _is_digest(ref) else None)
    if (upload := m.group("upload")) is not None:
        digest = (query.get("digest") or [None])[0]
        if not upload:
            if method != "POST":
                return RegistryOp("blob-upload-other", "unknown", repository=name)
            mount = (query.get("mount") or [None])[0]
            if mount:
                source = (query.get("from") or [None])[0]
                return RegistryOp("blob-mount", "push", repository=name, digest=mount,
                                  mount_from=source)
            return RegistryOp("blob-upload-start", "push", repository=name, digest=digest)
        op, action = _UPLOAD_OPS.get(method, ("blob-upload-other", "unknown"))
        return RegistryOp(op, action, repository=name, digest=digest)
    if (blob := m.group("blob")) is not None:
        op, action = _BLOB_OPS.get(method, ("blob-other", "unknown"))
        return RegistryOp(op, action, repository=name,
                          digest=blob if _is_digest(blob) else None)
    subject = m.group("referrers")
    return RegistryOp("referrers", "pull", repository=name, digest=subject)
