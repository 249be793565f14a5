"""The federated query service as a real server on 127.0.0.1, over products built by the reconcile core.

Everything is real: the examples are reconciled into an embedded Qdrant and a file catalog,
the service runs under uvicorn on the test loop, and callers are httpx clients. The
ticket product's inference endpoint is the built-in inference runtime on its own server;
a "slow embedding service" and a scripted runtime (to reach the error paths) are small
FastAPI stand-ins on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.files import FileCatalogBackend
from datamesh.adapters.stores import open_store as real_open_store
from datamesh.core.merge import MERGE
from datamesh.core.plan import FUSION
from datamesh.core.ports import VectorStore
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.reconciler import Reconciler
from datamesh.inference.runtime import RuntimeSettings
from datamesh.inference.runtime import create_app as create_runtime
from datamesh.local import standalone_reconciler
from datamesh.query import app as query_app
from datamesh.query.access import Authenticator, Unauthenticated
from datamesh.query.app import create_app, serve
from datamesh.query.catalog_sources import FileCatalogSource, StaticCatalogSource
from datamesh.query.engine import within
from datamesh.query.schemas import INFERENCE_KEY
from datamesh.query.settings import QuerySettings
from datamesh.settings import StoreSettings
from datamesh.web.serving import serve_app
from tests.conftest import operator_settings
from tests.httpserver import ServerThread

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if p.name != "00-namespaces.yaml")
TOKENS = {
    "alice-token": {"identity": "alice", "groups": ["finance", "sales"]},
    "bob-token": {"identity": "bob", "groups": ["sales"]},
    "cfo-token": {"identity": "cfo@example.com", "groups": []},
}
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
CFO = {"Authorization": "Bearer cfo-token"}
RESTRICTED = "finance/expense-exceptions"
SLOW = "logistics/shipment-delays-mirror"


def example_bodies() -> list[dict[str, Any]]:
    """Every example manifest as the API server would hand it to the operator."""
    bodies = []
    for i, path in enumerate(EXAMPLES):
        doc = yaml.safe_load(path.read_text())
        doc["metadata"].update(generation=1, uid=f"uid-{i}")
        bodies.append(doc)
    return bodies


def embedding_standin(state: dict[str, bool]) -> FastAPI:
    """An OpenAI-compatible /v1/embeddings server (built-in vectors) that hangs while ``state['hang']``."""
    app = FastAPI()
    builtin = resolve_provider("builtin:ngram-384")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await request.json()
        if state["hang"]:
            await asyncio.sleep(60)
        vectors = await builtin.embed(body["input"])
        return {
            "object": "list",
            "data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": body["model"],
        }

    return app


def runtime_standin(calls: list[dict[str, Any]]) -> FastAPI:
    """Answers /v1/transform in the runtime's shape (one result per record), and records what it got."""
    app = FastAPI()

    @app.post("/v1/transform")
    async def transform(request: Request) -> Any:
        body = await request.json()
        calls.append(body)
        if body.get("task") == "refuse":
            from fastapi.responses import JSONResponse

            return JSONResponse({"detail": "unknown task 'refuse'"}, status_code=400)
        return {
            "results": [
                {"label": "long" if len(str(r.get("summary", ""))) > 20 else "short", "task": body.get("task")}
                for r in body["records"]
            ]
        }

    return app


