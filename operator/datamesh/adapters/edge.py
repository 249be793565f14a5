"""The embedded vector store: Qdrant's own engine in this process, through qdrant-edge.

``qdrant_edge.EdgeShard`` is one Qdrant shard in one directory, with no collections or aliases
of its own. Here each index collection is a shard directory, and each alias is a small pointer
file replaced atomically, so the reconcile core sees the same collections, aliases and errors as
on a Qdrant server.

Layout under the root folder::

    aliases/<safe name>                    {"alias": ..., "index": ...}: one file per alias
    counts.json                            point counts, left by a clean close for the next open
    collections/<safe name>/collection.json  what the collection is (written last: its commit mark)
    collections/<safe name>/shard/         the EdgeShard (config, WAL, segments)
    ingest/<safe alias>/                   a store of the same layout, written by a product's ingestion
                                           Job (another process), adopted by this one when it ends

A shard directory is locked by the process that opens it (its WAL), so one process owns the
root. Shards are cheap when configured for it (one search thread, vectors memory-mapped, no
payload index unless a field is filterable) and at most ``max_open`` stay open at once, least
recently used closed first, so hundreds of products cost little memory and few threads.

New collections are made in child processes (a pool shared by the stores of a process): the
engine holds the GIL while it creates a shard (12 ms on a quiet disk, far more under load, mostly
file-system work), which made creating collections the operator's bottleneck with a thousand new
products. Opening a shard holds it too, through three fsyncs of its configuration (10-30 ms), so
a child also writes a new collection's first batch (all the rows of a small product) and this
process opens the collection only when an operation needs it: in a burst of new products the
operator no longer stops once per product. What the children run is ``edge_builder``, which
imports the engine and little else. They are started with ``spawn`` (see ``adapters.processes``):
a script that opens an ``EdgeStore`` needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import qdrant_edge as qe

from datamesh.adapters import bm25
from datamesh.adapters.atomic import atomic_write
from datamesh.adapters.edge_builder import (
    META_FILE,
    MIN_RECALL,
    SHARD_DIR,
    Points,
    add_payload_indexes,
    build_shard,
    edge_config,
    optimize_shard,
    panicked,
    upsert_operation,
)
from datamesh.adapters.processes import ChildProcesses
from datamesh.adapters.similarity import cosines, dense_of
from datamesh.core.plan import (
    DENSE_VECTOR,
    DIGEST_KEY,
    FUSION,
    KIND_KEY,
    PRODUCT_KEY,
    SPARSE_VECTOR,
    TEXT_KEY,
    CollectionPlan,
    RoutingKind,
    collection_alias,
    product_ref,
    routing_fields,
)
from datamesh.core.ports import (
    TIE_SLACK,
    CollectionMissing,
    LayoutReport,
    ScoredRow,
    SearchRequest,
    StoreRejected,
    VectorStoreError,
    stable_top,
)
from datamesh.resource.models import CollectionLayout, Distance, FieldType, SearchMode

log = logging.getLogger(__name__)
T = TypeVar("T")

ALIASES_DIR = "aliases"
# Earlier versions kept every alias in this one file, rewritten whole on each switch: 3.3 ms a switch
# at 10,000 aliases against 0.5 ms now (bench/store.py). Converted when a store opens.
LEGACY_ALIASES_FILE = "aliases.json"
INGEST_DIR = "ingest"
COUNTS_FILE = "counts.json"  # {collection: points}, written by a clean close and read by the next open
# The engine's messages are its only error signal (it raises plain Exception): the prefixes of
# its OperationError kinds that mean the request itself was wrong, and those meaning "absent".
_REJECTED = (
    "Vector dimension error",
    "Not existing vector name error",
    "Payload type does not match",
    "Validation failed",
    "Wrong usage of sparse vectors",
    "Service runtime error: config is incompatible",
)
_MISSING = ("cannot load edge shard: directory", "no segments were loaded", "Shard is not initialized")


def _panicked(exc: BaseException) -> bool:
    # Rust panics arrive as pyo3_runtime.PanicException, a BaseException whose module is not importable.
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


def _translate(exc: BaseException, collection: str) -> BaseException:
    """An exception of the engine (or of our file handling) as the port's error of the same kind."""
    if isinstance(exc, VectorStoreError):
        return exc
    where = f"embedded store, collection {collection}"
    if panicked(exc):
        return VectorStoreError(f"{where}: the engine failed: {exc}")
    if isinstance(exc, FileNotFoundError):
        return CollectionMissing(f"{where}: does not exist")
    if isinstance(exc, OSError):
        return VectorStoreError(f"{where}: I/O error: {exc}")
    if isinstance(exc, (TypeError, ValueError)):
        return StoreRejected(f"{where}: {exc}")
    if type(exc) is Exception:
        message = str(exc)
        if message.startswith(_REJECTED):
            return StoreRejected(f"{where}: {message}")
        if any(marker in message for marker in _MISSING):
            return CollectionMissing(f"{where}: does not exist ({message})")
        return VectorStoreError(f"{where}: {message}")
    return exc


# One shard in this process, vectors and payload read from disk through the page cache (cold), no
# quantization: what every embedded collection is, whatever a product's spec asks of a Qdrant cluster.
EMBEDDED_LAYOUT = CollectionLayout(on_disk_vectors=True, on_disk_payload=True)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value).lower() if isinstance(value, bool) else str(value)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80].strip("._-")


def safe_dirname(name: str) -> str:
    """A directory name for any collection name: readable start, unique by the hash of the whole."""
    return f"{_slug(name) or 'c'}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def ingestion_folder(root: Path, namespace: str, name: str) -> Path:
    """The folder where an ingestion Job writes a product's collections for the store at ``root`` to adopt."""
    return root / INGEST_DIR / safe_dirname(collection_alias(namespace, name))


def _finite(vector: Sequence[float], size: int) -> list[float]:
    values = [float(v) for v in vector]
    if len(values) != size:
        raise StoreRejected(f"a vector of {len(values)} dimensions for a collection of {size}")
    if not all(map(math.isfinite, values)):
        raise StoreRejected("a vector with NaN or infinite values")  # the engine would store them silently
    return values


