"""What the query service does for a caller, whatever the wire: the REST API and the MCP tools call these.

Every function sees only the products the caller's identity may read, and a hidden product is
"not found" exactly like a missing one. Failures are :class:`~datamesh.web.errors.ApiError`
(status and message): the REST API renders them as ``{"detail": ...}``, the MCP tools as tool errors.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from datamesh.query.access import Identity, can_read
from datamesh.query.catalog_sources import CatalogSource
from datamesh.query.engine import CandidateView, ProductFailure, QueryEngine, elapsed_ms
from datamesh.query.routing import Candidates, ProductNameError, candidates, product_ref, resolve_names
from datamesh.query.schemas import QueryRequest
from datamesh.resource.catalog import CatalogEntry, entry_key
from datamesh.web.errors import ApiError


def visible(source: CatalogSource, identity: Identity) -> dict[str, CatalogEntry]:
    """Every product ``identity`` may read, by catalog key."""
    return {k: e for k, e in source.entries().items() if can_read(identity, e)}


def require_catalog(source: CatalogSource) -> None:
    """ApiError 503 until the catalog has been read once."""
    if not source.loaded:
        raise ApiError(503, "the catalog is not loaded yet")


def list_products(
    source: CatalogSource,
    identity: Identity,
    *,
    domain: str | None = None,
    tag: str | None = None,
    phase: str | None = None,
) -> list[CatalogEntry]:
    """The products ``identity`` may read, optionally of one domain, tag or phase, in name order."""
    chosen = [
        e
        for e in visible(source, identity).values()
        if (domain is None or e.domain.lower() == domain.lower())
        and (tag is None or tag.lower() in (t.lower() for t in e.tags))
        and (phase is None or (e.phase or "").lower() == phase.lower())
    ]
    chosen.sort(key=product_ref)
    return chosen


def find_product(source: CatalogSource, identity: Identity, name: str) -> CatalogEntry:
    """One product by ``namespace/name`` (or a bare name when unambiguous); ApiError 404 or 422 otherwise."""
    namespace, slash, bare = name.partition("/")
    if slash:
        entry = source.entries().get(entry_key(namespace, bare))
        if entry is None or not can_read(identity, entry):
            # The same answer for "missing" and "not yours": existence is not disclosed.
            raise ApiError(404, f"product {name} not found")
        return entry
    try:
        (entry,) = resolve_names([name], list(visible(source, identity).values()))
    except ProductNameError as exc:
        raise ApiError(exc.status, str(exc)) from None
    return entry


@dataclass(frozen=True)
class _Choice:
    catalog: dict[str, CatalogEntry]  # kept alive so that its id, in the cache key, names no other dict
    candidates: Candidates
    view: CandidateView | None  # None when there is no candidate to route among


class _RecentChoices:
    """The candidates, and their routing view, of the last few (catalog, caller, narrowing) combinations.

    Reading who may see what, sorting the catalog and working out each candidate's routing took
    milliseconds per question at thousands of products, and a catalog changes far less often than
    questions come. A catalog is known by its entries dict, which every source swaps whole when it
    changes.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: OrderedDict[tuple[Any, ...], _Choice] = OrderedDict()

    def get(self, source: CatalogSource, identity: Identity, request: QueryRequest) -> _Choice:
        """The choice of ``request`` for ``identity`` (ProductNameError as :func:`candidates` raises it)."""
        catalog = source.entries()
        key = (id(catalog), identity, tuple(request.domains or ()), tuple(request.products or ()))
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            return kept
        readable = (e for e in catalog.values() if can_read(identity, e))
        chosen = candidates(readable, domains=request.domains, products=request.products)
        view = CandidateView.of(chosen.entries, catalog.values()) if chosen.entries else None
        kept = self._kept[key] = _Choice(catalog, chosen, view)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)
        return kept


_choices = _RecentChoices(8)


@dataclass
class Answer:
    """A question's answer as the API shapes it; ``status`` is 502/503 when every routed product failed."""

    body: dict[str, Any]
    status: int = 200


async def answer_question(
    engine: QueryEngine, source: CatalogSource, identity: Identity, request: QueryRequest
) -> Answer:
    """Choose the caller's candidates, route and ask them (``QueryEngine.answer``), and say what failed."""
    started = time.perf_counter()
    require_catalog(source)
    try:
        choice = _choices.get(source, identity, request)
    except ProductNameError as exc:
        raise ApiError(exc.status, str(exc)) from None
    chosen = choice.candidates
    if choice.view is None:
        empty = {"routedTo": [], "lowConfidence": True, "confidenceNote": chosen.note, "results": [], "merged": []}
        return Answer({**empty, "errors": [], "message": chosen.note, "latencyMs": elapsed_ms(started)})
    answer = await engine.answer(
        request.question,
        choice.view,
        identity,
        named=chosen.named,
        limit=request.limit,
        per_product=request.per_product,
        max_products=request.max_products,
    )
    errors = answer["errors"]
    if errors and not answer["results"]:
        status = 503 if all(e["kind"] == "timeout" for e in errors) else 502
        causes = "; ".join(f"{e['product']}: {e['error']}" for e in errors)
        detail = f"all {len(errors)} routed products failed: {causes}"
        return Answer({"detail": detail, "routedTo": answer["routedTo"], "errors": errors}, status)
    answer["message"] = (
        f"{len(errors)} of {len(answer['routedTo'])} products failed; results are partial" if errors else None
    )
    return Answer(answer)


def _searchable(entry: CatalogEntry) -> CatalogEntry:
    if not entry.collection:
        raise ApiError(
            409, f"product {entry.product} has no semantic search collection (phase {entry.phase or 'unknown'})"
        )
    return entry


def _failed(entry: CatalogEntry, failure: ProductFailure) -> ApiError:
    status = 504 if failure.kind == "timeout" else 502
    return ApiError(status, f"product {entry.product}: {failure}", kind=failure.kind)


async def ask_product(
    engine: QueryEngine, entry: CatalogEntry, question: str, limit: int, identity: Identity
) -> dict[str, Any]:
    """Semantic search on one product: ``{product, hits, latencyMs}``; ApiError 409, 502 or 504 if it cannot answer."""
    _searchable(entry)
    vectors = engine.question(question)
    try:
        asked = await engine.ask(entry, vectors, limit, identity)
    finally:
        await vectors.close()
    if asked.error is not None:
        raise _failed(entry, asked.error)
    return {"product": entry.product, "hits": asked.hits, "latencyMs": asked.latency_ms}


async def sample_product(engine: QueryEngine, entry: CatalogEntry, limit: int, identity: Identity) -> dict[str, Any]:
    """A few of the product's rows, the same each time, masked as hits are: ``{product, rows, latencyMs}``."""
    _searchable(entry)
    started = time.perf_counter()
    try:
        rows = await engine.sample(entry, limit, identity)
    except ProductFailure as failure:
        raise _failed(entry, failure) from None
    return {"product": entry.product, "rows": rows, "latencyMs": elapsed_ms(started)}
