"""The embedded store builds a large collection's HNSW index in a child process, from a copy of its shard.

Real engine, real child process. The index is built on collections far smaller than the default
threshold here (``optimize_min_points``), so the tests stay fast; what they assert does not depend
on the size: the same answers before and after, nothing written meanwhile lost, and the folder
still opening after a crash at the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datamesh.adapters import edge
from datamesh.adapters.edge import EdgeStore, safe_dirname
from datamesh.core.plan import DIGEST_KEY, PRODUCT_KEY, CollectionPlan
from datamesh.core.ports import SearchRequest
from datamesh.resource.models import Distance, FieldType, SearchMode

DIM = 32
INDEX = "_routing--test"
WORDS = ["invoice", "shipment", "customs", "churn", "renewal", "storm", "scanner", "refund", "carrier", "price"]


Points = tuple[list[str], list[list[float]], list[str], list[dict[str, Any]]]


@contextlib.asynccontextmanager
async def opened(root: Path, **settings: Any) -> AsyncIterator[EdgeStore]:
    """An embedded store on ``root``, closed when the block ends, whatever its assertions did."""
    store = EdgeStore(root, **settings)
    try:
        yield store
    finally:
        await store.close()


def points(start: int, count: int, product: str = "ns/a") -> Points:
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(count, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"00000000-0000-4000-8000-{start + i:012d}" for i in range(count)]
    texts = [" ".join(rng.choice(WORDS, size=4)) for _ in range(count)]
    payloads = [{"text": t, PRODUCT_KEY: product, DIGEST_KEY: "d1"} for t in texts]
    return ids, vectors.tolist(), texts, payloads


def question(seed: int, mode: SearchMode = SearchMode.hybrid) -> SearchRequest:
    vector = np.random.default_rng(10_000 + seed).normal(size=DIM)
    return SearchRequest((vector / np.linalg.norm(vector)).tolist(), "refund carrier storm", 10, mode)


async def made(store: EdgeStore, count: int) -> None:
    plan = CollectionPlan(INDEX, INDEX, DIM, Distance.cosine, {PRODUCT_KEY: FieldType.string}, SearchMode.hybrid)
    await store.ensure_index(plan)
    for start in range(0, count, 500):
        await store.upsert(INDEX, *points(start, min(500, count - start)))


async def answers(store: EdgeStore) -> list[list[Any]]:
    """Dense answers (row ids in order), and the hybrid answers' scores: many of these short texts tie on
    BM25, and tied rows come back in the order of the segments that hold them."""
    dense = [[row.id for row in await store.search(INDEX, question(seed, SearchMode.dense))] for seed in range(5)]
    hybrid = [sorted(round(row.score, 6) for row in await store.search(INDEX, question(seed))) for seed in range(5)]
    return dense + hybrid


async def until_indexed(store: EdgeStore, timeout: float = 60.0) -> None:
    """Wait until the index holds exactly the collection's points (it counts deleted ones until a build)."""

    async def indexed() -> None:
        while True:
            state = await store.index_state(INDEX)
            if state.points and state.indexed == state.points:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(indexed(), timeout)


async def test_a_large_collection_is_indexed_in_the_background_and_answers_the_same(tmp_path: Path) -> None:
    async with opened(tmp_path / "store", optimize_min_points=1000, optimize_delay=0.05) as store:
        await made(store, 1500)
        assert not (await store.index_state(INDEX)).used, "written rows are searched exactly until the index is built"
        before = await answers(store)
        await until_indexed(store)  # no call asks for it: the writes did
        assert await store.count(INDEX) == 1500
        assert await answers(store) == before
        assert not (store.root / "collections" / safe_dirname(INDEX) / edge.OPTIMIZING_DIR).exists()
    async with opened(tmp_path / "store", optimize_min_points=0) as again:  # the index is the shard's now, on disk
        state = await again.index_state(INDEX)
        assert (state.points, state.indexed, state.used) == (1500, 1500, True)
        assert state.recall is not None and state.recall >= 0.95
        assert await answers(again) == before


async def test_a_large_collection_written_by_an_earlier_run_is_indexed_when_it_opens(tmp_path: Path) -> None:
    earlier = EdgeStore(tmp_path / "store", optimize_min_points=0)
    await made(earlier, 1200)
    await earlier.close()
    async with opened(tmp_path / "store", optimize_min_points=1000, optimize_delay=0.05) as store:
        assert await store.count(INDEX) == 1200
        await until_indexed(store)
        await store.settled()
        assert (await store.index_state(INDEX)).used


