"""Choosing the vector store: a Qdrant server when a URL is set, else Qdrant's embedded engine."""

from __future__ import annotations

from pathlib import Path

from datamesh.adapters.edge import EdgeStore
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
    return EdgeStore(root, concurrency=slots, max_open=settings.max_open, search_threads=settings.search_threads)
