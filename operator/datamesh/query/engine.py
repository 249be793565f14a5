"""Answering a question: embed it once per model, route it on evidence, ask the products, merge.

The hot path builds plain dicts (the response is validated once by construction, not per hit);
a product's timeout starts when its search starts, and a search that finished counts even if the
loop noticed late, so a busy event loop cannot turn a finished search into a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.core.calibration import Scale, model_scales
from datamesh.core.merge import Candidate, merge
from datamesh.core.plan import FUSION, KIND_KEY, PRODUCT_KEY, ROW_KEY, TEXT_KEY, row_key
from datamesh.core.ports import (
    EmbedderResolver,
    EmbeddingError,
    EmbeddingServiceError,
    ScoredRow,
    SearchRequest,
    VectorStore,
    VectorStoreError,
)
from datamesh.core.routing import POLICY, Evidence, Selection, add_row_hit, select
from datamesh.query.access import Identity, can_read_pii
from datamesh.query.metrics import Metrics
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CatalogEntry
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL, SearchMode, parse_duration

log = logging.getLogger(__name__)
_STALE_CARDS = 16  # extra cards fetched when a routing search excludes products rather than naming them
T = TypeVar("T")
ModelKey = tuple[str, str | None]


class ProductFailure(Exception):
    """One product could not answer; ``kind`` classifies why (timeout, embedding, vector_store)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def model_of(entry: CatalogEntry) -> ModelKey:
    """The embedding model (and endpoint) a product's vectors come from."""
    return entry.embedding_model or DEFAULT_EMBEDDING_MODEL, entry.embedding_endpoint


class QuestionVectors:
    """The question embedded once per distinct model within one request, each with a deadline."""

    def __init__(self, question: str, embedders: EmbedderResolver, timeout: float) -> None:
        self.question = question
        self.embedders = embedders
        self.timeout = timeout  # the default; a model's products may set their own
        self.timeouts: dict[ModelKey, float] = {}
        self._tasks: dict[ModelKey, asyncio.Task[list[float]]] = {}
        self._failures: dict[ModelKey, ProductFailure] = {}

    def start(self, models: Iterable[ModelKey]) -> None:
        """Begin embedding for every model at once (a product never waits on another's model)."""
        for key in models:
            if key not in self._tasks:
                self._tasks[key] = asyncio.create_task(self._embed(*key))

    async def vector(self, key: ModelKey) -> list[float]:
        """The question's vector in one model; raises ProductFailure(embedding or timeout)."""
        self.start([key])
        task = self._tasks[key]
        timeout = self.timeouts.get(key, self.timeout)
        if not task.done():  # the products after the first find it done: no timer, no waiter each
            # asyncio.wait never cancels: one waiter giving up leaves the embedding to the others.
            await asyncio.wait({task}, timeout=timeout)
        failure: ProductFailure
        if not task.done():
            failure = ProductFailure("timeout", f"embedding the question took over {timeout * 1000:.0f} ms")
        else:
            try:
                return task.result()
            except EmbeddingServiceError as exc:
                failure = ProductFailure("embedding", f"the product's embedding service is unavailable: {exc}")
            except EmbeddingError as exc:
                failure = ProductFailure("embedding", f"cannot embed the question with the product's model: {exc}")
        self._failures[key] = failure
        raise failure

    def failure(self, key: ModelKey) -> ProductFailure | None:
        """Why the question has no vector in a model (after it was asked for), if it has none."""
        return self._failures.get(key)

    async def _embed(self, model: str, endpoint: str | None) -> list[float]:
        (vector,) = await self.embedders(model, endpoint).embed([self.question])
        return vector

    async def close(self) -> None:
        """Cancel embeddings nobody waits for any more."""
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


async def within(call: Awaitable[T], timeout: float) -> T | None:
    """The call's result, or None when it has not finished after ``timeout`` seconds of its own."""
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:  # the question was given up: its search must not run on orphaned
        task.cancel()
        raise
    if task.done():
        return task.result()  # finished in time, even if the loop noticed late
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