async def test_rows_an_earlier_run_wrote_after_its_last_build_are_indexed_when_the_collection_opens(
    tmp_path: Path,
) -> None:
    earlier = EdgeStore(tmp_path / "store", optimize_min_points=1000, optimize_delay=0.05)
    await made(earlier, 1200)
    await until_indexed(earlier)
    await earlier.settled()
    earlier.optimize_min_points = 0  # it stops before it would index what it writes next
    await earlier.upsert(INDEX, *points(5000, 600))
    await earlier.close()
    async with opened(tmp_path / "store", optimize_min_points=1000, optimize_delay=0.05) as store:
        state = await store.index_state(INDEX)
        assert state.points == 1800 and state.indexed == 1200
        await until_indexed(store)  # a third of it outside the index: built again, though this run wrote nothing
        await store.settled()
        assert (await store.index_state(INDEX)).used


async def test_a_collection_that_lost_many_points_is_indexed_again_without_them(tmp_path: Path) -> None:
    async with opened(tmp_path / "store", optimize_min_points=1000, optimize_delay=0.05) as store:
        await made(store, 1200)
        await store.upsert(INDEX, *points(5000, 600, "ns/b"))
        await until_indexed(store)
        await store.settled()
        assert (await store.index_state(INDEX)).indexed == 1800
        await store.remove_product(INDEX, "ns/b")
        # The index held the 600 deleted points (searches stepped over them): built again without them.
        await until_indexed(store)
        await store.settled()
        state = await store.index_state(INDEX)
        assert (state.points, state.indexed, state.used) == (1200, 1200, True)
        assert {row.payload[PRODUCT_KEY] for row in await store.search(INDEX, question(1))} == {"ns/a"}


class CountingOptimizer:
    """The real child process, its builds counted."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.builds = 0

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        self.builds += 1
        return await self.real.run(call, *args)


async def test_a_collection_written_for_a_while_is_indexed_once_its_writes_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingOptimizer(edge._OPTIMIZER)
    monkeypatch.setattr(edge, "_OPTIMIZER", counting)
    async with opened(tmp_path / "store", optimize_min_points=1000, optimize_delay=2.0) as store:
        await made(store, 100)
        for start in range(100, 4000, 100):  # an ingestion of 4,000 rows over about two seconds, never pausing for 2 s
            await store.upsert(INDEX, *points(start, 100))
            await asyncio.sleep(0.05)
        assert counting.builds == 0, "no build while the rows keep coming (each would be rebuilt soon after)"
        await until_indexed(store)
        await store.settled()
        assert counting.builds == 1
        assert (await store.index_state(INDEX)).used


async def test_an_index_is_used_with_the_fewest_candidates_that_find_the_best_rows(tmp_path: Path) -> None:
    """Copies of a few rows (one product's rows copied into many) are hard on the graph: with few candidates a
    search misses many of the best rows, so more are weighed. 384 dimensions and 15,000 points: below 20 MB of
    vectors the engine searches exactly whatever its index.
    """
    dim, rows, copies = 384, 150, 100
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(rows, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tolist()
    plan = CollectionPlan(INDEX, INDEX, dim, Distance.cosine, {PRODUCT_KEY: FieldType.string}, SearchMode.dense)
    # Questions near several rows at once, as a real question is (about 0.35 to each here).
    questions = [np.sum([vectors[i] for i in rng.choice(rows, 8, replace=False)], axis=0).tolist() for _ in range(8)]

    async def best(store: EdgeStore) -> list[list[float]]:
        found = [await store.search(INDEX, SearchRequest(q, "", 64, SearchMode.dense)) for q in questions]
        return [[round(row.score, 5) for row in rows] for rows in found]

    async def copied(store: EdgeStore) -> list[list[float]]:
        await store.ensure_index(plan)
        for copy in range(copies):
            ids = [f"00000000-0000-4000-9000-{copy * 1000 + i:012d}" for i in range(rows)]
            await store.upsert(INDEX, ids, vectors, [""] * rows, [{PRODUCT_KEY: f"ns/p{copy}"}] * rows)
        return await best(store)

    async with opened(tmp_path / "store", optimize_min_points=0) as store:
        exact = await copied(store)
        assert await store.optimize(INDEX)
        state = await store.index_state(INDEX)
        assert state.indexed == rows * copies and state.recall is not None and state.recall >= 0.95
        assert state.candidates is not None and state.candidates > 128, "the engine's default finds too few"
        indexed = await best(store)
        found = [
            sum(1 for score in got if score >= want[-1]) / len(want) for got, want in zip(indexed, exact, strict=True)
        ]
        assert sum(found) / len(found) >= 0.95, "the index's answers hold the best rows an exact search finds"
    # A store that asks more than any index gives keeps its searches exact.
    async with opened(tmp_path / "strict", optimize_min_points=0, min_recall=1.01) as strict:
        exact = await copied(strict)
        assert await strict.optimize(INDEX)
        state = await strict.index_state(INDEX)
        assert state.indexed == rows * copies and not state.used
        assert await best(strict) == exact


async def test_a_small_collection_is_not_indexed(tmp_path: Path) -> None:
    async with opened(tmp_path / "store", optimize_min_points=1000, optimize_delay=0.01) as store:
        await made(store, 600)
        await asyncio.sleep(0.5)
        state = await store.index_state(INDEX)
        assert (state.points, state.indexed, state.used) == (600, 0, False)


class PausedOptimizer:
    """The real child process, held back until the test has written what it wants written meanwhile."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        self.started.set()
        await self.go.wait()
        return await self.real.run(call, *args)


@contextlib.asynccontextmanager
async def building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[EdgeStore], Awaitable[None]]
) -> AsyncIterator[tuple[EdgeStore, bool]]:
    """A store whose index build of 1,200 points waits while ``meanwhile`` runs; the store and whether it built."""
    paused = PausedOptimizer(edge._OPTIMIZER)
    monkeypatch.setattr(edge, "_OPTIMIZER", paused)
    async with opened(tmp_path / "store", optimize_min_points=0) as store:
        await made(store, 1200)
        store.optimize_min_points = 1000
        build = asyncio.create_task(store.optimize(INDEX))
        await asyncio.wait_for(paused.started.wait(), 10)
        await meanwhile(store)
        paused.go.set()
        yield store, await asyncio.wait_for(build, 60)


