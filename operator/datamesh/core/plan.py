"""Where and how a product's vectors are stored: names, ids and the collection plan.

Each product has an alias (what queries use) pointing at an index collection named after its
embedding settings, so a change of model builds a new index beside the old one and the alias
switches when it is complete.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datamesh.resource.models import DataProductSpec, Distance, FieldType

# Payload keys the operator owns; schema field names cannot start with "_", so they never clash.
TEXT_KEY = "_text"
DIGEST_KEY = "_ingest"

_POINT_NAMESPACE = uuid.UUID("6f1c8e0a-4b7d-5f3a-9c2e-d4a1b0e7f9c3")


@dataclass(frozen=True)
class CollectionPlan:
    """Where and how one product's vectors are stored."""

    alias: str
    index: str
    vector_size: int
    distance: Distance
    payload_indexes: dict[str, FieldType] = field(default_factory=dict)


def collection_alias(namespace: str, name: str) -> str:
    """The alias queries use for a product (namespaces hold no dots, so it is unique)."""
    return f"{namespace}.{name}"


def collection_plan(namespace: str, name: str, spec: DataProductSpec, vector_size: int) -> CollectionPlan:
    """The collection a product's spec asks for, once its model's dimension is known."""
    search = spec.semantic_search
    if search is None:
        raise ValueError("a collection plan needs semanticSearch")
    settings = f"{search.embedding_model}|{search.embedding_endpoint or ''}|{vector_size}|{search.distance}"
    suffix = hashlib.sha256(settings.encode()).hexdigest()[:10]
    alias = collection_alias(namespace, name)
    indexes = {f.name: FieldType(f.type) for f in spec.data_schema.fields if f.filterable}
    return CollectionPlan(alias, f"{alias}--{suffix}", vector_size, Distance(search.distance), indexes)


def point_id(namespace: str, name: str, key: Sequence[Any]) -> str:
    """Deterministic point id from the product and its row's primary key."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{namespace}/{name}/" + "\x1f".join(map(str, key))))
