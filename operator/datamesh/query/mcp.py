"""The mesh as MCP tools for AI agents: list, describe and ask data products, over stdio or streamable HTTP.

The tools call the functions the REST API calls (:mod:`datamesh.query.service`), so access rules,
candidate selection, ``QueryEngine.answer`` and PII masking are the same as on ``POST /v1/query``.
Who calls: on HTTP, the bearer token of each request, checked against the query service's tokens
file (anonymous only when allowed); on stdio, the token the server was started with. The query
service serves the tools at ``/mcp`` when ``DATAMESH_QUERY_MCP`` is on; ``datamesh mcp`` serves
them alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from datamesh.adapters.stores import open_store
from datamesh.core.ports import VectorStore
from datamesh.query import service
from datamesh.query.access import Authenticator, Identity, Unauthenticated, can_read_pii
from datamesh.query.catalog_sources import CatalogSource, source_of
from datamesh.query.engine import QueryEngine
from datamesh.query.metrics import Metrics
from datamesh.query.routing import routable
from datamesh.query.schemas import (
    MERGED_LIMIT,
    PER_PRODUCT,
    DomainName,
    Domains,
    Hit,
    Limit,
    MaxProducts,
    MergedLimit,
    ProductError,
    ProductRef,
    Products,
    QueryRequest,
    Question,
    RoutedProduct,
)
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CatalogEntry, ConditionSummary, FieldSummary, SLASummary
from datamesh.settings import StoreSettings
from datamesh.web.errors import ApiError, detail_response
from datamesh.web.serving import LOOPBACK, serve_forever

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
SERVER_NAME = "datamesh"

INSTRUCTIONS = (
    "Datamesh answers questions from the rows of an organisation's data products (customer churn reasons, "
    "shipment delays, support tickets, ...). Start with `ask` for a question in plain words: it picks the "
    "products whose rows answer it and returns the matching rows, best first, each with its product and primary "
    "key. Use `list_products` and `describe_product` to see what exists and what its fields mean, and "
    "`ask_product` to search one product more deeply. You only ever see products your identity may read; "
    "personal data fields come back masked (null) unless you are allowed to read them."
)


# ==== what the tools return (camelCase, as the REST API) ========================================


class AgentModel(BaseModel):
    """camelCase on the wire, like the REST API."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ProductSummary(AgentModel):
    """One product, in a line."""

    product: str = Field(description="'namespace/name': what describe_product and ask_product take.")
    domain: str
    description: str
    owner: str | None = Field(None, description="The owning team.")
    phase: str | None = Field(None, description="Ready, Degraded, Provisioning, Pending or Failed.")
    records: int | None = Field(None, description="Rows the product holds.")
    tags: list[str] = Field(default_factory=list)
    answers_questions: bool = Field(description="Whether ask and ask_product can search it now.")


class ProductListing(AgentModel):
    """The products the caller may read."""

    products: list[ProductSummary]
    count: int


class ProductDetails(ProductSummary):
    """Everything the catalog knows about one product that helps to read its rows."""

    fields: list[FieldSummary] = Field(description="The schema: each field's name, type, meaning, key and PII flags.")
    primary_key: list[str] = Field(description="The fields whose values make up a row's key.")
    key_fields: list[str] = Field(description="The fields whose text is searched.")
    sla: SLASummary | None = Field(None, description="Declared freshness, availability and query latency.")
    conditions: list[ConditionSummary] = Field(
        description="The product's conditions that are not True (empty when it is healthy): what is wrong and why."
    )
    consumers: list[str] = Field(description="Who may read it ('*', identities, 'group:<name>').")
    pii_visible: bool = Field(description="Whether you see the values of its PII fields (else they come back null).")
    inference: bool = Field(description="Whether it has an inference endpoint (transform via the REST API).")


class AnswerHit(AgentModel):
    """A row that answers the question, in the merged ranking."""

    product: str = Field(description="The product holding the row, 'namespace/name'.")
    key: Any = Field(description="The row's primary key (a list of values for a composite key).")
    score: float = Field(description="Merged score: comparable across products, higher is better.")
    text: str | None = Field(None, description="The row's searched text.")
    fields: dict[str, Any] = Field(default_factory=dict, description="The row's fields (PII masked as null).")
    masked: list[str] = Field(default_factory=list, description="Fields masked as personal data.")


