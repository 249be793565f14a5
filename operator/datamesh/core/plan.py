"""Where and how a product's vectors are stored: names, ids and the collection plan.

Each product has an alias (what queries use) pointing at an index collection named after its
embedding settings, so a change of model or search mode builds a new index beside the old one
and the alias switches when it is complete.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# Defined apart so that the embedded store's builder processes import them alone; used through here.
from datamesh.core.vectors import DENSE_VECTOR as DENSE_VECTOR
from datamesh.core.vectors import SPARSE_VECTOR as SPARSE_VECTOR
from datamesh.resource.models import (
    CollectionLayout,
    DataProductSpec,
    Distance,
    FieldType,
    SearchMode,
    qualified_name,
)

# Payload keys the operator owns; schema field names cannot start with "_", so they never clash.
TEXT_KEY = "_text"
DIGEST_KEY = "_ingest"
# Payload keys of the mesh's routing collections (one per embedding model): the rows of every
# product using that model (a sample of a large product's: DATAMESH_ROUTING_ROWS_PER_PRODUCT), and one
# card per product, so routing sees the rows themselves.
PRODUCT_KEY = "_product"
ROW_KEY = "_key"
KIND_KEY = "_kind"  # "card" or "row": keywords, since the embedded engine matches booleans as 1
RoutingKind = Literal["row", "card"]
ROUTING_PREFIX = "_routing--"  # "_" never starts a namespace, so no product alias can collide
# Part of every index name: a new layout of the collections re-indexes every product once.
LAYOUT = "2"
# Qdrant refuses collection and alias names over 255 characters; an index adds "--" + 10.
MAX_ALIAS = 255 - 12

_POINT_NAMESPACE = uuid.UUID("6f1c8e0a-4b7d-5f3a-9c2e-d4a1b0e7f9c3")
_POINT_NAMESPACE_BYTES = _POINT_NAMESPACE.bytes


@dataclass(frozen=True)
class Fusion:
    """How a hybrid search fuses its two prefetches: weighted reciprocal rank fusion.

    Each prefetch fetches ``max(limit * fetch_factor, min_fetch)`` candidates, so a row found by
    only one of them still competes. Weights are set by the quality benchmark, not by habit.
    """

    k: int = 2
    dense_weight: float = 1.0
    sparse_weight: float = 2.0  # measured: BM25's exact words rank better than a second dense vote
    fetch_factor: int = 4
    min_fetch: int = 50

    def fetch(self, limit: int) -> int:
        """Candidates each prefetch returns for a search of ``limit`` hits."""
        return max(limit * self.fetch_factor, self.min_fetch)


FUSION = Fusion()


@dataclass(frozen=True)
class CollectionPlan:
    """Where and how one product's vectors are stored."""

    alias: str
    index: str
    vector_size: int
    distance: Distance
    payload_indexes: dict[str, FieldType] = field(default_factory=dict)
    mode: SearchMode = SearchMode.hybrid
    layout: CollectionLayout = field(default_factory=CollectionLayout)

    @property
    def sparse(self) -> bool:
        """Whether the collection holds BM25 vectors of the key fields' words."""
        return self.mode is not SearchMode.dense


def collection_alias(namespace: str, name: str) -> str:
    """The alias queries use for a product: unique, and short enough for Qdrant with its index suffix."""
    return qualified_name(namespace, name, MAX_ALIAS)


def collection_plan(namespace: str, name: str, spec: DataProductSpec, vector_size: int) -> CollectionPlan:
    """The collection a product's spec asks for, once its model's dimension is known."""
    search = spec.semantic_search
    if search is None:
        raise ValueError("a collection plan needs semanticSearch")
    mode = SearchMode(search.mode)
    settings = (
        f"{search.embedding_model}|{search.embedding_endpoint or ''}|{vector_size}|{search.distance}|{mode.value}"
    )
    if search.layout.shards != 1:
        # The one layout setting Qdrant cannot change in place: a new shard count is a new collection.
        settings += f"|shards={search.layout.shards}"
    suffix = hashlib.sha256(f"{LAYOUT}|{settings}".encode()).hexdigest()[:10]
    alias = collection_alias(namespace, name)
    indexes = {f.name: FieldType(f.type) for f in spec.data_schema.fields if f.filterable}
    distance = Distance(search.distance)
    return CollectionPlan(alias, f"{alias}--{suffix}", vector_size, distance, indexes, mode, search.layout)


def routing_plan(plan: CollectionPlan, model: str, endpoint: str | None) -> CollectionPlan:
    """The routing collection shared by every product embedded like ``plan`` (same model and vectors)."""
    settings = f"{LAYOUT}|{model}|{endpoint or ''}|{plan.vector_size}|{Distance(plan.distance).value}"
    name = f"{ROUTING_PREFIX}{hashlib.sha256(settings.encode()).hexdigest()[:16]}"
    # Both filters of a routing search indexed: unindexed, the kind filter reads every point's payload.
    indexes = {PRODUCT_KEY: FieldType.string, KIND_KEY: FieldType.string}
    return CollectionPlan(name, name, plan.vector_size, plan.distance, indexes, SearchMode.hybrid)


def product_ref(namespace: str, name: str) -> str:
    """How the API and the routing collections name a product: ``namespace/name``."""
    return f"{namespace}/{name}"


def routing_fields(product: str, digest: str, kind: RoutingKind = "row") -> dict[str, str]:
    """The payload fields that mark a routing point as a product's row (or its card) from ingestion ``digest``."""
    return {PRODUCT_KEY: product, KIND_KEY: kind, DIGEST_KEY: digest}


def card_point_id(namespace: str, name: str) -> str:
    """The routing collection's point holding a product's card."""
    return _uuid5(f"card:{namespace}/{name}")


def row_key(row: Mapping[str, Any], primary_key: Sequence[str]) -> Any:
    """A row's key as the API shows it: the primary key's value, or the list of values of a composite key."""
    values = [row.get(k) for k in primary_key]
    return values[0] if len(values) == 1 else values


def routing_share(rows: int, cap: int) -> float:
    """The share of a product's rows its routing collection holds: all up to ``cap`` (0: no cap)."""
    return 1.0 if cap <= 0 or rows <= cap else cap / rows


def in_routing_sample(pid: str, share: float) -> bool:
    """Whether a row (by its point id) is in its product's routing sample.

    Decided by the id alone, which is a uniform hash of the row's key: the same rows are picked on
    every ingestion of unchanged data, in any order, and about ``share`` of them.
    """
    return share >= 1.0 or int(pid.replace("-", "")[:8], 16) < share * 0x1_0000_0000


def point_id(namespace: str, name: str, key: Sequence[Any]) -> str:
    """Deterministic point id from the product and its row's primary key: ``uuid5`` of both."""
    return _uuid5(f"{namespace}/{name}/" + "\x1f".join(map(str, key)))


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(_POINT_NAMESPACE, name))``, the same text, computed without a UUID object."""
    # uuid.uuid5 builds, then formats, a UUID object: 13 us a row, a third of validating one. The
    # same bytes by hand take 5 us (the unit tests compare both).
    raw = bytearray(hashlib.sha1(_POINT_NAMESPACE_BYTES + name.encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
