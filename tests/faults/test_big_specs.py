"""Big specs: no annotation of the operator grows with the spec, and specs too big for the object are refused.

The largest spec the CRD takes is 40 rows of 8 values of 256 characters; in 4-byte characters
that is about 330 kB, more than the 256 KiB all annotations of an object may hold. Such a spec is
stored by server-side apply (which keeps no copy in an annotation); the operator's diff-base
holds digests, so it reconciles, stays small and still sees an edit of the last value.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.cluster.test_reconcile_cluster import product
from tests.faults.helpers import create_namespace, delete_namespace_products, reconciled_under
from tests.harness import Kubectl, OperatorThread, wait_for

NS = "faults-big"
ANNOTATIONS_LIMIT = 262_144
COLUMNS = [f"c{j}" for j in range(7)]


def big_product(name: str) -> dict[str, Any]:
    rows = [{"id": f"r{i}", **dict.fromkeys(COLUMNS, "😀" * 256)} for i in range(40)]
    body = product(name, rows)
    body["metadata"]["namespace"] = NS
    body["spec"]["schema"]["fields"] = [
        {"name": "id", "type": "string", "primaryKey": True},
        *({"name": c, "type": "string"} for c in COLUMNS),
    ]
    body["spec"]["semanticSearch"]["keyFields"] = ["c0"]
    return body


def annotation_bytes(obj: dict[str, Any]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in (obj["metadata"].get("annotations") or {}).items())


def server_side_apply(kubectl: Kubectl, body: dict[str, Any]) -> None:
    kubectl.run("apply", "--server-side", "--field-manager=faults", "-f", "-", input=yaml.safe_dump(body))


def test_a_spec_bigger_than_the_annotations_limit_reconciles_with_small_annotations_and_edits_are_seen(
    kubectl: Kubectl, operator: OperatorThread
) -> None:
    create_namespace(kubectl, NS)
    body = big_product("huge")
    assert len(json.dumps(body["spec"], ensure_ascii=False).encode()) > ANNOTATIONS_LIMIT
    try:
        server_side_apply(kubectl, body)
        # The status is written before kopf records the handled spec, so wait for both.
        first = wait_for(
            lambda: (dp := kubectl.get("dp", "huge", NS)) and reconciled_under(dp, "datamesh.io") and dp, 90
        )
        assert first["status"]["records"] == 40
        used = annotation_bytes(first)
        assert "datamesh.io/last-handled-configuration" in first["metadata"]["annotations"]
        assert used < 2_000, f"the operator's annotations hold {used} bytes"

        # An edit of the very last value is still a change of the spec, reconciled at once.
        edited = big_product("huge")
        edited["spec"]["source"]["inline"][-1]["c0"] = "a different note at the end"
        server_side_apply(kubectl, edited)
        second = wait_for(
            lambda: (
                (dp := kubectl.get("dp", "huge", NS))
                and dp["metadata"]["generation"] == 2
                and reconciled_under(dp, "datamesh.io")
                and dp
            ),
            90,
            what="the edit reconciled",
        )
        assert second["status"]["ingestedDigest"] != first["status"]["ingestedDigest"]
        assert annotation_bytes(second) < 2_000
        hits = operator.call(operator.store.count(second["status"]["collection"]))
        assert hits == 40
    finally:
        delete_namespace_products(kubectl, NS)


def test_a_spec_over_the_object_limits_is_refused_by_the_api_server_naming_the_inline_rows(
    kubectl: Kubectl, operator: OperatorThread
) -> None:
    create_namespace(kubectl, NS)
    # 1,500 rows of about 200 characters: over 256 KiB, far over the 40 rows inline allows.
    rows = [{"id": f"r{i}", "text": f"row {i} " + "x" * 200, "amount": i} for i in range(1500)]
    body = product("too-big", rows)
    body["metadata"]["namespace"] = NS
    assert len(json.dumps(body["spec"]).encode()) > ANNOTATIONS_LIMIT
    for mode in ([], ["--server-side"]):
        refused = kubectl.run("apply", *mode, "-f", "-", input=yaml.safe_dump(body), check=False)
        assert refused.returncode != 0, f"kubectl apply {mode} accepted a {len(rows)}-row inline spec"
        assert "spec.source.inline: Too many: 1500: must have at most 40 items" in refused.stderr, refused.stderr
    assert kubectl.get("dp", "too-big", NS) is None
    # Where the API server's own words end (it cannot see into untyped rows), the schema says where to go.
    explained = kubectl.run("explain", "dataproducts.spec.source.inline").stdout
    assert "configMapRef or url" in " ".join(explained.split())
