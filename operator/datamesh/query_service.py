"""The federated query service: one HTTP API over every product of the mesh.

``POST /v1/query`` routes a question to the relevant products (``routing``), asks them
concurrently, each with its own embedding model and a timeout from its SLA, and returns hits
per product, one merged ranking (reciprocal rank fusion: raw scores of different embedding
models are not comparable) and per-product errors. Callers only ever see products their
identity may read (``access``). Run it with :func:`serve` (``datamesh query-service``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import uvicorn
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from datamesh.access import Authenticator, Identity, can_read
from datamesh.asgi import RequestObserver
from datamesh.catalog import CatalogEntry, entry_key
from datamesh.catalog_watch import CatalogSource, FileCatalogSource, KubeCatalogSource
from datamesh.embeddings import DEFAULT_MODEL, EmbeddingError, EmbeddingServiceError, resolve_provider
from datamesh.http_client import server_message
from datamesh.models import DNS_LABEL_PATTERN, parse_duration
from datamesh.qdrant import TEXT_KEY, VectorStore, VectorStoreError
from datamesh.routing import DEFAULT_THRESHOLD, Route, Router, product_ref

log = logging.getLogger(__name__)

INFERENCE_KEY = "_inference"  # where /transform puts the model's output in each record
RRF_K = 60
MAX_RECORDS = 1000
_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a DataProduct name (DNS subdomain)
_PRODUCT_PATTERN = DNS_LABEL_PATTERN[:-1] + "/" + _NAME_PATTERN[1:]


class QuerySettings(BaseSettings):
    """Settings of the query service, from ``DATAMESH_QUERY_*`` (Qdrant comes from ``DATAMESH_QDRANT_*``)."""

    model_config = SettingsConfigDict(env_prefix="DATAMESH_QUERY_", extra="ignore")

    catalog_namespace: str = Field("datamesh-system", description="Namespace of the catalog ConfigMaps (watched).")
    catalog_file: str | None = Field(None, description="Read the catalog from this file instead of the Kubernetes API (local mode).")
    tokens_file: str | None = Field(None, description="YAML/JSON {token: {identity, groups}} (mounted from a Secret); re-read when it changes.")
    allow_anonymous: bool = Field(False, description="Serve callers without a token as 'anonymous' (they see products open to '*').")
    timeout_cap_seconds: float = Field(5.0, gt=0, description="Longest per-product query timeout, whatever the product's SLA says.")
    default_timeout_seconds: float = Field(2.0, gt=0, description="Per-product timeout of products without sla.queryLatencyP99.")
    route_threshold: float = Field(DEFAULT_THRESHOLD, ge=0, le=1, description="Minimum routing score (0..1) for a product to be asked.")
    max_products: int = Field(10, ge=1, le=50, description="Products asked per question unless the request's maxProducts says otherwise.")
    fanout_concurrency: int = Field(16, ge=1, description="Products queried at the same time for one request.")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond).")
    transform_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of a product's inference endpoint on /transform.")
    watch_timeout_seconds: int = Field(60, ge=5, description="Seconds the API server keeps a catalog watch open before it is renewed.")
    log_level: str = Field("info", description="uvicorn log level.")


# ==== request and response models ============================================================


class ApiModel(BaseModel):
    """camelCase on the wire; unknown fields are refused so typos do not pass silently."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they are not text and break every encoder downstream.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from exc
    return text


Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000), AfterValidator(_encodable)]
Limit = Annotated[int, Field(ge=1, le=100, description="Hits per product.")]
ProductName = Annotated[str, StringConstraints(max_length=317, pattern=_PRODUCT_PATTERN)]
DomainName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
NamespaceParam = Annotated[str, Path(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN, examples=["sales"])]
NameParam = Annotated[str, Path(min_length=1, max_length=253, pattern=_NAME_PATTERN, examples=["customer-churn"])]


class QueryRequest(ApiModel):
    """A question for the whole mesh."""

    question: Question = Field(description="The question, in plain words (1..2000 characters).")
    domains: list[DomainName] | None = Field(None, max_length=50, description="Only products of these domains.")
    products: list[ProductName] | None = Field(None, max_length=50, description="Only these products ('namespace/name'); they are asked whatever their routing score.")
    limit: Limit = 5
    max_products: int | None = Field(None, ge=1, le=50, description="Ask at most this many products (default from the service settings).")


