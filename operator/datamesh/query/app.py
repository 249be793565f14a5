"""The federated query service: one HTTP API over every product of the mesh.

``POST /v1/query`` routes a question to the relevant products (``routing``), asks them
concurrently, each with its own embedding model and a timeout from its SLA (``engine``), and
returns hits per product, one merged ranking and per-product errors. Callers only ever see
products their identity may read (``access``); ``/`` is a catalog page over this API (``page``).
Run it with :func:`serve`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import uvicorn
from fastapi import Body, Depends, FastAPI, Query, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.http import api_url, server_message
from datamesh.adapters.stores import open_store
from datamesh.core.ports import EmbedderResolver, VectorStore
from datamesh.query import service
from datamesh.query.access import Authenticator, Identity, Unauthenticated
from datamesh.query.catalog_sources import CatalogSource, source_of
from datamesh.query.engine import QueryEngine, elapsed_ms
from datamesh.query.mcp import McpEndpoint
from datamesh.query.metrics import Metrics, RequestMetrics
from datamesh.query.page import add_catalog_page
from datamesh.query.schemas import (
    ERRORS,
    INFERENCE_KEY,
    NOT_FOUND,
    PRODUCT_QUERY_EXAMPLES,
    QUERY_EXAMPLES,
    TRANSFORM_EXAMPLES,
    NameParam,
    NamespaceParam,
    ProductList,
    ProductQueryRequest,
    ProductResult,
    QueryFailure,
    QueryRequest,
    QueryResponse,
    SampleResponse,
    TransformRequest,
    TransformResponse,
)
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CatalogEntry
from datamesh.settings import StoreSettings
from datamesh.web.errors import ApiError, DetailBody, detail_response
from datamesh.web.json import SafeJSONResponse
from datamesh.web.limits import BodySizeLimit
from datamesh.web.serving import LOOPBACK


def authenticator_of(settings: QuerySettings) -> Authenticator:
    """The authenticator the service settings describe."""
    return Authenticator(tokens_file=settings.tokens_file, allow_anonymous=settings.allow_anonymous)


def _too_large(limit: int) -> Response:
    return detail_response(ApiError(413, f"request body is larger than {limit} bytes"))


_bearer = HTTPBearer(auto_error=False, description="A token from the service's tokens file.")


async def _caller(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Identity:
    # Declared through HTTPBearer so OpenAPI documents the scheme; the Authenticator decides.
    authenticator: Authenticator = request.app.state.authenticator
    try:
        return authenticator.identify(request.headers.get("authorization"))
    except Unauthenticated as exc:
        raise ApiError(401, str(exc), headers=exc.challenge) from None


Caller = Annotated[Identity, Depends(_caller)]


# What an endpoint that searches one product's collection may answer besides 200.
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    **NOT_FOUND,
    409: {"model": DetailBody, "description": "The product has no semantic search collection."},
    502: {"model": DetailBody},
    504: {"model": DetailBody},
}


def create_app(
    source: CatalogSource,
    store: VectorStore,
    settings: QuerySettings,
    authenticator: Authenticator,
    embedders: EmbedderResolver = resolve_provider,
    *,
    host: str = LOOPBACK,
) -> FastAPI:
    """The query service over a catalog source and a vector store; starts and stops the source with the app.

    ``host`` is the address it is served on: with ``settings.mcp``, a loopback one makes /mcp refuse other Hosts.
    """
    metrics = Metrics(source)
    engine = QueryEngine(store, settings, metrics, embedders)
    mcp = (
        McpEndpoint(source, engine, authenticator, host=host, max_body_bytes=settings.max_body_bytes)
        if settings.mcp
        else None
    )
    state: dict[str, httpx.AsyncClient] = {}

    def http() -> httpx.AsyncClient:
        # Created on first use, on the serving loop (httpx clients belong to one event loop).
        if "client" not in state:
            # Bounded connections; retries=1 repeats only failed connection attempts, which never reached the runtime.
            transport = httpx.AsyncHTTPTransport(
                retries=1, limits=httpx.Limits(max_connections=64, max_keepalive_connections=16)
            )
            state["client"] = httpx.AsyncClient(
                timeout=httpx.Timeout(settings.transform_timeout_seconds, connect=5.0), transport=transport
            )
        return state["client"]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await source.start()
        try:
            async with mcp.running() if mcp is not None else contextlib.nullcontext():
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
    if mcp is not None:
        app.router.routes.append(mcp.route)  # a plain ASGI route: not part of the REST API's OpenAPI
    add_catalog_page(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes, refuse=_too_large)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> SafeJSONResponse:
        return detail_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": [_validation_item(e) for e in exc.errors()]}, status_code=422)

    def one_product(identity: Identity, namespace: str, name: str) -> CatalogEntry:
        return service.find_product(source, identity, f"{namespace}/{name}")

    @app.get("/healthz", tags=["health"], response_class=PlainTextResponse)
    async def healthz() -> str:
        """Liveness: the process serves HTTP."""
        return "ok"

    @app.get(
        "/readyz",
        tags=["health"],
        response_class=PlainTextResponse,
        responses={503: {"description": "The catalog is not loaded yet."}},
    )
    async def readyz() -> PlainTextResponse:
        """Readiness: the catalog has been loaded."""
        if not source.loaded:
            return PlainTextResponse("catalog not loaded yet", status_code=503)
        return PlainTextResponse("ok")  # no count: readiness is unauthenticated

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus metrics of this service."""
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/query",
        tags=["query"],
        response_model=QueryResponse,
        response_model_by_alias=True,
        responses={
            **ERRORS,
            502: {"model": QueryFailure, "description": "Every routed product failed."},
            503: {
                "model": QueryFailure,
                "description": "Every routed product timed out, or the catalog is not loaded.",
            },
        },
    )
    async def query(identity: Caller, body: Annotated[QueryRequest, Body(openapi_examples=QUERY_EXAMPLES)]) -> Any:
        """Route a question to the relevant products, ask them concurrently, and merge their hits."""
        answer = await service.answer_question(engine, source, identity, body)
        # Built from plain values on the hot path: no per-hit validation round trip.
        return SafeJSONResponse(answer.body, status_code=answer.status)

    @app.get(
        "/v1/products",
        tags=["catalog"],
        response_model=ProductList,
        response_model_by_alias=True,
        response_model_exclude_none=True,
        responses=ERRORS,
    )
    async def list_products(
        identity: Caller,
        domain: Annotated[str | None, Query(max_length=63, description="Only this domain.")] = None,
        tag: Annotated[str | None, Query(max_length=253, description="Only products with this tag.")] = None,
        phase: Annotated[
            str | None, Query(max_length=32, description="Only this phase (Ready, Degraded, ...).")
        ] = None,
    ) -> Any:
        """The catalog: every product the caller may read, optionally filtered."""
        chosen = service.list_products(source, identity, domain=domain, tag=tag, phase=phase)
        return ProductList(products=chosen, count=len(chosen))

    @app.get(
        "/v1/products/{namespace}/{name}",
        tags=["catalog"],
        response_model=CatalogEntry,
        response_model_by_alias=True,
        response_model_exclude_none=True,
        responses={**ERRORS, **NOT_FOUND},
    )
    async def show_product(identity: Caller, namespace: NamespaceParam, name: NameParam) -> Any:
        """One product's catalog entry."""
        return one_product(identity, namespace, name)

    @app.post(
        "/v1/products/{namespace}/{name}/query",
        tags=["query"],
        response_model=ProductResult,
        response_model_by_alias=True,
        responses=SEARCH_ERRORS,
    )
    async def query_product(
        identity: Caller,
        namespace: NamespaceParam,
        name: NameParam,
        body: Annotated[ProductQueryRequest, Body(openapi_examples=PRODUCT_QUERY_EXAMPLES)],
    ) -> Any:
        """Semantic search on one product."""
        entry = one_product(identity, namespace, name)
        return SafeJSONResponse(await service.ask_product(engine, entry, body.question, body.limit, identity))

    @app.get(
        "/v1/products/{namespace}/{name}/sample",
        tags=["catalog"],
        response_model=SampleResponse,
        response_model_by_alias=True,
        responses=SEARCH_ERRORS,
    )
    async def sample_product(
        identity: Caller,
        namespace: NamespaceParam,
        name: NameParam,
        limit: Annotated[int, Query(ge=1, le=50, description="Rows to return.")] = 5,
    ) -> Any:
        """A few of the product's rows, the same ones every time, with PII masked as in answers."""
        entry = one_product(identity, namespace, name)
        return SafeJSONResponse(await service.sample_product(engine, entry, limit, identity))

    @app.post(
        "/v1/products/{namespace}/{name}/transform",
        tags=["inference"],
        response_model=TransformResponse,
        response_model_by_alias=True,
        responses={
            **ERRORS,
            **NOT_FOUND,
            400: {"model": DetailBody, "description": "Refused by the runtime."},
            409: {"model": DetailBody, "description": "The product has no inference endpoint."},
            413: {"model": DetailBody, "description": "Body too large, or too many records for the runtime."},
            422: {"description": "Invalid request, or refused by the runtime."},
            502: {"model": DetailBody, "description": "The runtime is unreachable or answered wrongly."},
            504: {"model": DetailBody, "description": "The runtime did not answer in time."},
        },
    )
    async def transform(
        identity: Caller,
        namespace: NamespaceParam,
        name: NameParam,
        body: Annotated[TransformRequest, Body(openapi_examples=TRANSFORM_EXAMPLES)],
    ) -> Any:
        """Send records to the product's inference runtime; its output lands in each record under ``_inference``."""
        entry = one_product(identity, namespace, name)
        if not entry.inference_endpoint:
            raise ApiError(409, f"product {namespace}/{name} has no inference endpoint")
        started = time.perf_counter()
        url = api_url(entry.inference_endpoint, "transform")
        payload = body.model_dump(mode="json", exclude_unset=True)  # exactly what the caller sent
        try:
            response = await http().post(url, json=payload)
        except httpx.TimeoutException:
            raise ApiError(
                504,
                f"the inference runtime of {namespace}/{name} did not answer within "
                f"{settings.transform_timeout_seconds:g} s",
            ) from None
        except httpx.HTTPError as exc:
            raise ApiError(
                502,
                f"the inference runtime of {namespace}/{name} is unreachable: {type(exc).__name__}: {exc}".rstrip(": "),
            ) from None
        if response.status_code in (400, 413, 422):
            # The caller's request is what the runtime refused: pass its verdict on as the same 4xx.
            raise ApiError(
                response.status_code,
                f"the inference runtime of {namespace}/{name} refused the request: "
                f"{server_message(response, limit=300)}",
            )
        if response.status_code != 200:
            raise ApiError(
                502,
                f"the inference runtime of {namespace}/{name} answered HTTP {response.status_code}: "
                f"{server_message(response, limit=300)}",
            )
        try:
            answer = response.json()
            outputs = answer["results"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(502, f"the inference runtime of {namespace}/{name} sent no 'results' list") from None
        if not isinstance(outputs, list) or len(outputs) != len(body.records):
            got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise ApiError(
                502,
                f"the inference runtime of {namespace}/{name} returned {got} results for {len(body.records)} records",
            )
        records = [{**record, INFERENCE_KEY: output} for record, output in zip(body.records, outputs, strict=True)]
        model = answer.get("model") if isinstance(answer.get("model"), str) else None
        return TransformResponse(
            product=f"{namespace}/{name}", records=records, model=model, latency_ms=elapsed_ms(started)
        )

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
    item: dict[str, Any] = {
        "type": error.get("type"),
        "loc": [str(p) if not isinstance(p, int) else p for p in error.get("loc", ())],
        "msg": error.get("msg"),
    }
    if "input" in error:
        item["input"] = _echo(error["input"])
    if error.get("ctx"):
        item["ctx"] = {k: str(v) for k, v in error["ctx"].items()}
    return item


async def serve(host: str, port: int, settings: QuerySettings | None = None, store: VectorStore | None = None) -> None:
    """Run the query service until interrupted (catalog from a file or a watch, store from ``DATAMESH_QDRANT_*``)."""
    settings = settings or QuerySettings()
    owned = store is None
    if store is None:
        # As many store requests at once as products are asked at once: the store must not be the narrower bound.
        store = open_store(StoreSettings(), concurrency=settings.fanout_concurrency)
    app = create_app(source_of(settings), store, settings, authenticator_of(settings), host=host)
    config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level, access_log=False, lifespan="on")
    try:
        await uvicorn.Server(config).serve()
    finally:
        if owned:
            await store.close()