def rows_of(entry: CatalogEntry, payloads: Iterable[Mapping[str, Any]], unmask: bool) -> list[dict[str, Any]]:
    """Stored rows as the API shows them: product, key, embedded text, fields (PII masked unless granted)."""
    # The entry's names are worked out once for all of its rows: they are properties computed per call.
    product, primary_key = entry.product, entry.primary_key
    hidden = () if unmask else tuple(f.name for f in entry.fields if f.pii)
    shown = []
    for payload in payloads:
        fields = {k: v for k, v in payload.items() if not k.startswith("_")}
        masked = [name for name in hidden if name in fields]
        for name in masked:
            fields[name] = None
        key, text = row_key(payload, primary_key), payload.get(TEXT_KEY)
        shown.append({"product": product, "key": key, "text": text, "fields": fields, "masked": masked})
    return shown


def hits_of(entry: CatalogEntry, rows: Sequence[ScoredRow], unmask: bool) -> list[dict[str, Any]]:
    """Search hits as the API shows them: the rows (as :func:`rows_of` shows them) with their scores."""
    shown = rows_of(entry, (r.payload for r in rows), unmask)
    for hit, row in zip(shown, rows, strict=True):
        hit["score"] = round(row.score, 6)
        hit["similarity"] = None if row.similarity is None else round(row.similarity, 6)
    return shown


@dataclass
class Asked:
    """One product's answer (or failure) within a question."""

    entry: CatalogEntry
    hits: list[dict[str, Any]]
    latency_ms: float
    error: ProductFailure | None = None


@dataclass(frozen=True)
class CandidateView:
    """What routing reads of one set of candidates in one catalog, worked out once, not per question.

    Every question over the same candidates (the usual case: one catalog, every product visible)
    would otherwise redo this for the whole catalog: at 3,000 products it was most of the time a
    question took beside its routing searches.
    """

    by_product: dict[str, CatalogEntry]
    ordered: tuple[str, ...]  # the candidates' names in name order
    scales: dict[str, Scale]
    calibrations: dict[str, tuple[float, float] | None]
    # Per routing collection and model: its candidates, and the filter scope of its searches.
    groups: dict[tuple[str, ModelKey], tuple[tuple[str, ...], dict[str, list[str]]]]
    models: frozenset[ModelKey]
    remote_models: frozenset[ModelKey]  # embedded by a service of their own, whose timeout applies

    @classmethod
    def of(cls, candidates: Sequence[CatalogEntry], catalog: Iterable[CatalogEntry]) -> CandidateView:
        """The view of ``candidates`` among every product of ``catalog``."""
        population: dict[str, set[str]] = {}
        for entry in catalog:
            if entry.routing_collection:
                population.setdefault(entry.routing_collection, set()).add(entry.product)
        members: dict[tuple[str, ModelKey], list[str]] = {}
        for entry in candidates:
            if entry.routing_collection:
                members.setdefault((entry.routing_collection, model_of(entry)), []).append(entry.product)
        groups = {
            key: (tuple(products), routing_scope(products, population.get(key[0], set())))
            for key, products in members.items()
        }
        models = frozenset(model_of(e) for e in candidates)
        return cls(
            by_product={e.product: e for e in candidates},
            ordered=tuple(sorted(e.product for e in candidates)),
            scales=scales_of(candidates),
            calibrations={e.product: calibration_of(e) for e in candidates},
            groups=groups,
            models=models,
            remote_models=frozenset(m for m in models if m[1] is not None),
        )


