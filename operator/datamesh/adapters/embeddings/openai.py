"""Embeddings from any OpenAI-compatible ``POST /v1/embeddings`` server (TEI, vLLM, Ollama, datamesh)."""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Sequence

import httpx
import numpy as np

from datamesh.adapters.embeddings.builtin import as_lists, normalise_rows
from datamesh.adapters.http import RetriesExhausted, api_url, request_with_retries, server_message
from datamesh.core.ports import EmbeddingError, EmbeddingServiceError, UnknownModelError


class _LoopState:
    def __init__(self, client: httpx.AsyncClient, concurrency: int) -> None:
        self.client = client
        self.semaphore = asyncio.Semaphore(concurrency)


class OpenAICompatibleProvider:
    """Any server with an OpenAI-style ``POST /v1/embeddings`` (TEI, vLLM, Ollama, datamesh)."""

    def __init__(
        self,
        model: str,
        endpoint: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        batch_size: int = 64,
        max_concurrency: int = 4,
        attempts: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        api_key: str | None = None,
    ) -> None:
        if not model:
            raise UnknownModelError("an embedding endpoint needs a model name")
        if not re.match(r"^https?://", endpoint.strip()):
            raise UnknownModelError(f"embedding endpoint {endpoint!r} must be an http(s) URL")
        self.model_id = model
        self.url = api_url(endpoint, "embeddings")
        self.batch_size = max(1, batch_size)
        self.attempts = max(1, attempts)
        self._concurrency = max(1, max_concurrency)
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout, write=read_timeout, pool=read_timeout)
        self._backoff = (backoff_base, backoff_max)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._dim: int | None = None
        # httpx connections and asyncio primitives belong to one event loop: keep one set per loop.
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"OpenAICompatibleProvider({self.model_id!r}, {self.url!r})"

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
            client = httpx.AsyncClient(timeout=self._timeout, limits=limits, headers=self._headers)
            state = self._states[loop] = _LoopState(client, self._concurrency)
        return state

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.aclose()

    async def dimension(self) -> int:
        """Discovered once by embedding a probe text."""
        if self._dim is None:
            await self._request(["dimension probe"])
        assert self._dim is not None
        return self._dim

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Batches of ``batch_size`` texts, sent concurrently (bounded), results in input order."""
        texts = list(texts)
        if not texts:
            return []
        # Servers refuse empty inputs; an empty text has no meaning anyway, so it maps to zeros.
        todo = [i for i, t in enumerate(texts) if t.strip()]
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        tasks = [asyncio.ensure_future(self._request([texts[i] for i in b])) for b in batches]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        dim = await self.dimension() if len(todo) < len(texts) else self._dim
        out: list[list[float]] = [[] for _ in texts]
        for batch, vectors in zip(batches, results, strict=True):
            for i, v in zip(batch, vectors, strict=True):
                out[i] = v
        for i, v in enumerate(out):
            if not v:
                out[i] = [0.0] * (dim or 0)
        return out

    async def _request(self, texts: list[str]) -> list[list[float]]:
        state = self._state()
        base, cap = self._backoff
        try:
            response = await request_with_retries(
                state.client,
                "POST",
                self.url,
                json={"model": self.model_id, "input": texts},
                attempts=self.attempts,
                backoff_base=base,
                backoff_max=cap,
                semaphore=state.semaphore,
            )
        except RetriesExhausted as e:
            raise EmbeddingServiceError(
                f"embedding service {self.url} failed after {e.attempts} attempts: {e.cause}"
            ) from e
        if response.status_code >= 400:
            raise EmbeddingError(
                f"embedding service {self.url} answered HTTP {response.status_code} for model {self.model_id!r}: "
                f"{server_message(response)}"
            )
        return self._parse(response, len(texts))

    def _parse(self, response: httpx.Response, expected: int) -> list[list[float]]:
        try:
            data = response.json()["data"]
            items = sorted(data, key=lambda d: d.get("index", 0))
            matrix = np.asarray([d["embedding"] for d in items], dtype=np.float64)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EmbeddingError(
                f"embedding service {self.url} sent a malformed response ({type(e).__name__}: {e}): "
                f"{response.text[:200]!r}"
            ) from e
        if matrix.ndim != 2 or matrix.shape[0] != expected or matrix.shape[1] == 0:
            raise EmbeddingError(f"embedding service {self.url} returned {matrix.shape} vectors for {expected} texts")
        if not np.all(np.isfinite(matrix)):
            raise EmbeddingError(f"embedding service {self.url} returned non-finite values")
        if self._dim is None:
            self._dim = matrix.shape[1]
        elif self._dim != matrix.shape[1]:
            raise EmbeddingError(
                f"embedding service {self.url} changed dimension from {self._dim} to {matrix.shape[1]}"
            )
        return as_lists(normalise_rows(matrix))
