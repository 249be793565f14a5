"""Qdrant collections of data products, through qdrant-client.

Works the same against a Qdrant server (``url``) and qdrant-client's local mode (``:memory:``
or a folder): nothing here branches on which. Each product has an alias (what queries use)
pointing at an index collection named after its embedding settings, so a change of model
builds a new index beside the old one and switches the alias when it is complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from datamesh.models import DataProductSpec, Distance, FieldType

# Payload keys the operator owns; schema field names cannot start with "_", so they never clash.
TEXT_KEY = "_text"
DIGEST_KEY = "_ingest"

# How qdrant-client's local mode words a missing collection (or alias).
_LOCAL_NOT_FOUND = re.compile(r"Collection (.+) not found")
_POINT_NAMESPACE = uuid.UUID("6f1c8e0a-4b7d-5f3a-9c2e-d4a1b0e7f9c3")
_PAYLOAD_SCHEMA = {
    FieldType.string: qm.PayloadSchemaType.KEYWORD,
    FieldType.integer: qm.PayloadSchemaType.INTEGER,
    FieldType.number: qm.PayloadSchemaType.FLOAT,
    FieldType.boolean: qm.PayloadSchemaType.BOOL,
    FieldType.timestamp: qm.PayloadSchemaType.DATETIME,
    FieldType.date: qm.PayloadSchemaType.DATETIME,
}


class VectorStoreError(Exception):
    """Qdrant could not be reached or refused a request (transient: retried with backoff)."""


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
    assert search is not None
    settings = f"{search.embedding_model}|{search.embedding_endpoint or ''}|{vector_size}|{search.distance}"
    suffix = hashlib.sha256(settings.encode()).hexdigest()[:10]
    alias = collection_alias(namespace, name)
    indexes = {f.name: FieldType(f.type) for f in spec.data_schema.fields if f.filterable}
    return CollectionPlan(alias, f"{alias}--{suffix}", vector_size, Distance(search.distance), indexes)


def point_id(namespace: str, name: str, key: Sequence[Any]) -> str:
    """Deterministic point id from the product and its row's primary key."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{namespace}/{name}/" + "\x1f".join(map(str, key))))


class VectorStore:
    """The product collections of one Qdrant (server or embedded)."""

    def __init__(self, client: AsyncQdrantClient, concurrency: int = 8) -> None:
        self.client = client
        # Bounded concurrency: a thousand reconciles must not open a thousand requests.
        self._slots = asyncio.Semaphore(concurrency)

    @classmethod
    def connect(cls, url: str | None, path: str = ":memory:", api_key: str | None = None, timeout: float = 10.0, concurrency: int = 8) -> VectorStore:
        """A store on the Qdrant server at ``url``, or the embedded one at ``path``, with at most ``concurrency`` requests at once."""
        if url:
            client = AsyncQdrantClient(url=url, api_key=api_key, timeout=int(timeout))
        elif path == ":memory:":
            client = AsyncQdrantClient(location=":memory:")
        else:
            client = AsyncQdrantClient(path=path)
        return cls(client, concurrency)

    async def _call(self, what: str, coro: Any) -> Any:
        async with self._slots:
            try:
                return await coro
            except (ResponseHandlingException, UnexpectedResponse, OSError, TimeoutError) as exc:
                raise VectorStoreError(f"Qdrant {what} failed: {exc}") from exc
            except ValueError as exc:
                # Local mode says a collection is missing with a ValueError (a server answers 404).
                missing = _LOCAL_NOT_FOUND.fullmatch(str(exc))
                if missing is None:
                    raise
                raise VectorStoreError(f"Qdrant {what} failed: collection {missing.group(1)} does not exist") from exc

    async def current_index(self, alias: str) -> str | None:
        """The index collection an alias points at, if any."""
        aliases = await self._call("list aliases", self.client.get_aliases())
        return next((a.collection_name for a in aliases.aliases if a.alias_name == alias), None)

    async def ensure_index(self, plan: CollectionPlan) -> bool:
        """Create the plan's index collection if missing; True when it was created."""
        if await self._call("check collection", self.client.collection_exists(plan.index)):
            return False
        await self._call(
            "create collection",
            self.client.create_collection(
                plan.index, vectors_config=qm.VectorParams(size=plan.vector_size, distance=qm.Distance(plan.distance))
            ),
        )
        with warnings.catch_warnings():
            # Local mode ignores payload indexes (and says so); a server uses them.
            warnings.simplefilter("ignore", UserWarning)
            for key, kind in {**plan.payload_indexes, DIGEST_KEY: FieldType.string}.items():
                await self._call("create payload index", self.client.create_payload_index(plan.index, key, field_schema=_PAYLOAD_SCHEMA[kind]))
        return True

    async def point_alias(self, alias: str, index: str) -> str | None:
        """Point ``alias`` at ``index`` in one atomic change; returns the index it pointed at before."""
        previous = await self.current_index(alias)
        if previous == index:
            return previous
        ops: list[Any] = []
        if previous is not None:
            ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias)))
        ops.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=index, alias_name=alias)))
        await self._call("switch alias", self.client.update_collection_aliases(change_aliases_operations=ops))
        return previous

    async def upsert(self, collection: str, ids: Sequence[str], vectors: Sequence[Sequence[float]], payloads: Sequence[dict[str, Any]]) -> None:
        """Write one batch of points (idempotent: ids come from primary keys)."""
        points = [qm.PointStruct(id=i, vector=list(v), payload=p) for i, v, p in zip(ids, vectors, payloads, strict=True)]
        await self._call("upsert", self.client.upsert(collection, points=points, wait=True))

    async def delete_other_ingests(self, collection: str, digest: str) -> None:
        """Remove points not written by the ingestion with ``digest`` (rows gone from the source)."""
        selector = qm.FilterSelector(filter=qm.Filter(must_not=[qm.FieldCondition(key=DIGEST_KEY, match=qm.MatchValue(value=digest))]))
        await self._call("delete stale points", self.client.delete(collection, points_selector=selector, wait=True))

    async def count(self, collection: str) -> int:
        """Exact number of points in a collection or alias."""
        result = await self._call("count", self.client.count(collection, exact=True))
        return int(result.count)

    async def vector_size(self, collection: str) -> int:
        """Dimension of a collection's vectors."""
        info = await self._call("describe collection", self.client.get_collection(collection))
        return int(info.config.params.vectors.size)

    async def exists(self, collection: str) -> bool:
        """Whether a collection (or alias) exists."""
        return bool(await self._call("check collection", self.client.collection_exists(collection)))

    async def drop(self, collection: str) -> None:
        """Delete a collection if it exists."""
        if await self.exists(collection):
            await self._call("delete collection", self.client.delete_collection(collection))

    async def drop_product(self, alias: str) -> None:
        """Delete a product's alias and every index collection built for it."""
        collections = await self._call("list collections", self.client.get_collections())
        index = await self.current_index(alias)
        if index is not None:
            await self._call(
                "delete alias",
                self.client.update_collection_aliases(change_aliases_operations=[qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias))]),
            )
        for c in collections.collections:
            if c.name.startswith(f"{alias}--"):
                await self.drop(c.name)

    async def search(
        self, collection: str, vector: Sequence[float], limit: int, query_filter: qm.Filter | None = None
    ) -> list[qm.ScoredPoint]:
        """Nearest points to ``vector``."""
        result = await self._call(
            "search",
            self.client.query_points(collection, query=list(vector), limit=limit, with_payload=True, query_filter=query_filter),
        )
        return list(result.points)

    async def close(self) -> None:
        """Close the client (releases the embedded store's folder lock)."""
        await self.client.close()