@dataclass
class Mesh:
    url: str
    anonymous_url: str
    client: httpx.AsyncClient
    store: VectorStore
    reconciler: Reconciler
    catalog_path: Path
    runtime_calls: list[dict[str, Any]]
    hang: dict[str, bool]


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp("query")
    hang = {"hang": False}
    runtime_calls: list[dict[str, Any]] = []
    settings = operator_settings(catalog_flush_seconds=0.01)
    store = real_open_store(StoreSettings(url=None))
    catalog_path = tmp / "catalog.json"
    writer = CatalogWriter(
        FileCatalogBackend(catalog_path), "catalog", settings.catalog_shard_bytes, settings.catalog_flush_seconds
    )
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]  # bound, never listening: connections are refused
    with (
        ServerThread(embedding_standin(hang)) as embed_url,
        ServerThread(runtime_standin(runtime_calls)) as standin_url,
        ServerThread(create_runtime(RuntimeSettings(model="builtin:ngram-384"))) as runtime_url,
    ):
        async with httpx.AsyncClient() as http:
            reconciler = standalone_reconciler(settings, store, writer, http)
            bodies = example_bodies()
            for body in bodies:
                name = body["metadata"]["name"]
                if name == "ticket-summaries":
                    body["spec"]["inference"] = {"enabled": True, "endpoint": runtime_url}
                if name == "invoice-disputes":
                    body["spec"]["inference"] = {"enabled": True, "endpoint": standin_url}
                if name == "feature-requests":  # unreachable inference: Degraded, still searchable
                    body["spec"]["inference"] = {"enabled": True, "endpoint": f"http://127.0.0.1:{dead_port}"}
            mirror = copy.deepcopy(next(b for b in bodies if b["metadata"]["name"] == "shipment-delays"))
            mirror["metadata"].update(name="shipment-delays-mirror", uid="uid-mirror")
            mirror["spec"]["semanticSearch"].update(embeddingModel="standin-ngram", embeddingEndpoint=embed_url)
            mirror["spec"]["sla"]["queryLatencyP99"] = "300ms"
            # The same name in another namespace: a bare "customer-churn" is then ambiguous.
            namesake = copy.deepcopy(next(b for b in bodies if b["metadata"]["name"] == "customer-churn"))
            namesake["metadata"].update(namespace="other", uid="uid-namesake")
            namesake["spec"]["source"]["inline"] = namesake["spec"]["source"]["inline"][:2]
            namesake["spec"].update(description="Placeholder accounts for a migration dry run.", tags=["migration"])
            for row in namesake["spec"]["source"]["inline"]:
                row["churn_reason"] = "Placeholder account kept for a migration test."
            phases = {}
            for body in [*bodies, mirror, namesake]:
                outcome = await reconciler.reconcile(body)
                assert outcome is not None
                phases[f"{body['metadata']['namespace']}/{body['metadata']['name']}"] = outcome.status.phase
            assert phases.pop("product/feature-requests") == "Degraded"
            assert set(phases.values()) == {"Ready"}, phases

            query_settings = QuerySettings(
                catalog_file=str(catalog_path), default_timeout_seconds=2.0, timeout_cap_seconds=3.0
            )
            strict = create_app(FileCatalogSource(catalog_path), store, query_settings, Authenticator(TOKENS))
            open_settings = query_settings.model_copy(update={"allow_anonymous": True})
            anonymous = create_app(
                FileCatalogSource(catalog_path), store, open_settings, Authenticator(TOKENS, allow_anonymous=True)
            )
            async with (
                serve_app(strict) as url,
                serve_app(anonymous) as anonymous_url,
                httpx.AsyncClient(timeout=30) as client,
            ):
                yield Mesh(url, anonymous_url, client, store, reconciler, catalog_path, runtime_calls, hang)
            hang["hang"] = False
            await writer.close()
    closed.close()
    await store.close()


async def ask(mesh: Mesh, headers: dict[str, str] | None = None, url: str | None = None, **body: Any) -> httpx.Response:
    return await mesh.client.post(f"{url or mesh.url}/v1/query", json=body, headers=headers or {})


def products_in(answer: dict[str, Any]) -> set[str]:
    """Every product named anywhere in a /v1/query answer."""
    return (
        {r["product"] for r in answer.get("routedTo", [])}
        | {r["product"] for r in answer.get("results", [])}
        | {m["product"] for m in answer.get("merged", [])}
        | {e["product"] for e in answer.get("errors", [])}
    )


# ==== routing and answers ====================================================================


@pytest.mark.parametrize(
    ("question", "product", "field"),
    [
        ("why do customers churn after price increases?", "sales/customer-churn", "churn_reason"),
        ("shipments held up by storms and snow", "logistics/shipment-delays", "delay_report"),
        ("why do employees leave the company?", "hr/exit-interviews", "exit_feedback"),
    ],
)
async def test_question_is_routed_to_and_answered_by_its_product_first(
    mesh: Mesh, question: str, product: str, field: str
) -> None:
    response = await ask(mesh, ALICE, question=question, limit=3, perProduct=4)
    assert response.status_code == 200, response.text
    answer = response.json()
    # The mirror holds the same rows embedded by another model: either may be the better route.
    product = answer["routedTo"][0]["product"] if answer["routedTo"][0]["product"] == SLOW else product
    assert answer["routedTo"][0]["product"] == product
    assert "matching row" in answer["routedTo"][0]["why"] and 0 < answer["routedTo"][0]["score"] <= 1.2
    first = answer["results"][0]
    assert first["product"] == product and len(first["hits"]) == 4, "perProduct hits per product"
    hit = first["hits"][0]
    assert hit["text"] == hit["fields"][field]
    assert not any(k.startswith("_") for k in hit["fields"])
    primary = {"sales/customer-churn": "customer_id", "logistics/shipment-delays": "shipment_id"}
    if product in primary:
        assert hit["key"] == hit["fields"][primary[product]], "a hit names its row by its primary key"
    assert answer["merged"][0]["product"] == product
    assert len(answer["merged"]) == 3, "limit sets the merged ranking's length"
    hits = {(h["product"], json.dumps(h["key"])) for r in answer["results"] for h in r["hits"]}
    assert all((m["product"], json.dumps(m["key"])) in hits for m in answer["merged"]), "merged points at hits"
    assert set(answer["merged"][0]) == {"product", "key", "score"}


