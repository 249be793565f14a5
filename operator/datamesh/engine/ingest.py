"""Writing validated rows, embedded, into a product's collection."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from datamesh.core.plan import DIGEST_KEY, TEXT_KEY
from datamesh.core.ports import EmbeddingProvider, VectorStore
from datamesh.core.rows import ValidatedRows, key_text


async def write_points(
    store: VectorStore,
    collection: str,
    provider: EmbeddingProvider,
    key_fields: Sequence[str],
    validated: ValidatedRows,
    digest: str,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Embed the key fields in batches, upsert them, then remove points of earlier ingestions."""
    for start in range(0, len(validated.rows), batch_size):
        rows = validated.rows[start : start + batch_size]
        texts = [key_text(r, key_fields) for r in rows]
        vectors = await provider.embed(texts)
        payloads = [{**r, TEXT_KEY: t, DIGEST_KEY: digest} for r, t in zip(rows, texts, strict=True)]
        await store.upsert(collection, validated.ids[start : start + batch_size], vectors, texts, payloads)
        if on_batch is not None:
            on_batch(len(rows))
    # Only after every batch landed: a crash mid-way leaves the old rows in place, never fewer.
    await store.delete_other_ingests(collection, digest)
