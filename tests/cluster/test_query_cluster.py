"""The query service watching the catalog on the real control plane, end to end.

The session's operator reconciles the products; the query service runs on the operator's
loop, sharing its embedded Qdrant (as one process would in local mode; in a cluster they
are two Deployments on one Qdrant server), and reads the catalog through a Kubernetes watch.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from datamesh.query.access import Authenticator
from datamesh.query.app import create_app
from datamesh.query.catalog_sources import KubeCatalogSource
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CATALOG_LABEL, CatalogEntry, encode_entry
from datamesh_dev import devcluster
from tests.cluster.test_reconcile_cluster import EXAMPLES, apply, delete, product, ready
from tests.conftest import PLATFORM_NAMESPACE, REPO
from tests.harness import Kubectl, OperatorThread, wait_for
from tests.unit.test_query_service import ALICE, TOKENS


@dataclass
class Service:
    url: str
    source: KubeCatalogSource


@pytest.fixture(scope="module")
def service(operator: OperatorThread) -> Iterator[Service]:
    # A short server-side watch timeout exercises the normal renewal path during the tests too.
    source = KubeCatalogSource(PLATFORM_NAMESPACE, timeout_seconds=20, backoff_max=2.0)
    settings = QuerySettings(catalog_namespace=PLATFORM_NAMESPACE)
    app = create_app(source, operator.store, settings, Authenticator(TOKENS))
    with operator.serving(app) as url:
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, what="catalog loaded")
        yield Service(url, source)


def ask(service: Service, question: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{service.url}/v1/query", json={"question": question, **body}, headers=ALICE, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def products_in(answer: dict[str, Any]) -> set[str]:
    return {r["product"] for r in answer["routedTo"]} | {r["product"] for r in answer["results"]}


def volcanic_product(name: str, domain: str) -> dict[str, Any]:
    """A product about a subject no other product mentions."""
    rows = [
        {"id": f"v{i}", "text": f"volcanic ash cloud grounded cargo flight {i} at the hub", "amount": i}
        for i in range(6)
    ]
    body = product(
        name,
        rows,
        domain=domain,
        description="Cargo flights grounded by volcanic ash clouds.",
        tags=["volcano", "aviation"],
    )
    # Routed among the examples, so embedded with their (default) model rather than the tests' lexical one.
    del body["spec"]["semanticSearch"]["embeddingModel"]
    return body


def test_examples_answer_questions_about_their_subject(
    kubectl: Kubectl, operator: OperatorThread, service: Service
) -> None:
    kubectl.run("apply", "-f", str(REPO / "examples"))
    for path in EXAMPLES:
        doc = yaml.safe_load(path.read_text())
        ready(kubectl, doc["metadata"]["name"], doc["metadata"]["namespace"])
    for question, expected in (
        ("which shipments were delayed by weather?", "logistics/shipment-delays"),
        ("why do customers churn after price increases?", "sales/customer-churn"),
    ):
        answer = wait_for(
            lambda q=question: (a := ask(service, q, perProduct=3))["results"] and a, 10, what=f"answer to {question!r}"
        )
        assert answer["routedTo"][0]["product"] == expected
        assert answer["results"][0]["product"] == expected and len(answer["results"][0]["hits"]) == 3
        assert answer["merged"][0]["product"] == expected
    # The restricted example is routed only for callers that may read it.
    bob = httpx.post(
        f"{service.url}/v1/query",
        json={"question": "which expense rules are broken most?"},
        headers={"Authorization": "Bearer bob-token"},
        timeout=30,
    ).json()
    assert "finance/expense-exceptions" not in products_in(bob)
    assert (
        ask(service, "which expense rules are broken most?")["routedTo"][0]["product"] == "finance/expense-exceptions"
    )


def test_new_product_is_queryable_at_once_and_gone_once_deleted(
    kubectl: Kubectl, operator: OperatorThread, service: Service
) -> None:
    name = f"volcanic-{uuid.uuid4().hex[:6]}"
    domain = f"aviation-{name[-6:]}"
    apply(kubectl, volcanic_product(name, domain))
    try:
        ready(kubectl, name)
        # The catalog entry is written before Ready is reported; the watch delivers it in well under a second.
        seen = time.monotonic()
        answer = wait_for(
            lambda: (a := ask(service, "which cargo flights were grounded by volcanic ash?", limit=2))["results"] and a,
            5,
            interval=0.05,
            what="new product routed",
        )
        lag = time.monotonic() - seen
        assert lag < 1.0, f"the new product became queryable {lag:.2f}s after it was Ready"
        assert answer["routedTo"][0]["product"] == f"default/{name}"
        assert "volcanic ash" in answer["results"][0]["hits"][0]["text"]
        assert httpx.get(f"{service.url}/v1/products/default/{name}", headers=ALICE).json()["domain"] == domain
    finally:
        delete(kubectl, name)
    # kubectl delete returns once the finalizer (which removes the catalog entry) is done.
    gone = time.monotonic()
    wait_for(
        lambda: httpx.get(f"{service.url}/v1/products/default/{name}", headers=ALICE).status_code == 404,
        5,
        interval=0.05,
        what="product gone",
    )
    assert time.monotonic() - gone < 1.0
    assert f"default/{name}" not in products_in(
        ask(service, "which cargo flights were grounded by volcanic ash?", maxProducts=50)
    )


def test_watch_resumes_after_api_server_restart(
    kubectl: Kubectl,
    operator: OperatorThread,
    service: Service,
    control_plane: devcluster.ControlPlane | devcluster.ExternalCluster,
) -> None:
    if isinstance(control_plane, devcluster.ExternalCluster):
        pytest.skip("an external cluster's API server cannot be restarted from here")
    watches = service.source.watches
    control_plane.restart_apiserver()
    name = f"after-restart-{uuid.uuid4().hex[:6]}"
    apply(kubectl, volcanic_product(name, f"aviation-{name[-6:]}"))
    try:
        ready(kubectl, name, timeout=120)
        answer = wait_for(
            lambda: (
                (a := ask(service, "which cargo flights were grounded by volcanic ash?", limit=2))["routedTo"]
                and a["routedTo"][0]["product"] == f"default/{name}"
                and a
            ),
            15,
            interval=0.1,
            what="product applied after the restart routed",
        )
        assert answer["results"][0]["hits"]
        assert service.source.watches > watches  # a new watch connection, not a restarted service
        assert httpx.get(f"{service.url}/readyz").status_code == 200
    finally:
        delete(kubectl, name)
    wait_for(
        lambda: httpx.get(f"{service.url}/v1/products/default/{name}", headers=ALICE).status_code == 404,
        5,
        interval=0.05,
        what="product gone after restart",
    )


def config_map(namespace: str, name: str, entries: list[CatalogEntry], labelled: bool = True) -> str:
    labels = {CATALOG_LABEL: "true"} if labelled else {}
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "data": {e.key: encode_entry(e) for e in entries},
        }
    )


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``predicate`` holds, checked every 20 ms on this loop (so the watch keeps running)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_source_follows_large_shards_through_watch_renewals(kubectl: Kubectl) -> None:
    """A shard near the ConfigMap size limit, a second shard, relabelling and deletion, across watch renewals."""
    ns = f"catalog-watch-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", ns)
    big = [
        CatalogEntry(
            namespace="shop",
            name=f"p{i:03d}",
            domain="shop",
            description=f"product {i} " + "x" * 2500,
            phase="Ready",
            collection=f"shop.p{i:03d}",
        )
        for i in range(300)
    ]
    source = KubeCatalogSource(ns, timeout_seconds=5, backoff_max=1.0)
    await source.start()
    try:
        await eventually(lambda: source.loaded, 10, "first list")
        assert source.entries() == {}
        # Arrives as one ~800 kB watch event. create, not apply: apply's last-applied annotation
        # would double the object past the annotation size limit.
        kubectl.run("create", "-f", "-", input=config_map(ns, "catalog-0", big))
        await eventually(lambda: len(source.entries()) == 300, 5, "large shard")
        assert source.entries()["shop.p007"].description.startswith("product 7 ")

        extra = CatalogEntry(namespace="shop", name="extra", domain="shop", description="one more", phase="Ready")
        kubectl.run("create", "-f", "-", input=config_map(ns, "catalog-1", [extra]))
        kubectl.run(
            "create",
            "-f",
            "-",
            input=config_map(ns, "unrelated", [extra.model_copy(update={"name": "ignored"})], labelled=False),
        )
        lag = await eventually(lambda: "shop.extra" in source.entries(), 5, "second shard")
        assert lag < 1.0 and len(source.entries()) == 301 and "shop.ignored" not in source.entries()

        await asyncio.sleep(6)  # past timeout_seconds: the server ends the watch and it is renewed
        assert source.watches >= 2
        kubectl.run("replace", "-f", "-", input=config_map(ns, "catalog-0", big[:10]))
        await eventually(lambda: len(source.entries()) == 11, 5, "shard shrunk")
        kubectl.run("label", "configmap", "catalog-1", "-n", ns, f"{CATALOG_LABEL}-")
        await eventually(lambda: "shop.extra" not in source.entries(), 5, "unlabelled shard dropped")
        kubectl.run("delete", "configmap", "catalog-0", "-n", ns)
        await eventually(lambda: source.entries() == {}, 5, "deleted shard dropped")
        assert source.loaded and source.relists == 1  # followed by watch alone, never re-listed
    finally:
        await source.stop()
        kubectl.run("delete", "namespace", ns, "--wait=false")
