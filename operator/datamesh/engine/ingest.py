"""Writing a product's rows, validated and embedded, into its collection and the mesh's routing collection
(all of a small product's rows; a sample of a large one's, see ``core.plan.routing_share``).

Two passes over the source: the first validates every row and fingerprints what would be
written (nothing is written when the fingerprint is unchanged, or when too many rows are
refused); the second validates again and writes, batch by batch. A small source (up to
``KEEP_ROWS`` rows) is read once: the first pass keeps its validated batches for the write.
Reading and parsing run in a worker thread; each batch is embedded once and upserted into both
collections while the next batch is read and embedded, so the embedder and the engine work at
once and memory is bounded by ``KEEP_ROWS`` rows or two batches, whatever the source's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from datamesh.core.plan import (
    DIGEST_KEY,
    ROW_KEY,
    TEXT_KEY,
    CollectionPlan,
    card_point_id,
    in_routing_sample,
    routing_fields,
    routing_share,
    row_key,
)
from datamesh.core.ports import EmbeddingProvider, RowSource, VectorStore
from datamesh.core.rows import IngestDigest, Refusals, Row, RowValidator, ValidatedBatch, key_text
from datamesh.resource.models import DataProductSpec, ScoreCalibration

_DONE = object()
CALIBRATION_SAMPLE = 128  # rows whose pairwise similarities calibrate the product's scores
# Rows of a source small enough to be read once: re-reading and re-validating them cost as much
# as their second write (bench/ingest.py, 1,000 rows), and this many rows fit in memory anywhere.
KEEP_ROWS = 2_048


@dataclass(frozen=True)
class Target:
    """Where one product's rows go: its own collection, and the routing collection of its model."""

    namespace: str
    name: str
    plan: CollectionPlan
    routing: CollectionPlan
    provider: EmbeddingProvider
    primary_key: Sequence[str]
    # The share of rows also written to the routing collection (see core.plan.routing_share).
    routing_share: float = 1.0

    @property
    def product(self) -> str:
        return f"{self.namespace}/{self.name}"


async def _batches(rows: RowSource, size: int) -> Iterator[list[Row]]:
    # Opened in a worker thread: a parquet reader or a large file starts with real work.
    return await asyncio.to_thread(rows.batches, size)


async def _next(batches: Iterator[list[Row]]) -> list[Row] | None:
    batch = await asyncio.to_thread(next, batches, _DONE)
    return None if batch is _DONE else batch  # type: ignore[return-value]


@dataclass(frozen=True)
class Scan:
    """What the first pass found: rows that would be written, their fingerprint, what was refused."""

    accepted: int
    seen: int
    digest: str
    refusals: Refusals
    too_many_refused: bool
    # The validated batches of a small source (None past KEEP_ROWS rows: the write reads again).
    kept: tuple[ValidatedBatch, ...] | None = None

    def kept_ids(self) -> list[str] | None:
        """The point ids of the rows the first pass kept (None when it kept none)."""
        return None if self.kept is None else [pid for batch in self.kept for pid in batch.ids]


async def scan(rows: RowSource, target: Target, spec: DataProductSpec, batch_size: int) -> Scan:
    """Validate every row and fingerprint what an ingestion would write (nothing is written)."""
    validator = RowValidator(target.namespace, target.name, spec)
    digest = IngestDigest(target.plan, spec.key_fields)
    kept: list[ValidatedBatch] | None = []
    async for valid in validated(rows, validator, batch_size):
        digest.update(valid)
        if kept is not None and validator.seen <= KEEP_ROWS:
            kept.append(valid)
        else:
            kept = None  # too big to keep: the write reads the source again
    max_percent = spec.source.max_rejected_percent if spec.source else 100.0
    return Scan(
        validator.accepted,
        validator.seen,
        digest.hexdigest(),
        validator.refusals,
        validator.too_many_refused(max_percent),
        tuple(kept) if kept is not None else None,
    )


async def validated(rows: RowSource, validator: RowValidator, batch_size: int) -> AsyncIterator[ValidatedBatch]:
    """The source read again, batch by batch, through ``validator``."""
    batches = await _batches(rows, batch_size)
    while (batch := await _next(batches)) is not None:
        yield validator.validate(batch)


async def replay(kept: Sequence[ValidatedBatch]) -> AsyncIterator[ValidatedBatch]:
    """Batches the first pass kept, as the write reads them."""
    for batch in kept:
        yield batch


@dataclass(frozen=True)
class Written:
    """What the second pass wrote."""

    rows: int
    calibration: ScoreCalibration | None


@dataclass(frozen=True)
class Ingestion:
    """What one ingestion found in the source and what it wrote."""

    found: Scan
    target: Target  # with the routing share of the rows found
    written: Written | None  # None: nothing written (too many rows refused, or the store held them)

    def refused_message(self, spec: DataProductSpec) -> str:
        """Why nothing was written when too many rows were refused."""
        limit = spec.source.max_rejected_percent if spec.source else 100.0
        refused = self.found.refusals
        return (
            f"{refused.rows} of {self.found.seen} rows rejected, more than the {limit:g}% source.maxRejectedPercent "
            f"allows; nothing was written: {refused.summary()}"
        )


