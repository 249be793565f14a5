"""The ports of the reconcile core: what it needs from the outside world, as Protocols.

Adapters (``datamesh.adapters``) implement them against Qdrant, Kubernetes, HTTP and files;
tests implement them in memory. The errors here are the only ones the core interprets, so an
adapter translates its library's exceptions into these by kind.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from datamesh.core.conditions import Check
from datamesh.core.plan import CollectionPlan, RoutingKind
from datamesh.core.rows import Row
from datamesh.resource.models import CollectionLayout, Inference, SearchMode, Source

# ==== errors ==================================================================================


class VectorStoreError(Exception):
    """The vector store could not be reached or refused a request (transient: retried with backoff)."""


class CollectionMissing(VectorStoreError):
    """The collection (or alias) does not exist."""


class StoreRejected(VectorStoreError):
    """The store refused a request as malformed (a wrong vector size, a conflicting collection)."""


class EmbeddingError(Exception):
    """Embedding failed; ``transient`` says whether retrying later can help."""

    transient: bool = False


class UnknownModelError(EmbeddingError):
    """The model string is not understood or the model does not exist (permanent)."""


class ProviderUnavailableError(EmbeddingError):
    """The library of the provider is not installed (permanent until the image changes)."""


class EmbeddingServiceError(EmbeddingError):
    """A remote embedding service is down, overloaded or too slow, after retries (transient)."""

    transient = True


class SourceError(Exception):
    """The source could not be read. Transient ones (network, missing ConfigMap) are retried."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class Conflict(Exception):
    """A catalog shard changed since it was read (resourceVersion mismatch)."""


class CatalogUnavailable(Exception):
    """A catalog shard could not be read or written; the message says which and why (transient)."""


# ==== embeddings ==============================================================================


@runtime_checkable
class EmbeddingProvider(Protocol):
    """Turns texts into L2-normalised vectors of a fixed dimension."""

    model_id: str

    async def dimension(self) -> int:
        """Length of the vectors this provider returns."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in order."""
        ...


class EmbedderResolver(Protocol):
    """The provider for a model string and an optional OpenAI-compatible endpoint."""

    def __call__(self, model: str, endpoint: str | None = None) -> EmbeddingProvider: ...


# ==== vector store ============================================================================


@dataclass(frozen=True)
class SearchRequest:
    """One product search: the question's embedding and words, fused by Qdrant in hybrid mode."""

    vector: Sequence[float]
    text: str
    limit: int
    mode: SearchMode = SearchMode.hybrid
    # Routing collections only: the products whose points may answer (or, when that list is the
    # longer one, those whose points may not), and which kind ("card", "row").
    products: Sequence[str] | None = None
    kind: str | None = None
    excluded: Sequence[str] | None = None
    payload: Sequence[str] | None = None  # the payload keys to return (None: all of them)


@dataclass(frozen=True)
class ScoredRow:
    """One search hit: the point id, its rank score, its cosine similarity to the question, its payload.

    ``score`` orders hits within one product (a fused score in hybrid mode); ``similarity`` is
    the embedding's cosine, comparable across products that share a model.
    """

    id: str
    score: float
    payload: Mapping[str, Any] = field(default_factory=dict)
    similarity: float | None = None


# Extra hits a store asks its engine for: fused scores tie often (1/(k+r) and 2/(k+2r+2) are equal),
# and an engine breaks ties differently from call to call, so the same question got different rows.
TIE_SLACK = 8


def stable_top(rows: Sequence[ScoredRow], limit: int) -> list[ScoredRow]:
    """The best ``limit`` hits, ties broken by similarity and then id: the same answer every time."""
    return sorted(rows, key=lambda r: (-r.score, -(r.similarity or 0.0), r.id))[:limit]


@dataclass(frozen=True)
class LayoutReport:
    """A collection's layout as the store applied it, and the settings it could not honour."""

    applied: CollectionLayout
    ignored: tuple[str, ...] = ()  # e.g. "shards 3": settings of the plan the store keeps its own way
    changed: tuple[str, ...] = ()  # settings changed in place on an existing collection