class ProductQueryRequest(ApiModel):
    """A question for one product."""

    question: Question = Field(description="The question, in plain words (1..2000 characters).")
    limit: Limit = 5


class TransformRequest(BaseModel):
    """Records for a product's inference runtime; every other field (e.g. ``task``) passes through unchanged."""

    model_config = ConfigDict(extra="allow")

    records: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_RECORDS, description="The records to transform (at most 1000).")
    task: Any = Field(None, description="What the runtime should do, in the runtime's terms (built-in runtime: 'classify' or 'enrich', with 'field', 'labels' or 'prompt').")


class Hit(ApiModel):
    id: str
    score: float = Field(description="Similarity from the product's own collection (comparable within a product only).")
    text: str | None = Field(None, description="The key-field text that was embedded.")
    payload: dict[str, Any] = Field(default_factory=dict, description="The row's fields.")


class ProductResult(ApiModel):
    product: str
    hits: list[Hit]
    latency_ms: float


class MergedHit(ApiModel):
    product: str
    id: str
    score: float = Field(description=f"Reciprocal rank fusion score, sum of 1/({RRF_K} + rank).")
    text: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)


class RoutedProduct(ApiModel):
    product: str
    score: float = Field(description="Routing score in [0, 1].")
    why: str
    degraded: bool = False


class ProductError(ApiModel):
    product: str
    error: str
    kind: str = Field(description="timeout, embedding (the question could not be embedded) or vector_store (the search failed).")


class QueryResponse(ApiModel):
    routed_to: list[RoutedProduct]
    results: list[ProductResult]
    merged: list[MergedHit]
    errors: list[ProductError]
    message: str | None = None
    latency_ms: float = 0.0


class QueryFailure(ApiModel):
    detail: str
    routed_to: list[RoutedProduct]
    errors: list[ProductError]


class ProductList(ApiModel):
    products: list[CatalogEntry]
    count: int


class TransformResponse(ApiModel):
    product: str
    records: list[dict[str, Any]] = Field(description=f"Each input record with the model's output under '{INFERENCE_KEY}'.")
    model: str | None = Field(None, description="The model the runtime says it used, when it says.")
    latency_ms: float


class ErrorBody(BaseModel):
    detail: Any


