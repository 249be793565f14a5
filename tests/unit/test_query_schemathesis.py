"""schemathesis fuzzes the live query service from its own OpenAPI: no input may cause a 5xx.

The service runs under uvicorn on 127.0.0.1 in a loop thread that also owns the embedded
Qdrant (schemathesis calls it synchronously from the test thread). The examples are reconciled
first so that queries return real hits, and the churn product's inference endpoint is the
built-in inference runtime on its own server, so /transform is fuzzed end to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from datamesh.adapters.files import FileCatalogBackend
from datamesh.core.ports import VectorStore
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.inference.runtime import RuntimeSettings
from datamesh.inference.runtime import create_app as create_runtime
from datamesh.local import standalone_reconciler
from datamesh.query.access import Authenticator
from datamesh.query.app import create_app
from datamesh.query.catalog_sources import FileCatalogSource, StaticCatalogSource
from datamesh.query.settings import QuerySettings
from tests.conftest import operator_settings
from tests.harness import OperatorThread
from tests.httpserver import ServerThread
from tests.unit.test_query_service import TOKENS, example_bodies

AUTH = {"Authorization": "Bearer alice-token"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    catalog_path = tmp_path_factory.mktemp("fuzz") / "catalog.json"
    op_settings = operator_settings(catalog_flush_seconds=0.01)
    # A loop thread that owns the embedded store; the operator itself is never started here.
    with (
        OperatorThread(op_settings) as loop,
        ServerThread(create_runtime(RuntimeSettings(model="builtin:ngram-384"))) as runtime_url,
    ):

        async def build() -> None:
            writer = CatalogWriter(FileCatalogBackend(catalog_path), "catalog", op_settings.catalog_shard_bytes, 0.01)
            async with httpx.AsyncClient() as http:
                reconciler = standalone_reconciler(op_settings, loop.store, writer, http)
                for body in example_bodies():
                    if body["metadata"]["name"] == "customer-churn":  # the OpenAPI path examples name it
                        body["spec"]["inference"] = {"enabled": True, "endpoint": runtime_url}
                    outcome = await reconciler.reconcile(body)
                    assert outcome is not None and outcome.status.phase == "Ready", outcome
            await writer.close()

        loop.call(build())
        app = create_app(
            FileCatalogSource(catalog_path),
            loop.store,
            QuerySettings(catalog_file=str(catalog_path)),
            Authenticator(TOKENS),
        )
        with loop.serving(app) as url:
            yield url


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document, as create_app builds it (no server or catalog needed)."""
    app = create_app(StaticCatalogSource(), cast(VectorStore, None), QuerySettings(), Authenticator())
    return app.openapi()


# Loaded at import rather than with schemathesis.pytest.from_fixture: the lazy loader of
# schemathesis 4.32 uses pytest's removed Function._nodeid and fails on pytest 9. The live
# server serves this same document (checked below), and the cases are sent to the live server.
schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, service: str) -> None:
    case.call_and_validate(base_url=service, headers=AUTH, checks=[not_a_server_error], timeout=30)


def test_live_openapi_is_the_fuzzed_one(service: str) -> None:
    assert httpx.get(f"{service}/openapi.json").json() == openapi_document()


def test_query_service_answers_the_documented_examples(service: str) -> None:
    """The OpenAPI examples are real requests: each one returns 200 with hits."""
    spec = httpx.get(f"{service}/openapi.json").json()
    examples = spec["paths"]["/v1/query"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    for name, example in examples.items():
        response = httpx.post(f"{service}/v1/query", json=example["value"], headers=AUTH, timeout=30)
        assert response.status_code == 200, (name, response.text)
        assert response.json()["results"], name
    example = spec["paths"]["/v1/products/{namespace}/{name}/query"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]["question"]["value"]
    assert httpx.post(
        f"{service}/v1/products/sales/customer-churn/query", json=example, headers=AUTH, timeout=30
    ).json()["hits"]
    transform = spec["paths"]["/v1/products/{namespace}/{name}/transform"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]["classify"]["value"]
    answer = httpx.post(
        f"{service}/v1/products/sales/customer-churn/transform", json=transform, headers=AUTH, timeout=30
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["records"][0]["_inference"]["label"] == "price"
