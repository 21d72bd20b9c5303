"""Registry API classification: method + URI → RegistryOp.

Expected values follow the route table of DESIGN.md (distribution's `registry/api/v2/routes.go`,
the OCI distribution spec): base, catalog, tags, manifests by tag and by digest, blobs, the
upload session (start, monolithic, cross-repository mount, chunk, commit, status, cancel) and
referrers. Repository names have several path segments, so routes are found from the end.
"""

from __future__ import annotations

import pytest
from craft import request, response, run_segs, tcp_flow

from sensor.records import RegistryOp
from sensor.registry import classify

D = "sha256:" + "0123456789abcdef" * 4
D2 = "sha512:" + "ab" * 64
UUID = "b9a1c1b4-6f1c-4d6e-9d5a-27d0c0b1e0aa"
NAME = "team/app/worker"


def op(operation, action, **kw):
    return RegistryOp(operation, action, **kw)


CASES = [
    # base
    ("GET", "/v2/", op("base", "check")),
    ("GET", "/v2", op("base", "check")),
    ("HEAD", "/v2/", op("base", "check")),
    # catalog
    ("GET", "/v2/_catalog", op("catalog", "list")),
    ("GET", "/v2/_catalog?n=100", op("catalog", "list", page_size=100)),
    ("GET", "/v2/_catalog?n=50&last=library%2Fnginx", op("catalog", "list", page_size=50)),
    ("GET", "/v2/_catalog?n=999999999", op("catalog", "list", page_size=999999999)),
    ("GET", "/v2/_catalog?n=lots", op("catalog", "list", page_size=-1)),
    ("GET", "/v2/_catalog/", op("catalog", "list")),
    # tags
    ("GET", "/v2/library/alpine/tags/list", op("tags-list", "list", repository="library/alpine")),
    ("GET", f"/v2/{NAME}/tags/list?n=10&last=v1",
     op("tags-list", "list", repository=NAME, page_size=10)),
    ("GET", "/v2/busybox/tags/list", op("tags-list", "list", repository="busybox")),
    # manifests by tag
    ("GET", f"/v2/{NAME}/manifests/latest",
     op("manifest-get", "pull", repository=NAME, reference="latest")),
    ("HEAD", f"/v2/{NAME}/manifests/v1.2.3",
     op("manifest-head", "pull", repository=NAME, reference="v1.2.3")),
    ("PUT", f"/v2/{NAME}/manifests/v1",
     op("manifest-put", "push", repository=NAME, reference="v1")),
    ("DELETE", f"/v2/{NAME}/manifests/v1",
     op("manifest-delete", "delete", repository=NAME, reference="v1")),
    # manifests by digest
    ("GET", f"/v2/{NAME}/manifests/{D}",
     op("manifest-get", "pull", repository=NAME, reference=D, digest=D)),
    ("HEAD", f"/v2/library/alpine/manifests/{D2}",
     op("manifest-head", "pull", repository="library/alpine", reference=D2, digest=D2)),
    ("PUT", f"/v2/{NAME}/manifests/{D}",
     op("manifest-put", "push", repository=NAME, reference=D, digest=D)),
    ("DELETE", f"/v2/{NAME}/manifests/{D}",
     op("manifest-delete", "delete", repository=NAME, reference=D, digest=D)),
    ("PATCH", f"/v2/{NAME}/manifests/v1",
     op("manifest-other", "unknown", repository=NAME, reference="v1")),
    # blobs
    ("GET", f"/v2/{NAME}/blobs/{D}", op("blob-get", "pull", repository=NAME, digest=D)),
    ("HEAD", f"/v2/{NAME}/blobs/{D}", op("blob-head", "pull", repository=NAME, digest=D)),
    ("DELETE", f"/v2/{NAME}/blobs/{D}", op("blob-delete", "delete", repository=NAME, digest=D)),
    ("PUT", f"/v2/{NAME}/blobs/{D}", op("blob-other", "unknown", repository=NAME, digest=D)),
    # upload session
    ("POST", f"/v2/{NAME}/blobs/uploads/", op("blob-upload-start", "push", repository=NAME)),
    ("POST", f"/v2/{NAME}/blobs/uploads/?digest={D}",
     op("blob-upload-start", "push", repository=NAME, digest=D)),  # monolithic
    ("POST", f"/v2/{NAME}/blobs/uploads/?mount={D}&from=library/base",
     op("blob-mount", "push", repository=NAME, digest=D, mount_from="library/base")),
    ("POST", f"/v2/{NAME}/blobs/uploads/?mount={D}&from=library%2Fbase",
     op("blob-mount", "push", repository=NAME, digest=D, mount_from="library/base")),
    ("POST", f"/v2/{NAME}/blobs/uploads/?mount={D}",
     op("blob-mount", "push", repository=NAME, digest=D)),
    ("PATCH", f"/v2/{NAME}/blobs/uploads/{UUID}",
     op("blob-upload-chunk", "push", repository=NAME)),
    ("PATCH", f"/v2/{NAME}/blobs/uploads/{UUID}?_state=abc",
     op("blob-upload-chunk", "push", repository=NAME)),
    ("PUT", f"/v2/{NAME}/blobs/uploads/{UUID}?digest={D}",
     op("blob-upload-commit", "push", repository=NAME, digest=D)),
    ("PUT", f"/v2/{NAME}/blobs/uploads/{UUID}?_state=xyz&digest={D}",
     op("blob-upload-commit", "push", repository=NAME, digest=D)),
    ("GET", f"/v2/{NAME}/blobs/uploads/{UUID}",
     op("blob-upload-status", "push", repository=NAME)),
    ("DELETE", f"/v2/{NAME}/blobs/uploads/{UUID}",
     op("blob-upload-cancel", "push", repository=NAME)),
    ("GET", f"/v2/{NAME}/blobs/uploads/", op("blob-upload-other", "unknown", repository=NAME)),
    # referrers (OCI distribution 1.1)
    ("GET", f"/v2/{NAME}/referrers/{D}", op("referrers", "pull", repository=NAME, digest=D)),
    ("GET", f"/v2/{NAME}/referrers/{D}?artifactType=application%2Fvnd.example.sbom",
     op("referrers", "pull", repository=NAME, digest=D)),
    # names are found from the end; components may look like route words
    ("GET", "/v2/org/manifests/app/manifests/v1",
     op("manifest-get", "pull", repository="org/manifests/app", reference="v1")),
    ("GET", "/v2/a/blobs/b/tags/list", op("tags-list", "list", repository="a/blobs/b")),
    ("GET", f"/v2/x/tags/y/blobs/{D}", op("blob-get", "pull", repository="x/tags/y", digest=D)),
    # absolute-form and percent-encoded targets
    ("GET", f"http://registry.example:5000/v2/{NAME}/manifests/v1",
     op("manifest-get", "pull", repository=NAME, reference="v1")),
    ("GET", "/v2/library%2Falpine/manifests/3.19",
     op("manifest-get", "pull", repository="library/alpine", reference="3.19")),
    # under /v2 but no known route
    ("GET", "/v2/library/alpine", op("unknown", "unknown")),
    ("GET", "/v2/library/alpine/manifests/", op("unknown", "unknown")),
]