QUERY_EXAMPLES = {
    "question": {"summary": "Ask the whole mesh", "value": {"question": "why do enterprise customers churn after a price increase?", "limit": 5}},
    "filtered": {"summary": "Only some domains", "value": {"question": "which shipments were delayed by weather?", "domains": ["logistics"], "maxProducts": 3}},
    "named": {"summary": "Named products", "value": {"question": "disputed invoices about VAT", "products": ["finance/invoice-disputes"], "limit": 10}},
}
PRODUCT_QUERY_EXAMPLES = {"question": {"summary": "Ask one product", "value": {"question": "customers leaving because of price", "limit": 5}}}
TRANSFORM_EXAMPLES = {
    "classify": {
        "summary": "Zero-shot classification of a text field (built-in runtime)",
        "value": {
            "task": "classify",
            "field": "churn_reason",
            "records": [{"customer_id": "C-1", "churn_reason": "The price went up 40% at renewal."}],
            "labels": [
                {"name": "price", "description": "price increases, cost, budget, too expensive"},
                {"name": "product", "description": "missing features, bugs, performance, usability"},
            ],
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody, "description": "Missing or invalid bearer token."}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such product, or the caller may not read it."}}


# ==== JSON, body size and metrics =============================================================


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by null (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: ASCII escapes (lone surrogates survive), non-finite numbers as null."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class _BodyTooLarge(HTTPException):
    # An HTTPException, because FastAPI turns any other error while reading a body into a 400.
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(max_bytes))


def _too_large(max_bytes: int) -> str:
    return f"request body is larger than {max_bytes} bytes"


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = SafeJSONResponse({"detail": _too_large(self.max_bytes)}, status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, source: CatalogSource) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("datamesh_query_requests_total", "HTTP requests by route and status.", ["route", "status"], registry=r)
        self.duration = Histogram("datamesh_query_request_duration_seconds", "HTTP request latency by route.", ["route"], registry=r)
        self.product_seconds = Histogram(
            "datamesh_query_product_duration_seconds", "Latency of one product's part of a query, by outcome.", ["outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.product_errors = Counter("datamesh_query_product_errors_total", "Per-product query errors by kind.", ["kind"], registry=r)
        self.routed = Histogram("datamesh_query_routed_products", "Products a question was routed to.", buckets=(0, 1, 2, 3, 5, 10, 20, 50), registry=r)
        self.routing_seconds = Histogram("datamesh_query_routing_seconds", "Time to route a question.", buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1), registry=r)
        Gauge("datamesh_query_catalog_products", "Products in the catalog as the service sees it.", registry=r).set_function(lambda: len(source.entries()))
        Gauge("datamesh_query_catalog_loaded", "1 once the catalog has been read.", registry=r).set_function(lambda: float(source.loaded))


class RequestMetrics(RequestObserver):
    """Counts and times every HTTP request by route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.duration.labels(route).observe(seconds)


class ApiError(Exception):
    """A 4xx/5xx answer with a ``detail`` message and optional extra fields."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


# ==== fan-out =================================================================================


class ProductFailure(Exception):
    """One product could not answer; ``kind`` classifies why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class QuestionVectors:
    """The question embedded once per distinct (model, endpoint) within one request."""

    def __init__(self, question: str) -> None:
        self.question = question
        self._tasks: dict[tuple[str, str | None], asyncio.Task[list[float]]] = {}

    async def vector(self, entry: CatalogEntry) -> list[float]:
        key = (entry.embedding_model or DEFAULT_MODEL, entry.embedding_endpoint)
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.create_task(self._embed(*key))
        # Shielded: one product timing out must not cancel the embedding other products await.
        return await asyncio.shield(task)

    async def _embed(self, model: str, endpoint: str | None) -> list[float]:
        (vector,) = await resolve_provider(model, endpoint).embed([self.question])
        return vector

    async def close(self) -> None:
        """Cancel embeddings nobody waits for any more (their products timed out)."""
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _hit(point: Any) -> Hit:
    payload = dict(point.payload or {})
    text = payload.get(TEXT_KEY)
    # Keys with a leading underscore are the platform's bookkeeping, never row fields.
    return Hit(id=str(point.id), score=float(point.score), text=text, payload={k: v for k, v in payload.items() if not k.startswith("_")})


def reciprocal_rank_fusion(results: list[ProductResult], limit: int, k: int = RRF_K) -> list[MergedHit]:
    """One ranking from per-product rankings: score = 1/(k + rank); ties keep the routing order."""
    fused: list[tuple[float, int, int, MergedHit]] = []
    for order, result in enumerate(results):
        for rank, hit in enumerate(result.hits, start=1):
            score = 1.0 / (k + rank)
            fused.append((-score, order, rank, MergedHit(product=result.product, id=hit.id, score=round(score, 6), text=hit.text, payload=hit.payload)))
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

    def __init__(self, store: VectorStore, settings: QuerySettings, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics

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
                points = await self.store.search(entry.collection, vector, limit)
            return ProductResult(product=product_ref(entry), hits=[_hit(p) for p in points], latency_ms=_ms(started))
        except TimeoutError:
            outcome = "timeout"
            p99 = entry.sla.query_latency_p99 if entry.sla else None
            basis = f"sla.queryLatencyP99 {p99}" if p99 else "the default timeout"
            stalled = "embedding the question" if stage == "embedding" else "searching the collection"
            raise ProductFailure("timeout", f"no answer within {timeout * 1000:.0f} ms ({basis}, service cap {self.settings.timeout_cap_seconds:g} s) while {stalled}") from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - whatever one product raises must not fail the others
            outcome = stage
            raise ProductFailure(stage, _failure_message(stage, exc)) from exc
        finally:
            self.metrics.product_seconds.labels(outcome).observe(time.perf_counter() - started)
            if outcome not in ("ok", "cancelled"):
                self.metrics.product_errors.labels(outcome).inc()

    async def fan_out(self, routes: list[Route], question: str, limit: int) -> tuple[list[ProductResult], list[ProductError]]:
        """Every routed product asked concurrently (bounded); results and errors in routing order."""
        vectors = QuestionVectors(question)
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


# ==== the app =================================================================================


_bearer = HTTPBearer(auto_error=False, description="A token from the service's tokens file.")


async def _caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Identity:
    # Declared through HTTPBearer so OpenAPI documents the scheme; the Authenticator decides.
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.identify(request.headers.get("authorization"))


Caller = Annotated[Identity, Depends(_caller)]


def _routed(route: Route) -> RoutedProduct:
    return RoutedProduct(product=route.product, score=route.score, why=route.why, degraded=route.degraded)


def _transform_url(endpoint: str) -> str:
    base = endpoint.strip().rstrip("/").removesuffix("/v1")
    return f"{base}/v1/transform"


def create_app(source: CatalogSource, store: VectorStore, settings: QuerySettings, authenticator: Authenticator) -> FastAPI:
    """The query service over a catalog source and a vector store; starts and stops the source with the app."""
    metrics = Metrics(source)
    engine = QueryEngine(store, settings, metrics)
    router = Router()
    state: dict[str, httpx.AsyncClient] = {}

    def http() -> httpx.AsyncClient:
        # Created on first use, on the serving loop (httpx clients belong to one event loop).
        if "client" not in state:
            # Bounded connections; retries=1 repeats only failed connection attempts, which never reached the runtime.
            transport = httpx.AsyncHTTPTransport(retries=1, limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
            state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(settings.transform_timeout_seconds, connect=5.0), transport=transport)
        return state["client"]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await source.start()
        try:
            yield
        finally:
            await source.stop()
            if "client" in state:
                await state.pop("client").aclose()

    app = FastAPI(
        title="Datamesh federated query service",
        version="0.1.0",
        description=(
            "Ask questions across every data product of the mesh, or query and transform one product. "
            "Callers authenticate with a bearer token and only ever see products whose access.consumers admit them."
        ),
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.authenticator = authenticator
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": [_validation_item(e) for e in exc.errors()]}, status_code=422)

    def visible(identity: Identity) -> dict[str, CatalogEntry]:
        return {k: e for k, e in source.entries().items() if can_read(identity, e)}

    def one_product(identity: Identity, namespace: str, name: str) -> CatalogEntry:
        entry = source.entries().get(entry_key(namespace, name))
        if entry is None or not can_read(identity, entry):
            # The same answer for "missing" and "not yours": existence is not disclosed.
            raise ApiError(404, f"product {namespace}/{name} not found")
        return entry

    @app.get("/healthz", tags=["health"], response_class=PlainTextResponse)
    async def healthz() -> str:
        """Liveness: the process serves HTTP."""
        return "ok"

    @app.get("/readyz", tags=["health"], response_class=PlainTextResponse, responses={503: {"description": "The catalog is not loaded yet."}})
    async def readyz() -> PlainTextResponse:
        """Readiness: the catalog has been loaded."""
        if not source.loaded:
            return PlainTextResponse("catalog not loaded yet", status_code=503)
        return PlainTextResponse(f"ok: {len(source.entries())} products")

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus metrics of this service."""
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/query",
        tags=["query"],
        response_model=QueryResponse,
        response_model_by_alias=True,
        responses={**_ERRORS, 502: {"model": QueryFailure, "description": "Every routed product failed."}, 503: {"model": QueryFailure, "description": "Every routed product timed out, or the catalog is not loaded."}},
    )
    async def query(identity: Caller, body: Annotated[QueryRequest, Body(openapi_examples=QUERY_EXAMPLES)]) -> Any:
        """Route a question to the relevant products, ask them concurrently, and merge their hits."""
        started = time.perf_counter()
        if not source.loaded:
            raise ApiError(503, "the catalog is not loaded yet")
        t0 = time.perf_counter()
        routes = await router.route(
            body.question,
            visible(identity),
            domains=body.domains,
            products=body.products,
            threshold=settings.route_threshold,
            max_products=body.max_products or settings.max_products,
            caller=identity,
        )
        metrics.routing_seconds.observe(time.perf_counter() - t0)
        metrics.routed.observe(len(routes))
        routed = [_routed(r) for r in routes]
        if not routes:
            filters = " matching the domains/products filters" if body.domains or body.products else ""
            message = f"no product you may read{filters} is relevant enough to this question (routing threshold {settings.route_threshold:g}); try naming domains or products"
            return QueryResponse(routed_to=[], results=[], merged=[], errors=[], message=message, latency_ms=_ms(started))
        results, errors = await engine.fan_out(routes, body.question, body.limit)
        if not results:
            status = 503 if all(e.kind == "timeout" for e in errors) else 502
            failure = QueryFailure(detail=f"all {len(routes)} routed products failed: " + "; ".join(f"{e.product}: {e.error}" for e in errors), routed_to=routed, errors=errors)
            return SafeJSONResponse(failure.model_dump(by_alias=True, mode="json"), status_code=status)
        merged = reciprocal_rank_fusion(results, body.limit)
        message = f"{len(errors)} of {len(routes)} products failed; results are partial" if errors else None
        answer = QueryResponse(routed_to=routed, results=results, merged=merged, errors=errors, message=message, latency_ms=_ms(started))
        # Built from validated parts: returning a response skips FastAPI's second validation of the hot path.
        return SafeJSONResponse(answer.model_dump(by_alias=True, mode="json"))

    @app.get("/v1/products", tags=["catalog"], response_model=ProductList, response_model_by_alias=True, response_model_exclude_none=True, responses=_ERRORS)
    async def list_products(
        identity: Caller,
        domain: Annotated[str | None, Query(max_length=63, description="Only this domain.")] = None,
        tag: Annotated[str | None, Query(max_length=253, description="Only products with this tag.")] = None,
        phase: Annotated[str | None, Query(max_length=32, description="Only this phase (Ready, Degraded, ...).")] = None,
    ) -> Any:
        """The catalog: every product the caller may read, optionally filtered."""
        chosen = [
            e for e in visible(identity).values()
            if (domain is None or e.domain.lower() == domain.lower())
            and (tag is None or tag.lower() in (t.lower() for t in e.tags))
            and (phase is None or (e.phase or "").lower() == phase.lower())
        ]
        chosen.sort(key=product_ref)
        return ProductList(products=chosen, count=len(chosen))

    @app.get(
        "/v1/products/{namespace}/{name}", tags=["catalog"], response_model=CatalogEntry, response_model_by_alias=True,
        response_model_exclude_none=True, responses={**_ERRORS, **_NOT_FOUND},
    )
    async def show_product(identity: Caller, namespace: NamespaceParam, name: NameParam) -> Any:
        """One product's catalog entry."""
        return one_product(identity, namespace, name)

    @app.post(
        "/v1/products/{namespace}/{name}/query", tags=["query"], response_model=ProductResult, response_model_by_alias=True,
        responses={**_ERRORS, **_NOT_FOUND, 409: {"model": ErrorBody, "description": "The product has no semantic search."}, 502: {"model": ErrorBody}, 504: {"model": ErrorBody}},
    )
    async def query_product(
        identity: Caller, namespace: NamespaceParam, name: NameParam, body: Annotated[ProductQueryRequest, Body(openapi_examples=PRODUCT_QUERY_EXAMPLES)]
    ) -> Any:
        """Semantic search on one product."""
        entry = one_product(identity, namespace, name)
        if not entry.collection:
            raise ApiError(409, f"product {namespace}/{name} has no semantic search collection (phase {entry.phase or 'unknown'})")
        vectors = QuestionVectors(body.question)
        try:
            return await engine.ask(entry, vectors, body.limit)
        except ProductFailure as failure:
            raise ApiError(504 if failure.kind == "timeout" else 502, f"product {namespace}/{name}: {failure}", kind=failure.kind) from None
        finally:
            await vectors.close()

    @app.post(
        "/v1/products/{namespace}/{name}/transform", tags=["inference"], response_model=TransformResponse, response_model_by_alias=True,
        responses={
            **_ERRORS, **_NOT_FOUND, 400: {"model": ErrorBody, "description": "Refused by the runtime."}, 409: {"model": ErrorBody, "description": "The product has no inference endpoint."},
            413: {"model": ErrorBody, "description": "Body too large, or too many records for the runtime."}, 422: {"description": "Invalid request, or refused by the runtime."},
            502: {"model": ErrorBody, "description": "The runtime is unreachable or answered wrongly."}, 504: {"model": ErrorBody, "description": "The runtime did not answer in time."},
        },
    )
    async def transform(
        identity: Caller, namespace: NamespaceParam, name: NameParam, body: Annotated[TransformRequest, Body(openapi_examples=TRANSFORM_EXAMPLES)]
    ) -> Any:
        """Send records to the product's inference runtime; its output lands in each record under ``_inference``."""
        entry = one_product(identity, namespace, name)
        if not entry.inference_endpoint:
            raise ApiError(409, f"product {namespace}/{name} has no inference endpoint")
        started = time.perf_counter()
        url = _transform_url(entry.inference_endpoint)
        payload = body.model_dump(mode="json", exclude_unset=True)  # exactly what the caller sent
        try:
            response = await http().post(url, json=payload)
        except httpx.TimeoutException:
            raise ApiError(504, f"the inference runtime of {namespace}/{name} did not answer within {settings.transform_timeout_seconds:g} s") from None
        except httpx.HTTPError as exc:
            raise ApiError(502, f"the inference runtime of {namespace}/{name} is unreachable: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        if response.status_code in (400, 413, 422):
            # The caller's request is what the runtime refused: pass its verdict on as the same 4xx.
            raise ApiError(response.status_code, f"the inference runtime of {namespace}/{name} refused the request: {server_message(response, limit=300)}")
        if response.status_code != 200:
            raise ApiError(502, f"the inference runtime of {namespace}/{name} answered HTTP {response.status_code}: {server_message(response, limit=300)}")
        try:
            answer = response.json()
            outputs = answer["results"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(502, f"the inference runtime of {namespace}/{name} sent no 'results' list") from None
        if not isinstance(outputs, list) or len(outputs) != len(body.records):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise ApiError(502, f"the inference runtime of {namespace}/{name} returned {got} results for {len(body.records)} records")
        records = [{**record, INFERENCE_KEY: output} for record, output in zip(body.records, outputs, strict=True)]
        model = answer.get("model") if isinstance(answer.get("model"), str) else None
        return TransformResponse(product=f"{namespace}/{name}", records=records, model=model, latency_ms=_ms(started))

    return app


_ECHO_LIMIT = 200


def _echo(value: Any) -> Any:
    """A request value as it may be echoed in an error: JSON-safe and short."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= _ECHO_LIMIT else value[:_ECHO_LIMIT] + "..."
    try:
        encoded = json.dumps(jsonable_encoder(value), ensure_ascii=True)
    except (TypeError, ValueError):
        return _echo(repr(value))
    return value if len(encoded) <= _ECHO_LIMIT else _echo(encoded)


def _validation_item(error: Mapping[str, Any]) -> dict[str, Any]:
    """One pydantic/FastAPI validation error in FastAPI's shape, safe to serialise (bodies can be bytes)."""
    item: dict[str, Any] = {"type": error.get("type"), "loc": [str(p) if not isinstance(p, int) else p for p in error.get("loc", ())], "msg": error.get("msg")}
    if "input" in error:
        item["input"] = _echo(error["input"])
    if error.get("ctx"):
        item["ctx"] = {k: str(v) for k, v in error["ctx"].items()}
    return item


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


async def serve(host: str, port: int, settings: QuerySettings | None = None, store: VectorStore | None = None) -> None:
    """Run the query service until interrupted: catalog from the file or the Kubernetes watch, Qdrant from ``DATAMESH_QDRANT_*``."""
    from datamesh.settings import get_settings

    settings = settings or QuerySettings()
    owned = store is None
    if store is None:
        operator = get_settings()
        # As many Qdrant requests at once as products are asked at once: the store must not be the narrower bound.
        store = VectorStore.connect(
            operator.qdrant_url, operator.qdrant_path, operator.qdrant_api_key, operator.qdrant_timeout, concurrency=settings.fanout_concurrency
        )
    source: CatalogSource
    if settings.catalog_file:
        source = FileCatalogSource(settings.catalog_file)
    else:
        source = KubeCatalogSource(settings.catalog_namespace, timeout_seconds=settings.watch_timeout_seconds)
    app = create_app(source, store, settings, Authenticator.from_settings(settings))
    config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level, access_log=False, lifespan="on")
    try:
        await uvicorn.Server(config).serve()
    finally:
        if owned:
            await store.close()