class AgentAnswer(AgentModel):
    """A question's answer: where it went, the rows that answer it best first, and what failed."""

    routed_to: list[RoutedProduct] = Field(description="The products asked, with why each was chosen.")
    low_confidence: bool = Field(description="No product clearly holds the answer: read the hits with care.")
    confidence_note: str | None = Field(None, description="Why the answer is low-confidence.")
    hits: list[AnswerHit] = Field(description="The merged ranking, best first.")
    errors: list[ProductError] = Field(default_factory=list, description="Products that could not answer.")
    message: str | None = None


class ProductAnswer(AgentModel):
    """One product's rows that answer a question, best first."""

    product: str
    hits: list[Hit]


# ==== who calls ==================================================================================


class Callers:
    """Who calls a tool: the request's bearer token on HTTP, the server's own token on stdio."""

    def __init__(self, authenticator: Authenticator, stdio_token: str | None = None) -> None:
        self.authenticator = authenticator
        self.stdio_authorization = f"Bearer {stdio_token}" if stdio_token else None

    def identify(self, headers: Mapping[str, str] | None) -> Identity:
        """The identity of a call (``headers``: the HTTP request's, None on stdio); ToolError when refused."""
        authorization = self.stdio_authorization if headers is None else headers.get("authorization")
        try:
            return self.authenticator.identify(authorization)
        except Unauthenticated as exc:
            raise ToolError(str(exc)) from None


@contextmanager
def tool_errors() -> Iterator[None]:
    """An API error (not found, ambiguous, failed...) becomes a tool error with the same message."""
    try:
        yield
    except ApiError as exc:
        raise ToolError(exc.message) from None


# ==== the tools ==================================================================================

ProductParam = Annotated[
    ProductRef, Field(description="The product: 'namespace/name' as list_products shows it, or a bare name.")
]


class MeshTools:
    """The tool handlers: each identifies the caller, then calls the shared query service functions."""

    def __init__(self, source: CatalogSource, engine: QueryEngine, callers: Callers) -> None:
        self.source, self.engine, self.callers = source, engine, callers

    def _caller(self, ctx: Context) -> Identity:
        identity = self.callers.identify(ctx.headers)
        service.require_catalog(self.source)
        return identity

    async def list_products(
        self,
        ctx: Context,
        domain: Annotated[DomainName | None, Field(description="Only products of this domain, e.g. 'sales'.")] = None,
    ) -> ProductListing:
        """Every product the caller may read."""
        with tool_errors():
            products = [summary(e) for e in service.list_products(self.source, self._caller(ctx), domain=domain)]
        return ProductListing(products=products, count=len(products))

    async def describe_product(self, ctx: Context, product: ProductParam) -> ProductDetails:
        """One product's schema, SLA, status and access."""
        with tool_errors():
            identity = self._caller(ctx)
            return details(service.find_product(self.source, identity, product), identity)

    async def ask(
        self,
        ctx: Context,
        question: Question,
        domains: Domains | None = None,
        products: Products | None = None,
        limit: MergedLimit = MERGED_LIMIT,
        per_product: Limit = PER_PRODUCT,
        max_products: MaxProducts | None = None,
    ) -> AgentAnswer:
        """A question across the mesh: the same answer as POST /v1/query, its hits merged into one ranking."""
        request = QueryRequest(
            question=question,
            domains=domains,
            products=products,
            limit=limit,
            per_product=per_product,
            max_products=max_products,
        )
        with tool_errors():
            answer = await service.answer_question(self.engine, self.source, self._caller(ctx), request)
        if answer.status != 200:
            raise ToolError(str(answer.body["detail"]))  # every routed product failed: the causes
        return agent_answer(answer.body)

    async def ask_product(
        self,
        ctx: Context,
        product: ProductParam,
        question: Question,
        limit: Limit = PER_PRODUCT,
    ) -> ProductAnswer:
        """One product's rows that answer a question."""
        with tool_errors():
            identity = self._caller(ctx)
            entry = service.find_product(self.source, identity, product)
            answered = await service.ask_product(self.engine, entry, question, limit, identity)
        return ProductAnswer(product=answered["product"], hits=answered["hits"])


_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

