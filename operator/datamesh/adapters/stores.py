"""Choosing the vector store: a Qdrant server when a URL is set, else the embedded store."""

from __future__ import annotations

from datamesh.adapters.qdrant import QdrantStore
from datamesh.core.ports import VectorStore
from datamesh.settings import StoreSettings


def open_store(settings: StoreSettings, concurrency: int | None = None) -> VectorStore:
    """The store ``settings`` describe, with at most ``concurrency`` requests in flight."""
    return QdrantStore.connect(settings, concurrency)
