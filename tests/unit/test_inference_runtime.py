"""The built-in inference runtime as a real server on 127.0.0.1, called by real httpx clients."""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import positive_data_acceptance

from datamesh.adapters.embeddings.openai import OpenAICompatibleProvider
from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.core.ports import EmbeddingError
from datamesh.inference.runtime import RuntimeSettings, create_app
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL
from datamesh.web.serving import free_port
from tests.httpserver import ServerThread

TEXTS = [
    "customer cancelled because the price was too high",
    "Shipment delayed at the Rotterdam hub",
    "Café opening hours – Zürich",
    "",
]
CHAT_MODEL = "stand-in-chat"
FAST_RETRIES: dict[str, Any] = {"retry_attempts": 3, "retry_base_seconds": 0.01, "retry_max_seconds": 0.05}


# ==== a stand-in chat server ===================================================================


@dataclass
class ChatState:
    """What the stand-in saw, and how it should misbehave next."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    delay: float = 0.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def chat_app(state: ChatState) -> FastAPI:
    """An OpenAI-compatible ``/v1/chat/completions`` that answers the user content upper-cased.

    No LLM can run on this machine, so enrichment is tested against this tiny real server: a
    deterministic answer, a 503 for each of the next ``fail_next`` calls, a 400 for content
    containing '<refuse>', and a count of calls in flight (to see the runtime's concurrency bound).
    """
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        state.requests.append(body)
        if state.fail_next > 0:
            state.fail_next -= 1
            return JSONResponse({"error": {"message": "model is loading", "type": "server_error"}}, status_code=503)
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if "<refuse>" in user:
            return JSONResponse(
                {"error": {"message": "content policy", "type": "invalid_request_error"}}, status_code=400
            )
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(state.delay)
        finally:
            state.in_flight -= 1
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body.get("model", "default"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": user.upper()}, "finish_reason": "stop"}
                ],
            }
        )

    return app


# ==== servers ===================================================================================


@pytest.fixture(scope="module")
def chat() -> Iterator[tuple[str, ChatState]]:
    state = ChatState()
    with ServerThread(chat_app(state)) as url:
        yield url, state


@pytest.fixture
def chat_state(chat: tuple[str, ChatState]) -> Iterator[ChatState]:
    chat[1].reset()
    yield chat[1]
    chat[1].reset()


@pytest.fixture(scope="module")
def runtime_url(chat: tuple[str, ChatState]) -> Iterator[str]:
    # A base URL ending in /v1, as OpenAI-compatible servers are usually given.
    settings = RuntimeSettings(chat_endpoint=f"{chat[0]}/v1", chat_model=CHAT_MODEL, chat_concurrency=4, **FAST_RETRIES)
    with ServerThread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def small_runtime_url() -> Iterator[str]:
    """A runtime with tiny limits and no chat server."""
    settings = RuntimeSettings(max_batch=4, max_records=3, max_body_bytes=2048, max_input_chars=100)
    with ServerThread(create_app(settings)) as url:
        yield url


@pytest.fixture
async def client(runtime_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=runtime_url, timeout=30) as c:
        await wait_ready(c)
        yield c


async def wait_ready(c: httpx.AsyncClient, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (r := await c.get("/readyz")).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, r.text
        await asyncio.sleep(0.02)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] and error["message"]
    return str(error["message"])


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ==== /v1/embeddings ============================================================================


async def test_embeddings_match_the_provider_exactly_in_order(client: httpx.AsyncClient) -> None:
    expected = await resolve_provider(DEFAULT_EMBEDDING_MODEL).embed(TEXTS)
    r = await client.post(
        "/v1/embeddings", json={"model": DEFAULT_EMBEDDING_MODEL, "input": TEXTS, "encoding_format": "float"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == DEFAULT_EMBEDDING_MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert all(d["object"] == "embedding" for d in body["data"])
    assert [d["embedding"] for d in body["data"]] == expected
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


async def test_embeddings_of_a_single_string_and_base64(client: httpx.AsyncClient) -> None:
    (expected,) = await resolve_provider(DEFAULT_EMBEDDING_MODEL).embed([TEXTS[0]])
    r = await client.post("/v1/embeddings", json={"input": TEXTS[0]})
    assert r.status_code == 200, r.text
    assert [d["embedding"] for d in r.json()["data"]] == [expected]
    # The official OpenAI client asks for base64 (little-endian float32) by default.
    r = await client.post("/v1/embeddings", json={"input": [TEXTS[0]], "encoding_format": "base64"})
    packed = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(packed, expected, atol=1e-7)


async def test_the_embeddings_module_openai_client_works_against_the_runtime(runtime_url: str) -> None:
    # How the query service and the operator use a product's runtime.
    provider = resolve_provider(DEFAULT_EMBEDDING_MODEL, endpoint=runtime_url)
    assert isinstance(provider, OpenAICompatibleProvider)
    texts = [f"order {i} shipped late from warehouse {i % 7}" for i in range(150)] + TEXTS  # > one batch of 64
    try:
        got = await provider.embed(texts)
        assert await provider.dimension() == 384
    finally:
        await provider.aclose()
    assert np.allclose(got, await resolve_provider(DEFAULT_EMBEDDING_MODEL).embed(texts), atol=1e-12)


async def test_a_different_model_is_refused_with_an_openai_error(client: httpx.AsyncClient, runtime_url: str) -> None:
    message = assert_openai_error(
        await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}),
        400,
        "model_not_found",
    )
    assert DEFAULT_EMBEDDING_MODEL in message and "text-embedding-3-small" in message
    provider = OpenAICompatibleProvider("text-embedding-3-small", runtime_url, attempts=3)
    try:
        with pytest.raises(EmbeddingError, match="serves the model") as caught:
            await provider.embed(["x"])
    finally:
        await provider.aclose()
    assert not caught.value.transient  # a 4xx is not retried


async def test_malformed_embedding_requests_are_422(client: httpx.AsyncClient) -> None:
    assert "token arrays" in assert_openai_error(
        await client.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 422, "invalid_request"
    )
    assert_openai_error(await client.post("/v1/embeddings", json={"input": []}), 422, "invalid_input")
    assert_openai_error(await client.post("/v1/embeddings", json={}), 422, "invalid_request")
    assert_openai_error(
        await client.post("/v1/embeddings", json={"input": "x", "dimensions": 1536}), 400, "invalid_dimensions"
    )
    assert_openai_error(await client.get("/v1/embeddings"), 405, "method_not_allowed")


# ==== /v1/transform: classify ===================================================================

TICKET_LABELS = [
    {"name": "billing", "description": "charges, payments, invoices, refunds and subscription fees"},
    {"name": "bug", "description": "the app crashes, shows errors, freezes or something is broken"},
    {"name": "feature request", "description": "a suggestion to add new functionality or improve the product"},
]


async def test_classify_support_tickets_zero_shot(client: httpx.AsyncClient) -> None:
    """The built-in model is lexical, so the labels carry a description (as a real model also likes)."""
    tickets = {
        "I was charged twice for my subscription": "billing",
        "the app crashes when I upload a photo": "bug",
        "please add dark mode": "feature request",
    }
    records = [{"id": i, "text": t} for i, t in enumerate(tickets)]
    r = await client.post(
        "/v1/transform", json={"task": "classify", "field": "text", "records": records, "labels": TICKET_LABELS}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == DEFAULT_EMBEDDING_MODEL
    assert [res["label"] for res in body["results"]] == list(tickets.values())
    for res in body["results"]:
        scores = list(res["scores"].values())
        assert set(res["scores"]) == {"billing", "bug", "feature request"} and "labels" not in res
        assert math.isclose(sum(scores), 1.0, abs_tol=1e-5) and scores == sorted(scores, reverse=True)
        assert res["scores"][res["label"]] > 0.5


async def test_classify_reports_bad_records_in_place_and_keeps_order(client: httpx.AsyncClient) -> None:
    records = [
        {"text": "I was charged twice for my subscription"},
        {"body": "no text field here"},
        {"text": None},
        {"text": {"nested": "object"}},
        {"text": "   "},
        {"text": "the app crashes when I upload a photo"},
    ]
    r = await client.post(
        "/v1/transform",
        json={"task": "classify", "field": "text", "records": records, "labels": TICKET_LABELS, "multiLabel": True},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(records)
    assert results[0]["label"] == "billing" and results[0]["labels"][0] == "billing"
    assert results[5]["label"] == "bug"
    assert "no field 'text'" in results[1]["error"]
    assert "null" in results[2]["error"] and "object" in results[3]["error"] and "empty" in results[4]["error"]


async def test_classify_validation(client: httpx.AsyncClient) -> None:
    base = {"task": "classify", "field": "text", "records": [{"text": "x"}]}
    assert "at least two labels" in assert_openai_error(
        await client.post("/v1/transform", json={**base, "labels": ["a"]}), 422, "invalid_request"
    )
    assert "repeat" in assert_openai_error(
        await client.post("/v1/transform", json={**base, "labels": ["a", "a"]}), 422, "invalid_request"
    )
    assert_openai_error(
        await client.post("/v1/transform", json={**base, "task": "summarise", "labels": ["a", "b"]}),
        422,
        "invalid_request",
    )
    assert_openai_error(
        await client.post("/v1/transform", json={**base, "labels": ["a", "b"], "multilabel": True}),
        422,
        "invalid_request",
    )
    assert_openai_error(
        await client.post("/v1/transform", json={**base, "records": [], "labels": ["a", "b"]}), 422, "invalid_request"
    )


# ==== /v1/transform: enrich =====================================================================


async def test_enrich_calls_the_chat_server_per_record(client: httpx.AsyncClient, chat_state: ChatState) -> None:
    prompt = "Summarise the churn reason in three words."
    records = [{"reason": "price went up at renewal"}, {"other": 1}, {"reason": "moved to a competitor"}]
    r = await client.post(
        "/v1/transform", json={"task": "enrich", "field": "reason", "prompt": prompt, "records": records}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == CHAT_MODEL
    assert body["results"][0] == {"output": f"{prompt}\n\nprice went up at renewal".upper()}
    assert "no field 'reason'" in body["results"][1]["error"]
    assert body["results"][2] == {"output": f"{prompt}\n\nmoved to a competitor".upper()}
    assert len(chat_state.requests) == 2
    sent = chat_state.requests[0]
    assert sent["model"] == CHAT_MODEL and sent["temperature"] == 0.0
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]


async def test_enrich_retries_a_503_then_succeeds(client: httpx.AsyncClient, chat_state: ChatState) -> None:
    chat_state.fail_next = 1
    r = await client.post(
        "/v1/transform", json={"task": "enrich", "field": "t", "prompt": "p", "records": [{"t": "hello"}]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [{"output": "P\n\nHELLO"}]
    assert len(chat_state.requests) == 2
    assert metric((await client.get("/metrics")).text, "datamesh_inference_chat_calls_total", outcome="retried") >= 1


async def test_enrich_refusal_is_per_record_and_an_outage_is_502(
    client: httpx.AsyncClient, chat_state: ChatState
) -> None:
    records = [{"t": "fine"}, {"t": "<refuse> this"}]
    r = await client.post("/v1/transform", json={"task": "enrich", "field": "t", "prompt": "p", "records": records})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert (
        results[0] == {"output": "P\n\nFINE"}
        and "HTTP 400" in results[1]["error"]
        and "content policy" in results[1]["error"]
    )
    assert len(chat_state.requests) == 2  # a 4xx is not retried

    chat_state.fail_next = 100
    r = await client.post(
        "/v1/transform", json={"task": "enrich", "field": "t", "prompt": "p", "records": [{"t": "a"}]}
    )
    assert "after 3 attempts" in assert_openai_error(r, 502, "upstream_unavailable")


async def test_enrich_concurrency_is_bounded(client: httpx.AsyncClient, chat_state: ChatState) -> None:
    chat_state.delay = 0.05
    records = [{"t": f"record {i}"} for i in range(24)]
    r = await client.post("/v1/transform", json={"task": "enrich", "field": "t", "prompt": "p", "records": records})
    assert r.status_code == 200, r.text
    assert [x["output"] for x in r.json()["results"]] == [f"P\n\nRECORD {i}" for i in range(24)]
    assert 1 < chat_state.max_in_flight <= 4


async def test_enrich_without_a_chat_endpoint_says_how_to_configure_one(small_runtime_url: str) -> None:
    async with httpx.AsyncClient(base_url=small_runtime_url) as c:
        r = await c.post("/v1/transform", json={"task": "enrich", "field": "t", "prompt": "p", "records": [{"t": "a"}]})
    message = assert_openai_error(r, 400, "chat_not_configured")
    assert "--chat-endpoint" in message and "DATAMESH_INFERENCE_CHAT_ENDPOINT" in message


# ==== limits ====================================================================================


async def test_limits_are_clear_4xx(small_runtime_url: str) -> None:
    async with httpx.AsyncClient(base_url=small_runtime_url) as c:
        await wait_ready(c)
        assert "at most 4" in assert_openai_error(
            await c.post("/v1/embeddings", json={"input": ["a"] * 5}), 413, "too_many_inputs"
        )
        assert (await c.post("/v1/embeddings", json={"input": ["a"] * 4})).status_code == 200
        assert "at most 100" in assert_openai_error(
            await c.post("/v1/embeddings", json={"input": ["a", "b" * 101]}), 422, "input_too_long"
        )
        records = {"task": "classify", "field": "t", "labels": ["a", "b"], "records": [{"t": "a"}] * 4}
        assert "at most 3" in assert_openai_error(await c.post("/v1/transform", json=records), 413, "too_many_records")
        long_field = {**records, "records": [{"t": "x" * 101}, {"t": "a"}]}
        results = (await c.post("/v1/transform", json=long_field)).json()["results"]
        assert "at most 100" in results[0]["error"] and results[1]["label"] in ("a", "b")
        big = {"input": ["word " * 19] * 30}
        assert_openai_error(await c.post("/v1/embeddings", json=big), 413, "request_too_large")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit must still hold
            yield b'{"input": ['
            for _ in range(40):
                yield b'"' + b"w" * 90 + b'",'
            yield b'"x"]}'

        r = await c.post("/v1/embeddings", content=chunked(), headers={"content-type": "application/json"})
        assert_openai_error(r, 413, "request_too_large")
        metrics = (await c.get("/metrics")).text
    assert metric(metrics, "datamesh_inference_requests_total", route="/v1/embeddings", status="413") == 3


# ==== health, readiness, metrics, proxying ======================================================


async def test_health_readiness_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready == {"status": "ready", "model": DEFAULT_EMBEDDING_MODEL, "dimension": 384, "enrich": True}
    before = (await client.get("/metrics")).text
    await client.post("/v1/embeddings", json={"input": ["one", "two", "three"]})
    await client.post("/v1/embeddings", json={"input": "x", "model": "nope"})
    after = (await client.get("/metrics")).text
    count = {"route": "/v1/embeddings", "method": "POST"}
    assert (
        metric(after, "datamesh_inference_requests_total", status="200", **count)
        - metric(before, "datamesh_inference_requests_total", status="200", **count)
        == 1
    )
    assert (
        metric(after, "datamesh_inference_requests_total", status="400", **count)
        - metric(before, "datamesh_inference_requests_total", status="400", **count)
        == 1
    )
    assert (
        metric(after, "datamesh_inference_embedded_texts_total")
        - metric(before, "datamesh_inference_embedded_texts_total")
        == 3
    )
    assert metric(after, "datamesh_inference_request_duration_seconds_count", route="/v1/embeddings") >= 2
    assert metric(after, "datamesh_inference_ready") == 1


async def test_openapi_documents_both_endpoints_with_examples(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path, examples in (("/v1/embeddings", {"batch", "single"}), ("/v1/transform", {"classify", "enrich"})):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert set(body["examples"]) == examples
        assert {"400", "413", "422"} <= set(spec["paths"][path]["post"]["responses"])


async def test_proxy_mode_serves_another_servers_embeddings_and_is_unready_while_it_is_down(runtime_url: str) -> None:
    expected = await resolve_provider(DEFAULT_EMBEDDING_MODEL).embed(TEXTS[:2])
    proxy = RuntimeSettings(embedding_endpoint=runtime_url, **FAST_RETRIES)
    with ServerThread(create_app(proxy)) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            await wait_ready(c)
            r = await c.post("/v1/embeddings", json={"input": TEXTS[:2], "model": DEFAULT_EMBEDDING_MODEL})
            assert r.status_code == 200, r.text
            assert np.allclose([d["embedding"] for d in r.json()["data"]], expected, atol=1e-12)

    down = RuntimeSettings(embedding_endpoint=f"http://127.0.0.1:{free_port()}", **FAST_RETRIES)
    with ServerThread(create_app(down)) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.get("/healthz")).status_code == 200
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] == "starting"
            r = await c.post("/v1/embeddings", json={"input": "x"})
            assert "unavailable" in assert_openai_error(r, 503, "provider_unavailable")
            assert r.headers["retry-after"] == "1"


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATAMESH_INFERENCE_MODEL", "")  # what the Deployment sets when the spec has no model
    monkeypatch.setenv("DATAMESH_INFERENCE_CHAT_ENDPOINT", "http://llm.ai.svc:8000/v1")
    monkeypatch.setenv("DATAMESH_INFERENCE_MAX_BATCH", "32")
    s = RuntimeSettings()
    assert (s.model, s.chat_endpoint, s.max_batch, s.max_records) == (
        DEFAULT_EMBEDDING_MODEL,
        "http://llm.ai.svc:8000/v1",
        32,
        1000,
    )
    monkeypatch.setenv("DATAMESH_INFERENCE_CHAT_ENDPOINT", "llm:8000")
    with pytest.raises(ValueError, match="http"):
        RuntimeSettings()


def test_unknown_model_fails_at_startup() -> None:
    with pytest.raises(EmbeddingError, match="unknown embedding model scheme"):
        create_app(RuntimeSettings(model="nosuch:model"))


# ==== the OpenAPI contract, fuzzed ==============================================================


def test_every_endpoint_keeps_its_openapi_contract(runtime_url: str, chat_state: ChatState) -> None:
    """schemathesis-generated requests (valid and not) get documented answers and never a server error."""
    # Driven through hypothesis directly: schemathesis' lazy pytest fixture breaks on pytest 9.
    schema = schemathesis.openapi.from_url(f"{runtime_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/v1/transform", "/healthz", "/readyz", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            # Schema-valid requests may still be refused on settings the schema cannot know
            # (the served model and its dimension, batch limits, whether a chat server is set).
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()
