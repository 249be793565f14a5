"""Writing a product's rows, validated and embedded, into its collection.

Two passes over the source: the first validates every row and fingerprints what would be
written (nothing is written when the fingerprint is unchanged, or when too many rows are
refused); the second validates again and writes, batch by batch. Reading and parsing run in a
worker thread, and each batch is embedded and upserted before the next is read, so memory is
bounded by a batch whatever the source's size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from datamesh.core.plan import DIGEST_KEY, TEXT_KEY, CollectionPlan
from datamesh.core.ports import EmbeddingProvider, RowSource, VectorStore
from datamesh.core.rows import IngestDigest, Refusals, Row, RowValidator, ValidatedBatch, key_text
from datamesh.resource.models import DataProductSpec

_DONE = object()


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


async def scan(
    rows: RowSource, namespace: str, name: str, spec: DataProductSpec, plan: CollectionPlan, batch_size: int
) -> Scan:
    """Validate every row and fingerprint what an ingestion would write (nothing is written)."""
    validator = RowValidator(namespace, name, spec)
    digest = IngestDigest(plan, spec.key_fields)
    batches = await _batches(rows, batch_size)
    while (batch := await _next(batches)) is not None:
        digest.update(validator.validate(batch))
    max_percent = spec.source.max_rejected_percent if spec.source else 100.0
    return Scan(
        validator.accepted,
        validator.seen,
        digest.hexdigest(),
        validator.refusals,
        validator.too_many_refused(max_percent),
    )


async def write_points(
    store: VectorStore,
    plan: CollectionPlan,
    provider: EmbeddingProvider,
    rows: RowSource,
    validator: RowValidator,
    digest: str,
    batch_size: int,
    on_batch: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    """Embed and upsert every valid row in batches, then remove points of earlier ingestions; rows written."""
    written = 0
    batches = await _batches(rows, batch_size)
    while (batch := await _next(batches)) is not None:
        valid: ValidatedBatch = validator.validate(batch)
        if not valid.rows:
            continue
        texts = [key_text(r, validator.key_fields) for r in valid.rows]
        vectors = await provider.embed(texts)
        payloads = [{**r, TEXT_KEY: t, DIGEST_KEY: digest} for r, t in zip(valid.rows, texts, strict=True)]
        await store.upsert(plan.index, valid.ids, vectors, texts, payloads)
        written += len(valid.rows)
        if on_batch is not None:
            await on_batch(written)
    # Only after every batch landed: a crash mid-way leaves the old rows in place, never fewer.
    await store.delete_other_ingests(plan.index, digest)
    return written
