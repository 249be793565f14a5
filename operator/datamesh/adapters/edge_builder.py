"""What the embedded store's collection builders run: a shard's folder made with its first points.

These run in child processes (see ``adapters.edge``), which import this module and what it
imports, nothing else: the engine, the standard library, the BM25 tokenizer and the vector
names. Metadata and rows arrive as plain values (the distance and the payload types by their
names in the DataProduct spec), errors leave as plain exceptions with the engine's message.
A builder so costs about 26 MiB instead of 55-60 with the store's own module and its imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from datamesh.adapters import bm25
from datamesh.adapters.atomic import atomic_write
from datamesh.core.vectors import DENSE_VECTOR, SPARSE_VECTOR

META_FILE = "collection.json"
SHARD_DIR = "shard"
Points = tuple[list[str], list[list[float]], list[str], list[dict[str, Any]]]  # ids, vectors, texts, payloads

# By their names in the spec (resource.models.Distance and FieldType): the builder never imports the models.
DISTANCES = {"Cosine": qe.Distance.Cosine, "Dot": qe.Distance.Dot, "Euclid": qe.Distance.Euclid}
PAYLOAD_TYPES = {
    "string": qe.PayloadSchemaType.Keyword,
    "integer": qe.PayloadSchemaType.Integer,
    "number": qe.PayloadSchemaType.Float,
    "boolean": qe.PayloadSchemaType.Bool,
    "timestamp": qe.PayloadSchemaType.Datetime,
    "date": qe.PayloadSchemaType.Datetime,
}


def panicked(exc: BaseException) -> bool:
    """Whether ``exc`` is a Rust panic of the engine (pyo3's PanicException, a BaseException)."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


@contextlib.contextmanager
def _panics_as_exceptions() -> Iterator[None]:
    """A panic of the engine as a plain Exception with its message: pyo3's PanicException cannot be
    unpickled in the parent, which reads the message as it reads the engine's own errors."""
    try:
        yield
    except BaseException as exc:
        if panicked(exc):
            raise Exception(f"the engine failed: {exc}") from None
        raise


def edge_config(
    meta: Mapping[str, Any],
    search_threads: int,
    hnsw: qe.HnswIndexConfig | None = None,
    optimizers: qe.EdgeOptimizersConfig | None = None,
) -> qe.EdgeConfig:
    """The engine's configuration of a collection described by its metadata (``hnsw``, ``optimizers``: unset keeps
    the shard's)."""
    dense = qe.EdgeVectorParams(
        size=int(meta["vector_size"]), distance=DISTANCES[str(meta["distance"])], memory=qe.Memory.Cold
    )
    sparse = {SPARSE_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)} if meta["sparse"] else None
    return qe.EdgeConfig(
        vectors={DENSE_VECTOR: dense},
        sparse_vectors=sparse,
        max_search_threads=search_threads,
        hnsw_config=hnsw,
        optimizers=optimizers,
    )


def add_payload_indexes(engine: qe.EdgeShard, indexes: Mapping[str, str]) -> None:
    """Index the payload fields ``indexes`` names (field: spec type); the caller flushes."""
    for key, kind in indexes.items():
        engine.update(qe.UpdateOperation.create_field_index(key, PAYLOAD_TYPES[kind]))


def upsert_operation(
    sparse: bool,
    ids: Sequence[str],
    rows: Sequence[Sequence[float]],
    texts: Sequence[str],
    payloads: Sequence[Mapping[str, Any]],
) -> qe.UpdateOperation:
    """The write of these points (vectors checked, as lists: the engine reads them 2.5x faster than numpy rows)."""
    points = []
    for point_id, vector, text, payload in zip(ids, rows, texts, payloads, strict=True):
        named: dict[str, Any] = {DENSE_VECTOR: vector}
        words = bm25.document_vector(text) if sparse else None
        if words is not None:  # only the tokenizer's own vectors: a malformed one breaks the shard
            named[SPARSE_VECTOR] = words
        points.append(qe.Point(point_id, named, dict(payload)))
    return qe.UpdateOperation.upsert_points(points)


def build_shard(
    directory: str,
    meta: dict[str, Any],
    search_threads: int,
    points: Points | None = None,
) -> int:
    """Create a collection's folder: its shard (made, indexed, its first ``points`` written, flushed,
    closed), then its commit mark; its count of points."""
    folder = Path(directory)
    if folder.exists():  # a creation a crash interrupted: it has no commit mark
        shutil.rmtree(folder)
    with _panics_as_exceptions():
        engine = qe.EdgeShard.create(str(folder / SHARD_DIR), edge_config(meta, search_threads))
        try:
            # Only filterable fields: each payload index costs megabytes per shard, even empty.
            add_payload_indexes(engine, meta["payload_indexes"])
            if points is not None:
                engine.update(upsert_operation(bool(meta["sparse"]), *points))
            engine.flush()
            count = int(engine.count(qe.CountRequest(exact=True))) if points is not None else 0
        finally:
            engine.close()
    atomic_write(folder / META_FILE, json.dumps(meta, sort_keys=True))
    return count


