"""The query service's request and response bodies (camelCase on the wire)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from datamesh.resource.catalog import CatalogEntry
from datamesh.resource.models import DNS_LABEL_PATTERN
from datamesh.web.errors import DetailBody

INFERENCE_KEY = "_inference"  # where /transform puts the model's output in each record
RRF_K = 60
MAX_RECORDS = 1000
_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a DataProduct name (DNS subdomain)
_PRODUCT_PATTERN = DNS_LABEL_PATTERN[:-1] + "/" + _NAME_PATTERN[1:]


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


Question = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000), AfterValidator(_encodable)
]
Limit = Annotated[int, Field(ge=1, le=100, description="Hits per product.")]
ProductName = Annotated[str, StringConstraints(max_length=317, pattern=_PRODUCT_PATTERN)]
DomainName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
NamespaceParam = Annotated[str, Path(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN, examples=["sales"])]
NameParam = Annotated[str, Path(min_length=1, max_length=253, pattern=_NAME_PATTERN, examples=["customer-churn"])]


class QueryRequest(ApiModel):
    """A question for the whole mesh."""

    question: Question = Field(description="The question, in plain words (1..2000 characters).")
    domains: list[DomainName] | None = Field(None, max_length=50, description="Only products of these domains.")
    products: list[ProductName] | None = Field(
        None,
        max_length=50,
        description="Only these products ('namespace/name'); they are asked whatever their routing score.",
    )
    limit: Limit = 5
    max_products: int | None = Field(
        None, ge=1, le=50, description="Ask at most this many products (default from the service settings)."
    )


class ProductQueryRequest(ApiModel):
    """A question for one product."""

    question: Question = Field(description="The question, in plain words (1..2000 characters).")
    limit: Limit = 5


class TransformRequest(BaseModel):
    """Records for a product's inference runtime; every other field (e.g. ``task``) passes through unchanged."""

    model_config = ConfigDict(extra="allow")

    records: list[dict[str, Any]] = Field(
        min_length=1, max_length=MAX_RECORDS, description="The records to transform (at most 1000)."
    )
    task: Any = Field(
        None,
        description=(
            "What the runtime should do, in the runtime's terms (built-in runtime: 'classify' or 'enrich', with "
            "'field', 'labels' or 'prompt')."
        ),
    )


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
    kind: str = Field(
        description="timeout, embedding (the question could not be embedded) or vector_store (the search failed)."
    )


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
    records: list[dict[str, Any]] = Field(
        description=f"Each input record with the model's output under '{INFERENCE_KEY}'."
    )
    model: str | None = Field(None, description="The model the runtime says it used, when it says.")
    latency_ms: float


QUERY_EXAMPLES = {
    "question": {
        "summary": "Ask the whole mesh",
        "value": {"question": "why do enterprise customers churn after a price increase?", "limit": 5},
    },
    "filtered": {
        "summary": "Only some domains",
        "value": {"question": "which shipments were delayed by weather?", "domains": ["logistics"], "maxProducts": 3},
    },
    "named": {
        "summary": "Named products",
        "value": {"question": "disputed invoices about VAT", "products": ["finance/invoice-disputes"], "limit": 10},
    },
}
PRODUCT_QUERY_EXAMPLES = {
    "question": {"summary": "Ask one product", "value": {"question": "customers leaving because of price", "limit": 5}}
}
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
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": DetailBody, "description": "Missing or invalid bearer token."}
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": DetailBody, "description": "No such product, or the caller may not read it."}
}