async def ingest(
    store: VectorStore,
    target: Target,
    spec: DataProductSpec,
    rows: RowSource,
    batch_size: int,
    routing_rows: int,
    *,
    held: Callable[[Scan, Target], Awaitable[bool]] | None = None,
    slot: contextlib.AbstractAsyncContextManager[Any] | None = None,
    on_batch: Callable[[int, int], Awaitable[None]] | None = None,
) -> Ingestion:
    """Scan the rows, then write them (holding ``slot``) unless too many were refused or ``held`` says they are there.

    ``on_batch`` hears the rows written so far and the rows to write.
    """
    found = await scan(rows, target, spec, batch_size)
    target = replace(target, routing_share=routing_share(found.accepted, routing_rows))
    if found.too_many_refused or (held is not None and await held(found, target)):
        return Ingestion(found, target, None)
    if found.kept is not None:
        batches = replay(found.kept)
    else:
        batches = validated(rows, RowValidator(target.namespace, target.name, spec), batch_size)

    async def progress(done: int) -> None:
        if on_batch is not None:
            await on_batch(done, found.accepted)

    async with slot or contextlib.nullcontext():
        written = await write_points(store, target, batches, spec.key_fields, found.digest, progress)
    return Ingestion(found, target, written)


async def write_points(
    store: VectorStore,
    target: Target,
    batches: AsyncIterator[ValidatedBatch],
    key_fields: Sequence[str],
    digest: str,
    on_batch: Callable[[int], Awaitable[None]] | None = None,
) -> Written:
    """Embed and upsert every valid row in batches, then remove points of earlier ingestions."""
    written = 0
    sample = _Reservoir(CALIBRATION_SAMPLE)

    async def embedded() -> _Embedded | None:
        async for valid in batches:
            if valid.rows:
                texts = [key_text(r, key_fields) for r in valid.rows]
                return _Embedded(valid, texts, await target.provider.embed(texts))
        return None

    ahead = asyncio.ensure_future(embedded())
    try:
        while (current := await ahead) is not None:
            ahead = asyncio.ensure_future(embedded())  # the next batch is embedded while this one is written
            await _upsert(store, target, current, digest)
            sample.extend(current.vectors)
            written += len(current.valid.rows)
            if on_batch is not None:
                await on_batch(written)
    finally:
        ahead.cancel()
    # Only after every batch landed: a crash mid-way leaves the old rows in place, never fewer.
    await store.delete_other_ingests(target.plan.index, digest)
    return Written(written, calibration(sample.items))


@dataclass(frozen=True)
class _Embedded:
    valid: ValidatedBatch
    texts: list[str]
    vectors: list[list[float]]


async def _upsert(store: VectorStore, target: Target, batch: _Embedded, digest: str) -> None:
    """One batch into the product's collection, and its routing sample into the routing collection."""
    rows, texts, ids = batch.valid.rows, batch.texts, batch.valid.ids
    payloads = [{**r, TEXT_KEY: t, DIGEST_KEY: digest} for r, t in zip(rows, texts, strict=True)]
    # One after the other: the engine holds the GIL while it writes, and two writes at once were
    # slower than in turn (measured with bench/ingest.py).
    await store.upsert(target.plan.index, ids, batch.vectors, texts, payloads)
    picked = [i for i, pid in enumerate(ids) if in_routing_sample(pid, target.routing_share)]
    if picked:
        marks = routing_fields(target.product, digest)
        routing = [{**marks, ROW_KEY: row_key(rows[i], target.primary_key)} for i in picked]
        vectors = [batch.vectors[i] for i in picked]
        await store.upsert(target.routing.index, [ids[i] for i in picked], vectors, [texts[i] for i in picked], routing)


async def routing_holds(
    store: VectorStore, target: Target, digest: str, accepted: int, ids: Iterable[str] | None = None
) -> bool:
    """Whether the routing collection holds the rows of ingestion ``digest`` (``accepted`` rows written).

    Exactly when every row is routed, or when the row ids (``ids``) are known; otherwise at least
    one row (the sample's exact size would take another read of the source).
    """
    held = await store.routing_points(target.routing.index, target.product, digest)
    share = target.routing_share
    if share >= 1.0:
        return held == accepted
    if ids is None:
        return held > 0 or accepted == 0
    return held == sum(in_routing_sample(pid, share) for pid in ids)


async def card_held(store: VectorStore, target: Target, digest: str) -> bool:
    """Whether the routing collection holds the product's card of ingestion ``digest``."""
    return await store.routing_points(target.routing.index, target.product, digest, "card") == 1


async def write_card(store: VectorStore, target: Target, card: str, digest: str) -> None:
    """The product's card in the routing collection; then everything of its older ingestions goes."""
    (vector,) = await target.provider.embed([card])
    payload = {**routing_fields(target.product, digest, "card"), TEXT_KEY: card}
    await store.upsert(
        target.routing.index, [card_point_id(target.namespace, target.name)], [vector], [card], [payload]
    )
    await store.remove_product(target.routing.index, target.product, keep_digest=digest)


def calibration(vectors: Sequence[Sequence[float]]) -> ScoreCalibration | None:
    """Mean and spread of the cosine between pairs of a product's rows (None below three rows)."""
    if len(vectors) < 3:
        return None
    matrix = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    cosines = (matrix @ matrix.T)[np.triu_indices(len(matrix), k=1)]
    return ScoreCalibration(mean=round(float(cosines.mean()), 6), std=round(float(cosines.std()), 6))


class _Reservoir:
    """A uniform sample of at most ``size`` vectors from a stream, reproducible run to run."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[Sequence[float]] = []
        self._seen = 0
        self._random = random.Random(0)

    def extend(self, vectors: Sequence[Sequence[float]]) -> None:
        for vector in vectors:
            self._seen += 1
            if len(self.items) < self.size:
                self.items.append(vector)
            else:
                slot = self._random.randrange(self._seen)
                if slot < self.size:
                    self.items[slot] = vector