async def test_merged_ranking_is_on_scores_not_ranks(mesh: Mesh) -> None:
    answer = (
        await ask(
            mesh,
            ALICE,
            question="customers disputing invoices and prices",
            products=["invoice-disputes", "sales/customer-churn"],
            limit=6,
        )
    ).json()
    assert len(answer["results"]) == 2
    merged = answer["merged"]
    assert [m["score"] for m in merged] == sorted((m["score"] for m in merged), reverse=True)
    similarity = {(h["product"], json.dumps(h["key"])): h["similarity"] for r in answer["results"] for h in r["hits"]}
    scores = {r["product"]: r["score"] for r in answer["routedTo"]}
    best = max(scores.values())
    fused = {(h["product"], json.dumps(h["key"])): h["score"] for r in answer["results"] for h in r["hits"]}
    best_fused = (FUSION.dense_weight + FUSION.sparse_weight) / (FUSION.k + 1)
    for m in merged:  # one model: the hit's cosine (and its words), weighed by its product's routing share
        key = (m["product"], json.dumps(m["key"]))
        weight = 1 - MERGE.route_weight + MERGE.route_weight * scores[m["product"]] / best
        expected = (similarity[key] + MERGE.fused_weight * min(fused[key] / best_fused, 1.0)) * weight
        assert m["score"] == pytest.approx(expected, abs=1e-5)
    # Not interleaving: a product's second hit may outrank another product's first.
    firsts = {r["product"]: r["hits"][0]["key"] for r in answer["results"]}
    assert [m["key"] for m in merged[:2]] != list(firsts.values()) or len({m["product"] for m in merged[:2]}) == 2


async def test_routing_is_deterministic(mesh: Mesh) -> None:
    answers = [
        (await ask(mesh, ALICE, question="late deliveries and unhappy customers", limit=2)).json() for _ in range(3)
    ]
    assert answers[0]["routedTo"] == answers[1]["routedTo"] == answers[2]["routedTo"]
    assert answers[0]["merged"] == answers[2]["merged"]


async def test_domain_and_product_filters(mesh: Mesh) -> None:
    answer = (await ask(mesh, ALICE, question="customers disputing prices", domains=["finance"])).json()
    assert answer["routedTo"] and {r["product"].split("/")[0] for r in answer["routedTo"]} == {"finance"}
    # A named product is asked even when the question has nothing to do with it.
    answer = (
        await ask(mesh, ALICE, question="which shipments were delayed by weather?", products=["hr/exit-interviews"])
    ).json()
    assert [r["product"] for r in answer["routedTo"]] == ["hr/exit-interviews"]
    assert "requested by name" in answer["routedTo"][0]["why"] and answer["routedTo"][0]["requested"]
    assert answer["results"][0]["hits"]
    # A bare name is enough when it is unambiguous; an ambiguous or unknown one is a clear error.
    bare = (await ask(mesh, ALICE, question="late parcels", products=["shipment-delays"])).json()
    assert [r["product"] for r in bare["routedTo"]] == ["logistics/shipment-delays"]
    ambiguous = await ask(mesh, ALICE, question="churn", products=["customer-churn"])
    assert ambiguous.status_code == 422 and "other/customer-churn" in ambiguous.json()["detail"]
    unknown = await ask(mesh, ALICE, question="churn", products=["no-such-product"])
    assert unknown.status_code == 404 and unknown.json()["detail"] == "product no-such-product not found"
    answer = (await ask(mesh, ALICE, question="why do employees leave the company?", maxProducts=1)).json()
    assert [r["product"] for r in answer["routedTo"]] == ["hr/exit-interviews"], "maxProducts caps the products asked"
    nothing = await ask(mesh, ALICE, question="weather", domains=["astronomy"])
    assert (
        nothing.status_code == 200 and "no product you may read in the domains astronomy" in nothing.json()["message"]
    )


