"""Embedding providers: the built-in n-gram model, resolution, and a real OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from datamesh.adapters.embeddings.builtin import BuiltinNgramProvider, cosine_scores
from datamesh.adapters.embeddings.local_models import FastEmbedProvider
from datamesh.adapters.embeddings.openai import OpenAICompatibleProvider
from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.core.ports import (
    EmbeddingError,
    EmbeddingProvider,
    EmbeddingServiceError,
    ProviderUnavailableError,
    UnknownModelError,
)
from datamesh.web.serving import free_port
from tests.httpserver import ServerThread

SAMPLE = [
    "customer cancelled because the price was too high",
    "churn due to pricing",
    "truck delayed by snow storm",
    "Shipment delayed at the Rotterdam hub",
    "Café opening hours – Zürich",
]


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# ==== built-in provider =======================================================================


async def test_builtin_is_deterministic_within_a_process() -> None:
    p = resolve_provider("builtin:ngram-384")
    first = await p.embed(SAMPLE)
    second = await BuiltinNgramProvider(384).embed(list(reversed(SAMPLE)))
    assert first == list(reversed(second))


def test_builtin_matches_a_fresh_process() -> None:
    script = (
        "import json, sys, asyncio\n"
        "from datamesh.adapters.embeddings.registry import resolve_provider\n"
        "texts = json.loads(sys.argv[1])\n"
        "print(json.dumps(asyncio.run(resolve_provider('builtin:ngram-384').embed(texts))))\n"
    )
    here = BuiltinNgramProvider(384).encode(SAMPLE).tolist()
    for seed in ("1", "4242"):  # different str-hash salts must not change anything
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(SAMPLE)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=60,
        )
        assert json.loads(out.stdout) == here


async def test_builtin_vectors_are_unit_length() -> None:
    vectors = await resolve_provider("builtin").embed([*SAMPLE, "x", "a b c d e f g h i j k l m n o p"])
    for v in vectors:
        assert abs(norm(v) - 1.0) < 1e-9


@pytest.mark.parametrize("dim", [64, 100, 384, 1024, 4096])
async def test_builtin_dimension_is_honoured(dim: int) -> None:
    p = resolve_provider(f"builtin:ngram-{dim}")
    assert p.model_id == f"builtin:ngram-{dim}"
    assert await p.dimension() == dim
    vectors = await p.embed(SAMPLE)
    assert {len(v) for v in vectors} == {dim}


async def test_builtin_alone_means_ngram_384() -> None:
    p = resolve_provider("builtin")
    assert p.model_id == "builtin:ngram-384"
    assert await p.dimension() == 384
    assert resolve_provider("builtin") is p  # cached


@pytest.mark.parametrize("model", ["builtin:ngram-32", "builtin:ngram-5000", "builtin:ngram-abc", "builtin:tfidf"])
def test_builtin_refuses_bad_variants(model: str) -> None:
    with pytest.raises(UnknownModelError, match="builtin:ngram-<dim>"):
        resolve_provider(model)


async def test_builtin_semantic_sanity() -> None:
    p = resolve_provider("builtin:ngram-384")
    cancel, churn, truck, shipped, delays, late, deliveries = await p.embed(
        [
            "customer cancelled because the price was too high",
            "churn due to pricing",
            "truck delayed by snow storm",
            "shipment delayed",
            "delays in shipments",
            "deliveries arrive late",
            "late delivery",
        ]
    )
    assert dot(cancel, churn) > dot(cancel, truck) + 0.1
    assert dot(shipped, delays) > 0.6
    assert dot(shipped, delays) > dot(shipped, cancel) + 0.5
    assert dot(late, deliveries) > 0.6
    # Plural/inflection folding: the same words in another form embed identically.
    a, b = await p.embed(["customers delayed", "customer delays"])
    assert dot(a, b) > 0.999


async def test_builtin_empty_text_gives_zeros_not_nan() -> None:
    p = resolve_provider("builtin:ngram-128")
    vectors = await p.embed(["", "   ", "!!! ...", "real words", ""])
    for i in (0, 1, 2, 4):
        assert vectors[i] == [0.0] * 128
    assert all(not math.isnan(x) for v in vectors for x in v)
    assert abs(norm(vectors[3]) - 1.0) < 1e-9
    assert await p.embed([]) == []


async def test_builtin_large_batch_equals_small_batches() -> None:
    # Crosses the thread threshold and the internal block size: a text's vector must not
    # depend on which batch, block or thread computed it.
    p = BuiltinNgramProvider(256)
    texts = [f"order {i} for customer {i % 97} delayed in region {i % 13}" for i in range(5000)]
    big = await p.embed(texts)
    assert len(big) == 5000
    for i in (0, 1, 2047, 2048, 2049, 4095, 4096, 4999):
        assert big[i] == (await p.embed([texts[i]]))[0]


def test_cosine_scores() -> None:
    scores = cosine_scores([1.0, 0.0], [[2.0, 0.0], [0.0, 3.0], [0.0, 0.0], [-1.0, 0.0]])
    assert scores == [1.0, 0.0, 0.0, -1.0]
    assert cosine_scores([1.0, 0.0], []) == []


# ==== resolution ==============================================================================


def test_unknown_scheme_lists_accepted_forms() -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_provider("word2vec:google-news")
    message = str(info.value)
    assert "word2vec" in message
    forms = ("onnx:all-MiniLM-L6-v2", "builtin:ngram-<dim>", "fastembed:<model>", "sentence-transformers:<model>")
    for form in (*forms, "embeddingEndpoint"):
        assert form in message


def test_empty_model_is_unknown() -> None:
    with pytest.raises(UnknownModelError):
        resolve_provider("  ")


async def test_fastembed_scheme() -> None:
    if importlib.util.find_spec("fastembed") is None:
        with pytest.raises(ProviderUnavailableError) as info:
            resolve_provider("fastembed:whatever")
        assert "pip install 'datamesh-operator[fastembed]'" in str(info.value)
    else:
        with pytest.raises(UnknownModelError):
            resolve_provider("fastembed:no-such-org/no-such-model-xyz")


async def test_sentence_transformers_scheme() -> None:
    if importlib.util.find_spec("sentence_transformers") is None:
        for model in ("sentence-transformers:whatever", "st:whatever"):
            with pytest.raises(ProviderUnavailableError) as info:
                resolve_provider(model)
            assert "pip install 'datamesh-operator[sentence-transformers]'" in str(info.value)
    else:
        # Resolving loads nothing (so downloads nothing); the model is loaded on first embed.
        assert resolve_provider("st:whatever").model_id == "sentence-transformers:whatever"


async def test_bare_model_name() -> None:
    name = "BAAI/bge-small-en-v1.5"
    has_fastembed = importlib.util.find_spec("fastembed") is not None
    has_st = importlib.util.find_spec("sentence_transformers") is not None
    if has_fastembed:
        p = resolve_provider(name)
        assert p.model_id == f"fastembed:{name}"
        assert await p.dimension() == 384  # from fastembed's model list: nothing is downloaded
    elif has_st:
        assert resolve_provider(name).model_id == f"sentence-transformers:{name}"
    else:
        with pytest.raises(ProviderUnavailableError) as info:
            resolve_provider(name)
        assert "datamesh-operator[fastembed]" in str(info.value)
        assert "builtin:ngram-<dim>" in str(info.value)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("Could not load model BAAI/bge-small-en-v1.5 from any source.", EmbeddingServiceError),
        ("Model BAAI/bge-small-en-v1.5 is not supported in TextEmbedding.", UnknownModelError),
    ],
)
async def test_fastembed_failing_to_download_is_transient(
    monkeypatch: pytest.MonkeyPatch, failure: str, expected: type[EmbeddingError]
) -> None:
    """Offline, fastembed says "Could not load model ... from any source" (a ValueError): that heals, so the
    product is retried (Degraded), not Failed as for a model fastembed does not know."""

    class TextEmbedding:
        @staticmethod
        def list_supported_models() -> list[dict[str, Any]]:
            return [{"model": "BAAI/bge-small-en-v1.5", "dim": 384}]

        def __init__(self, model_name: str, cache_dir: str | None = None) -> None:
            raise ValueError(failure)

    fake = types.ModuleType("fastembed")
    fake.TextEmbedding = TextEmbedding  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastembed", fake)
    p = FastEmbedProvider("BAAI/bge-small-en-v1.5")
    assert await p.dimension() == 384  # from the model list: nothing loaded yet
    with pytest.raises(EmbeddingError) as info:
        await p.embed(["text"])
    assert type(info.value) is expected and info.value.transient is (expected is EmbeddingServiceError)
    assert "BAAI/bge-small-en-v1.5" in str(info.value)


# ==== OpenAI-compatible HTTP provider against a real server ====================================


def raw_vector(text: str) -> list[float]:
    """What the test server returns for a text: not normalised, one direction per number."""
    if text.startswith("t-"):
        n = int(text[2:])
        return [float(n + 1), 1.0, float(n % 3)]
    return [2.0, 0.0, 0.0]


@dataclass
class ServerState:
    """Behaviour and observations of the test embeddings server, reset for every test."""

    fail_first: int = 0  # first N requests answer 503
    status: int | None = None  # every request answers this status
    message: str = "overloaded"
    hang: float = 0.0  # seconds to sleep before answering
    delay: float = 0.0  # seconds to sleep before a good answer
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    generation: int = 0

    def reset(self) -> None:
        # A new generation releases handlers still hanging for an earlier test.
        self.__dict__.update({**ServerState().__dict__, "generation": self.generation + 1})


def embeddings_app(state: ServerState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = await request.json()
        generation = state.generation
        state.requests.append(body)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if state.hang:
                deadline = time.monotonic() + state.hang
                # Polls a counter that another request bumps (a cancelled client cannot set an Event here).
                while time.monotonic() < deadline and state.generation == generation:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                if state.generation != generation:
                    return JSONResponse({"error": {"message": "abandoned"}}, status_code=503)
            if len(state.requests) <= state.fail_first:
                return JSONResponse({"error": {"message": "warming up"}}, status_code=503)
            if state.status is not None:
                return JSONResponse({"error": {"message": state.message}}, status_code=state.status)
            if state.delay:
                await asyncio.sleep(state.delay)
            data = [
                {"object": "embedding", "index": i, "embedding": raw_vector(t)} for i, t in enumerate(body["input"])
            ]
            data.reverse()  # the index, not the position, says which input a vector belongs to
            return {"object": "list", "model": body["model"], "data": data}
        finally:
            if state.generation == generation:
                state.in_flight -= 1

    return app


@dataclass
class EmbeddingServer:
    url: str
    state: ServerState


_STATE = ServerState()


@pytest.fixture(scope="module")
def _embedding_server_url() -> Iterator[str]:
    # The app reads the module-level state object, which each test resets in place.
    with ServerThread(embeddings_app(_STATE)) as url:
        yield url


@pytest.fixture
def embedding_server(_embedding_server_url: str) -> EmbeddingServer:
    _STATE.reset()
    return EmbeddingServer(_embedding_server_url, _STATE)


@contextlib.asynccontextmanager
async def fast_provider(url: str, **kwargs: Any) -> AsyncIterator[OpenAICompatibleProvider]:
    """A provider with short backoffs, whose connections are closed when the block ends."""
    options: dict[str, Any] = {"backoff_base": 0.05, "backoff_max": 0.2, **kwargs}
    provider = OpenAICompatibleProvider("test-model", url, **options)
    try:
        yield provider
    finally:
        await provider.aclose()


def expected(text: str) -> list[float]:
    v = raw_vector(text)
    n = norm(v)
    return [x / n for x in v]


async def test_http_vectors_order_and_batching(embedding_server: EmbeddingServer) -> None:
    texts = [f"t-{i}" for i in range(150)]
    async with fast_provider(embedding_server.url) as p:
        vectors = await p.embed(texts)
    assert len(vectors) == 150
    for text, v in zip(texts, vectors, strict=True):
        assert v == pytest.approx(expected(text), abs=1e-12)
        assert abs(norm(v) - 1.0) < 1e-9
    sizes = sorted(len(r["input"]) for r in embedding_server.state.requests)
    assert sizes == [22, 64, 64]
    assert {r["model"] for r in embedding_server.state.requests} == {"test-model"}
    # The first response told the dimension: no probe needed.
    assert await p.dimension() == 3
    assert len(embedding_server.state.requests) == 3


async def test_http_dimension_probe_once(embedding_server: EmbeddingServer) -> None:
    async with fast_provider(embedding_server.url) as p:
        assert await p.dimension() == 3
        assert await p.dimension() == 3
    assert len(embedding_server.state.requests) == 1


async def test_http_concurrency_is_bounded(embedding_server: EmbeddingServer) -> None:
    embedding_server.state.delay = 0.1
    async with fast_provider(embedding_server.url, batch_size=10, max_concurrency=2) as p:
        vectors = await p.embed([f"t-{i}" for i in range(100)])
    assert len(vectors) == 100
    assert len(embedding_server.state.requests) == 10
    assert embedding_server.state.max_in_flight == 2


async def test_http_empty_texts_are_zero_vectors(embedding_server: EmbeddingServer) -> None:
    async with fast_provider(embedding_server.url) as p:
        vectors = await p.embed(["t-1", "", "t-2", "  "])
    assert vectors[0] == pytest.approx(expected("t-1"))
    assert vectors[1] == [0.0, 0.0, 0.0]
    assert vectors[2] == pytest.approx(expected("t-2"))
    assert vectors[3] == [0.0, 0.0, 0.0]
    assert all("" not in r["input"] for r in embedding_server.state.requests)


async def test_http_retries_transient_failures(embedding_server: EmbeddingServer) -> None:
    embedding_server.state.fail_first = 2
    async with fast_provider(embedding_server.url) as p:
        vectors = await p.embed(["t-5"])
    assert vectors == [pytest.approx(expected("t-5"))]
    assert len(embedding_server.state.requests) == 3


async def test_http_gives_up_after_three_attempts(embedding_server: EmbeddingServer) -> None:
    embedding_server.state.status = 503
    async with fast_provider(embedding_server.url) as p:
        with pytest.raises(EmbeddingServiceError) as info:
            await p.embed(["t-1"])
    assert f"{embedding_server.url}/v1/embeddings" in str(info.value)
    assert "503" in str(info.value)
    assert info.value.transient
    assert len(embedding_server.state.requests) == 3


async def test_http_rate_limit_is_retried(embedding_server: EmbeddingServer) -> None:
    embedding_server.state.status = 429
    async with fast_provider(embedding_server.url) as p:
        with pytest.raises(EmbeddingServiceError, match="429"):
            await p.embed(["t-1"])
    assert len(embedding_server.state.requests) == 3


async def test_http_client_error_is_permanent_and_immediate(embedding_server: EmbeddingServer) -> None:
    embedding_server.state.status = 404
    embedding_server.state.message = "model 'test-model' not found"
    async with fast_provider(embedding_server.url) as p:
        with pytest.raises(EmbeddingError) as info:
            await p.embed(["t-1"])
    assert not isinstance(info.value, EmbeddingServiceError)
    assert not info.value.transient
    assert "model 'test-model' not found" in str(info.value)
    assert len(embedding_server.state.requests) == 1


async def test_http_read_timeout(embedding_server: EmbeddingServer) -> None:
    embedding_server.state.hang = 3.0
    started = time.monotonic()
    async with fast_provider(embedding_server.url, connect_timeout=0.5, read_timeout=0.5) as p:
        with pytest.raises(EmbeddingServiceError) as info:
            await p.embed(["t-1"])
    assert time.monotonic() - started < 3.0
    assert f"{embedding_server.url}/v1/embeddings" in str(info.value)
    assert "timed out" in str(info.value)


async def test_http_connection_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens on it
    async with fast_provider(url) as p:
        with pytest.raises(EmbeddingServiceError) as info:
            await p.embed(["t-1"])
    assert f"{url}/v1/embeddings" in str(info.value)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_resolve_with_endpoint(embedding_server: EmbeddingServer, suffix: str) -> None:
    p = resolve_provider("builtin:ngram-384", embedding_server.url + suffix)
    assert isinstance(p, OpenAICompatibleProvider)
    assert isinstance(p, EmbeddingProvider)
    assert p.url == f"{embedding_server.url}/v1/embeddings"
    assert resolve_provider("builtin:ngram-384", embedding_server.url) is p  # one per (model, server)
    assert p.model_id == "builtin:ngram-384"  # sent as-is to the server
    try:
        assert await p.embed(["t-7"]) == [pytest.approx(expected("t-7"))]
    finally:
        await p.aclose()  # the next use opens a fresh client
    assert embedding_server.state.requests[-1]["model"] == "builtin:ngram-384"