@dataclass(frozen=True)
class SearchPlan:
    """The engine calls of one search: ``query``, then for ``cosines_by_engine`` an exact one for its hits' cosines."""

    query: qe.QueryRequest
    dense: list[float]
    scored: bool  # the query's own scores are the similarities
    cosines_by_engine: bool


def cosine_query(dense: list[float], ids: set[Any]) -> qe.QueryRequest:
    """The exact dense query that scores just the points ``ids`` by their similarity to ``dense``."""
    return qe.QueryRequest(
        query=qe.Query.Nearest(dense, using=DENSE_VECTOR),
        filter=qe.Filter(must=[qe.HasIdCondition(ids)]),
        limit=len(ids),
        with_payload=False,
        params=qe.SearchParams(exact=True),
    )


def _fused_with_similarity(engine: qe.EdgeShard, query: qe.QueryRequest, dense: list[float]) -> list[ScoredRow]:
    """A fused query's rows, each with the question's cosine from a dense query over those points only.

    Returning the points' vectors to compute the cosines here cost more than the search (a routing
    search's 64 vectors: about 2 of 6.7 ms, converted to Python lists and back to numpy).
    """
    points = engine.query(query)
    if not points:
        return []
    ids = [p.id for p in points]  # read once: each read of an id builds a uuid.UUID
    cosine = {p.id: float(p.score) for p in engine.query(cosine_query(dense, set(ids)))}
    return [
        ScoredRow(str(pid), float(p.score), p.payload or {}, cosine.get(pid))
        for pid, p in zip(ids, points, strict=True)
    ]


def _checked_rows(vectors: Sequence[Sequence[float]], size: int) -> list[list[float]]:
    """The vectors as lists of floats, once checked: ``size`` dimensions each, every value a finite float32."""
    # One array check per batch: per-value Python checks cost as much as the engine's write.
    try:
        matrix = np.asarray(vectors, dtype=np.float32)
    except ValueError as exc:  # ragged rows
        raise StoreRejected(f"vectors of different dimensions for a collection of {size}") from exc
    if matrix.ndim != 2 or matrix.shape[1] != size:
        raise StoreRejected(f"vectors of shape {matrix.shape} for a collection of {size} dimensions")
    if not np.isfinite(matrix).all():  # the engine would store them silently
        raise StoreRejected("a vector with NaN, infinite or out-of-range (float32) values")
    # The engine reads a list of floats about 2.5x faster than a numpy row: the caller's own lists, if lists.
    lists = all(type(v) is list for v in vectors)
    return cast("list[list[float]]", list(vectors)) if lists else matrix.tolist()


@contextlib.contextmanager
def _translated(collection: str) -> Iterator[None]:
    """The engine's errors (a Rust panic is a BaseException) as the port's, by kind; the rest as they are."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        translated = _translate(exc, collection)
        if translated is exc:
            raise
        raise translated from exc


# The processes that create collections and write their first batch (see the module docstring): one per
# default ingestion slot. With two, each new product's two calls queued for them (28-32 products/s in one
# process against 55-65 with four, 2026-12-02).
_BUILDER = ChildProcesses(4)
# The process that builds large collections' HNSW indexes (see ``EdgeStore.optimize``): one, so an
# index build (minutes of one core at a few hundred thousand points) never takes both cores.
_OPTIMIZER = ChildProcesses(1)
OPTIMIZING_DIR = "shard.optimizing"  # the copy being indexed; a leftover of a crash is removed by the next build
REPLACED_DIR = "shard.replaced"  # the shard an indexed copy replaces, for the instant between two renames


# In a collection's metadata: its last index build's recall, and the candidates its searches weigh (None: exact).
RECALL_KEY = "index_recall"
CANDIDATES_KEY = "index_candidates"


@dataclass(frozen=True)
class IndexState:
    """A collection's points, those its HNSW index holds (deleted ones included until the next build), and
    whether its searches use the index (no: none built yet, or one that misses too many of the best rows)."""

    points: int
    indexed: int
    recall: float | None  # of its last build
    candidates: int | None  # per search, the fewest that found enough of the best rows; None: searches are exact

    @property
    def used(self) -> bool:
        """Whether its searches use the index."""
        return self.candidates is not None


def search_params(meta: Mapping[str, Any]) -> qe.SearchParams | None:
    """How a collection's dense searches use its index: with the candidates its last build chose, or not at all."""
    if RECALL_KEY not in meta:
        return None  # never indexed: exact searches of its plain segments
    candidates = meta.get(CANDIDATES_KEY)
    return qe.SearchParams(hnsw_ef=int(candidates)) if candidates else qe.SearchParams(exact=True)


@dataclass
class _Optimization:
    """A collection's index build in flight: the writes made since its copy, replayed on the copy before the swap."""

    journal: list[qe.UpdateOperation] = field(default_factory=list)
    points: int = 0  # points written since the copy
    abandoned: bool = False  # the collection was dropped, replaced or written too much meanwhile


# Points written to a collection while its index is built, past which the build is given up (tried again
# later): the journal holds them (1.5 KiB each at 384 dimensions) until the copy catches up.
JOURNAL_MAX_POINTS = 50_000


@dataclass
class _Shard:
    """An open shard and the operations in flight on it."""

    name: str
    meta: dict[str, Any]
    engine: qe.EdgeShard
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    # How its dense searches use its index: read from its metadata once, as it opens (a new index reopens it).
    search: qe.SearchParams | None = field(init=False)

    def __post_init__(self) -> None:
        self.idle.set()
        self.search = search_params(self.meta)