class VectorStore(Protocol):
    """The product collections of one Qdrant (a server, or the embedded engine)."""

    async def current_index(self, alias: str) -> str | None:
        """The index collection an alias points at, if any."""
        ...

    async def ensure_index(self, plan: CollectionPlan) -> bool:
        """Create the plan's index collection if missing; True when it was created."""
        ...

    async def apply_layout(self, plan: CollectionPlan) -> LayoutReport:
        """Bring the index collection's layout to the plan's where the store can; say what it applied."""
        ...

    async def point_alias(self, alias: str, index: str) -> str | None:
        """Point ``alias`` at ``index`` atomically; returns the index it pointed at before."""
        ...

    async def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        texts: Sequence[str],
        payloads: Sequence[Mapping[str, Any]],
    ) -> None:
        """Write one batch of points (idempotent: ids come from primary keys); ``texts`` feed BM25."""
        ...

    async def delete_other_ingests(self, collection: str, digest: str) -> None:
        """Remove points not written by the ingestion with ``digest``."""
        ...

    async def remove_product(self, collection: str, product: str, keep_digest: str | None = None) -> None:
        """Routing collections: remove a product's points (but those of the ingestion ``keep_digest``)."""
        ...

    async def count(self, collection: str) -> int:
        """Exact number of points in a collection or alias."""
        ...

    async def routing_points(self, collection: str, product: str, digest: str, kind: RoutingKind = "row") -> int:
        """Routing collections: how many rows (or cards) of a product's ingestion ``digest`` it holds."""
        ...

    async def exists(self, collection: str) -> bool:
        """Whether a collection (or alias) exists."""
        ...

    async def drop(self, collection: str) -> None:
        """Delete a collection if it exists."""
        ...

    async def drop_product(self, alias: str) -> None:
        """Delete a product's alias and every index collection built for it."""
        ...

    async def search(self, collection: str, request: SearchRequest) -> list[ScoredRow]:
        """The best rows for a question, as one Qdrant query (two prefetches fused in hybrid mode)."""
        ...

    async def sample(self, collection: str, limit: int) -> list[Mapping[str, Any]]:
        """The payloads of up to ``limit`` points in point-id order: the same rows every time, no question needed."""
        ...

    async def adopt_ingestion(self, namespace: str, name: str, index: str, routing: str) -> None:
        """Take in what an ingestion Job wrote for a product into ``index`` and ``routing``.

        A server holds them already; the embedded store moves them in from the Job's own folder.
        """
        ...

    async def close(self) -> None:
        """Release connections (and the embedded store's lock)."""
        ...


# ==== rows, endpoints, inference ==============================================================


class RowSource(Protocol):
    """A product's rows, read in batches, as many times as the ingestion passes over them."""

    def batches(self, size: int) -> Iterator[list[Row]]:
        """The rows, ``size`` at a time (raises SourceError when the data cannot be parsed)."""
        ...

    def close(self) -> None:
        """Release what holds the rows (a downloaded file)."""
        ...


class RowLoader(Protocol):
    """Opens a product's source for reading."""

    async def __call__(self, source: Source, namespace: str) -> RowSource: ...


class Progress(Protocol):
    """Where a long ingestion reports how far it got."""

    async def __call__(self, namespace: str, name: str, done: int, total: int) -> None: ...


class SourceSize(Protocol):
    """The size in bytes of a product's source before it is read (None: not known until read)."""

    async def __call__(self, source: Source) -> int | None: ...


class EndpointProbe(Protocol):
    """None when the URL answers, else the cause in a few words."""

    async def __call__(self, url: str) -> str | None: ...


class InferenceBackend(Protocol):
    """Runs the model of products with ``inference.model``."""

    async def ensure(self, namespace: str, name: str, uid: str, spec: Inference) -> tuple[Check, str | None]:
        """Make the runtime exist; its InferenceReady check and endpoint URL."""
        ...


# ==== ingestion Jobs ==========================================================================


JobPhase = Literal["running", "succeeded", "failed"]


@dataclass(frozen=True)
class JobState:
    """An ingestion Job as the operator finds it."""

    name: str  # namespace/name, as status and events show it
    phase: JobPhase
    report: str | None = None  # the ingestion's report (its pod's termination message), once it ended
    message: str = ""  # why it failed, in Kubernetes' words, when its pod left no report


class IngestJobs(Protocol):
    """Runs large ingestions as Kubernetes Jobs (``datamesh ingest NAMESPACE/NAME``)."""

    async def get(self, namespace: str, name: str, job: str) -> JobState | None:
        """The product's Job named ``job``, or None when there is none."""
        ...

    async def start(self, namespace: str, name: str, job: str) -> JobState:
        """Create the Job ``job`` ingesting the product (one that exists already is returned as it is)."""
        ...

    async def delete(self, namespace: str, name: str, keep: str | None = None) -> None:
        """Delete the product's Jobs (but ``keep``) and their pods."""
        ...


# ==== catalog =================================================================================


@dataclass
class Shard:
    """One ConfigMap (or file section) of the catalog as read."""

    name: str
    data: dict[str, str]
    version: str | None  # None: does not exist yet


class CatalogBackend(Protocol):
    """Where catalog shards are kept."""

    async def list_shards(self) -> list[Shard]: ...

    async def read_shard(self, name: str) -> Shard: ...

    async def write_shard(self, shard: Shard) -> None:
        """Write ``shard.data``; raises Conflict when ``shard.version`` is stale."""
        ...


# ==== observation =============================================================================


class Observer(Protocol):
    """Where the engine reports what it did (Prometheus in the operator, nothing in tests)."""

    def reconciled(self, phase: str, seconds: float, reason: str | None) -> None:
        """One reconcile ended in ``phase``; ``reason`` is Ready's reason when it went wrong."""

    def phase_changed(self, old: str | None, new: str | None) -> None:
        """A product moved from one phase to another (None: appeared or went away)."""

    def rows_ingested(self, count: int) -> None:
        """Rows embedded and written."""

    def rows_rejected(self, count: int) -> None:
        """Source rows refused by validation."""

    def catalog_written(self) -> None:
        """One catalog shard write."""


class NullObserver:
    """Observes nothing."""

    def reconciled(self, phase: str, seconds: float, reason: str | None) -> None:
        return None

    def phase_changed(self, old: str | None, new: str | None) -> None:
        return None

    def rows_ingested(self, count: int) -> None:
        return None

    def rows_rejected(self, count: int) -> None:
        return None

    def catalog_written(self) -> None:
        return None
