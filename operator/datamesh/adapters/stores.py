"""Choosing the vector store: a Qdrant server when a URL is set, else Qdrant's embedded engine."""

from __future__ import annotations

import shutil
from pathlib import Path

from datamesh.adapters.edge import EdgeStore, ingestion_folder
from datamesh.core.ports import VectorStore
from datamesh.settings import StoreSettings


def open_store(settings: StoreSettings, concurrency: int | None = None) -> VectorStore:
    """The store ``settings`` describe, with at most ``concurrency`` requests in flight."""
    slots = concurrency or settings.concurrency
    if settings.url:
        # Imported only here: qdrant-client costs 0.6 s at start-up, and the embedded default never needs it.
        from datamesh.adapters.qdrant import QdrantStore

        return QdrantStore.connect(settings, slots)
    root = None if settings.path == ":memory:" else Path(settings.path)
    return EdgeStore(
        root,
        concurrency=slots,
        max_open=settings.max_open,
        search_threads=settings.search_threads,
        optimize_min_points=settings.optimize_min_points,
    )


def open_job_store(settings: StoreSettings, namespace: str, name: str) -> VectorStore:
    """The store an ingestion Job writes a product into: the server itself, or its own folder beside the embedded store.

    The embedded store's folder belongs to the operator's process; the operator adopts the Job's folder when it ends.
    That folder starts empty: an earlier attempt's rows are written again.
    """
    if settings.url:
        return open_store(settings)
    if settings.path == ":memory:":
        raise ValueError("an ingestion Job needs the embedded store's folder (DATAMESH_QDRANT_PATH), not :memory:")
    folder = ingestion_folder(Path(settings.path), namespace, name)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's rows: this one writes them all again
    # Indexed once adopted, by the operator: the Job's process ends with its ingestion.
    return open_store(settings.model_copy(update={"path": str(folder), "optimize_min_points": 0}))
