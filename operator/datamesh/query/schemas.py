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
MAX_RECORDS = 1000
_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a DataProduct name (DNS subdomain)
_PRODUCT_PATTERN = "^(" + DNS_LABEL_PATTERN[1:-1] + "/)?" + _NAME_PATTERN[1:]  # namespace/name or name


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
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=2000),
    AfterValidator(_encodable),
    Field(description="The question, in plain words (1..2000 characters)."),
]
Limit = Annotated[int, Field(ge=1, le=100, description="Hits per product.")]
ProductRef = Annotated[str, StringConstraints(min_length=1, max_length=317, pattern=_PRODUCT_PATTERN)]
DomainName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
NamespaceParam = Annotated[str, Path(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN, examples=["sales"])]
NameParam = Annotated[str, Path(min_length=1, max_length=253, pattern=_NAME_PATTERN, examples=["customer-churn"])]
# A question's options, shared by POST /v1/query and the MCP tool `ask`.
Domains = Annotated[
    list[DomainName], Field(max_length=50, description="Only products of these domains (routing chooses among them).")
]
Products = Annotated[
    list[ProductRef],
    Field(
        max_length=50,
        description="Only these products, all of them asked: 'namespace/name', or a bare name when it is unambiguous.",
    ),
]
MergedLimit = Annotated[int, Field(ge=1, le=100, description="Hits in the merged ranking.")]
MaxProducts = Annotated[
    int, Field(ge=1, le=50, description="Ask at most this many products (default from the service settings).")
]
MERGED_LIMIT = 10
PER_PRODUCT = 5


class QueryRequest(ApiModel):
    """A question for the whole mesh."""

    question: Question
    domains: Domains | None = None
    products: Products | None = None
    limit: MergedLimit = MERGED_LIMIT
    per_product: Limit = PER_PRODUCT
    max_products: MaxProducts | None = None


class ProductQueryRequest(ApiModel):
    """A question for one product."""

    question: Question
    limit: Limit = PER_PRODUCT


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


class Row(ApiModel):
    """A row as its product holds it."""

    product: str = Field(description="The product, 'namespace/name'.")
    key: Any = Field(description="The row's primary key value (a list of values for a composite key).")
    text: str | None = Field(None, description="The key-field text that was embedded.")
    fields: dict[str, Any] = Field(default_factory=dict, description="The row's fields (PII masked unless granted).")
    masked: list[str] = Field(default_factory=list, description="Fields whose values were masked as personal data.")


class Hit(Row):
    """A row that answers, with its scores."""

    score: float = Field(description="The product's own ranking score (fused in hybrid mode).")
    similarity: float | None = Field(None, description="Cosine of the question and the row's key-field text.")


class ProductResult(ApiModel):
    product: str
    hits: list[Hit]
    latency_ms: float


class SampleResponse(ApiModel):
    """A few of a product's rows, the same ones every time (the lowest point ids), masked as hits are."""

    product: str
    rows: list[Row]
    latency_ms: float


class MergedHit(ApiModel):
    """A place in the merged ranking: which hit of which product, and its merged score."""

    product: str
    key: Any
    score: float = Field(
        description="Similarity to the question on a scale shared by every product, weighed by its routing score."
    )


class RoutedProduct(ApiModel):
    product: str
    score: float = Field(description="Routing evidence: the best row's or the description's similarity, and more.")
    why: str
    degraded: bool = False
    requested: bool = Field(False, description="Named in the request's products.")


class ProductError(ApiModel):
    product: str
    error: str
    kind: str = Field(
        description="timeout, embedding (the question could not be embedded) or vector_store (the search failed)."
    )


class QueryResponse(ApiModel):
    """The answer: where the question went, each product's hits, one merged ranking, and what failed."""

    routed_to: list[RoutedProduct]
    low_confidence: bool = Field(False, description="No product clearly holds the answer: read it with care.")
    confidence_note: str | None = Field(None, description="Why the answer is low-confidence.")
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