@pytest.mark.parametrize(("method", "uri", "expected"), CASES,
                         ids=[f"{m} {u[:70]}" for m, u, _ in CASES])
def test_classify(method, uri, expected):
    assert classify(method, uri) == expected


@pytest.mark.parametrize(("method", "uri"), [
    ("GET", "/"),
    ("GET", "/v1/_ping"),
    ("GET", "/v1/repositories/library/alpine/tags"),
    ("GET", "/token?service=registry&scope=repository:library/alpine:pull"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v2foo"),
    ("GET", "/v20/library/alpine/manifests/latest"),
    ("GET", "/api/v2.0/projects"),  # Harbor's own API, not the registry's
    ("GET", "*"),
    ("OPTIONS", "*"),
    (None, "/v2/"),
    ("GET", None),
    ("GET", ""),
])
def test_not_registry_api(method, uri):
    assert classify(method, uri) is None


def test_every_operation_has_one_of_the_design_actions():
    actions = {case[2].action for case in CASES}
    assert actions <= {"check", "list", "pull", "push", "delete", "unknown"}
    assert {c[2].operation for c in CASES} >= {
        "base", "catalog", "tags-list", "manifest-get", "manifest-head", "manifest-put",
        "manifest-delete", "blob-get", "blob-head", "blob-delete", "blob-upload-start",
        "blob-mount", "blob-upload-chunk", "blob-upload-commit", "blob-upload-status",
        "blob-upload-cancel", "referrers"}


def test_classification_reaches_the_transaction():
    mount = f"/v2/{NAME}/blobs/uploads/?mount={D}&from=library/base"
    segs = tcp_flow([
        (request("POST", mount, content_length=True),
         response(201, "Created", [("Location", f"/v2/{NAME}/blobs/{D}")],
                  content_length=True)),
        (request("GET", "/v2/_catalog?n=100000"), response(200, body=b"{}")),
        (request("GET", "/token?scope=x"), response(200, body=b"{}")),
    ])
    _, out = run_segs(segs)
    ops = [t.op for t in out.transactions]
    assert ops == [op("blob-mount", "push", repository=NAME, digest=D, mount_from="library/base"),
                   op("catalog", "list", page_size=100000), None]
    assert out.transactions[0].location == f"/v2/{NAME}/blobs/{D}"
