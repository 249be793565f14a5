"""Asking products: the question embedded once per model, concurrent fan-out with per-product
timeouts, and one merged ranking."""

from __future__ import annotations

import asyncio
import logging
import time

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.core.plan import TEXT_KEY
from datamesh.core.ports import (
    EmbedderResolver,
    EmbeddingError,
    EmbeddingServiceError,
    ScoredRow,
    SearchRequest,
    VectorStore,
    VectorStoreError,
)
from datamesh.query.metrics import Metrics
from datamesh.query.routing import Route, product_ref
from datamesh.query.schemas import RRF_K, Hit, MergedHit, ProductError, ProductResult
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CatalogEntry
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL, SearchMode, parse_duration

log = logging.getLogger(__name__)


class ProductFailure(Exception):
    """One product could not answer; ``kind`` classifies why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class QuestionVectors:
    """The question embedded once per distinct (model, endpoint) within one request."""

    def __init__(self, question: str, embedders: EmbedderResolver = resolve_provider) -> None:
        self.question = question
        self.embedders = embedders
        self._tasks: dict[tuple[str, str | None], asyncio.Task[list[float]]] = {}

    async def vector(self, entry: CatalogEntry) -> list[float]:
        key = (entry.embedding_model or DEFAULT_EMBEDDING_MODEL, entry.embedding_endpoint)
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.create_task(self._embed(*key))
        # Shielded: one product timing out must not cancel the embedding other products await.
        return await asyncio.shield(task)

    async def _embed(self, model: str, endpoint: str | None) -> list[float]:
        (vector,) = await self.embedders(model, endpoint).embed([self.question])
        return vector

    async def close(self) -> None:
        """Cancel embeddings nobody waits for any more (their products timed out)."""
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _hit(point: ScoredRow) -> Hit:
    text = point.payload.get(TEXT_KEY)
    # Keys with a leading underscore are the platform's bookkeeping, never row fields.
    fields = {k: v for k, v in point.payload.items() if not k.startswith("_")}
    return Hit(id=point.id, score=point.score, text=text, payload=fields)


def reciprocal_rank_fusion(results: list[ProductResult], limit: int, k: int = RRF_K) -> list[MergedHit]:
    """One ranking from per-product rankings: score = 1/(k + rank); ties keep the routing order."""
    fused: list[tuple[float, int, int, MergedHit]] = []
    for order, result in enumerate(results):
        for rank, hit in enumerate(result.hits, start=1):
            score = 1.0 / (k + rank)
            fused.append(
                (
                    -score,
                    order,
                    rank,
                    MergedHit(
                        product=result.product, id=hit.id, score=round(score, 6), text=hit.text, payload=hit.payload
                    ),
                )
            )
    fused.sort(key=lambda t: t[:3])
    return [t[3] for t in fused[:limit]]


def _failure_message(stage: str, exc: Exception) -> str:
    if isinstance(exc, EmbeddingServiceError):
        return f"the product's embedding service is unavailable: {exc}"
    if isinstance(exc, EmbeddingError):
        return f"cannot embed the question with the product's model: {exc}"
    if isinstance(exc, VectorStoreError):
        return str(exc)
    # Anything else from the client libraries.
    log.warning("%s step of a product query failed", stage, exc_info=exc)
    what = "embedding the question" if stage == "embedding" else "searching the collection"
    return f"{what} failed: {type(exc).__name__}: {exc}"


class QueryEngine:
    """Asks products concurrently with per-product timeouts; shared by the HTTP handlers."""

    def __init__(
        self,
        store: VectorStore,
        settings: QuerySettings,
        metrics: Metrics,
        embedders: EmbedderResolver = resolve_provider,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.embedders = embedders

    def question(self, text: str) -> QuestionVectors:
        """The question, to be embedded lazily once per model."""
        return QuestionVectors(text, self.embedders)

    def timeout_for(self, entry: CatalogEntry) -> float:
        """The product's sla.queryLatencyP99 (or the default), never above the service cap."""
        p99 = entry.sla.query_latency_p99 if entry.sla else None
        wanted = parse_duration(p99) if p99 else self.settings.default_timeout_seconds
        return min(wanted, self.settings.timeout_cap_seconds)

    async def ask(self, entry: CatalogEntry, vectors: QuestionVectors, limit: int) -> ProductResult:
        """One product's hits within its timeout; raises ProductFailure (kind timeout, embedding or vector_store)."""
        timeout = self.timeout_for(entry)
        started = time.perf_counter()
        outcome = "ok"
        stage = "embedding"
        try:
            async with asyncio.timeout(timeout):
                vector = await vectors.vector(entry)
                stage = "vector_store"
                if not entry.collection:
                    raise VectorStoreError("the product has no collection")
                mode = SearchMode(entry.search_mode or SearchMode.hybrid)
                request = SearchRequest(vector, vectors.question, limit, mode)
                points = await self.store.search(entry.collection, request)
            return ProductResult(
                product=product_ref(entry), hits=[_hit(p) for p in points], latency_ms=elapsed_ms(started)
            )
        except TimeoutError:
            outcome = "timeout"
            p99 = entry.sla.query_latency_p99 if entry.sla else None
            basis = f"sla.queryLatencyP99 {p99}" if p99 else "the default timeout"
            stalled = "embedding the question" if stage == "embedding" else "searching the collection"
            raise ProductFailure(
                "timeout",
                f"no answer within {timeout * 1000:.0f} ms ({basis}, service cap "
                f"{self.settings.timeout_cap_seconds:g} s) while {stalled}",
            ) from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:
            outcome = stage
            raise ProductFailure(stage, _failure_message(stage, exc)) from exc
        finally:
            self.metrics.product_seconds.labels(outcome).observe(time.perf_counter() - started)
            if outcome not in ("ok", "cancelled"):
                self.metrics.product_errors.labels(outcome).inc()

    async def fan_out(
        self, routes: list[Route], question: str, limit: int
    ) -> tuple[list[ProductResult], list[ProductError]]:
        """Every routed product asked concurrently (bounded); results and errors in routing order."""
        vectors = self.question(question)
        # Each product's timeout starts once it has a slot: a long queue must not time out products never asked.
        slots = asyncio.Semaphore(self.settings.fanout_concurrency)

        async def one(route: Route) -> ProductResult | ProductError:
            async with slots:
                try:
                    return await self.ask(route.entry, vectors, limit)
                except ProductFailure as failure:
                    return ProductError(product=route.product, error=str(failure), kind=failure.kind)

        try:
            answers = await asyncio.gather(*(one(r) for r in routes))
        finally:
            await vectors.close()
        results = [a for a in answers if isinstance(a, ProductResult)]
        errors = [a for a in answers if isinstance(a, ProductError)]
        return results, errors


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a perf_counter value), rounded for the wire."""
    return round((time.perf_counter() - started) * 1000, 2)