class EdgeStore:
    """Product collections in Qdrant's embedded engine, under one folder owned by this process."""

    def __init__(
        self,
        root: Path | None,
        *,
        concurrency: int = 8,
        max_open: int = 256,
        search_threads: int = 1,
        batch_size: int = 256,
        optimize_min_points: int = 20_000,
        optimize_delay: float = 5.0,
        min_recall: float = MIN_RECALL,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="datamesh-store-") if root is None else None
        self.root = Path(self._tmp.name) if self._tmp is not None else Path(root or ".")
        (self.root / "collections").mkdir(parents=True, exist_ok=True)
        # The collections' folder names, sorted, kept as this process (their only writer) makes and
        # drops them: finding a product's collections is then a range of this list, not a listing of
        # the folder (23 ms with 10,000 collections, once per deleted product).
        self._folders = sorted(os.listdir(self.root / "collections"))
        self.max_open = max_open
        self.search_threads = search_threads
        self.batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="datamesh-store")
        self._open: OrderedDict[str, _Shard] = OrderedDict()  # least recently used first
        self._locks: dict[str, asyncio.Lock] = {}
        self._aliases = self._read_aliases()
        self._alias_lock = asyncio.Lock()
        self._closed = False
        # Point counts of collections, kept between writes: this process is the store's only writer,
        # so a count changes only through its own writes. A periodic check of an unchanged product
        # then reads its count without reopening a collection the open-collection cache has closed
        # (with thousands of products those reopenings were most of the operator's work). A run that
        # closed cleanly leaves its counts for the next one, so a restart's checks reopen nothing either.
        self._counts: dict[str, int] = self._take_saved_counts()
        self._writes: dict[str, int] = {}
        # Collections created but not yet made on disk (their metadata), and those whose only write, by
        # the builder, was of one ingestion (its digest). The builder makes a new collection with its
        # first batch (all the rows of a small product) in one go: making it empty, then opening it again
        # to write took 56 ms of a builder a product against 43 (create, index, write, flush, close once).
        # Opening a collection here holds the GIL through the engine's fsyncs (10-30 ms), so this process
        # opens it only when an operation needs it. An operation on a collection not yet made makes it.
        self._unbuilt: dict[str, dict[str, Any]] = {}
        self._one_ingest: dict[str, str] = {}
        # HNSW indexes of large collections, built in a child process (see ``optimize``).
        self.optimize_min_points = optimize_min_points
        self.optimize_delay = optimize_delay
        self.min_recall = min_recall  # an index finding less of the exact best rows is not used
        self._optimizing: dict[str, _Optimization] = {}
        self._optimize_slot = asyncio.Semaphore(1)
        self._checks: set[str] = set()  # collections whose need of an index is to be checked shortly
        self._checked: dict[str, int] = {}  # their write counter when last checked: unwritten, never checked again
        self._unindexed: dict[str, int] = {}  # points written or deleted since the last build (this run's)
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False

    def _take_saved_counts(self) -> dict[str, int]:
        """The counts the last run saved as it closed, for the collections still here; the file is read once.

        Read once and removed: if this run is killed, the next one counts every collection itself.
        """
        path = self.root / COUNTS_FILE
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            log.warning("embedded store: %s is unreadable, every collection is counted again: %s", path, exc)
            saved = {}
        path.unlink()
        return {
            name: count
            for name, count in saved.items()
            if isinstance(count, int) and self._folder_at(safe_dirname(name))[1]
        }

    # ---- plumbing ------------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _dir(self, name: str) -> Path:
        return self.root / "collections" / safe_dirname(name)

    async def _engine(self, collection: str, call: Callable[..., T], *args: Any) -> T:
        """Run one engine call in a worker thread, bounded, its errors translated by kind."""
        async with self._bounded(collection):
            # Threads of our own, as many as the slots: a call holding a slot never waits for a thread.
            return await asyncio.get_running_loop().run_in_executor(self._threads, call, *args)

    @contextlib.asynccontextmanager
    async def _bounded(self, collection: str) -> AsyncIterator[None]:
        """One of the store's slots for an engine call, its errors translated by kind."""
        if self._closed:
            raise VectorStoreError("the embedded store is closed")
        async with self._slots:
            with _translated(collection):
                yield

    def _inline(self, collection: str, call: Callable[..., T], *args: Any) -> T:
        """Run one short engine call (a search) on the event loop's thread, its errors translated by kind.

        The engine holds the GIL for the whole of every call, so a worker thread runs nothing beside
        it and only adds two hand-overs of the GIL: a question's twelve searches took 4.5-5 ms longer
        in worker threads than called here (ten products, MiniLM, 2026-12-01).
        """
        if self._closed:
            raise VectorStoreError("the embedded store is closed")
        with _translated(collection):
            return call(*args)

    def _config(self, meta: Mapping[str, Any]) -> qe.EdgeConfig:
        return edge_config(meta, self.search_threads)

    def _read_meta(self, name: str) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = json.loads((self._dir(name) / META_FILE).read_text())
        except FileNotFoundError:
            return None
        return meta

    @contextlib.asynccontextmanager
    async def _use(self, name: str) -> AsyncIterator[_Shard]:
        """An open shard for one operation: opened on first use, kept open while it is in use."""
        async with self._lock(name):
            shard = self._open.get(name)
            if shard is None:
                await self._build_locked(name)
                meta = await self._engine(name, self._read_meta, name)
                if meta is None:
                    raise CollectionMissing(f"embedded store, collection {name}: does not exist")
                engine = await self._engine(name, self._load, name, meta)
                shard = self._open[name] = _Shard(name, meta, engine)
                self._consider_optimizing(name)  # a restart's large collections get their index too
            self._open.move_to_end(name)
            shard.users += 1
            shard.idle.clear()
        try:
            yield shard
        finally:
            shard.users -= 1
            if shard.users == 0:
                shard.idle.set()
            await self._evict()

    def _load(self, name: str, meta: Mapping[str, Any]) -> qe.EdgeShard:
        folder = self._dir(name)
        if not (folder / SHARD_DIR).exists() and (folder / REPLACED_DIR).exists():
            (folder / REPLACED_DIR).rename(folder / SHARD_DIR)  # a crash between the two renames of an index swap
        return qe.EdgeShard.load(str(folder / SHARD_DIR), self._config(meta))

    async def _evict(self) -> None:
        # Close the least recently used idle shards over the cap (each holds a thread and mappings).
        if len(self._open) <= self.max_open:
            return  # every operation ends here: no scan of the open shards unless there is work
        for name in [n for n, s in self._open.items() if s.users == 0][: max(0, len(self._open) - self.max_open)]:
            async with self._lock(name):
                shard = self._open.get(name)
                if shard is not None and shard.users == 0:
                    await self._close_locked(name)

    async def _close_locked(self, name: str) -> None:
        shard = self._open.pop(name, None)
        if shard is None:
            return
        await shard.idle.wait()
        try:
            await asyncio.to_thread(shard.engine.close)
        except Exception as exc:  # the shard is gone either way; say why it did not close cleanly
            log.warning("closing embedded collection %s: %s", name, exc)

    def _changed(self, name: str) -> None:
        """A write to ``name`` begins or ends: its cached count is stale, and so is any count in flight."""
        for key in {name, self._resolve(name)}:
            self._writes[key] = self._writes.get(key, 0) + 1
            self._counts.pop(key, None)
            self._one_ingest.pop(key, None)

    @contextlib.asynccontextmanager
    async def _writing(self, name: str) -> AsyncIterator[_Shard]:
        """An open shard for one write, the only writer on it; its cached count dropped before and after."""
        self._changed(name)
        try:
            async with self._use(name) as shard, shard.writing:
                yield shard
        finally:
            self._changed(name)
            self._consider_optimizing(self._resolve(name))

    def _resolve(self, name: str) -> str:
        # Aliases first, as a Qdrant server resolves them.
        return self._aliases.get(name, name)

    # ---- aliases -------------------------------------------------------------------------------

    def _alias_file(self, alias: str) -> Path:
        return self.root / ALIASES_DIR / safe_dirname(alias)

    def _write_alias(self, alias: str, index: str) -> None:
        atomic_write(self._alias_file(alias), json.dumps({"alias": alias, "index": index}))

    def _remove_alias(self, alias: str) -> None:
        self._alias_file(alias).unlink(missing_ok=True)

    def _read_aliases(self) -> dict[str, str]:
        """Every alias's pointer; a store written by an earlier version (one file of all) is converted."""
        folder = self.root / ALIASES_DIR
        folder.mkdir(exist_ok=True)
        aliases: dict[str, str] = {}
        for path in folder.iterdir():
            if path.name.startswith("."):  # an atomic write's temporary file, left by a crash
                continue
            try:
                pointer = json.loads(path.read_text())
                aliases[str(pointer["alias"])] = str(pointer["index"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Its product's next reconcile points the alias again; the rest of the store is unaffected.
                log.warning("embedded store: alias file %s is unreadable, ignored: %s", path, exc)
        legacy = self.root / LEGACY_ALIASES_FILE
        if legacy.exists():
            for alias, index in json.loads(legacy.read_text()).items():
                if alias not in aliases:  # converted before a crash cut the conversion short
                    self._write_alias(alias, index)
                    aliases[alias] = index
            legacy.unlink()
        return aliases

    async def current_index(self, alias: str) -> str | None:
        """The index collection an alias points at, if any."""
        return self._aliases.get(alias)

    async def point_alias(self, alias: str, index: str) -> str | None:
        """Point ``alias`` at ``index`` atomically (its pointer file replaced whole); returns the previous target."""
        if index in self._unbuilt:  # an alias on disk points at a collection on disk, whatever happens next
            async with self._lock(index):
                await self._build_locked(index)
        if await self._engine(index, self._read_meta, index) is None:
            raise CollectionMissing(f"embedded store, collection {index}: does not exist")
        async with self._alias_lock:
            previous = self._aliases.get(alias)
            if previous != index:
                await self._engine(alias, self._write_alias, alias, index)
                self._aliases[alias] = index
            return previous

    # ---- collections ---------------------------------------------------------------------------

    async def ensure_index(self, plan: CollectionPlan) -> bool:
        """Create the plan's index collection if missing; True when it was created."""
        indexes: dict[str, str] = {k: FieldType(v).value for k, v in plan.payload_indexes.items()}
        wanted = {
            "name": plan.index,
            "vector_size": plan.vector_size,
            "distance": Distance(plan.distance).value,
            "sparse": plan.sparse,
            "payload_indexes": indexes,
        }
        async with self._lock(plan.index):
            shard = self._open.get(plan.index)
            # An open collection's description is the one in memory (this process is its only writer):
            # every reconcile and periodic check asks, and reading the file took a worker thread each.
            meta = shard.meta if shard is not None else self._unbuilt.get(plan.index)
            if meta is None:
                meta = await self._engine(plan.index, self._read_meta, plan.index)
            if meta is None:
                self._create(plan.index, wanted)
            elif any(meta[k] != wanted[k] for k in ("vector_size", "distance", "sparse")):
                raise StoreRejected(f"embedded store, collection {plan.index}: exists with other vectors")
        if meta is None:
            return True
        missing = {k: v for k, v in indexes.items() if k not in meta["payload_indexes"]}
        if missing:  # a collection made by an earlier version: its filters get their indexes now
            async with self._use(plan.index) as shard, shard.writing:
                await self._engine(plan.index, self._add_payload_indexes, shard, missing)
        return False

    async def apply_layout(self, plan: CollectionPlan) -> LayoutReport:
        """The embedded engine's own layout; what the plan asks beyond it is reported as ignored."""
        default = CollectionLayout()
        asked, kept = plan.layout.wire(), EMBEDDED_LAYOUT.wire()
        ignored = tuple(
            f"{name} {_shown(value)}"
            for name, value in asked.items()
            if value != default.wire()[name] and value != kept[name]
        )
        return LayoutReport(EMBEDDED_LAYOUT, ignored=ignored)

    def _add_payload_indexes(self, shard: _Shard, indexes: Mapping[str, str]) -> None:
        self._abandon_optimization(shard.name)  # its copy has not these indexes
        add_payload_indexes(shard.engine, indexes)
        shard.engine.flush()
        shard.meta = {**shard.meta, "payload_indexes": {**shard.meta["payload_indexes"], **indexes}}
        atomic_write(self._dir(shard.name) / META_FILE, json.dumps(shard.meta, sort_keys=True))

    def _create(self, name: str, meta: dict[str, Any]) -> None:
        """A new collection, made on disk by a builder process with its first batch, or when an operation needs it."""
        self._add_folder(safe_dirname(name))  # before it exists: a drop meanwhile must find it
        self._unbuilt[name] = meta
        self._counts[name] = 0  # this process is its only writer (a count a crash left for this name is void)

    async def _build_locked(self, name: str, points: Points | None = None) -> None:
        """Make a created collection on disk in a builder process (with ``points`` if given), its lock held.

        Nothing to do for a collection already made. A builder that died is a VectorStoreError.
        """
        meta = self._unbuilt.pop(name, None)
        if meta is None:
            return
        self._changed(name)
        try:
            async with self._bounded(name):
                count = await _BUILDER.run(build_shard, str(self._dir(name)), meta, self.search_threads, points)
        except BaseException as exc:
            self._unbuilt[name] = meta  # made again by the next operation (a half-made folder is replaced)
            if isinstance(exc, BrokenProcessPool):
                raise VectorStoreError(f"embedded store, collection {name}: the process creating it died") from exc
            raise
        finally:
            self._changed(name)
        self._counts[name] = count

    async def _write_unbuilt(
        self,
        name: str,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        texts: Sequence[str],
        payloads: Sequence[Mapping[str, Any]],
    ) -> bool:
        """A new collection made with its first batch (of one engine write at most) by a builder; False if not so."""
        if name not in self._unbuilt or len(ids) > self.batch_size:
            return False
        async with self._lock(name):
            meta = self._unbuilt.get(name)
            if meta is None:
                return False  # made meanwhile
            # Checked here: the builder imports no numpy (see ``edge_builder``).
            rows = _checked_rows(vectors, int(meta["vector_size"]))
            await self._build_locked(name, (list(ids), rows, list(texts), [dict(p) for p in payloads]))
        digests = {p.get(DIGEST_KEY) for p in payloads}
        if len(digests) == 1 and isinstance(only := digests.pop(), str):
            self._one_ingest[name] = only  # nothing of another ingestion to delete
        return True

    async def exists(self, collection: str) -> bool:
        """Whether a collection (or alias) exists."""
        name = self._resolve(collection)
        return name in self._unbuilt or await self._engine(name, self._read_meta, name) is not None

    async def count(self, collection: str) -> int:
        """Exact number of points in a collection or alias."""
        name = self._resolve(collection)
        cached = self._counts.get(name)
        if cached is not None:
            return cached
        before = self._writes.get(name, 0)
        async with self._use(name) as shard:
            counted = await self._engine(name, shard.engine.count, qe.CountRequest(exact=True))
        if self._writes.get(name, 0) == before:  # no write began or ended meanwhile
            self._counts[name] = counted
        return counted

    async def routing_points(self, collection: str, product: str, digest: str, kind: RoutingKind = "row") -> int:
        """Routing collections: how many rows (or cards) of a product's ingestion ``digest`` it holds."""
        name = self._resolve(collection)
        fields = routing_fields(product, digest, kind).items()
        rows = qe.Filter(must=[qe.FieldCondition(key=key, match=qe.MatchValue(value)) for key, value in fields])
        async with self._use(name) as shard:
            return int(await self._engine(name, shard.engine.count, qe.CountRequest(exact=True, filter=rows)))

    async def drop(self, collection: str) -> None:
        """Close and delete a collection if it exists (aliases pointing at it are left alone)."""
        async with self._lock(collection):
            self._changed(collection)
            self._unbuilt.pop(collection, None)
            await self._close_locked(collection)
            self._drop_folder(safe_dirname(collection))
            await self._engine(collection, self._remove, collection)

    def _folder_at(self, folder: str) -> tuple[int, bool]:
        """Where ``folder`` is (or would go) in the sorted list, and whether it is there."""
        at = bisect.bisect_left(self._folders, folder)
        return at, at < len(self._folders) and self._folders[at] == folder

    def _add_folder(self, folder: str) -> None:
        at, found = self._folder_at(folder)
        if not found:
            self._folders.insert(at, folder)

    def _drop_folder(self, folder: str) -> None:
        at, found = self._folder_at(folder)
        if found:
            del self._folders[at]

    def _remove(self, name: str) -> None:
        self._abandon_optimization(name)
        self._unindexed.pop(name, None)
        directory = self._dir(name)
        if directory.exists():
            # Renamed first: the collection is gone at once, even if the removal is interrupted.
            tomb = directory.with_name(f".drop-{uuid.uuid4().hex}")
            directory.rename(tomb)
            shutil.rmtree(tomb, ignore_errors=True)

    async def drop_product(self, alias: str) -> None:
        """Delete a product's alias and every index collection built for it."""
        async with self._alias_lock:
            if alias in self._aliases:
                await self._engine(alias, self._remove_alias, alias)
                del self._aliases[alias]
        names = await self._engine(alias, self._collections, self._folders_starting(_slug(alias)))
        for name in [*names, *self._unbuilt]:
            if name.startswith(f"{alias}--"):
                await self.drop(name)
        # What an ingestion Job left unadopted (its folder is named for the alias).
        await asyncio.to_thread(shutil.rmtree, self.root / INGEST_DIR / safe_dirname(alias), True)

    def _folders_starting(self, slug: str) -> list[str]:
        # In the event loop's thread, the only one that changes the list.
        folders = []
        for folder in itertools.islice(self._folders, bisect.bisect_left(self._folders, slug), None):
            if not folder.startswith(slug):
                break
            folders.append(folder)
        return folders

    def _collections(self, folders: Sequence[str]) -> list[str]:
        """The names of the collections in ``folders`` (from their metadata)."""
        names = []
        for folder in folders:
            try:
                names.append(json.loads((self.root / "collections" / folder / META_FILE).read_text())["name"])
            except (FileNotFoundError, NotADirectoryError):
                continue  # a creation a crash cut short, or one in progress
        return names

    # ---- points --------------------------------------------------------------------------------

    async def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        texts: Sequence[str],
        payloads: Sequence[Mapping[str, Any]],
    ) -> None:
        """Write points in batches (the engine holds the GIL while it writes, so batches stay small)."""
        if await self._write_unbuilt(collection, ids, vectors, texts, payloads):
            return
        async with self._writing(collection) as shard:
            for start in range(0, len(ids), self.batch_size):
                end = start + self.batch_size
                batch = (ids[start:end], vectors[start:end], texts[start:end], payloads[start:end])
                await self._engine(collection, self._write, shard, *batch)

    def _write(
        self,
        shard: _Shard,
        ids: Sequence[str],
        vectors: Sequence[Sequence[float]],
        texts: Sequence[str],
        payloads: Sequence[Mapping[str, Any]],
    ) -> None:
        rows = _checked_rows(vectors, int(shard.meta["vector_size"]))
        self._apply(shard, upsert_operation(bool(shard.meta["sparse"]), ids, rows, texts, payloads), len(ids))

    def _apply(self, shard: _Shard, operation: qe.UpdateOperation, points: int = 0) -> None:
        """Apply a write to a collection, kept for its copy if its index is being built."""
        shard.engine.update(operation)
        if points > 0:
            self._unindexed[shard.name] = self._unindexed.get(shard.name, 0) + points
        optimization = self._optimizing.get(shard.name)
        if optimization is None or optimization.abandoned:
            return
        optimization.journal.append(operation)
        optimization.points += points
        if optimization.points > JOURNAL_MAX_POINTS:
            self._abandon_optimization(shard.name)

    async def delete_other_ingests(self, collection: str, digest: str) -> None:
        """Remove points not written by the ingestion with ``digest``."""
        if self._one_ingest.get(collection) == digest:
            return  # written once, by the builder, with this ingestion's points only
        keep = qe.Filter(must_not=[qe.FieldCondition(key=DIGEST_KEY, match=qe.MatchValue(digest))])
        async with self._writing(collection) as shard:
            await self._engine(collection, self._delete, shard, keep)

    async def remove_product(self, collection: str, product: str, keep_digest: str | None = None) -> None:
        """Routing collections: remove a product's points (but those of the ingestion ``keep_digest``)."""
        if not await self.exists(collection):
            return
        keep: list[Any] | None = None
        if keep_digest is not None:
            keep = [qe.FieldCondition(key=DIGEST_KEY, match=qe.MatchValue(keep_digest))]
        doomed = qe.Filter(must=[qe.FieldCondition(key=PRODUCT_KEY, match=qe.MatchValue(product))], must_not=keep)
        async with self._writing(collection) as shard:
            await self._engine(collection, self._delete, shard, doomed)

    def _delete(self, shard: _Shard, doomed: qe.Filter) -> None:
        """Delete the points ``doomed`` matches, counted like written ones toward the next index build."""
        # An index keeps deleted points (searches step over them) until a build vacuums them: a mesh that lost
        # many products must get one as a mesh that gained many does.
        removed = int(shard.engine.count(qe.CountRequest(exact=True, filter=doomed)))
        # Not counted toward a running build's journal: replaying a deletion costs little whatever it removes.
        self._apply(shard, qe.UpdateOperation.delete_points_by_filter(doomed))
        self._unindexed[shard.name] = self._unindexed.get(shard.name, 0) + removed

    async def search(self, collection: str, request: SearchRequest) -> list[ScoredRow]:
        """The best rows for a question: one query, dense and BM25 prefetches fused in hybrid mode.

        A fused search on a cosine collection asks a second, exact dense query for its hits' cosines.
        """
        name = self._resolve(collection)
        async with self._use(name) as shard:
            plan = self.search_plan(shard, request)
            if plan is None:
                return []  # no indexable word: nothing can match
            if plan.cosines_by_engine:
                return stable_top(
                    self._inline(name, _fused_with_similarity, shard.engine, plan.query, plan.dense), request.limit
                )
            points = self._inline(name, shard.engine.query, plan.query)
        if plan.scored:
            rows = [ScoredRow(str(p.id), float(p.score), p.payload or {}, float(p.score)) for p in points]
        else:
            similarities = cosines(plan.dense, [dense_of(p.vector) for p in points])
            rows = [
                ScoredRow(str(p.id), float(p.score), p.payload or {}, sim)
                for p, sim in zip(points, similarities, strict=True)
            ]
        return stable_top(rows, request.limit)

    def search_plan(self, shard: _Shard, request: SearchRequest) -> SearchPlan | None:
        """The engine queries :meth:`search` makes for ``request`` on ``shard``; None when nothing can match."""
        dense = _finite(request.vector, int(shard.meta["vector_size"]))
        has_words = bool(shard.meta["sparse"]) and request.mode is not SearchMode.dense
        words = bm25.query_vector(request.text) if has_words else None
        if request.mode is SearchMode.sparse and words is None:
            return None
        # A plain cosine (or dot, on unit vectors) query scores by similarity already: no vectors needed.
        scored = (words is None or request.mode is SearchMode.dense) and shard.meta["distance"] != "Euclid"
        # A fused query's scores are ranks: a cosine collection asks the engine for the similarities.
        by_engine = not scored and shard.meta["distance"] == Distance.cosine.value
        query = self._query(request, dense, words, not (scored or by_engine), shard.search)
        return SearchPlan(query, dense, scored, by_engine)

    async def sample(self, collection: str, limit: int) -> list[Mapping[str, Any]]:
        """The payloads of up to ``limit`` points in point-id order."""
        name = self._resolve(collection)
        request = qe.ScrollRequest(limit=limit, with_payload=True, with_vector=False)
        async with self._use(name) as shard:
            records, _ = await self._engine(name, shard.engine.scroll, request)
        return [r.payload or {} for r in records]

    async def adopt_ingestion(self, namespace: str, name: str, index: str, routing: str) -> None:
        """Move in the index collection a Job wrote into its folder (replacing ours) and copy its routing rows.

        The Job's process has ended, so its folder is free to open. The folder goes once adopted, so adopting
        the same Job's work again finds nothing to do.
        """
        folder = ingestion_folder(self.root, namespace, name)
        made = folder / "collections" / safe_dirname(index)
        if not folder.exists() and await self.exists(index):
            return  # adopted already (a second look at the same finished Job)
        if not (made / META_FILE).is_file():
            raise CollectionMissing(
                f"embedded store: the ingestion Job of {namespace}/{name} left no collection {index} in {folder}"
            )
        written = EdgeStore(
            folder, concurrency=1, max_open=2, search_threads=self.search_threads, optimize_min_points=0
        )
        try:
            routed = await written._product_points(routing, product_ref(namespace, name))
        finally:
            await written.close()
        async with self._lock(index):
            self._changed(index)
            try:
                self._unbuilt.pop(index, None)
                await self._close_locked(index)
                await self._engine(index, self._replace, index, made)
                self._add_folder(safe_dirname(index))
            finally:
                self._changed(index)
        if routed[0]:
            await self.upsert(routing, *routed)
        await asyncio.to_thread(shutil.rmtree, folder, True)

    def _replace(self, name: str, made: Path) -> None:
        """``made`` (a collection folder of this file system) becomes the collection ``name``."""
        self._remove(name)
        made.rename(self._dir(name))

    async def _product_points(self, collection: str, product: str) -> Points:
        """A routing collection's points of ``product``: ids, dense vectors, texts and payloads."""
        ids: list[str] = []
        vectors: list[list[float]] = []
        texts: list[str] = []
        payloads: list[dict[str, Any]] = []
        if not await self.exists(collection):
            return ids, vectors, texts, payloads
        name = self._resolve(collection)
        mine = qe.Filter(must=[qe.FieldCondition(key=PRODUCT_KEY, match=qe.MatchValue(product))])
        offset: Any = None
        async with self._use(name) as shard:
            while True:
                request = qe.ScrollRequest(
                    offset=offset, limit=self.batch_size, filter=mine, with_payload=True, with_vector=[DENSE_VECTOR]
                )
                records, offset = await self._engine(name, shard.engine.scroll, request)
                for record in records:
                    payload = dict(record.payload or {})
                    ids.append(str(record.id))
                    vectors.append(list(dense_of(record.vector) or ()))
                    texts.append(str(payload.get(TEXT_KEY, "")))
                    payloads.append(payload)
                if offset is None:
                    return ids, vectors, texts, payloads

    @staticmethod
    def _query(
        request: SearchRequest,
        dense: list[float],
        words: qe.SparseVector | None,
        with_vectors: bool,
        params: qe.SearchParams | None,
    ) -> qe.QueryRequest:
        """The engine's query for ``request``; ``params``: how its dense search uses the index."""
        payload: Any = list(request.payload) if request.payload is not None else True
        common: dict[str, Any] = {"limit": request.limit + TIE_SLACK, "with_payload": payload}
        if with_vectors:
            common["with_vector"] = [DENSE_VECTOR]
        conditions: list[Any] = []
        if request.products is not None:
            conditions.append(qe.FieldCondition(key=PRODUCT_KEY, match=qe.MatchAny(list(request.products))))
        if request.kind is not None:
            conditions.append(qe.FieldCondition(key=KIND_KEY, match=qe.MatchValue(request.kind)))
        excluded: list[Any] = [qe.FieldCondition(key=PRODUCT_KEY, match=qe.MatchAny(list(request.excluded or ())))]
        if conditions or request.excluded:
            common["filter"] = qe.Filter(must=conditions or None, must_not=excluded if request.excluded else None)
        if request.mode is SearchMode.sparse and words is not None:
            return qe.QueryRequest(query=qe.Query.Nearest(words, using=SPARSE_VECTOR), **common)
        if request.mode is SearchMode.hybrid and words is not None:
            fetch = FUSION.fetch(request.limit)
            return qe.QueryRequest(
                prefetches=[
                    qe.Prefetch(limit=fetch, query=qe.Query.Nearest(dense, using=DENSE_VECTOR), params=params),
                    qe.Prefetch(limit=fetch, query=qe.Query.Nearest(words, using=SPARSE_VECTOR)),
                ],
                # The stub names the Fusion class; the engine takes its inner Rrf as the query.
                query=qe.Fusion.Rrf(k=FUSION.k, weights=[FUSION.dense_weight, FUSION.sparse_weight]),  # type: ignore[arg-type]
                **common,
            )
        return qe.QueryRequest(query=qe.Query.Nearest(dense, using=DENSE_VECTOR), params=params, **common)

    # ---- HNSW indexes of large collections ----------------------------------------------------

    def _consider_optimizing(self, name: str) -> None:
        """Check shortly whether ``name`` needs its index built (after a write, or as it opens); cheap when not."""
        if not self.optimize_min_points or self._closing or name in self._checks or name in self._optimizing:
            return
        writes = self._writes.get(name, 0)
        if self._checked.get(name) == writes:
            return  # not written since its last check
        count = self._counts.get(name)
        if count is not None and count < self.optimize_min_points:
            self._checked[name] = writes
            return
        self._checks.add(name)
        task = asyncio.get_running_loop().create_task(self._check_soon(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _check_soon(self, name: str) -> None:
        # Once its writes pause (an ingestion or a burst of new products is then one build, not one per
        # threshold crossed, with every row of it to replay), or after sixty pauses' time (5 min) if they never do.
        loop = asyncio.get_running_loop()
        latest = loop.time() + 60 * self.optimize_delay
        try:
            while True:
                writes = self._writes.get(name, 0)
                await asyncio.sleep(self.optimize_delay)
                if self._writes.get(name, 0) == writes or loop.time() >= latest:
                    break
        finally:
            self._checks.discard(name)
        try:
            if await self._needs_index(name):
                await self.optimize(name)
        except Exception as exc:  # a background task: said in the log, tried again after the next write or opening
            log.warning("embedded store: the HNSW index of collection %s was not built: %s", name, exc)

    async def _needs_index(self, name: str) -> bool:
        """Whether ``name`` (if open: a check never opens one) is large and enough of it is not yet indexed."""
        if name not in self._open or self._closed:
            return False
        self._checked[name] = self._writes.get(name, 0)
        state = await self.index_state(name)
        if state.points < self.optimize_min_points:
            return False
        # Points written since the last build are outside the index and searched exactly (all of them if it was
        # never built): built again once they are a tenth of the collection. A copy already indexed keeps its
        # graph (a build with nothing new took 1.9 s at 36,070 points against 15.6 s for the first).
        # Points outside the index that an earlier run wrote are not in this run's count: the engine's count of
        # indexed points gives them, at least (it still counts deleted points as indexed until the next build).
        outside = max(state.points - state.indexed, self._unindexed.get(name, 0))
        return outside >= max(self.optimize_min_points // 2, state.points // 10)

    async def index_state(self, collection: str) -> IndexState:
        """A collection's HNSW index: how many points it holds, and whether searches use it."""
        name = self._resolve(collection)
        async with self._use(name) as shard:
            return await self._engine(name, self._index_state, shard)

    @staticmethod
    def _index_state(shard: _Shard) -> IndexState:
        info = shard.engine.info()
        # The engine counts sparse vectors as indexed wherever they are (their index is always built).
        worded = 0
        if shard.meta["sparse"]:
            words = qe.Filter(must=[qe.HasVectorCondition(SPARSE_VECTOR)])
            worded = int(shard.engine.count(qe.CountRequest(exact=True, filter=words)))
        indexed = int(info.indexed_vectors_count) - worded
        return IndexState(int(info.points_count), indexed, shard.meta.get(RECALL_KEY), shard.meta.get(CANDIDATES_KEY))

    async def settled(self) -> None:
        """Return once no index build is due or running (benchmarks measure searches on the indexes)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _abandon_optimization(self, name: str) -> None:
        optimization = self._optimizing.get(name)
        if optimization is not None:
            optimization.abandoned = True
            optimization.journal.clear()

    async def optimize(self, collection: str) -> bool:
        """Build the HNSW index of a collection (or alias) in a child process; False if the build was given up.

        The child indexes a copy of the shard; the writes made meanwhile are replayed on the copy, which then
        replaces the shard. Searches go on throughout but for the swap itself (the shard closed and reopened).
        """
        name = self._resolve(collection)
        async with self._optimize_slot:
            if self._closed or name in self._unbuilt:
                return False
            try:
                return await self._optimize(name)
            finally:
                self._optimizing.pop(name, None)

    async def _optimize(self, name: str) -> bool:
        folder = self._dir(name)
        optimization = _Optimization()
        async with self._use(name) as shard, shard.writing:
            # No write while it is copied: the copy is the shard as of now, the journal every write after it.
            await self._engine(name, shard.engine.flush)
            await self._engine(name, self._copy_shard, folder)
            self._optimizing[name] = optimization
            meta = shard.meta
        try:
            copied = str(folder / OPTIMIZING_DIR)
            recall = await _OPTIMIZER.run(optimize_shard, copied, meta, self.search_threads, self.min_recall)
        except Exception as exc:
            await self._drop_copy(folder)
            if optimization.abandoned:  # dropped or replaced meanwhile, its copy with it
                return False
            if isinstance(exc, BrokenProcessPool):
                raise VectorStoreError(f"embedded store, collection {name}: the process indexing it died") from exc
            raise _translate(exc, name) from exc
        if optimization.abandoned or self._closed:
            await self._drop_copy(folder)
            return False
        copy = await self._engine(name, self._load_copy, folder, meta)
        finishing = False
        try:
            # Most of the writes made meanwhile while searches and writes go on, the last ones with the shard closed.
            done = await self._engine(name, self._replay, copy, optimization, 0)
            async with self._lock(name):
                if not (optimization.abandoned or self._closed):
                    await self._close_locked(name)  # no operation until the copy is in its place
                    finishing = True
                    measured = {**meta, RECALL_KEY: round(recall.share, 4), CANDIDATES_KEY: recall.candidates}
                    await asyncio.shield(
                        self._engine(name, self._finish_copy, copy, optimization, done, folder, measured)
                    )
        finally:
            if not finishing:
                await self._engine(name, copy.close)
                await self._drop_copy(folder)
        if not finishing:
            return False
        self._unindexed[name] = optimization.points
        self._changed(name)
        if recall.candidates is None:  # many near-identical rows, typically: the graph is built, searches stay exact
            log.warning(
                "embedded store: the HNSW index of collection %s finds %.0f%% of the best rows exact searches find "
                "(under %.0f%%): its searches stay exact",
                name,
                100 * recall.share,
                100 * self.min_recall,
            )
        else:
            log.info(
                "embedded store: collection %s has its HNSW index (%d candidates a search: %.0f%% of the best rows)",
                name,
                recall.candidates,
                100 * recall.share,
            )
        return True

    @staticmethod
    async def _drop_copy(folder: Path) -> None:
        await asyncio.to_thread(shutil.rmtree, folder / OPTIMIZING_DIR, True)

    @staticmethod
    def _copy_shard(folder: Path) -> None:
        for leftover in (OPTIMIZING_DIR, REPLACED_DIR):  # of a crash or of a build given up
            shutil.rmtree(folder / leftover, ignore_errors=True)
        shutil.copytree(folder / SHARD_DIR, folder / OPTIMIZING_DIR)

    def _load_copy(self, folder: Path, meta: Mapping[str, Any]) -> qe.EdgeShard:
        return qe.EdgeShard.load(str(folder / OPTIMIZING_DIR), self._config(meta))

    @staticmethod
    def _replay(copy: qe.EdgeShard, optimization: _Optimization, start: int) -> int:
        """Apply the journal's writes from ``start`` on to the copy; where it ends now."""
        writes = optimization.journal[start:]
        for operation in writes:
            copy.update(operation)
        return start + len(writes)

    @classmethod
    def _finish_copy(
        cls, copy: qe.EdgeShard, optimization: _Optimization, start: int, folder: Path, meta: Mapping[str, Any]
    ) -> None:
        """The last writes replayed on the copy, which then replaces the (closed) shard; ``meta`` has its recall."""
        try:
            cls._replay(copy, optimization, start)
            copy.flush()
        finally:
            copy.close()
        # Before the swap: on the shard it replaces (no index), a recall changes nothing.
        atomic_write(folder / META_FILE, json.dumps(meta, sort_keys=True))
        # Two renames: a crash between them leaves the old shard under REPLACED_DIR, which ``_load`` takes back.
        (folder / SHARD_DIR).rename(folder / REPLACED_DIR)
        (folder / OPTIMIZING_DIR).rename(folder / SHARD_DIR)
        shutil.rmtree(folder / REPLACED_DIR, ignore_errors=True)

    async def close(self) -> None:
        """Close every shard (flushing it), so the folder can be opened again; the counts are kept for the next run.

        Collections created and not yet made on disk are made now (empty), as a Qdrant server would keep them.
        """
        for name in list(self._unbuilt):
            async with self._lock(name):
                try:
                    await self._build_locked(name)
                except Exception as exc:  # the rest must still close; the next run's reconcile creates it again
                    log.warning("embedded store: collection %s was not made before closing: %s", name, exc)
        self._closing = True
        for task in list(self._background):  # an index build in flight is given up: its copy goes at the next one
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for name in list(self._open):
            async with self._lock(name):
                await self._close_locked(name)
        self._closed = True
        # Every engine call returned, so no write can change a count after it is saved.
        await asyncio.to_thread(self._threads.shutdown, True)
        if self._tmp is not None:
            self._tmp.cleanup()
        elif self._counts:
            atomic_write(self.root / COUNTS_FILE, json.dumps(self._counts, sort_keys=True))