DESCRIPTIONS = {
    "list_products": (
        "List the data products you may read: name ('namespace/name'), domain, description, owning team, phase, "
        "row count, tags, and whether it can answer questions now. Use it to see what data exists, optionally "
        "for one domain; then describe_product for a product's fields, or ask to query."
    ),
    "describe_product": (
        "Describe one data product: its fields (type, meaning, primary key, personal data), the searched fields, "
        "its SLA (freshness, availability, latency), its phase and any failing conditions with their reason, "
        "its owner and who may read it, and whether you see its personal data. Use it before reading a "
        "product's rows, or to find out why a product is not Ready. A product you may not read is not found."
    ),
    "ask": (
        "Answer a question in plain words from the rows of the data products: the question is routed to the "
        "products whose rows match it best, they are searched at once, and their rows come back merged into one "
        "ranking, best first. Each hit names its product and its row's primary key, with the row's text and "
        "fields (personal data masked as null unless you may read it). routedTo says which products were asked "
        "and why; lowConfidence with confidenceNote says when no product clearly holds the answer; errors lists "
        "products that failed. Narrow it with domains, or name products to ask exactly those. Start here."
    ),
    "ask_product": (
        "Search one data product for the rows that answer a question, best first, each with its primary key, "
        "text, fields (personal data masked unless you may read it) and scores. Use it to dig deeper into a "
        "product that ask routed to, or when you already know which product holds the answer."
    ),
}


def create_mcp_server(source: CatalogSource, engine: QueryEngine, callers: Callers) -> MCPServer:
    """The MCP server with the mesh's tools over a catalog source and a query engine."""
    server: MCPServer = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, version="0.1.0")
    tools = MeshTools(source, engine, callers)
    handlers: dict[str, Callable[..., Awaitable[BaseModel]]] = {
        "list_products": tools.list_products,
        "describe_product": tools.describe_product,
        "ask": tools.ask,
        "ask_product": tools.ask_product,
    }
    for name, handler in handlers.items():
        server.add_tool(
            handler, name=name, description=DESCRIPTIONS[name], annotations=_READ_ONLY, structured_output=True
        )
    return server


# ==== shaping =====================================================================================


def summary(entry: CatalogEntry) -> ProductSummary:
    """A product's line in list_products."""
    return ProductSummary(
        product=entry.product,
        domain=entry.domain,
        description=entry.description,
        owner=entry.owner,
        phase=entry.phase,
        records=entry.records,
        tags=entry.tags,
        answers_questions=routable(entry),
    )


def details(entry: CatalogEntry, identity: Identity) -> ProductDetails:
    """A product as describe_product shows it to ``identity``."""
    return ProductDetails(
        **summary(entry).model_dump(),
        fields=entry.fields,
        primary_key=entry.primary_key,
        key_fields=entry.key_fields,
        sla=entry.sla,
        # Only what is wrong: Ready restates the others, and a True condition's message is not kept.
        conditions=[c for c in entry.conditions if c.status != "True" and c.type != "Ready"],
        consumers=entry.consumers,
        pii_visible=can_read_pii(identity, entry),
        inference=bool(entry.inference_endpoint),
    )


def agent_answer(answer: dict[str, Any]) -> AgentAnswer:
    """The REST answer with its merged ranking joined to the hits it points at (one list for an agent to read)."""
    hits = {(h["product"], json.dumps(h["key"])): h for r in answer["results"] for h in r["hits"]}
    merged = []
    for m in answer["merged"]:
        hit = hits.get((m["product"], json.dumps(m["key"])), {})
        merged.append(
            AnswerHit(
                product=m["product"],
                key=m["key"],
                score=m["score"],
                text=hit.get("text"),
                fields=hit.get("fields", {}),
                masked=hit.get("masked", []),
            )
        )
    return AgentAnswer(
        routed_to=answer["routedTo"],
        low_confidence=answer["lowConfidence"],
        confidence_note=answer["confidenceNote"],
        hits=merged,
        errors=answer["errors"],
        message=answer.get("message"),
    )


# ==== HTTP ========================================================================================