# The graph a large collection gets, built on one thread (the operator keeps the other core). Twice Qdrant's
# default links and candidates: at bench/query.py's 2,000 products (36,070 routing points of the built-in
# model, whose hashed n-grams are hard on a graph), a search of 128 hits weighing 256 candidates found 84% of
# the exact best rows with m 16 and ef_construct 100, 92% with these (99% weighing 512: 0.91 ms against 2.4 ms
# exact; built in 13.7 s).
# A filter that leaves fewer points than full_scan_threshold (KiB of vectors: 13,000 points of 384 dimensions)
# is searched exactly through the payload index: the routing collection's cards (one per product) stay exact up
# to 13,000 products, which is faster than a filtered search of the graph.
HNSW = qe.HnswIndexConfig(m=32, ef_construct=200, full_scan_threshold=20_000, max_indexing_threads=1)
# Every segment indexed, whatever its size (0 would turn indexing off): the store decided it is time.
EVERY_SEGMENT = qe.EdgeOptimizersConfig(indexing_threshold=1)

# An index is used with the fewest candidates per search (``hnsw_ef``) that find this share of what exact
# searches find (see ``index_recall``); when even the most do not, its searches stay exact.
MIN_RECALL = 0.95
CANDIDATES = (128, 256, 512, 1024, 2048)
_PROBES = 24  # questions that measure it
# Rows each (fewer candidates than hits mean nothing). A routing search's dense prefetch takes 288: measured on the
# routing collection of 10,000 products (bench/query.py --corpus debian), recall hardly depends on it (512
# candidates: 0.98 of 72 and of 128 hits, 0.97 of 288).
_PROBE_LIMIT = 128
# Each question is the sum of this many stored rows: its best rows score about 0.5, as a real question's do (two
# rows' sum scores 0.7 and finds every best row even in a broken graph).
_PROBE_MIX = 8


@dataclass(frozen=True)
class Recall:
    """What an index build measured: the share of the exact best rows found, with ``candidates`` per search
    (None: not enough with any, its searches stay exact)."""

    share: float
    candidates: int | None


def optimize_shard(directory: str, meta: dict[str, Any], search_threads: int, min_recall: float = MIN_RECALL) -> Recall:
    """Build the HNSW index of a copy of a collection's shard (load, optimize, flush, close), at low priority.

    Its recall (see ``index_recall``). Runs in a child of its own: it holds the GIL throughout.
    """
    with contextlib.suppress(OSError):  # the child only runs these: the operator's own work comes first
        os.nice(10)
    with _panics_as_exceptions():
        engine = qe.EdgeShard.load(directory, edge_config(meta, search_threads, HNSW, EVERY_SEGMENT))
        try:
            engine.optimize()
            engine.flush()
            return index_recall(engine, min_recall)
        finally:
            engine.close()


def index_recall(engine: qe.EdgeShard, min_recall: float = MIN_RECALL) -> Recall:
    """The fewest candidates per search with which the index finds ``min_recall`` of an exact search's best rows,
    over questions made of stored rows.

    Counted by score, since tied rows are interchangeable. Qdrant's graph has no recall guarantee: many
    near-identical vectors (copies of one product's rows in many products) disconnect it, and its searches then
    miss many of the best rows.
    """
    request = qe.ScrollRequest(limit=_PROBE_MIX * _PROBES, with_payload=False, with_vector=[DENSE_VECTOR])
    records, _ = engine.scroll(request)  # in id order: ids are hashes, so a sample of the rows
    stored = [r.vector[DENSE_VECTOR] for r in records if isinstance(r.vector, dict) and DENSE_VECTOR in r.vector]
    probes = []
    for start in range(0, len(stored) - _PROBE_MIX + 1, _PROBE_MIX):
        question = [sum(values) for values in zip(*stored[start : start + _PROBE_MIX], strict=True)]
        exact = _nearest(engine, question, qe.SearchParams(exact=True))
        if exact:
            probes.append((question, exact[-1].score - 1e-6, len(exact)))
    share = 1.0
    for candidates in CANDIDATES:
        params = qe.SearchParams(hnsw_ef=candidates)
        shares = [sum(1 for p in _nearest(engine, q, params) if p.score >= cut) / n for q, cut, n in probes]
        share = sum(shares) / len(shares) if shares else 1.0
        if share >= min_recall:
            return Recall(share, candidates)
    return Recall(share, None)


def _nearest(engine: qe.EdgeShard, question: list[float], params: qe.SearchParams) -> list[qe.ScoredPoint]:
    request = qe.QueryRequest(
        query=qe.Query.Nearest(question, using=DENSE_VECTOR), limit=_PROBE_LIMIT, params=params, with_payload=False
    )
    return engine.query(request)