async def test_a_question_nothing_answers_well_still_gets_the_best_candidates_and_says_so(mesh: Mesh) -> None:
    response = await ask(mesh, ALICE, question="zzyzx qwxv")
    assert response.status_code == 200
    answer = response.json()
    assert answer["lowConfidence"] is True and "no product clearly holds the answer" in answer["confidenceNote"]
    assert len(answer["routedTo"]) >= 2 and answer["results"], "never an empty answer"
    confident = (await ask(mesh, ALICE, question="which shipments were delayed by the winter storm?")).json()
    assert confident["lowConfidence"] is False and confident["confidenceNote"] is None


async def test_degraded_product_is_routed_and_flagged(mesh: Mesh) -> None:
    answer = (await ask(mesh, ALICE, question="what features do users request for accessibility?")).json()
    top = answer["routedTo"][0]
    assert top["product"] == "product/feature-requests"
    assert top["degraded"] is True and "DEGRADED" in top["why"]
    assert answer["results"][0]["product"] == "product/feature-requests" and answer["results"][0]["hits"]


# ==== product endpoints ======================================================================


async def test_product_list_filters_and_show(mesh: Mesh) -> None:
    everything = (await mesh.client.get(f"{mesh.url}/v1/products", headers=ALICE)).json()
    names = [f"{p['namespace']}/{p['name']}" for p in everything["products"]]
    assert names == sorted(names) and everything["count"] == len(names) == len(EXAMPLES) + 2
    finance = (await mesh.client.get(f"{mesh.url}/v1/products", params={"domain": "finance"}, headers=ALICE)).json()
    assert {p["name"] for p in finance["products"]} == {"expense-exceptions", "invoice-disputes"}
    churn = (await mesh.client.get(f"{mesh.url}/v1/products", params={"tag": "churn"}, headers=ALICE)).json()
    assert [f"{p['namespace']}/{p['name']}" for p in churn["products"]] == ["sales/customer-churn"]
    degraded = (await mesh.client.get(f"{mesh.url}/v1/products", params={"phase": "degraded"}, headers=ALICE)).json()
    assert [p["name"] for p in degraded["products"]] == ["feature-requests"]

    shown = await mesh.client.get(f"{mesh.url}/v1/products/sales/customer-churn", headers=ALICE)
    assert shown.status_code == 200
    entry = shown.json()
    assert (
        entry["domain"] == "sales"
        and entry["collection"] == "sales.customer-churn"
        and entry["keyFields"] == ["churn_reason"]
    )
    missing = await mesh.client.get(f"{mesh.url}/v1/products/sales/no-such-product", headers=ALICE)
    assert missing.status_code == 404 and missing.json() == {"detail": "product sales/no-such-product not found"}