class BearerGate:
    """Answers 401 (with the challenge, as the REST API) to HTTP requests the authenticator refuses, before MCP."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app, self.authenticator = app, authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                self.authenticator.identify(Headers(scope=scope).get("authorization"))
            except Unauthenticated as exc:
                await detail_response(ApiError(401, str(exc), headers=exc.challenge))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class McpEndpoint:
    """The tools as a streamable HTTP endpoint behind the bearer gate, for any host app to route to."""

    def __init__(
        self,
        source: CatalogSource,
        engine: QueryEngine,
        authenticator: Authenticator,
        *,
        host: str = LOOPBACK,
        max_body_bytes: int = 1024 * 1024,
    ) -> None:
        self.server = create_mcp_server(source, engine, Callers(authenticator))
        # Stateless, JSON answers: any replica serves any request (no sticky sessions), and the tools
        # need no server-to-client requests. Served on a loopback address, the SDK also refuses
        # requests whose Host is not a loopback one (DNS rebinding by a web page).
        app = self.server.streamable_http_app(
            streamable_http_path=MCP_PATH,
            stateless_http=True,
            json_response=True,
            host=host,
            max_request_body_size=max_body_bytes,
        )
        self.route = Route(MCP_PATH, endpoint=BearerGate(app, authenticator))

    def running(self) -> AbstractAsyncContextManager[None]:
        """The endpoint's background work, for the host app's lifespan (a mounted app's own never runs)."""
        return self.server.session_manager.run()


def create_mcp_app(
    source: CatalogSource,
    store: VectorStore,
    settings: QuerySettings,
    authenticator: Authenticator,
    *,
    host: str = LOOPBACK,
) -> Starlette:
    """``datamesh mcp --http``: the tools at /mcp, with /healthz and /readyz; starts and stops the source."""
    engine = QueryEngine(store, settings, Metrics(source))
    endpoint = McpEndpoint(source, engine, authenticator, host=host, max_body_bytes=settings.max_body_bytes)

    async def healthz(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def readyz(_: Request) -> PlainTextResponse:
        if not source.loaded:
            return PlainTextResponse("catalog not loaded yet", status_code=503)
        return PlainTextResponse("ok")

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await source.start()
        try:
            async with endpoint.running():
                yield
        finally:
            await source.stop()

    routes = [endpoint.route, Route("/healthz", healthz), Route("/readyz", readyz)]
    return Starlette(routes=routes, lifespan=lifespan)


# ==== stdio =======================================================================================


def stdio_identity(authenticator: Authenticator, token: str | None) -> Identity:
    """Who a stdio server acts for: ``token``'s identity, or anonymous when allowed; Unauthenticated otherwise."""
    if token is None and not authenticator.allow_anonymous:
        raise Unauthenticated(
            "no identity: pass --token (a token of DATAMESH_QUERY_TOKENS_FILE), or allow anonymous callers "
            "with DATAMESH_QUERY_ALLOW_ANONYMOUS=true (they see only products open to '*')",
            {},
        )
    return authenticator.identify(f"Bearer {token}" if token else None)


async def serve_mcp(
    settings: QuerySettings,
    authenticator: Authenticator,
    *,
    store: VectorStore | None = None,
    http: tuple[str, int] | None = None,
    token: str | None = None,
) -> None:
    """``datamesh mcp``: the tools on stdio as ``token``'s identity (checked on every call), or on HTTP at
    ``http`` (host, port) until interrupted; the catalog as the settings say, the store from ``DATAMESH_QDRANT_*``
    unless given."""
    owned = store is None
    if store is None:
        store_settings = StoreSettings()
        if store_settings.url is None and store_settings.path == ":memory:":
            log.warning(
                "DATAMESH_QDRANT_URL and DATAMESH_QDRANT_PATH are unset: the store is empty and in memory, so no "
                "product can answer; point them at the store the catalog describes, or use --state-dir"
            )
        store = open_store(store_settings, concurrency=settings.fanout_concurrency)
    source = source_of(settings)
    try:
        if http is not None:
            app = create_mcp_app(source, store, settings, authenticator, host=http[0])
            await serve_forever(app, host=http[0], port=http[1], log_level=settings.log_level)
            return
        engine = QueryEngine(store, settings, Metrics(source))
        server = create_mcp_server(source, engine, Callers(authenticator, token))
        await source.start()
        try:
            await server.run_stdio_async()
        finally:
            await source.stop()
    finally:
        if owned:
            await store.close()
