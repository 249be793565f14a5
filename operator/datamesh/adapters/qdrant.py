"""The vector store on a Qdrant server, through qdrant-client.

Works the same against a Qdrant server (``url``) and qdrant-client's local mode (``:memory:``
or a folder), which the tests use as the stand-in for a server's API: nothing here branches
on which. Aliases and collections are Qdrant's own.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import warnings
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from datamesh.adapters import bm25
from datamesh.adapters.similarity import cosines, dense_of
from datamesh.core.plan import (
    DENSE_VECTOR,
    DIGEST_KEY,
    FUSION,
    KIND_KEY,
    PRODUCT_KEY,
    SPARSE_VECTOR,
    CollectionPlan,
    RoutingKind,
    routing_fields,
)
from datamesh.core.ports import (
    TIE_SLACK,
    CollectionMissing,
    LayoutReport,
    ScoredRow,
    SearchRequest,
    VectorStoreError,
    stable_top,
)
from datamesh.resource.models import CollectionLayout, Distance, FieldType, HnswLayout, Quantization, SearchMode
from datamesh.settings import StoreSettings

T = TypeVar("T")

# How long a collection's layout (BM25 or not) is trusted: an alias may switch to a re-indexed one.
_LAYOUT_TTL = 10.0

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


def _quantization(kind: Quantization | str) -> qm.QuantizationConfig | None:
    kind = Quantization(kind)  # the models keep enum values as plain strings
    if kind is Quantization.scalar:
        return qm.ScalarQuantization(scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, always_ram=True))
    if kind is Quantization.binary:
        return qm.BinaryQuantization(binary=qm.BinaryQuantizationConfig(always_ram=True))
    return None


def _layout_of(config: qm.CollectionConfig, asked: CollectionLayout) -> CollectionLayout:
    """A collection's layout as Qdrant reports it (``asked`` when it reports none: local mode keeps no layout)."""
    params = config.params
    if params.shard_number is None:
        return asked
    vectors = params.vectors.get(DENSE_VECTOR) if isinstance(params.vectors, dict) else params.vectors
    quantization = config.quantization_config
    kind = Quantization.none
    if quantization is not None:
        kind = Quantization.scalar if isinstance(quantization, qm.ScalarQuantization) else Quantization.binary
    return CollectionLayout(
        shards=params.shard_number,
        replicas=params.replication_factor or 1,
        write_consistency=params.write_consistency_factor or 1,
        on_disk_vectors=bool(vectors is not None and vectors.on_disk),
        on_disk_payload=bool(params.on_disk_payload),
        quantization=kind,
        hnsw=HnswLayout(m=config.hnsw_config.m, ef_construct=config.hnsw_config.ef_construct),
    )


