"""The vector store on a Qdrant server, through qdrant-client.

Works the same against a Qdrant server (``url``) and qdrant-client's local mode (``:memory:``
or a folder), which the tests use as the stand-in for a server's API: nothing here branches
on which. Aliases and collections are Qdrant's own.
"""

from __future__ import annotations

import asyncio
import re
import warnings
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from datamesh.core.plan import DIGEST_KEY, CollectionPlan
from datamesh.core.ports import CollectionMissing, ScoredRow, VectorStoreError
from datamesh.resource.models import FieldType
from datamesh.settings import StoreSettings

T = TypeVar("T")

# How qdrant-client's local mode words a missing collection (or alias).
_LOCAL_NOT_FOUND = re.compile(r"Collection (.+) not found")
_PAYLOAD_SCHEMA = {
    FieldType.string: qm.PayloadSchemaType.KEYWORD,
    FieldType.integer: qm.PayloadSchemaType.INTEGER,
    FieldType.number: qm.PayloadSchemaType.FLOAT,
    FieldType.boolean: qm.PayloadSchemaType.BOOL,
    FieldType.timestamp: qm.PayloadSchemaType.DATETIME,
    FieldType.date: qm.PayloadSchemaType.DATETIME,
}


class QdrantStore:
    """The product collections of one Qdrant server (or qdrant-client's local mode)."""

    def __init__(self, client: AsyncQdrantClient, concurrency: int = 8) -> None:
        self.client = client
        # Bounded concurrency: a thousand reconciles must not open a thousand requests.
        self._slots = asyncio.Semaphore(concurrency)

    @classmethod
    def connect(cls, settings: StoreSettings, concurrency: int | None = None) -> QdrantStore:
        """A store on the server at ``settings.url`` (or qdrant-client's local mode at ``settings.path``)."""
        if settings.url:
            client = AsyncQdrantClient(url=settings.url, api_key=settings.api_key, timeout=int(settings.timeout))
        elif settings.path == ":memory:":
            client = AsyncQdrantClient(location=":memory:")
        else:
            client = AsyncQdrantClient(path=settings.path)
        return cls(client, concurrency or settings.concurrency)

    async def _call(self, what: str, coro: Awaitable[T]) -> T:
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
                raise CollectionMissing(f"Qdrant {what} failed: collection {missing.group(1)} does not exist") from exc

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
                await self._call(
                    "create payload index",
                    self.client.create_payload_index(plan.index, key, field_schema=_PAYLOAD_SCHEMA[kind]),
                )
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

    async def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        payloads: Sequence[Mapping[str, Any]],
    ) -> None:
        """Write one batch of points (idempotent: ids come from primary keys)."""
        points = [
            qm.PointStruct(id=i, vector=list(v), payload=dict(p))
            for i, v, p in zip(ids, vectors, payloads, strict=True)
        ]
        await self._call("upsert", self.client.upsert(collection, points=points, wait=True))

    async def delete_other_ingests(self, collection: str, digest: str) -> None:
        """Remove points not written by the ingestion with ``digest`` (rows gone from the source)."""
        selector = qm.FilterSelector(
            filter=qm.Filter(must_not=[qm.FieldCondition(key=DIGEST_KEY, match=qm.MatchValue(value=digest))])
        )
        await self._call("delete stale points", self.client.delete(collection, points_selector=selector, wait=True))

    async def count(self, collection: str) -> int:
        """Exact number of points in a collection or alias."""
        result = await self._call("count", self.client.count(collection, exact=True))
        return int(result.count)

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
                self.client.update_collection_aliases(
                    change_aliases_operations=[qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias))]
                ),
            )
        for c in collections.collections:
            if c.name.startswith(f"{alias}--"):
                await self.drop(c.name)

    async def search(self, collection: str, vector: Sequence[float], limit: int) -> list[ScoredRow]:
        """Nearest points to ``vector``."""
        result = await self._call(
            "search", self.client.query_points(collection, query=list(vector), limit=limit, with_payload=True)
        )
        return [ScoredRow(str(p.id), float(p.score), p.payload or {}) for p in result.points]

    async def close(self) -> None:
        """Close the client (releases the embedded store's folder lock)."""
        await self.client.close()