async def test_writes_made_while_the_index_is_built_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def meanwhile(store: EdgeStore) -> None:
        await store.upsert(INDEX, *points(50_000, 300, product="ns/b"))  # a new product's rows
        await store.remove_product(INDEX, "ns/a", keep_digest="d2")  # and every row of another removed
        assert await store.count(INDEX) == 300
        assert {row.payload[PRODUCT_KEY] for row in await store.search(INDEX, question(0))} == {"ns/b"}

    async with building(tmp_path, monkeypatch, meanwhile) as (store, built):
        assert built
        assert await store.count(INDEX) == 300
        assert {row.payload[PRODUCT_KEY] for row in await store.search(INDEX, question(0))} == {"ns/b"}
        assert (await store.index_state(INDEX)).indexed > 0
    async with opened(tmp_path / "store", optimize_min_points=0) as again:
        assert await again.count(INDEX) == 300, "the swapped shard holds the replayed writes on disk"


async def test_a_collection_dropped_while_it_is_indexed_stays_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def meanwhile(store: EdgeStore) -> None:
        await store.drop(INDEX)

    async with building(tmp_path, monkeypatch, meanwhile) as (store, built):
        assert not built
        assert not await store.exists(INDEX)
        assert not (store.root / "collections" / safe_dirname(INDEX)).exists()


async def test_a_build_outrun_by_its_writes_is_given_up_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge, "JOURNAL_MAX_POINTS", 250)  # the writes kept for the copy: 50,000 points by default

    async def meanwhile(store: EdgeStore) -> None:
        for start in range(50_000, 50_300, 100):
            await store.upsert(INDEX, *points(start, 100, product="ns/b"))

    async with building(tmp_path, monkeypatch, meanwhile) as (store, built):
        assert not built
        assert await store.count(INDEX) == 1500
        assert not (await store.index_state(INDEX)).used
        assert not (store.root / "collections" / safe_dirname(INDEX) / edge.OPTIMIZING_DIR).exists()


async def test_a_crash_between_the_renames_of_the_swap_loses_nothing(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "store", optimize_min_points=0)
    await made(store, 400)
    before = await answers(store)
    await store.close()
    folder = tmp_path / "store" / "collections" / safe_dirname(INDEX)
    # As the swap leaves it after its first rename: the shard moved aside, the indexed copy not yet in its place.
    (folder / edge.SHARD_DIR).rename(folder / edge.REPLACED_DIR)
    (folder / edge.OPTIMIZING_DIR).mkdir()
    async with opened(tmp_path / "store", optimize_min_points=0) as again:
        assert await again.count(INDEX) == 400
        assert await answers(again) == before
