"""The discovery catalog's wire format: one compact entry per product.

The operator writes entries (into sharded ConfigMaps, or a file in local mode) and the query
service reads them. Entries carry a format version and ignore keys they do not know, so an
older reader keeps every product a newer writer describes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from datamesh.resource.models import (
    Condition,
    ConditionStatus,
    DataProductSpec,
    DataProductStatus,
    parse_spec,
    parse_status,
    qualified_name,
)

log = logging.getLogger(__name__)

CATALOG_LABEL = "datamesh.io/catalog"
# Bumped when a field changes meaning; new optional fields need no bump (readers ignore them).
CATALOG_FORMAT = 1
# A condition's message in an entry is cut here: the catalog is a summary, the status has it whole.
CONDITION_MESSAGE_LIMIT = 300


class WireModel(BaseModel):
    """camelCase on the wire; unknown keys are ignored (a newer writer may add some)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True)


class SLASummary(WireModel):
    """The product's declared service levels, as the catalog shows them."""

    freshness: str | None = None
    availability: str | None = None
    query_latency_p99: str | None = None


class Calibration(WireModel):
    """Similarity statistics of a product's rows (mean and spread of row-to-row cosines)."""

    mean: float
    std: float


class FieldSummary(WireModel):
    """One schema column, as the catalog shows it."""

    name: str
    type: str
    description: str | None = None
    primary_key: bool = False
    pii: bool = False


class ConditionSummary(WireModel):
    """One status condition, as the catalog shows it: the message only while the condition is not True."""

    type: str
    status: str
    reason: str
    message: str | None = None


class CatalogEntry(WireModel):
    """What the mesh knows about one product: enough to route a question and query it."""

    format: int = CATALOG_FORMAT
    namespace: str
    name: str
    domain: str
    description: str
    owner: str | None = None
    tags: list[str] = Field(default_factory=list)
    fields: list[FieldSummary] = Field(default_factory=list)
    key_fields: list[str] = Field(default_factory=list)
    collection: str | None = None
    embedding_model: str | None = None
    embedding_endpoint: str | None = None
    search_mode: str | None = None
    inference_endpoint: str | None = None
    phase: str | None = None
    records: int | None = None
    sla: SLASummary | None = None
    sla_met: bool | None = None  # the last SLA check: None when the product declares nothing checkable
    conditions: list[ConditionSummary] = Field(default_factory=list)
    routing_collection: str | None = None
    calibration: Calibration | None = None
    consumers: list[str] = Field(default_factory=lambda: ["*"])
    pii_readers: list[str] = Field(default_factory=list)
    generation: int | None = None
    shard: str | None = None  # the operator shard that wrote the entry (its rebuild replaces only its own)

    @property
    def key(self) -> str:
        return entry_key(self.namespace, self.name)

    @property
    def product(self) -> str:
        """How the API names the product: ``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    @property
    def primary_key(self) -> list[str]:
        """Names of the primary-key fields, in schema order."""
        return [f.name for f in self.fields if f.primary_key]


def condition_summary(condition: Condition) -> ConditionSummary:
    """A condition as a catalog entry carries it (compact; a True condition's message is left out)."""
    status = ConditionStatus(condition.status)
    # A True condition's message ("last ingestion is 37s old") only ages in the catalog, which is
    # written per reconcile; a False or Unknown one's is the reason a reader needs.
    message = None if status is ConditionStatus.true else condition.message[:CONDITION_MESSAGE_LIMIT] or None
    return ConditionSummary(type=condition.type, status=status.value, reason=condition.reason, message=message)


def card_text(namespace: str, name: str, spec: DataProductSpec) -> str:
    """What a product is about, as one text: routed to when a question matches it as well as rows do."""
    columns = "; ".join(f"{f.name.replace('_', ' ')} {f.description or ''}".strip() for f in spec.data_schema.fields)
    title = name.replace("-", " ")
    return f"{spec.domain}. {title}. {spec.description} Tags: {', '.join(spec.tags)}. Fields: {columns}"


def entry_key(namespace: str, name: str) -> str:
    """Catalog key of a product: a valid ConfigMap data key (at most 253 characters)."""
    return qualified_name(namespace, name, 253)


def catalog_entry(
    namespace: str,
    name: str,
    generation: int,
    spec: DataProductSpec,
    status: DataProductStatus,
) -> CatalogEntry:
    """The catalog entry of a product from its spec and status."""
    search = spec.semantic_search if spec.semantic_search and spec.semantic_search.enabled else None
    return CatalogEntry(
        namespace=namespace,
        name=name,
        domain=spec.domain,
        description=spec.description,
        owner=spec.owner.team if spec.owner else None,
        tags=spec.tags,
        fields=[
            FieldSummary(name=f.name, type=f.type, description=f.description, primary_key=f.primary_key, pii=f.pii)
            for f in spec.data_schema.fields
        ],
        key_fields=spec.key_fields,
        collection=status.collection if search else None,
        embedding_model=search.embedding_model if search else None,
        embedding_endpoint=search.embedding_endpoint if search else None,
        search_mode=search.mode if search else None,
        inference_endpoint=status.inference_endpoint,
        phase=status.phase,
        records=status.records,
        sla=SLASummary.model_validate(spec.sla.wire()) if spec.sla else None,
        sla_met=status.sla.met if status.sla else None,
        conditions=[condition_summary(c) for c in status.conditions],
        consumers=spec.access.consumers,
        pii_readers=spec.access.pii_readers,
        routing_collection=status.routing_collection if search else None,
        calibration=Calibration.model_validate(status.score_calibration.wire()) if status.score_calibration else None,
        generation=generation,
    )


def encode_entry(entry: CatalogEntry) -> str:
    """Compact JSON of an entry, as stored."""
    return entry.model_dump_json(by_alias=True, exclude_none=True)


def decode_entries(data: Mapping[str, str]) -> dict[str, CatalogEntry]:
    """Entries of one shard; an unreadable entry is logged and left out, never fatal."""
    entries: dict[str, CatalogEntry] = {}
    for key, raw in data.items():
        try:
            entries[key] = CatalogEntry.model_validate_json(raw)
        except ValueError as exc:
            log.warning("catalog entry %s is unreadable and ignored: %s", key, exc)
    return entries


def entry_of_object(body: Mapping[str, Any]) -> CatalogEntry | None:
    """The catalog entry of a DataProduct object as stored (None when its spec does not validate)."""
    spec = parse_spec(body)
    if spec is None:
        return None
    meta = body.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    return catalog_entry(namespace, str(meta["name"]), int(meta.get("generation") or 1), spec, parse_status(body))