class QueryEngine:
    """Routes and asks products; shared by the HTTP handlers."""

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
        self._slots: asyncio.Semaphore | None = None

    def _store_slots(self) -> asyncio.Semaphore:
        # As many as the store serves at once (the service opens it so); made on the serving loop.
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.fanout_concurrency)
        return self._slots

    def question(self, text: str) -> QuestionVectors:
        """The question, to be embedded once per model."""
        return QuestionVectors(text, self.embedders, self.settings.timeout_cap_seconds)

    def timeout_for(self, entry: CatalogEntry) -> float:
        """The product's sla.queryLatencyP99 (or the default), never above the service cap."""
        p99 = entry.sla.query_latency_p99 if entry.sla else None
        wanted = parse_duration(p99) if p99 else self.settings.default_timeout_seconds
        return min(wanted, self.settings.timeout_cap_seconds)

    # ---- one product --------------------------------------------------------------------------

    async def ask(self, entry: CatalogEntry, vectors: QuestionVectors, limit: int, caller: Identity) -> Asked:
        """One product's hits within its timeout, counted from when its search starts."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            if entry.embedding_endpoint:
                vectors.timeouts.setdefault(model_of(entry), self.timeout_for(entry))
            vector = await vectors.vector(model_of(entry))
            if not entry.collection:
                raise ProductFailure("vector_store", "the product has no collection")
            mode = SearchMode(entry.search_mode or SearchMode.hybrid)
            request = SearchRequest(vector, vectors.question, limit, mode)
            timeout = self.timeout_for(entry)
            # The clock starts once the search holds a store slot: waiting behind other questions'
            # searches is load on this service, not the product being slow.
            async with self._store_slots():
                try:
                    rows = await within(self.store.search(entry.collection, request), timeout)
                except VectorStoreError as exc:
                    raise ProductFailure("vector_store", str(exc)) from None
            if rows is None:
                raise self._timed_out(entry, timeout)
            unmask = can_read_pii(caller, entry)
            return Asked(entry, hits_of(entry, rows, unmask), _ms(started))
        except ProductFailure as failure:
            outcome = failure.kind
            return Asked(entry, [], _ms(started), failure)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:  # whatever one product raises must not fail the others
            outcome = "vector_store"
            log.warning("a product query failed", exc_info=exc)
            return Asked(entry, [], _ms(started), ProductFailure("vector_store", f"{type(exc).__name__}: {exc}"))
        finally:
            self.metrics.product_seconds.labels(outcome).observe(time.perf_counter() - started)
            if outcome not in ("ok", "cancelled"):
                self.metrics.product_errors.labels(outcome).inc()

    async def sample(self, entry: CatalogEntry, limit: int, caller: Identity) -> list[dict[str, Any]]:
        """Up to ``limit`` of the product's rows (the same ones every time), shown and masked as hits are.

        Raises ProductFailure (vector_store or timeout) when the store cannot give them in the product's time.
        """
        if not entry.collection:
            raise ProductFailure("vector_store", "the product has no collection")
        timeout = self.timeout_for(entry)
        async with self._store_slots():
            try:
                payloads = await within(self.store.sample(entry.collection, limit), timeout)
            except VectorStoreError as exc:
                raise ProductFailure("vector_store", str(exc)) from None
        if payloads is None:
            raise self._timed_out(entry, timeout)
        unmask = can_read_pii(caller, entry)
        return rows_of(entry, payloads, unmask)

    def _timed_out(self, entry: CatalogEntry, timeout: float) -> ProductFailure:
        p99 = entry.sla.query_latency_p99 if entry.sla else None
        basis = f"sla.queryLatencyP99 {p99}" if p99 else "the default timeout"
        cap = self.settings.timeout_cap_seconds
        return ProductFailure("timeout", f"no answer within {timeout * 1000:.0f} ms ({basis}, cap {cap:g} s)")

    # ---- routing ------------------------------------------------------------------------------

    async def route(
        self, vectors: QuestionVectors, view: CandidateView, *, named: Sequence[str], max_products: int
    ) -> Selection:
        """The products to ask, from the evidence of their rows and cards in the routing collections."""
        evidence: dict[str, Evidence] = {}

        def of(product: str) -> Evidence:
            found = evidence.get(product)
            if found is None:
                calibration, scale = view.calibrations[product], view.scales[product]
                found = evidence[product] = Evidence(product, calibration=calibration, scale=scale)
            return found

        found = await asyncio.gather(
            *(self._gather(c, m, len(group), scope, vectors) for (c, m), (group, scope) in view.groups.items())
        )
        for rows, cards in found:
            for hit in cards:
                product = str(hit.payload.get(PRODUCT_KEY))
                if product in view.by_product:
                    of(product).card = hit.similarity
            for hit in rows:
                product = str(hit.payload.get(PRODUCT_KEY))
                if hit.payload.get(KIND_KEY) == "row" and product in view.by_product:
                    add_row_hit(of(product), hit.similarity, hit.payload.get(ROW_KEY))
        # The candidates without any evidence are weighed too (at zero), without an object each.
        return select(list(evidence.values()), max_products=max_products, named=named, others=view.ordered)

    async def _gather(
        self, collection: str, model: ModelKey, asked: int, scope: Mapping[str, list[str]], vectors: QuestionVectors
    ) -> tuple[list[ScoredRow], list[ScoredRow]]:
        """One routing collection's row hits (fused ranking) and card hits for the candidates in ``scope``."""
        try:
            vector = await vectors.vector(model)
        except ProductFailure:
            return [], []  # the products of this model fail with the reason when asked
        rows, cards = routing_requests(vector, vectors.question, asked, scope)
        try:
            found_rows, found_cards = await asyncio.gather(
                self.store.search(collection, rows), self.store.search(collection, cards)
            )
        except VectorStoreError as exc:
            log.warning("routing collection %s cannot be searched: %s", collection, exc)
            return [], []  # routing falls back on what the other collections say; the products are still asked
        return found_rows, found_cards

    # ---- the whole question -------------------------------------------------------------------

    async def answer(
        self,
        question: str,
        view: CandidateView,
        caller: Identity,
        *,
        named: Sequence[str] = (),
        limit: int = 10,
        per_product: int = 5,
        max_products: int | None = None,
    ) -> dict[str, Any]:
        """Route among ``view``'s candidates, ask concurrently (bounded), merge: the answer as the API returns it."""
        started = time.perf_counter()
        vectors = self.question(question)
        candidates = view.by_product.values()
        if view.remote_models:
            for entry in candidates:
                key = model_of(entry)
                if key in view.remote_models:
                    # A remote embedding service is part of its products' answer: their timeout applies. A
                    # model in this process is only queued behind other questions: the service's cap applies.
                    vectors.timeouts[key] = max(vectors.timeouts.get(key, 0.0), self.timeout_for(entry))
        vectors.start(view.models)
        scales = view.scales
        try:
            routing_started = time.perf_counter()
            selection = await self.route(
                vectors, view, named=named, max_products=max_products or self.settings.max_products
            )
            self.metrics.routing_seconds.observe(time.perf_counter() - routing_started)
            self.metrics.routed.observe(len(selection.routes))
            entries = view.by_product
            slots = asyncio.Semaphore(self.settings.fanout_concurrency)

            async def one(product: str) -> Asked:
                async with slots:
                    return await self.ask(entries[product], vectors, per_product, caller)

            asked = await asyncio.gather(*(one(r.product) for r in selection.routes))
            # A product whose model could not embed the question was never weighed: say so.
            routed = {r.product for r in selection.routes}
            failed = {key: failure for key in view.models if (failure := vectors.failure(key)) is not None}
            unweighed = [
                Asked(entry, [], 0.0, ProductFailure(failure.kind, f"not routed: {failure}"))
                for entry in (candidates if failed else ())
                if (failure := failed.get(model_of(entry))) is not None and entry.product not in routed
            ]
        finally:
            await vectors.close()
        scores = {r.product: r.score for r in selection.routes}
        answered = {a.entry.product: a for a in asked if a.error is None}
        candidates_by_product = {
            product: [
                Candidate(product, h["key"], rank, h["similarity"], fused_share(a.entry, h["score"]))
                for rank, h in enumerate(a.hits)
            ]
            for product, a in answered.items()
        }
        merged = merge(candidates_by_product, scores, scales, limit=limit)
        return {
            "routedTo": [
                {
                    "product": r.product,
                    "score": r.score,
                    "why": _why(r.why, r.named, entries[r.product].phase == "Degraded"),
                    "degraded": entries[r.product].phase == "Degraded",
                    "requested": r.named,
                }
                for r in selection.routes
            ],
            "lowConfidence": selection.low_confidence,
            "confidenceNote": selection.reason,
            "results": [
                {"product": a.entry.product, "hits": a.hits, "latencyMs": a.latency_ms}
                for a in asked
                if a.error is None
            ],
            "merged": [{"product": m.product, "key": m.key, "score": m.score} for m in merged],
            "errors": [
                {"product": a.entry.product, "error": str(a.error), "kind": a.error.kind}
                for a in [*asked, *unweighed]
                if a.error is not None
            ],
            "latencyMs": _ms(started),
        }


