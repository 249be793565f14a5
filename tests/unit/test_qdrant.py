"""datamesh.qdrant against the embedded Qdrant: how failures are reported, and bounded concurrency."""

from __future__ import annotations

import pytest

from datamesh.adapters.qdrant import QdrantStore
from datamesh.core.ports import VectorStoreError
from datamesh.settings import StoreSettings


async def test_missing_collection_is_a_vector_store_error_naming_it() -> None:
    store = QdrantStore.connect(StoreSettings(path=":memory:"))
    try:
        with pytest.raises(VectorStoreError, match=r"collection nowhere\.product does not exist"):
            await store.search("nowhere.product", [1.0, 0.0], 3)
        with pytest.raises(VectorStoreError, match=r"collection nowhere\.product does not exist"):
            await store.count("nowhere.product")
        assert not await store.exists("nowhere.product")
    finally:
        await store.close()


async def test_connect_bounds_concurrent_requests() -> None:
    store = QdrantStore.connect(StoreSettings(path=":memory:"), concurrency=3)
    default = QdrantStore.connect(StoreSettings(path=":memory:"))
    try:
        assert store._slots._value == 3
        assert default._slots._value == 8
    finally:
        await store.close()
        await default.close()