async def test_single_product_query(mesh: Mesh) -> None:
    response = await mesh.client.post(
        f"{mesh.url}/v1/products/sales/customer-churn/query",
        json={"question": "price increase", "limit": 2},
        headers=ALICE,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["product"] == "sales/customer-churn" and len(result["hits"]) == 2 and result["latencyMs"] >= 0
    assert "price" in result["hits"][0]["text"].lower()


async def test_sample_rows_are_the_same_each_time_and_masked_as_hits_are(mesh: Mesh) -> None:
    url = f"{mesh.url}/v1/products/sales/customer-churn/sample"
    response = await mesh.client.get(url, params={"limit": 3}, headers=ALICE)
    assert response.status_code == 200, response.text
    sample = response.json()
    assert sample["product"] == "sales/customer-churn" and len(sample["rows"]) == 3 and sample["latencyMs"] >= 0
    assert (await mesh.client.get(url, params={"limit": 3}, headers=ALICE)).json()["rows"] == sample["rows"]
    for row in sample["rows"]:
        assert row["masked"] == ["primary_contact_email"] and row["fields"]["primary_contact_email"] is None
        assert row["key"] == row["fields"]["customer_id"] and row["text"] == row["fields"]["churn_reason"]
        assert not any(k.startswith("_") for k in row["fields"])
    first = sample["rows"][0]
    found = await mesh.client.post(
        f"{mesh.url}/v1/products/sales/customer-churn/query",
        json={"question": first["text"], "limit": 1},
        headers=ALICE,
    )
    hit = found.json()["hits"][0]
    assert {k: v for k, v in hit.items() if k not in ("score", "similarity")} == first, "a sample row is shown as a hit"
    assert len((await mesh.client.get(url, headers=ALICE)).json()["rows"]) == 5, "five rows unless asked"
    assert (await mesh.client.get(url, params={"limit": 0}, headers=ALICE)).status_code == 422


async def test_pii_readers_see_sample_values_others_see_them_masked(mesh: Mesh) -> None:
    body = next(b for b in example_bodies() if b["metadata"]["name"] == "customer-churn")
    body["metadata"].update(name="churn-pii", uid="uid-pii")
    body["spec"]["access"] = {"consumers": ["*"], "piiReaders": ["group:sales"]}
    await mesh.reconciler.reconcile(body)
    try:
        url = f"{mesh.url}/v1/products/sales/churn-pii/sample"
        granted = (await mesh.client.get(url, headers=BOB)).json()["rows"]
        refused = (await mesh.client.get(url, headers=CFO)).json()["rows"]
    finally:
        await mesh.reconciler.finalize(body)
    assert all(r["masked"] == [] and "@" in r["fields"]["primary_contact_email"] for r in granted)
    assert all(r["masked"] == ["primary_contact_email"] for r in refused)
    assert [r["key"] for r in granted] == [r["key"] for r in refused]


async def test_transform_merges_runtime_output_under_inference_key(mesh: Mesh) -> None:
    records = [
        {"ticket_id": "T-1", "summary": "Cannot log in after the password reset, the page keeps reloading"},
        {"ticket_id": "T-2", "summary": "Refund", "inference": "a source field that must survive"},
    ]
    task = {"type": "classify", "field": "summary", "labels": ["access", "billing"]}
    url = f"{mesh.url}/v1/products/finance/invoice-disputes/transform"
    response = await mesh.client.post(url, json={"records": records, "task": task, "options": {"x": 1}}, headers=ALICE)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["product"] == "finance/invoice-disputes"
    assert [{k: v for k, v in r.items() if k != INFERENCE_KEY} for r in out["records"]] == records
    assert [r[INFERENCE_KEY]["label"] for r in out["records"]] == ["long", "short"]
    assert out["records"][0][INFERENCE_KEY]["task"] == task
    assert mesh.runtime_calls[-1] == {"records": records, "task": task, "options": {"x": 1}}  # passed through unchanged

    refused = await mesh.client.post(url, json={"records": records, "task": "refuse"}, headers=ALICE)
    assert refused.status_code == 400 and "unknown task" in refused.json()["detail"]
    no_runtime = await mesh.client.post(
        f"{mesh.url}/v1/products/sales/customer-churn/transform", json={"records": records}, headers=ALICE
    )
    assert no_runtime.status_code == 409 and "no inference endpoint" in no_runtime.json()["detail"]
    unreachable = await mesh.client.post(
        f"{mesh.url}/v1/products/product/feature-requests/transform", json={"records": records}, headers=ALICE
    )
    assert unreachable.status_code == 502 and "unreachable" in unreachable.json()["detail"]


async def test_transform_through_the_built_in_runtime(mesh: Mesh) -> None:
    records = [
        {"ticket_id": "T-1", "summary": "I was charged twice for my subscription and want a refund"},
        {"ticket_id": "T-2", "summary": "The password reset link does not let me log in"},
    ]
    labels = [
        {"name": "billing", "description": "charged, payment, invoice, refund, subscription"},
        {"name": "access", "description": "login, log in, password, reset, account locked"},
    ]
    url = f"{mesh.url}/v1/products/support/ticket-summaries/transform"
    response = await mesh.client.post(
        url, json={"task": "classify", "field": "summary", "labels": labels, "records": records}, headers=ALICE
    )
    assert response.status_code == 200, response.text
    out = response.json()
    assert [r[INFERENCE_KEY]["label"] for r in out["records"]] == ["billing", "access"]
    assert [{k: v for k, v in r.items() if k != INFERENCE_KEY} for r in out["records"]] == records
    assert out["model"]
    # The runtime's own validation reaches the caller as a 4xx, with its message.
    bad = await mesh.client.post(
        url, json={"task": "classify", "field": "summary", "labels": ["only-one"], "records": records}, headers=ALICE
    )
    assert bad.status_code in (400, 422) and "refused" in bad.json()["detail"]


# ==== faults =================================================================================


async def test_hanging_product_times_out_while_the_others_answer(mesh: Mesh) -> None:
    mesh.hang["hang"] = True
    try:
        started = time.perf_counter()
        response = await ask(mesh, ALICE, question="which shipments were delayed by weather?", perProduct=3)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["routedTo"][0]["product"] == "logistics/shipment-delays"
        assert [e["product"] for e in answer["errors"]] == [SLOW], "a product that could not be weighed is named"
        error = answer["errors"][0]
        assert error["kind"] == "timeout" and "300 ms" in error["error"] and "not routed" in error["error"]
        assert answer["results"][0]["product"] == "logistics/shipment-delays" and len(answer["results"][0]["hits"]) == 3
        assert SLOW not in {m["product"] for m in answer["merged"]}
        assert "partial" in answer["message"]
        assert elapsed < 1.5, f"a 300 ms timeout took {elapsed:.2f}s"

        # Only the hanging product asked: every routed product timed out -> 503 with the cause.
        only = await ask(mesh, ALICE, question="weather delays", products=[SLOW])
        assert only.status_code == 503
        body = only.json()
        assert (
            SLOW in body["detail"] and body["errors"][0]["kind"] == "timeout" and body["routedTo"][0]["product"] == SLOW
        )
        single = await mesh.client.post(
            f"{mesh.url}/v1/products/{SLOW}/query", json={"question": "weather"}, headers=ALICE
        )
        assert single.status_code == 504 and single.json()["kind"] == "timeout"
    finally:
        mesh.hang["hang"] = False


async def test_all_products_failing_is_502_with_causes(mesh: Mesh) -> None:
    await mesh.store.drop_product("hr.exit-interviews")
    try:
        response = await ask(mesh, ALICE, question="why do employees leave?", products=["hr/exit-interviews"])
        assert response.status_code == 502
        body = response.json()
        assert body["errors"][0]["product"] == "hr/exit-interviews" and body["errors"][0]["kind"] == "vector_store"
        assert "hr/exit-interviews" in body["detail"]
    finally:
        body = next(b for b in example_bodies() if b["metadata"]["name"] == "exit-interviews")
        body["metadata"]["generation"] = 2  # a new generation re-ingests the dropped collection
        await mesh.reconciler.reconcile(body)
    assert (
        await ask(mesh, ALICE, question="why do employees leave?", products=["hr/exit-interviews"])
    ).status_code == 200


# ==== access =================================================================================


async def test_caller_without_access_never_sees_the_restricted_product(mesh: Mesh) -> None:
    for headers, url in ((BOB, mesh.url), ({}, mesh.anonymous_url)):
        listed = (await mesh.client.get(f"{url}/v1/products", headers=headers)).json()
        assert RESTRICTED not in {f"{p['namespace']}/{p['name']}" for p in listed["products"]}
        assert listed["count"] == len(EXAMPLES) + 1  # every other product, including the one open to '*' in finance
        shown = await mesh.client.get(f"{url}/v1/products/{RESTRICTED}", headers=headers)
        missing = await mesh.client.get(f"{url}/v1/products/finance/does-not-exist", headers=headers)
        assert shown.status_code == missing.status_code == 404
        assert shown.json()["detail"].replace("expense-exceptions", "X") == missing.json()["detail"].replace(
            "does-not-exist", "X"
        )
        for question in ("which expense rules are broken most?", "hotel above the city cap and missing receipts"):
            answer = (await ask(mesh, headers, url, question=question, maxProducts=50, limit=100)).json()
            assert RESTRICTED not in products_in(answer)
            assert all("claim_id" not in h["fields"] for r in answer["results"] for h in r["hits"])
        named = await ask(mesh, headers, url, question="which expense rules are broken most?", products=[RESTRICTED])
        hidden = await ask(mesh, headers, url, question="which expense rules?", products=["finance/does-not-exist"])
        assert named.status_code == hidden.status_code == 404
        assert named.json()["detail"].replace(RESTRICTED, "X") == hidden.json()["detail"].replace(
            "finance/does-not-exist", "X"
        )
        for path, body in (("query", {"question": "hotel"}), ("transform", {"records": [{"a": 1}]})):
            response = await mesh.client.post(f"{url}/v1/products/{RESTRICTED}/{path}", json=body, headers=headers)
            assert response.status_code == 404
        assert (await mesh.client.get(f"{url}/v1/products/{RESTRICTED}/sample", headers=headers)).status_code == 404


async def test_callers_with_access_see_the_restricted_product(mesh: Mesh) -> None:
    for headers in (ALICE, CFO):  # by group, and by identity name
        answer = (await ask(mesh, headers, question="which expense rules are broken most?")).json()
        assert answer["routedTo"][0]["product"] == RESTRICTED and answer["results"][0]["hits"]
        assert (await mesh.client.get(f"{mesh.url}/v1/products/{RESTRICTED}", headers=headers)).status_code == 200
        sample = (await mesh.client.get(f"{mesh.url}/v1/products/{RESTRICTED}/sample", headers=headers)).json()
        assert sample["rows"] and all(r["masked"] == ["employee_name"] for r in sample["rows"])


async def test_authentication_is_required_unless_anonymous_is_allowed(mesh: Mesh) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YWxpY2U6eA=="}):
        for method, path in (
            ("POST", "/v1/query"),
            ("GET", "/v1/products"),
            ("GET", "/v1/products/sales/customer-churn"),
        ):
            response = await mesh.client.request(
                method, f"{mesh.url}{path}", json={"question": "x"} if method == "POST" else None, headers=headers
            )
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"].startswith("Bearer")
    # Anonymous allowed: no token is fine, a wrong token is still refused.
    assert (await mesh.client.get(f"{mesh.anonymous_url}/v1/products")).status_code == 200
    assert (
        await mesh.client.get(f"{mesh.anonymous_url}/v1/products", headers={"Authorization": "Bearer wrong"})
    ).status_code == 401


def test_tokens_file_is_read_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"t1": {"identity": "carol", "groups": ["hr"]}}))
    auth = Authenticator(tokens_file=path)
    assert auth.identify("Bearer t1").name == "carol" and auth.identify("Bearer t1").groups == {"hr"}
    path.write_text(yaml.safe_dump({"t2": {"identity": "dave"}}))  # the Secret was rotated
    assert auth.identify("Bearer t2").name == "dave"
    with pytest.raises(Unauthenticated, match="invalid bearer token"):
        auth.identify("Bearer t1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("t3: {groups: [x]}\n")
    with pytest.raises(ValueError, match="identity"):
        Authenticator(tokens_file=bad)


# ==== validation, health, metrics, OpenAPI ===================================================


@pytest.mark.parametrize(
    "body",
    [
        {"question": ""},
        {"question": "   "},
        {"question": "x" * 2001},
        {"question": "ok", "limit": 0},
        {"question": "ok", "limit": 101},
        {"question": "ok", "maxProducts": 51},
        {"question": "ok", "products": ["not a product"]},
        {"question": "ok", "domains": ["Not_A_Domain"]},
        {"question": "ok", "unexpected": True},
        {"limit": 3},
    ],
)
async def test_invalid_query_is_422_with_the_field(mesh: Mesh, body: dict[str, Any]) -> None:
    response = await ask(mesh, ALICE, **body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


async def test_other_invalid_requests(mesh: Mesh) -> None:
    not_json = await mesh.client.post(
        f"{mesh.url}/v1/query", content=b"{not json", headers={**ALICE, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 422
    too_many = await mesh.client.post(
        f"{mesh.url}/v1/products/support/ticket-summaries/transform",
        json={"records": [{"a": i} for i in range(1001)]},
        headers=ALICE,
    )
    assert too_many.status_code == 422
    bad_path = await mesh.client.get(f"{mesh.url}/v1/products/Bad_NS/x", headers=ALICE)
    assert bad_path.status_code == 422
    huge = await mesh.client.post(
        f"{mesh.url}/v1/query",
        content=json.dumps({"question": "x" * (2 * 1024 * 1024)}),
        headers={**ALICE, "Content-Type": "application/json"},
    )
    assert huge.status_code == 413 and "larger than" in huge.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"question": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    streamed = await mesh.client.post(
        f"{mesh.url}/v1/query", content=chunks(), headers={**ALICE, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    surrogate = await mesh.client.post(
        f"{mesh.url}/v1/query",
        content=b'{"question": "\\ud800"}',
        headers={**ALICE, "Content-Type": "application/json"},
    )
    assert surrogate.status_code == 422


async def test_health_readiness_follow_the_catalog_file(mesh: Mesh, tmp_path: Path) -> None:
    assert (await mesh.client.get(f"{mesh.url}/healthz")).status_code == 200
    ready = await mesh.client.get(f"{mesh.url}/readyz")
    assert ready.status_code == 200 and ready.text == "ok", "nothing unauthenticated counts the products"

    path = tmp_path / "later.json"
    app = create_app(FileCatalogSource(path), mesh.store, QuerySettings(catalog_file=str(path)), Authenticator(TOKENS))
    async with serve_app(app) as url:
        assert (await mesh.client.get(f"{url}/readyz")).status_code == 503
        assert (await mesh.client.post(f"{url}/v1/query", json={"question": "x"}, headers=ALICE)).status_code == 503
        path.write_bytes(mesh.catalog_path.read_bytes())
        assert (await mesh.client.get(f"{url}/readyz")).status_code == 200
    static = StaticCatalogSource()
    async with serve_app(create_app(static, mesh.store, QuerySettings(), Authenticator(TOKENS))) as url:
        assert (await mesh.client.get(f"{url}/readyz")).status_code == 503
        static.set({})
        assert (await mesh.client.get(f"{url}/readyz")).status_code == 200


async def test_new_product_in_the_catalog_file_is_queryable_at_once(mesh: Mesh) -> None:
    body = next(b for b in example_bodies() if b["metadata"]["name"] == "customer-churn")
    body["metadata"].update(name="churn-copy", uid="uid-copy")
    body["spec"]["domain"] = "retention"
    await mesh.reconciler.reconcile(body)
    try:
        answer = (await ask(mesh, ALICE, question="why do customers churn?", domains=["retention"])).json()
        assert [r["product"] for r in answer["results"]] == ["sales/churn-copy"]
    finally:
        await mesh.reconciler.finalize(body)
    assert "sales/churn-copy" not in products_in(
        (await ask(mesh, ALICE, question="why do customers churn?", maxProducts=50)).json()
    )


async def test_metrics_count_requests_and_product_outcomes(mesh: Mesh) -> None:
    await ask(mesh, ALICE, question="which shipments were delayed by weather?")
    text = (await mesh.client.get(f"{mesh.url}/metrics")).text
    assert 'datamesh_query_requests_total{route="/v1/query",status="200"}' in text
    assert 'datamesh_query_product_duration_seconds_count{outcome="ok"}' in text
    assert "catalog_products" not in text and "expense" not in text, "metrics reveal no product"
    assert "datamesh_query_catalog_loaded 1.0" in text
    assert "datamesh_query_routing_seconds_bucket" in text


async def test_openapi_documents_endpoints_examples_and_security(mesh: Mesh) -> None:
    spec = (await mesh.client.get(f"{mesh.url}/openapi.json")).json()
    assert {
        "/v1/query",
        "/v1/products",
        "/v1/products/{namespace}/{name}",
        "/v1/products/{namespace}/{name}/query",
        "/v1/products/{namespace}/{name}/transform",
        "/v1/products/{namespace}/{name}/sample",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    query = spec["paths"]["/v1/query"]["post"]
    assert query["requestBody"]["content"]["application/json"]["examples"]["question"]["value"]["question"]
    assert query["security"] == [{"HTTPBearer": []}]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    schema = spec["components"]["schemas"]["QueryRequest"]
    assert schema["properties"]["question"]["maxLength"] == 2000 and "maxProducts" in schema["properties"]


async def test_the_catalog_page_is_served_with_a_strict_content_security_policy(mesh: Mesh) -> None:
    for url in (mesh.url, mesh.anonymous_url):  # the page holds no data: served without a token either way
        page = await mesh.client.get(f"{url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert (await mesh.client.head(f"{url}/")).status_code == 200
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    # Without 'unsafe-inline' an inline script or style would not run: the page has none.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>|\sstyle=|\son[a-z]+=", page.text)
    assets = re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text)
    assert {"/ui/catalog.js", "/ui/catalog.css"} <= set(assets)
    for asset in assets:
        response = await mesh.client.get(f"{mesh.url}{asset}")
        assert response.status_code == 200, asset
        assert response.headers["content-security-policy"] == policy and response.headers["x-content-type-options"]
    script = (await mesh.client.get(f"{mesh.url}/ui/catalog.js")).text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script
    docs = await mesh.client.get(f"{mesh.url}/docs")
    assert docs.status_code == 200 and "content-security-policy" not in docs.headers, "the API's own pages keep theirs"
    assert "/" not in (await mesh.client.get(f"{mesh.url}/openapi.json")).json()["paths"]


async def test_serve_sizes_the_store_for_the_fan_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The service's own store allows as many Qdrant requests at once as products are asked at once."""
    stores: list[Any] = []

    def open_store(settings: StoreSettings, concurrency: int | None = None) -> VectorStore:
        stores.append(real_open_store(settings, concurrency))
        return stores[-1]

    async def no_serving(self: uvicorn.Server, sockets: Any = None) -> None:
        return None

    monkeypatch.setattr(query_app, "open_store", open_store)
    monkeypatch.setattr(uvicorn.Server, "serve", no_serving)
    await serve("127.0.0.1", 0, QuerySettings(fanout_concurrency=5, catalog_file=str(tmp_path / "catalog.json")))
    assert [s._slots._value for s in stores] == [5]


async def test_a_question_given_up_cancels_the_searches_it_started() -> None:
    """A question given up (its caller cancelled) leaves none of its products' searches running."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def search() -> list[object]:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    asking = asyncio.create_task(within(search(), 30))
    await started.wait()
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    await asyncio.wait_for(cancelled.wait(), 5)