def routing_scope(products: Sequence[str], population: set[str]) -> dict[str, list[str]]:
    """The filter of a routing collection's searches for ``products`` among all of its ``population``.

    When most of the population is asked for, the few others are excluded instead (the shorter list
    filters faster). Points of products outside the catalog (a deletion not yet cleaned up) may then
    come back: the caller drops them, and a few more cards are fetched for them.
    """
    others = population.difference(products)
    if population and len(others) < len(products):
        return {"excluded": sorted(others)}
    return {"products": list(products)}


def routing_requests(
    vector: Sequence[float], question: str, asked: int, scope: Mapping[str, list[str]]
) -> tuple[SearchRequest, SearchRequest]:
    """The two searches of a routing collection for ``asked`` products within ``scope``: best rows, cards."""
    wanted = (PRODUCT_KEY, ROW_KEY, KIND_KEY)  # the routing decision needs no more of each point
    cards = min(asked, POLICY.cards) + (_STALE_CARDS if "excluded" in scope else 0)
    return (
        SearchRequest(vector, question, POLICY.fetch, SearchMode.hybrid, kind="row", payload=wanted, **scope),
        SearchRequest(vector, question, cards, SearchMode.dense, kind="card", payload=wanted, **scope),
    )


def calibration_of(entry: CatalogEntry) -> tuple[float, float] | None:
    """A product's row-to-row similarity (mean, spread), when its ingestion measured it."""
    return (entry.calibration.mean, entry.calibration.std) if entry.calibration else None


def scales_of(entries: Sequence[CatalogEntry]) -> dict[str, Scale]:
    """Each product's map onto the mesh's reference similarity scale (identity for the main model)."""
    by_model = model_scales({e.product: (model_of(e), calibration_of(e)) for e in entries})
    return {e.product: by_model[model_of(e)] for e in entries}


def fused_share(entry: CatalogEntry, score: float) -> float:
    """A hit's score in its product's hybrid ranking, as a share of the best a fused score can be."""
    if entry.search_mode not in (None, SearchMode.hybrid.value):  # per hit: a string test, not an enum lookup
        return 0.0
    best = (FUSION.dense_weight + FUSION.sparse_weight) / (FUSION.k + 1)
    return min(max(score / best, 0.0), 1.0)


def _why(evidence: str, named: bool, degraded: bool) -> str:
    parts = ["requested by name"] if named else []
    parts.append(evidence)
    if degraded:
        parts.append("DEGRADED: results may be missing or stale")
    return "; ".join(parts)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a perf_counter value), rounded for the wire."""
    return _ms(started)