class QdrantStore:
    """The product collections of one Qdrant server (or qdrant-client's local mode)."""

    def __init__(self, client: AsyncQdrantClient, concurrency: int = 8) -> None:
        self.client = client
        self._sparse: dict[str, tuple[bool, bool, float]] = {}
        # Bounded concurrency: a thousand reconciles must not open a thousand requests.
        self._slots = asyncio.Semaphore(concurrency)

    @classmethod
    def connect(cls, settings: StoreSettings, concurrency: int | None = None) -> QdrantStore:
        """A store on the server at ``settings.url`` (or qdrant-client's local mode at ``settings.path``)."""
        if settings.url:
            # qdrant-client hands keyword arguments it does not know to its httpx client, whose
            # ``verify`` takes the SSL context that trusts the given CAs (a private CA's https).
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else True
            )
            client = AsyncQdrantClient(
                url=settings.url, api_key=settings.api_key, timeout=int(settings.timeout), verify=verify
            )
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
            info = await self._call("read collection", self.client.get_collection(plan.index))
            # A collection made by an earlier version: its filters get their indexes now.
            await self._payload_indexes(plan, skip=set(info.payload_schema or {}))
            return False
        layout = plan.layout
        dense = qm.VectorParams(
            size=plan.vector_size, distance=qm.Distance(plan.distance), on_disk=layout.on_disk_vectors
        )
        sparse = {SPARSE_VECTOR: qm.SparseVectorParams(modifier=qm.Modifier.IDF)} if plan.sparse else None
        await self._call(
            "create collection",
            self.client.create_collection(
                plan.index,
                vectors_config={DENSE_VECTOR: dense},
                sparse_vectors_config=sparse,
                shard_number=layout.shards,
                replication_factor=layout.replicas,
                write_consistency_factor=layout.write_consistency,
                on_disk_payload=layout.on_disk_payload,
                hnsw_config=qm.HnswConfigDiff(m=layout.hnsw.m, ef_construct=layout.hnsw.ef_construct),
                quantization_config=_quantization(layout.quantization),
            ),
        )
        self._sparse[plan.index] = (plan.sparse, plan.distance == Distance.euclid, time.monotonic())
        await self._payload_indexes(plan, skip=set())
        return True

    async def apply_layout(self, plan: CollectionPlan) -> LayoutReport:
        """Change in place what differs from the plan's layout (all but shards, which name the index)."""
        info = await self._call("read collection", self.client.get_collection(plan.index))
        current = _layout_of(info.config, plan.layout)
        wanted = plan.layout
        changed = tuple(sorted(k for k in wanted.differences(current) if k != "shards"))
        if changed:
            params = qm.CollectionParamsDiff(
                replication_factor=wanted.replicas,
                write_consistency_factor=wanted.write_consistency,
                on_disk_payload=wanted.on_disk_payload,
            )
            await self._call(
                "update collection",
                self.client.update_collection(
                    plan.index,
                    collection_params=params,
                    vectors_config={DENSE_VECTOR: qm.VectorParamsDiff(on_disk=wanted.on_disk_vectors)},
                    hnsw_config=qm.HnswConfigDiff(m=wanted.hnsw.m, ef_construct=wanted.hnsw.ef_construct),
                    quantization_config=_quantization(wanted.quantization) or qm.Disabled.DISABLED,
                ),
            )
            info = await self._call("read collection", self.client.get_collection(plan.index))
        return LayoutReport(_layout_of(info.config, wanted), changed=changed)

    async def _payload_indexes(self, plan: CollectionPlan, skip: set[str]) -> None:
        with warnings.catch_warnings():
            # Local mode ignores payload indexes (and says so); a server uses them.
            warnings.simplefilter("ignore", UserWarning)
            for key, kind in {**plan.payload_indexes, DIGEST_KEY: FieldType.string}.items():
                if key not in skip:
                    await self._call(
                        "create payload index",
                        self.client.create_payload_index(plan.index, key, field_schema=_PAYLOAD_SCHEMA[kind]),
                    )

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
        texts: Sequence[str],
        payloads: Sequence[Mapping[str, Any]],
    ) -> None:
        """Write one batch of points (idempotent: ids come from primary keys); ``texts`` feed BM25."""
        with_sparse, _ = await self._layout(collection)
        points = []
        for point_id, vector, text, payload in zip(ids, vectors, texts, payloads, strict=True):
            named: dict[str, Any] = {DENSE_VECTOR: list(vector)}
            sparse = bm25.document_vector(text) if with_sparse else None
            if sparse is not None:
                named[SPARSE_VECTOR] = qm.SparseVector(indices=sparse.indices, values=sparse.values)
            points.append(qm.PointStruct(id=point_id, vector=named, payload=dict(payload)))
        await self._call("upsert", self.client.upsert(collection, points=points, wait=True))

    async def _layout(self, collection: str) -> tuple[bool, bool]:
        """Whether a collection (or the one an alias names) holds BM25 vectors, and scores by distance."""
        now = time.monotonic()
        known = self._sparse.get(collection)
        if known is None or now - known[2] > _LAYOUT_TTL:
            info = await self._call("describe collection", self.client.get_collection(collection))
            vectors = info.config.params.vectors
            dense = vectors.get(DENSE_VECTOR) if isinstance(vectors, dict) else vectors
            euclid = dense is not None and dense.distance == qm.Distance.EUCLID
            known = self._sparse[collection] = (SPARSE_VECTOR in (info.config.params.sparse_vectors or {}), euclid, now)
        return known[0], known[1]

    async def delete_other_ingests(self, collection: str, digest: str) -> None:
        """Remove points not written by the ingestion with ``digest`` (rows gone from the source)."""
        selector = qm.FilterSelector(
            filter=qm.Filter(must_not=[qm.FieldCondition(key=DIGEST_KEY, match=qm.MatchValue(value=digest))])
        )
        await self._call("delete stale points", self.client.delete(collection, points_selector=selector, wait=True))

    async def remove_product(self, collection: str, product: str, keep_digest: str | None = None) -> None:
        """Routing collections: remove a product's points (but those of the ingestion ``keep_digest``)."""
        if not await self.exists(collection):
            return
        keep: list[Any] | None = None
        if keep_digest is not None:
            keep = [qm.FieldCondition(key=DIGEST_KEY, match=qm.MatchValue(value=keep_digest))]
        doomed = qm.Filter(must=[qm.FieldCondition(key=PRODUCT_KEY, match=qm.MatchValue(value=product))], must_not=keep)
        selector = qm.FilterSelector(filter=doomed)
        await self._call("remove product", self.client.delete(collection, points_selector=selector, wait=True))

    async def count(self, collection: str) -> int:
        """Exact number of points in a collection or alias."""
        result = await self._call("count", self.client.count(collection, exact=True))
        return int(result.count)

    async def routing_points(self, collection: str, product: str, digest: str, kind: RoutingKind = "row") -> int:
        """Routing collections: how many rows (or cards) of a product's ingestion ``digest`` it holds."""
        fields = routing_fields(product, digest, kind).items()
        rows = qm.Filter(must=[qm.FieldCondition(key=key, match=qm.MatchValue(value=value)) for key, value in fields])
        result = await self._call("count rows", self.client.count(collection, count_filter=rows, exact=True))
        return int(result.count)

    async def exists(self, collection: str) -> bool:
        """Whether a collection (or alias) exists."""
        return bool(await self._call("check collection", self.client.collection_exists(collection)))

    async def drop(self, collection: str) -> None:
        """Delete a collection if it exists."""
        self._sparse.pop(collection, None)
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

    async def search(self, collection: str, request: SearchRequest) -> list[ScoredRow]:
        """The best rows for a question: one query, with dense and BM25 prefetches fused in hybrid mode."""
        dense = list(request.vector)
        has_words, euclid = await self._layout(collection)
        wants_words = request.mode is not SearchMode.dense and has_words
        words = bm25.query_vector(request.text) if wants_words else None
        sparse = qm.SparseVector(indices=words.indices, values=words.values) if words is not None else None
        query: Any
        prefetch: list[qm.Prefetch] | None = None
        using: str | None = None
        if request.mode is SearchMode.hybrid and sparse is not None:
            fetch = FUSION.fetch(request.limit)
            prefetch = [
                qm.Prefetch(query=dense, using=DENSE_VECTOR, limit=fetch),
                qm.Prefetch(query=sparse, using=SPARSE_VECTOR, limit=fetch),
            ]
            query = qm.RrfQuery(rrf=qm.Rrf(k=FUSION.k, weights=[FUSION.dense_weight, FUSION.sparse_weight]))
        elif request.mode is SearchMode.sparse:
            if sparse is None:
                return []  # no indexable word: nothing can match
            query, using = sparse, SPARSE_VECTOR
        else:
            query, using = dense, DENSE_VECTOR
        # A plain cosine (or dot, on unit vectors) query scores by similarity already: no vectors needed.
        scored = using == DENSE_VECTOR and not euclid
        conditions: list[qm.Condition] = []
        if request.products is not None:
            conditions.append(qm.FieldCondition(key=PRODUCT_KEY, match=qm.MatchAny(any=list(request.products))))
        if request.kind is not None:
            conditions.append(qm.FieldCondition(key=KIND_KEY, match=qm.MatchValue(value=request.kind)))
        query_filter = None
        if conditions or request.excluded:
            excluded = qm.FieldCondition(key=PRODUCT_KEY, match=qm.MatchAny(any=list(request.excluded or ())))
            query_filter = qm.Filter(must=conditions or None, must_not=[excluded] if request.excluded else None)
        if prefetch is not None and query_filter is not None:
            for stage in prefetch:
                stage.filter = query_filter
        result = await self._call(
            "search",
            self.client.query_points(
                collection,
                query=query,
                using=using,
                prefetch=prefetch,
                query_filter=query_filter,
                limit=request.limit + TIE_SLACK,
                with_payload=list(request.payload) if request.payload is not None else True,
                with_vectors=[DENSE_VECTOR] if not scored else False,
            ),
        )
        if scored:
            rows = [ScoredRow(str(p.id), float(p.score), p.payload or {}, float(p.score)) for p in result.points]
        else:
            similarities = cosines(dense, [dense_of(p.vector) for p in result.points])
            rows = [
                ScoredRow(str(p.id), float(p.score), p.payload or {}, sim)
                for p, sim in zip(result.points, similarities, strict=True)
            ]
        return stable_top(rows, request.limit)

    async def sample(self, collection: str, limit: int) -> list[Mapping[str, Any]]:
        """The payloads of up to ``limit`` points in point-id order."""
        records, _ = await self._call(
            "sample", self.client.scroll(collection, limit=limit, with_payload=True, with_vectors=False)
        )
        return [r.payload or {} for r in records]

    async def adopt_ingestion(self, namespace: str, name: str, index: str, routing: str) -> None:
        """Nothing to move: an ingestion Job writes into the server's collections themselves."""

    async def close(self) -> None:
        """Close the client (releases the embedded store's folder lock)."""
        await self.client.close()
