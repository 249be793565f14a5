"""The built-in inference runtime (``datamesh inference-server``): what a product's inference Deployment runs.

``POST /v1/embeddings`` is OpenAI-compatible and serves the configured embedding provider;
``POST /v1/transform`` classifies a text field zero-shot by embedding similarity, or enriches it
through an OpenAI-compatible chat server; ``/healthz``, ``/readyz`` and ``/metrics`` for the platform.
Every error body has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

import httpx
import numpy as np
import uvicorn
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Scope

from datamesh.adapters.embeddings.builtin import cosine_scores
from datamesh.adapters.embeddings.openai import OpenAICompatibleProvider
from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.http import RetriesExhausted, api_url, request_with_retries, server_message
from datamesh.core.backoff import backoff_delay
from datamesh.core.ports import EmbeddingError, EmbeddingProvider
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL
from datamesh.web.errors import ApiError, OpenAIErrorResponse, openai_response
from datamesh.web.limits import BodySizeLimit
from datamesh.web.observe import RequestObserver

log = logging.getLogger(__name__)

_HTTP_URL = re.compile(r"^https?://\S+$")
# Word pieces and punctuation: close enough to a subword tokenizer's count for OpenAI's `usage`.
_USAGE_TOKEN = re.compile(r"\w+|[^\w\s]")
_LABEL_CACHE_SIZE = 4096


class RuntimeSettings(BaseSettings):
    """Settings of the inference runtime, read from ``DATAMESH_INFERENCE_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="DATAMESH_INFERENCE_", extra="ignore")

    model: str = Field(
        DEFAULT_EMBEDDING_MODEL, description="Embedding model served (any model string of datamesh.embeddings)."
    )
    embedding_endpoint: str | None = Field(
        None, description="OpenAI-compatible server to proxy embeddings to instead of computing them here."
    )
    embedding_api_key: SecretStr | None = Field(None, description="Bearer token for the embedding endpoint.")

    chat_endpoint: str | None = Field(
        None, description="OpenAI-compatible chat server (base URL) for task 'enrich'; unset disables it."
    )
    chat_model: str | None = Field(
        None, description="Model sent to the chat server; unset leaves it out (servers of one model accept that)."
    )
    chat_api_key: SecretStr | None = Field(None, description="Bearer token for the chat server.")
    chat_system_prompt: str = Field(
        "You enrich records of a data product. Follow the instruction, then answer with the result only.",
        description="System message of every enrichment call.",
    )
    chat_temperature: float = Field(
        0.0, ge=0, le=2, description="Sampling temperature of enrichment calls (0: as repeatable as the server allows)."
    )
    chat_max_tokens: int | None = Field(
        None, gt=0, description="Cap on generated tokens per record; unset uses the server's default."
    )
    chat_concurrency: int = Field(8, ge=1, le=256, description="Chat calls in flight at once, across all requests.")

    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to an outbound server.")
    request_timeout: float = Field(60.0, gt=0, description="Seconds per outbound request (one attempt).")
    retry_attempts: int = Field(
        3, ge=1, le=10, description="Attempts per outbound call on 429, 5xx and connection errors."
    )
    retry_base_seconds: float = Field(0.5, gt=0, description="First retry delay; doubles per attempt, with jitter.")
    retry_max_seconds: float = Field(8.0, gt=0, description="Longest retry delay (also caps a server's Retry-After).")

    max_batch: int = Field(256, ge=1, description="Texts per /v1/embeddings request.")
    max_records: int = Field(1000, ge=1, description="Records per /v1/transform request.")
    max_labels: int = Field(100, ge=2, description="Labels per classification request.")
    max_input_chars: int = Field(
        32_768, ge=1, description="Characters per text (an embeddings input, or a record's field)."
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Bytes per request body.")

    classify_temperature: float = Field(
        0.05, gt=0, le=10, description="Softmax temperature over the cosine similarities of a text with each label."
    )
    hypothesis_template: str = Field(
        "This text is about {label}.",
        description="How a label is phrased before it is embedded; must contain '{label}'.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _default_model(cls, value: Any) -> Any:
        # The Deployment passes an empty --model/env when the spec has none: that means the default.
        return value if value not in (None, "") and str(value).strip() else DEFAULT_EMBEDDING_MODEL

    @field_validator("embedding_endpoint", "chat_endpoint", "chat_model", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("embedding_endpoint", "chat_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not _HTTP_URL.match(value.strip()):
            raise ValueError(f"{value!r} must be an http(s) URL")
        return value.strip() if value else value

    @field_validator("hypothesis_template")
    @classmethod
    def _has_label(cls, value: str) -> str:
        if "{label}" not in value:
            raise ValueError("hypothesis_template must contain '{label}'")
        return value


# ==== wire models ===============================================================================


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request (token-array inputs are not supported: send text)."""

    input: str | list[str] = Field(description="One text or a list of texts.")
    model: str | None = Field(None, description="Must name the served model when given.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'base64' packs little-endian float32, as OpenAI does."
    )
    dimensions: int | None = Field(None, gt=0, description="Must equal the served model's dimension when given.")
    user: str | None = Field(None, description="Accepted for compatibility; ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _no_tokens(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, (int, list)) for v in value):
            raise ValueError("token arrays are not supported: send the text itself")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Label(BaseModel):
    """A label, with an optional description that is embedded along with its name."""

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)


class TransformRequest(BaseModel):
    """Records whose text ``field`` is classified against ``labels`` or enriched by ``prompt``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    records: list[dict[str, Any]] = Field(min_length=1, description="The records, each a JSON object.")
    task: Literal["classify", "enrich"]
    field: str = Field(min_length=1, max_length=256, description="The record field holding the text.")
    labels: list[Annotated[str, Field(min_length=1, max_length=200)] | Label] | None = Field(
        None,
        description="classify: the candidate labels, as names or {name, description}. Descriptions help a lot, "
        "and are needed by the lexical built-in model, which only matches words the text shares with the label.",
    )
    multi_label: bool = Field(False, description="classify: also list every label whose score reaches `threshold`.")
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="classify with multiLabel: minimum score (default 1/len(labels): better than an even split).",
    )
    temperature: float | None = Field(
        None, gt=0, le=10, description="classify: softmax temperature (default from the runtime's settings)."
    )
    hypothesis_template: str | None = Field(
        None, max_length=500, description="classify: how a label is phrased, with '{label}'."
    )
    prompt: str | None = Field(
        None, min_length=1, max_length=16_000, description="enrich: the instruction applied to each record's text."
    )

    @model_validator(mode="after")
    def _task_arguments(self) -> TransformRequest:
        if self.task == "classify":
            names = [label_name(x) for x in self.labels or []]
            if len(names) < 2:
                raise ValueError("task 'classify' needs 'labels' with at least two labels")
            if len(set(names)) != len(names):
                raise ValueError("'labels' must not repeat a name")
            if self.hypothesis_template is not None and "{label}" not in self.hypothesis_template:
                raise ValueError("'hypothesisTemplate' must contain '{label}'")
        elif self.prompt is None or not self.prompt.strip():
            raise ValueError("task 'enrich' needs a non-empty 'prompt'")
        return self


def label_name(label: str | Label) -> str:
    """The name of a label given either way."""
    return label if isinstance(label, str) else label.name


class ClassifyResult(BaseModel):
    label: str = Field(description="The best-scoring label.")
    scores: dict[str, float] = Field(description="Every label's score (softmax over labels, summing to 1), best first.")
    labels: list[str] | None = Field(
        None, description="multiLabel only: the labels reaching the threshold, best first."
    )


class EnrichResult(BaseModel):
    output: str = Field(description="The chat model's answer for the record.")


class RecordError(BaseModel):
    error: str = Field(description="Why this record has no result; the other records are unaffected.")


class TransformResponse(BaseModel):
    results: list[ClassifyResult | EnrichResult | RecordError] = Field(description="One per record, in order.")
    model: str


_EMBEDDINGS_EXAMPLES: dict[str, Any] = {
    "batch": {
        "summary": "Several texts",
        "value": {"model": DEFAULT_EMBEDDING_MODEL, "input": ["price too high", "moved to a competitor"]},
    },
    "single": {"summary": "One text", "value": {"input": "Why do enterprise customers churn?"}},
}
_TRANSFORM_EXAMPLES: dict[str, Any] = {
    "classify": {
        "summary": "Zero-shot classification of support tickets",
        "value": {
            "task": "classify",
            "field": "text",
            "records": [
                {"id": 1, "text": "I was charged twice for my subscription"},
                {"id": 2, "text": "please add dark mode"},
            ],
            "labels": [
                {"name": "billing", "description": "charges, payments, invoices, refunds and subscription fees"},
                {
                    "name": "feature request",
                    "description": "a suggestion to add new functionality or improve the product",
                },
                "bug",
            ],
        },
    },
    "enrich": {
        "summary": "Prompt-based enrichment (needs a chat endpoint)",
        "value": {
            "task": "enrich",
            "field": "churn_reason",
            "prompt": "Summarise the reason in three words.",
            "records": [{"churn_reason": "The price went up 40% at renewal."}],
        },
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse, "description": why}
    for code, why in {
        400: "Wrong model, or a task the runtime is not configured for.",
        413: "Too many inputs or records, or the body is too large.",
        422: "The request is malformed.",
        502: "The chat server failed for every record.",
        503: "The embedding provider is unavailable.",
    }.items()
}


# ==== errors ====================================================================================


class UpstreamError(Exception):
    """An outbound call failed; ``transient`` when retries were exhausted on 429/5xx/connection errors."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", param


# ==== outbound chat =============================================================================


class ChatClient:
    """OpenAI-compatible chat completions, with timeouts, retries with backoff, and bounded concurrency."""

    def __init__(self, settings: RuntimeSettings, calls: Counter) -> None:
        assert settings.chat_endpoint
        # Same base-URL rules as the embeddings client: with or without a trailing /v1.
        self.url = api_url(settings.chat_endpoint, "chat/completions")
        self.settings = settings
        self._calls = calls
        headers = (
            {"Authorization": f"Bearer {settings.chat_api_key.get_secret_value()}"} if settings.chat_api_key else {}
        )
        timeout = httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout)
        limits = httpx.Limits(
            max_connections=settings.chat_concurrency, max_keepalive_connections=settings.chat_concurrency
        )
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers)
        # One semaphore for the whole process: a burst of requests must not stampede the model server.
        self._semaphore = asyncio.Semaphore(settings.chat_concurrency)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def complete(self, system: str, user: str) -> tuple[str, str | None]:
        """The first choice's text and the model the server reports."""
        s = self.settings
        payload: dict[str, Any] = {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": s.chat_temperature,
        }
        if s.chat_model:
            payload["model"] = s.chat_model
        if s.chat_max_tokens:
            payload["max_tokens"] = s.chat_max_tokens
        response = await self._post(payload)
        try:
            body = response.json()
            content = body["choices"][0]["message"]["content"]
            if isinstance(content, list):  # content parts, as some servers send them
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise TypeError(f"content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            self._calls.labels("malformed").inc()
            raise UpstreamError(
                f"chat server {self.url} sent a malformed response ({e}): {response.text[:200]!r}", transient=False
            ) from e
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return content, model

    async def _post(self, payload: dict[str, Any]) -> httpx.Response:
        s = self.settings
        try:
            response = await request_with_retries(
                self._client,
                "POST",
                self.url,
                json=payload,
                attempts=s.retry_attempts,
                backoff_base=s.retry_base_seconds,
                backoff_max=s.retry_max_seconds,
                semaphore=self._semaphore,
                on_retry=lambda: self._calls.labels("retried").inc(),
            )
        except RetriesExhausted as e:
            self._calls.labels("failed").inc()
            raise UpstreamError(
                f"chat server {self.url} failed after {e.attempts} attempts: {e.cause}", transient=True
            ) from e
        if response.status_code >= 400:
            self._calls.labels("refused").inc()
            raise UpstreamError(
                f"chat server {self.url} answered HTTP {response.status_code}: {server_message(response)}",
                transient=False,
            )
        self._calls.labels("ok").inc()
        return response


# ==== metrics and ASGI guards ====================================================================


class RuntimeMetrics:
    """Prometheus metrics in a registry of the app's own, so several apps in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "datamesh_inference_requests_total",
            "HTTP requests, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "datamesh_inference_request_duration_seconds", "HTTP request latency, by route.", ["route"], registry=r
        )
        self.embedded = Counter(
            "datamesh_inference_embedded_texts_total", "Texts embedded (requests and labels).", registry=r
        )
        self.records = Counter(
            "datamesh_inference_transform_records_total",
            "Transformed records, by task and outcome.",
            ["task", "outcome"],
            registry=r,
        )
        self.chat_calls = Counter(
            "datamesh_inference_chat_calls_total",
            "Chat server calls, by outcome (ok, retried, refused, failed, malformed).",
            ["outcome"],
            registry=r,
        )
        self.ready = Gauge("datamesh_inference_ready", "1 once the embedding provider answered its probe.", registry=r)


class _MetricsMiddleware(RequestObserver):
    """Counts requests and times them, labelled by route template so paths cannot explode cardinality."""

    def __init__(self, app: ASGIApp, metrics: RuntimeMetrics, paths: set[str]) -> None:
        super().__init__(app)
        self.metrics, self.paths = metrics, paths

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None)
        if route is None:  # answered before routing (a 413), or no route matched
            route = scope["path"] if scope["path"] in self.paths else "unmatched"
        self.metrics.requests.labels(route, scope["method"], str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)


def _too_large(limit: int) -> Response:
    message = f"request body exceeds {limit} bytes; send fewer or shorter inputs per request"
    return openai_response(ApiError(413, message, code="request_too_large"))


# ==== the runtime ================================================================================


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def _usage_tokens(texts: Sequence[str]) -> int:
    return sum(len(_USAGE_TOKEN.findall(t)) for t in texts)


class _Runtime:
    """State shared by the routes: provider, chat client, caches, readiness and metrics."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.metrics = RuntimeMetrics()
        self.provider = self._provider(settings)
        served = {settings.model, self.provider.model_id}
        self.model_names = {m.casefold() for m in served}
        self.chat: ChatClient | None = None
        self.dimension: int | None = None
        self.not_ready = "the embedding provider has not answered its probe yet"
        self._labels: OrderedDict[str, list[float]] = OrderedDict()

    @staticmethod
    def _provider(settings: RuntimeSettings) -> EmbeddingProvider:
        if settings.embedding_endpoint:
            # Built here rather than by resolve_provider so the runtime's timeouts, retries and key apply.
            key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
            return OpenAICompatibleProvider(
                settings.model,
                settings.embedding_endpoint,
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.request_timeout,
                attempts=settings.retry_attempts,
                backoff_base=settings.retry_base_seconds,
                backoff_max=settings.retry_max_seconds,
                api_key=key,
            )
        return resolve_provider(settings.model)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        if self.settings.chat_endpoint:
            self.chat = ChatClient(self.settings, self.metrics.chat_calls)
        probe = asyncio.create_task(self._probe_until_ready(), name="inference-readiness-probe")
        try:
            yield
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            if self.chat is not None:
                await self.chat.aclose()
            if isinstance(self.provider, OpenAICompatibleProvider):
                await self.provider.aclose()

    async def _probe_until_ready(self) -> None:
        """Ask the provider for its dimension until it answers (a local model may load slowly, a proxy be down)."""
        failures = 0
        while True:
            try:
                self.dimension = await self.provider.dimension()
            except Exception as e:
                self.not_ready = (
                    f"embedding provider {self.provider.model_id!r} did not answer: {type(e).__name__}: {e}"
                )
                failures += 1
                delay = backoff_delay(failures, self.settings.retry_base_seconds, 30.0)
                log.warning("%s; retrying in %.1fs", self.not_ready, delay)
                await asyncio.sleep(delay)
                continue
            self.metrics.ready.set(1)
            log.info("embedding provider %s ready (dimension %d)", self.provider.model_id, self.dimension)
            return

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """The provider's vectors, with provider failures turned into 503/500 answers."""
        if not texts:
            return []
        try:
            vectors = await self.provider.embed(texts)
        except EmbeddingError as e:
            if e.transient:
                raise ApiError(
                    503, f"embedding provider unavailable: {e}", code="provider_unavailable", type="server_error"
                ) from e
            raise ApiError(500, f"embedding provider failed: {e}", code="provider_error", type="server_error") from e
        self.metrics.embedded.inc(len(texts))
        return vectors

    def check_model(self, model: str | None) -> None:
        if model is not None and model.casefold() not in self.model_names:
            raise ApiError(
                400,
                f"this runtime serves the model {self.provider.model_id!r}, not {model!r}; omit 'model' or send "
                f"{self.settings.model!r}",
                code="model_not_found",
                param="model",
            )

    # ---- /v1/embeddings

    async def embeddings(self, req: EmbeddingsRequest) -> EmbeddingsResponse:
        self.check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        limit = self.settings.max_batch
        if not texts:
            raise ApiError(422, "'input' must not be an empty list", code="invalid_input", param="input")
        if len(texts) > limit:
            raise ApiError(
                413,
                f"{len(texts)} inputs in one request; at most {limit} are accepted: split the batch",
                code="too_many_inputs",
                param="input",
            )
        longest = max(range(len(texts)), key=lambda i: len(texts[i]))
        if len(texts[longest]) > self.settings.max_input_chars:
            raise ApiError(
                422,
                f"input[{longest}] has {len(texts[longest])} characters; at most {self.settings.max_input_chars} are "
                "accepted",
                code="input_too_long",
                param="input",
            )
        if req.dimensions is not None:
            dim = self.dimension or await self.provider.dimension()
            if req.dimensions != dim:
                raise ApiError(
                    400,
                    f"the model {self.provider.model_id!r} has {dim} dimensions, not {req.dimensions}",
                    code="invalid_dimensions",
                    param="dimensions",
                )
        vectors = await self.embed(texts)
        data = [Embedding(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
        tokens = _usage_tokens(texts)
        return EmbeddingsResponse(
            data=data, model=self.provider.model_id, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
        )

    # ---- /v1/transform

    def _texts(self, req: TransformRequest) -> tuple[dict[int, str], dict[int, RecordError]]:
        """Each record's text by index, and why the others have none (one bad record never fails the batch)."""
        texts: dict[int, str] = {}
        errors: dict[int, RecordError] = {}
        limit = self.settings.max_input_chars
        for i, record in enumerate(req.records):
            value = record.get(req.field)
            if value is None:
                errors[i] = RecordError(
                    error=f"record has no field {req.field!r}"
                    if req.field not in record
                    else f"field {req.field!r} is null"
                )
            elif isinstance(value, (dict, list)):
                errors[i] = RecordError(
                    error=f"field {req.field!r} is {'an object' if isinstance(value, dict) else 'a list'}, not text"
                )
            elif not str(value).strip():
                errors[i] = RecordError(error=f"field {req.field!r} is empty")
            elif len(str(value)) > limit:
                errors[i] = RecordError(
                    error=f"field {req.field!r} has {len(str(value))} characters; at most {limit} are accepted"
                )
            else:
                texts[i] = str(value)  # numbers and booleans are classified as their text
        return texts, errors

    async def transform(self, req: TransformRequest) -> TransformResponse:
        if len(req.records) > self.settings.max_records:
            raise ApiError(
                413,
                f"{len(req.records)} records in one request; at most {self.settings.max_records} are accepted: split "
                "the batch",
                code="too_many_records",
                param="records",
            )
        if req.task == "classify":
            results = await self._classify(req)
            model = self.provider.model_id
        else:
            results, model = await self._enrich(req)
        for r in results:
            self.metrics.records.labels(req.task, "error" if isinstance(r, RecordError) else "ok").inc()
        return TransformResponse(results=results, model=model)

    async def _label_vectors(self, hypotheses: list[str]) -> list[list[float]]:
        """Vectors of the phrased labels; cached, since callers send the same labels again and again."""
        missing = list(dict.fromkeys(h for h in hypotheses if h not in self._labels))
        for h, v in zip(missing, await self.embed(missing), strict=True):
            self._labels[h] = v
        vectors = [self._labels[h] for h in hypotheses]
        for h in hypotheses:
            self._labels.move_to_end(h)
        while len(self._labels) > _LABEL_CACHE_SIZE:
            self._labels.popitem(last=False)
        return vectors

    async def _classify(self, req: TransformRequest) -> list[ClassifyResult | EnrichResult | RecordError]:
        labels = [x if isinstance(x, Label) else Label(name=x) for x in req.labels or []]
        if len(labels) > self.settings.max_labels:
            raise ApiError(
                422,
                f"{len(labels)} labels; at most {self.settings.max_labels} are accepted",
                code="too_many_labels",
                param="labels",
            )
        template = req.hypothesis_template or self.settings.hypothesis_template
        # str.replace, not str.format: a caller's template must not reach attributes through format fields.
        hypotheses = [
            template.replace("{label}", x.name) + (f" {x.description}" if x.description else "") for x in labels
        ]
        names = [x.name for x in labels]
        texts, errors = self._texts(req)
        label_vectors = await self._label_vectors(hypotheses)
        vectors = await self.embed(list(texts.values()))
        similarity = np.asarray([cosine_scores(v, label_vectors) for v in vectors], dtype=np.float64).reshape(
            len(texts), len(names)
        )
        probabilities = dict(
            zip(texts, _softmax(similarity / (req.temperature or self.settings.classify_temperature)), strict=True)
        )
        threshold = req.threshold if req.threshold is not None else 1.0 / len(names)
        results: list[ClassifyResult | EnrichResult | RecordError] = []
        for i in range(len(req.records)):
            if i in errors:
                results.append(errors[i])
                continue
            p = probabilities[i]
            order = np.argsort(-p, kind="stable")
            scores = {names[j]: round(float(p[j]), 6) for j in order}
            chosen = [names[j] for j in order if p[j] >= threshold] if req.multi_label else None
            results.append(ClassifyResult(label=names[order[0]], scores=scores, labels=chosen))
        return results

    async def _enrich(self, req: TransformRequest) -> tuple[list[ClassifyResult | EnrichResult | RecordError], str]:
        if self.chat is None:
            raise ApiError(
                400,
                "task 'enrich' needs an OpenAI-compatible chat server, and none is configured: start the runtime with "
                "--chat-endpoint URL (and --chat-model NAME), or set DATAMESH_INFERENCE_CHAT_ENDPOINT and "
                "DATAMESH_INFERENCE_CHAT_MODEL",
                code="chat_not_configured",
                param="task",
            )
        chat = self.chat
        texts, errors = self._texts(req)
        assert req.prompt is not None
        reported: list[str] = []

        async def one(text: str) -> EnrichResult | UpstreamError:
            try:
                content, model = await chat.complete(self.settings.chat_system_prompt, f"{req.prompt}\n\n{text}")
            except UpstreamError as e:
                return e
            if model:
                reported.append(model)
            return EnrichResult(output=content)

        answers = dict(zip(texts, await asyncio.gather(*map(one, texts.values())), strict=True))
        failures = [a for a in answers.values() if isinstance(a, UpstreamError)]
        if answers and len(failures) == len(answers) and all(f.transient for f in failures):
            # Nothing got through: an outage, which the caller should see as one, not as N record errors.
            raise ApiError(
                502, f"chat server unavailable: {failures[0]}", code="upstream_unavailable", type="server_error"
            )
        results: list[ClassifyResult | EnrichResult | RecordError] = []
        for i in range(len(req.records)):
            a = errors.get(i) or answers[i]
            results.append(RecordError(error=str(a)) if isinstance(a, UpstreamError) else a)
        return results, self.settings.chat_model or (reported[0] if reported else "unknown")


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


# ==== the app ====================================================================================


def create_app(settings: RuntimeSettings) -> FastAPI:
    """The runtime's ASGI app; raises the provider's error at once when the model is unknown or not installed."""
    rt = _Runtime(settings)
    app = FastAPI(
        title="Datamesh inference runtime",
        version="v1",
        description=(
            "OpenAI-compatible embeddings and record transforms (zero-shot classification, prompt-based enrichment) "
            "for one data product."
        ),
        lifespan=rt.lifespan,
        responses={k: v for k, v in _ERRORS.items() if k == 422},
    )
    app.state.runtime = rt

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return openai_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return openai_response(ApiError(422, message, code="invalid_request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = openai_response(ApiError(exc.status_code, str(exc.detail), code=code))
        response.headers.update(exc.headers or {})
        return response

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingsResponse,
        responses={k: _ERRORS[k] for k in (400, 413, 503)},
        tags=["embeddings"],
    )
    async def embeddings(
        req: Annotated[EmbeddingsRequest, Body(openapi_examples=_EMBEDDINGS_EXAMPLES)],
    ) -> EmbeddingsResponse:
        """OpenAI-compatible embeddings of one text or a list of texts, L2-normalised, in input order."""
        return await rt.embeddings(req)

    @app.post(
        "/v1/transform",
        response_model=TransformResponse,
        response_model_exclude_none=True,
        responses={k: _ERRORS[k] for k in (400, 413, 502, 503)},
        tags=["transform"],
    )
    async def transform(
        req: Annotated[TransformRequest, Body(openapi_examples=_TRANSFORM_EXAMPLES)],
    ) -> TransformResponse:
        """Classify (zero-shot, by embedding similarity) or enrich (with a chat model) each record's text field.

        A record without usable text gets ``{"error": ...}`` in its place; the others are still transformed.
        """
        return await rt.transform(req)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        responses={503: {"description": "The embedding provider has not answered its probe yet."}},
    )
    async def readyz() -> JSONResponse:
        """Readiness: 200 once the embedding provider has answered a probe."""
        if rt.dimension is None:
            return JSONResponse(
                {"status": "starting", "model": rt.provider.model_id, "reason": rt.not_ready}, status_code=503
            )
        return JSONResponse(
            {"status": "ready", "model": rt.provider.model_id, "dimension": rt.dimension, "enrich": rt.chat is not None}
        )

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics of this runtime."""
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The last added is the outermost: metrics see every answer, the body limit's 413s included.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes, refuse=_too_large)
    app.add_middleware(_MetricsMiddleware, metrics=rt.metrics, paths={getattr(r, "path", "") for r in app.routes})
    return app


async def serve(host: str, port: int, settings: RuntimeSettings | None = None) -> None:
    """Serve the runtime with uvicorn until SIGINT/SIGTERM."""
    app = create_app(settings or RuntimeSettings())
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False, proxy_headers=False, timeout_graceful_shutdown=10
    )
    await uvicorn.Server(config).serve()


def main(host: str, port: int, model: str | None, chat_endpoint: str | None, chat_model: str | None) -> None:
    """``datamesh inference-server``: command-line options override ``DATAMESH_INFERENCE_*`` settings."""
    overrides: dict[str, Any] = {
        k: v for k, v in {"model": model, "chat_endpoint": chat_endpoint, "chat_model": chat_model}.items() if v
    }
    try:
        # An unknown or uninstalled model fails here, before serving, with the provider's own message.
        asyncio.run(serve(host, port, RuntimeSettings(**overrides)))
    except (ValidationError, EmbeddingError) as e:
        raise SystemExit(f"datamesh inference-server: {e}") from e
