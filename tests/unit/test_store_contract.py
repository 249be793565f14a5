"""One contract for both vector stores: Qdrant's embedded engine (qdrant-edge) and a Qdrant server's
API through qdrant-client.

No Qdrant server can run here, so the server store runs against qdrant-client's local mode, which
implements the same API in process; it stands in for the server. Everything the reconciler and
the query service rely on is asserted against both, so the code above cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qdrant_edge as qe

from datamesh.adapters import edge, edge_builder
from datamesh.adapters.edge import EdgeStore, safe_dirname
from datamesh.adapters.processes import ChildProcesses
from datamesh.adapters.qdrant import QdrantStore
from datamesh.core.plan import DIGEST_KEY, KIND_KEY, PRODUCT_KEY, CollectionPlan, collection_alias
from datamesh.core.ports import (
    CollectionMissing,
    ScoredRow,
    SearchRequest,
    StoreRejected,
    VectorStore,
    VectorStoreError,
    stable_top,
)
from datamesh.resource.models import CollectionLayout, Distance, FieldType, HnswLayout, Quantization, SearchMode
from datamesh.settings import StoreSettings

DIM = 16
TEXTS = [
    "invoice paid twice after a card retry",
    "shipment held at customs for missing paperwork",
    "customer left for a cheaper competitor",
    "the xq-7781 firmware bricks the scanner",  # a rare token only BM25 can match exactly
    "renewal price increase of forty percent",
    "warehouse flooded during the storm",
]


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def unit(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).normal(size=DIM)
    return (vector / np.linalg.norm(vector)).tolist()


VECTORS = [unit(i) for i in range(len(TEXTS))]
IDS = [f"00000000-0000-4000-8000-{i:012d}" for i in range(len(TEXTS))]


def plan(index: str, mode: SearchMode = SearchMode.hybrid, alias: str = "ns.product") -> CollectionPlan:
    return CollectionPlan(alias, index, DIM, Distance.cosine, {}, mode)


@pytest.fixture(params=["embedded", "server-api"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    made: VectorStore = (
        EdgeStore(tmp_path / "store") if request.param == "embedded" else QdrantStore.connect(StoreSettings())
    )
    yield made
    await made.close()


async def filled(store: VectorStore, index: str = "ns.product--a", mode: SearchMode = SearchMode.hybrid) -> str:
    assert await store.ensure_index(plan(index, mode))
    payloads = [{"text": t, DIGEST_KEY: "d1"} for t in TEXTS]
    await store.upsert(index, IDS, VECTORS, TEXTS, payloads)
    return index


def request(vector: Sequence[float], text: str, limit: int = 3, mode: SearchMode = SearchMode.hybrid) -> SearchRequest:
    return SearchRequest(vector, text, limit, mode)


async def test_a_missing_collection_is_reported_as_such(store: VectorStore) -> None:
    with pytest.raises(CollectionMissing, match=r"nowhere\.product"):
        await store.count("nowhere.product")
    with pytest.raises(CollectionMissing):
        await store.search("nowhere.product", request(unit(0), "anything"))
    with pytest.raises(CollectionMissing):
        await store.sample("nowhere.product", 5)
    assert not await store.exists("nowhere.product")


async def test_ensure_creates_once_and_upserts_are_idempotent(store: VectorStore) -> None:
    index = await filled(store)
    assert not await store.ensure_index(plan(index))
    assert await store.exists(index) and await store.count(index) == len(TEXTS)
    await store.upsert(index, IDS[:2], VECTORS[:2], TEXTS[:2], [{"text": "again", DIGEST_KEY: "d1"}] * 2)
    assert await store.count(index) == len(TEXTS), "the same ids replace their points"


async def test_the_alias_switches_atomically_and_queries_follow_it(store: VectorStore) -> None:
    first = await filled(store, "ns.product--a")
    assert await store.point_alias("ns.product", first) is None
    assert await store.current_index("ns.product") == first and await store.exists("ns.product")
    second = "ns.product--b"
    await store.ensure_index(plan(second))
    await store.upsert(second, IDS[:1], VECTORS[:1], TEXTS[:1], [{"text": TEXTS[0], DIGEST_KEY: "d2"}])
    assert await store.point_alias("ns.product", second) == first
    assert await store.count("ns.product") == 1
    hits = await store.search("ns.product", request(VECTORS[0], TEXTS[0]))
    assert [h.id for h in hits] == [IDS[0]]


async def test_a_sample_is_the_first_points_by_id_whatever_order_they_were_written_in(store: VectorStore) -> None:
    index = "ns.product--a"
    await store.ensure_index(plan(index))
    order = [3, 0, 5, 1, 4, 2]
    payloads = [{"text": TEXTS[i], DIGEST_KEY: "d1"} for i in order]
    await store.upsert(index, [IDS[i] for i in order], [VECTORS[i] for i in order], [TEXTS[i] for i in order], payloads)
    await store.point_alias("ns.product", index)
    sample = await store.sample("ns.product", 3)
    assert [p["text"] for p in sample] == TEXTS[:3], "the same rows every time: the lowest point ids"
    assert len(await store.sample("ns.product", 100)) == len(TEXTS)


async def test_dense_search_ranks_by_cosine_and_reports_it(store: VectorStore) -> None:
    index = await filled(store)
    hits = await store.search(index, request(VECTORS[2], "unrelated words", limit=len(TEXTS), mode=SearchMode.dense))
    assert hits[0].id == IDS[2] and hits[0].payload["text"] == TEXTS[2]
    expected = sorted(float(np.dot(VECTORS[2], v)) for v in VECTORS)[::-1]
    assert [round(h.score, 4) for h in hits] == [round(s, 4) for s in expected]
    assert all(h.similarity is not None and abs(h.similarity - h.score) < 1e-4 for h in hits)


async def test_hybrid_search_finds_the_exact_rare_word_the_embedding_misses(store: VectorStore) -> None:
    index = await filled(store)
    question = "which scanner firmware xq-7781 problem"
    far = unit(999)  # an embedding unrelated to every row: only the words can find it
    dense = await store.search(index, request(far, question, limit=2, mode=SearchMode.dense))
    assert IDS[3] not in [h.id for h in dense]
    hybrid = await store.search(index, request(far, question, limit=2))
    assert hybrid[0].id == IDS[3]
    assert hybrid[0].similarity is not None and abs(hybrid[0].similarity - float(np.dot(far, VECTORS[3]))) < 1e-4
    # Every fused hit carries the question's cosine with its row, whichever prefetch found it.
    every = await store.search(index, request(far, question, limit=len(TEXTS)))
    assert len(every) == len(TEXTS)
    for hit in every:
        assert (
            hit.similarity is not None and abs(hit.similarity - float(np.dot(far, VECTORS[IDS.index(hit.id)]))) < 1e-4
        )
    sparse = await store.search(index, request(far, question, limit=5, mode=SearchMode.sparse))
    assert [h.id for h in sparse] == [IDS[3]], "BM25 returns only rows sharing a word"
    assert await store.search(index, request(far, "the of and", mode=SearchMode.sparse)) == []


async def test_a_dense_only_collection_holds_no_words(store: VectorStore) -> None:
    index = await filled(store, mode=SearchMode.dense)
    hits = await store.search(index, request(unit(999), "xq-7781", limit=1))
    assert hits and hits[0].id != IDS[3], "hybrid on a dense-only collection is the embedding alone"


async def test_stale_points_are_removed_by_digest(store: VectorStore) -> None:
    index = await filled(store)
    await store.upsert(index, IDS[:2], VECTORS[:2], TEXTS[:2], [{"text": t, DIGEST_KEY: "d2"} for t in TEXTS[:2]])
    await store.delete_other_ingests(index, "d2")
    assert await store.count(index) == 2


async def test_dropping_a_product_removes_its_alias_and_every_index(store: VectorStore) -> None:
    for index in ("ns.product--a", "ns.product--b"):
        await store.ensure_index(plan(index))
    await store.ensure_index(plan("ns.other--a", alias="ns.other"))
    await store.point_alias("ns.product", "ns.product--b")
    await store.drop_product("ns.product")
    assert await store.current_index("ns.product") is None
    assert not await store.exists("ns.product--a") and not await store.exists("ns.product--b")
    assert await store.exists("ns.other--a")
    await store.drop("ns.other--a")
    await store.drop("ns.other--a")  # idempotent
    assert not await store.exists("ns.other--a")
    # Names past the embedded store's 80-character folder prefix, and a product named like the start of another.
    long = "ns." + "x" * 120
    for index in (f"{long}--a", f"{long}y--a", "ns.product-2--a"):
        await store.ensure_index(plan(index, alias=index.rsplit("--", 1)[0]))
    await store.drop_product(long)
    assert not await store.exists(f"{long}--a")
    assert await store.exists(f"{long}y--a") and await store.exists("ns.product-2--a")


async def test_a_vector_of_the_wrong_size_is_refused(store: VectorStore) -> None:
    index = await filled(store)
    with pytest.raises(StoreRejected if isinstance(store, EdgeStore) else (StoreRejected, ValueError)):
        await store.upsert(index, IDS[:1], [[1.0] * (DIM + 1)], TEXTS[:1], [{}])


async def test_the_longest_valid_names_fit(store: VectorStore) -> None:
    alias = collection_alias("n" * 63, "a" * 253)
    index = f"{alias}--0123456789"
    assert len(index) <= 255 and alias.startswith("n" * 63 + ".")
    assert await store.ensure_index(plan(index, alias=alias))
    await store.point_alias(alias, index)
    assert await store.current_index(alias) == index


# ---- the embedded engine only ----------------------------------------------------------------


async def test_embedded_collections_survive_a_restart(tmp_path: Path) -> None:
    first = EdgeStore(tmp_path)
    index = await filled(first)
    await first.point_alias("ns.product", index)
    await first.close()
    again = EdgeStore(tmp_path)
    try:
        assert await again.current_index("ns.product") == index
        assert await again.count("ns.product") == len(TEXTS)
    finally:
        await again.close()


async def test_a_reopened_store_drops_every_index_an_earlier_run_built_for_a_product(tmp_path: Path) -> None:
    first = EdgeStore(tmp_path)
    for index in ("ns.product--a", "ns.product--b", "ns.product-2--a", "ns.other--a"):
        await first.ensure_index(plan(index))
    await first.point_alias("ns.product", "ns.product--b")
    await first.close()
    again = EdgeStore(tmp_path)
    try:
        await again.ensure_index(plan("ns.product--c"))  # a re-index this run began
        await again.drop_product("ns.product")
        for gone in ("ns.product--a", "ns.product--b", "ns.product--c"):
            assert not await again.exists(gone), gone
        assert await again.exists("ns.product-2--a") and await again.exists("ns.other--a")
        await again.ensure_index(plan("ns.product--a"))  # the same name again, after the drop
        await again.drop_product("ns.product")
        assert not await again.exists("ns.product--a")
    finally:
        await again.close()


async def test_a_store_with_all_its_aliases_in_one_file_keeps_them_after_an_upgrade(tmp_path: Path) -> None:
    """Earlier versions kept every alias in aliases.json; a store opened now converts it to one file per alias."""
    first = EdgeStore(tmp_path)
    kept, other = await filled(first, "ns.product--a"), await filled(first, "ns.other--a")
    await first.close()
    (tmp_path / "aliases").rename(tmp_path / "aliases-new")  # as an earlier version left the folder
    (tmp_path / "aliases.json").write_text(json.dumps({"ns.product": kept, "ns.other": other}))
    upgraded = EdgeStore(tmp_path)
    try:
        assert await upgraded.current_index("ns.product") == kept
        assert await upgraded.count("ns.other") == len(TEXTS)
        assert not (tmp_path / "aliases.json").exists()
        await upgraded.drop_product("ns.other")
    finally:
        await upgraded.close()
    again = EdgeStore(tmp_path)
    try:
        assert await again.current_index("ns.product") == kept, "the converted alias outlives another restart"
        assert await again.current_index("ns.other") is None, "a dropped alias stays dropped"
    finally:
        await again.close()


async def test_an_unreadable_alias_file_loses_only_that_alias(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = EdgeStore(tmp_path)
    for name in ("ns.product", "ns.other"):
        await first.point_alias(name, await filled(first, f"{name}--a"))
    await first.close()
    broken = next(p for p in (tmp_path / "aliases").iterdir() if p.name.startswith("ns.other"))
    broken.write_text("{not json")
    again = EdgeStore(tmp_path)
    try:
        assert await again.current_index("ns.product") == "ns.product--a"
        assert await again.current_index("ns.other") is None
        assert any(broken.name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
        assert await again.point_alias("ns.other", "ns.other--a") is None, "the next reconcile points it again"
    finally:
        await again.close()


class ShardLoads:
    """Counts the engine's shard openings (``EdgeShard.load``) from now on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real_load = qe.EdgeShard.load

        def counting_load(*args: Any) -> Any:
            self.count += 1
            return real_load(*args)

        monkeypatch.setattr(qe.EdgeShard, "load", counting_load)


@pytest.fixture
def builder_pool(monkeypatch: pytest.MonkeyPatch) -> ChildProcesses:
    """A builder process of this test's own: no other test's children, none stopping for being idle, and every
    call in the one child."""
    pool = ChildProcesses(1, idle_seconds=600)
    monkeypatch.setattr(edge, "_BUILDER", pool)
    return pool


def _builders(pool: ChildProcesses) -> list[multiprocessing.process.BaseProcess]:
    pids = set(pool.pids())
    return [p for p in multiprocessing.active_children() if p.pid in pids]


async def test_embedded_collections_are_created_in_another_process(
    tmp_path: Path, builder_pool: ChildProcesses
) -> None:
    """The engine holds the GIL while it creates a shard (over a second under disk pressure), which
    froze the operator's process, lease keeper included: a builder process creates them. With the
    builder paused, a new collection's first write waits while this process goes on serving the
    collections it has."""
    store = EdgeStore(tmp_path)
    try:
        index = await filled(store)  # the builder is up
        builders = _builders(builder_pool)
        assert builders, "no builder process"
        for builder in builders:
            os.kill(builder.pid or 0, signal.SIGSTOP)
        try:
            assert await store.ensure_index(plan("ns.product--b")) is True
            payloads = [{"text": t} for t in TEXTS]
            creating = asyncio.create_task(store.upsert("ns.product--b", IDS, VECTORS, TEXTS, payloads))
            await asyncio.sleep(0.5)
            assert not creating.done(), "the collection was made without the builder"
            hits = await store.search(index, request(VECTORS[0], TEXTS[0]))
            assert hits and hits[0].payload["text"] == TEXTS[0]
        finally:
            for builder in builders:
                os.kill(builder.pid or 0, signal.SIGCONT)
        await creating
        assert await store.count("ns.product--b") == len(TEXTS)
    finally:
        await store.close()


async def test_a_builder_that_died_is_replaced_without_a_failed_creation(
    tmp_path: Path, builder_pool: ChildProcesses
) -> None:
    store = EdgeStore(tmp_path)
    try:
        await filled(store, "ns.product--a")
        dead = _builders(builder_pool)
        assert dead, "no builder process"
        for builder in dead:
            os.kill(builder.pid or 0, signal.SIGKILL)
            builder.join(5)
        await filled(store, "ns.product--b")
        assert await store.count("ns.product--b") == len(TEXTS)
        assert {b.pid for b in _builders(builder_pool)}.isdisjoint(b.pid for b in dead)
    finally:
        await store.close()


async def test_a_new_collection_is_made_with_its_first_batch_in_one_builder_call(
    tmp_path: Path, builder_pool: ChildProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made empty, then opened again in the builder for its first rows, a new collection cost a builder
    56 ms (30 of CPU); made with them, 43 ms (21 of CPU: create, index, write, flush and close once).
    This process opens it only when an operation needs it."""
    calls: list[str] = []
    real_run = builder_pool.run

    async def counting_run(call: Any, *args: Any) -> Any:
        calls.append(call.__name__)
        return await real_run(call, *args)

    monkeypatch.setattr(builder_pool, "run", counting_run)
    loads = ShardLoads(monkeypatch)
    store = EdgeStore(tmp_path)
    try:
        index = await filled(store)
        assert calls == ["build_shard"], "made and written in one call"
        assert await store.count(index) == len(TEXTS) and loads.count == 0, "not opened here to be counted"
        hits = await store.search(index, request(VECTORS[1], TEXTS[1]))
        assert hits[0].payload["text"] == TEXTS[1] and loads.count == 1
        # Created, and needed before any write: made then, empty.
        assert await store.ensure_index(plan("ns.product--b")) is True
        assert await store.exists("ns.product--b") and calls == ["build_shard"]
        assert await store.search("ns.product--b", request(VECTORS[0], TEXTS[0])) == []
        assert calls == ["build_shard"] * 2
        # An alias is written only for a collection on disk.
        assert await store.ensure_index(plan("ns.product--c")) is True
        await store.point_alias("ns.product", "ns.product--c")
        assert (tmp_path / "collections" / safe_dirname("ns.product--c") / "collection.json").exists()
        # Dropped before it was made: nothing to make, nothing left.
        assert await store.ensure_index(plan("ns.product--d")) is True
        await store.drop("ns.product--d")
        assert not await store.exists("ns.product--d") and calls == ["build_shard"] * 3
    finally:
        await store.close()


async def test_a_collection_that_cannot_be_made_at_close_does_not_stop_the_close(
    tmp_path: Path, builder_pool: ChildProcesses, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = EdgeStore(tmp_path)
    index = await filled(store)
    assert await store.search(index, request(VECTORS[0], TEXTS[0]))  # open here
    assert await store.ensure_index(plan("ns.other--a")) is True  # created, not made yet

    async def broken_run(call: Any, *args: Any) -> Any:
        raise RuntimeError("no builder")

    monkeypatch.setattr(builder_pool, "run", broken_run)
    await store.close()
    assert any("ns.other--a" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    again = EdgeStore(tmp_path)  # the open collection was closed: another store can open the folder
    try:
        hits = await again.search(index, request(VECTORS[2], TEXTS[2]))
        assert hits[0].payload["text"] == TEXTS[2]
        assert not await again.exists("ns.other--a")
    finally:
        await again.close()


def test_a_process_that_exits_at_once_takes_its_builder_along_and_prints_nothing(tmp_path: Path) -> None:
    """As the election's exit does when the operator does not stop in time: os._exit, no clean-up."""
    script = textwrap.dedent(
        f"""
        import asyncio, multiprocessing, os, sys
        sys.path[:0] = {sys.path!r}
        from tests.unit.test_store_contract import filled
        from datamesh.adapters.edge import EdgeStore

        async def main():
            store = EdgeStore({str(tmp_path)!r})
            await filled(store)
            print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
            os._exit(1)

        asyncio.run(main())
        """
    )
    # Its output is read to the end: every process holding its stderr (builder, resource tracker) is gone.
    done = run_python(script)
    assert done.returncode == 1, done.stderr
    builders = [int(pid) for pid in done.stdout.split()]
    assert builders, "no builder process"
    assert done.stderr == ""
    for pid in builders:  # gone, or a zombie its new parent has not reaped
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", f"builder {pid} lives on"


async def test_embedded_writes_survive_a_crash(tmp_path: Path) -> None:
    """kill -9 after an upsert that was never flushed: the engine's write-ahead log replays it."""
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, sys
        sys.path[:0] = {sys.path!r}
        from tests.unit.test_store_contract import filled
        from datamesh.adapters.edge import EdgeStore

        async def main():
            store = EdgeStore({str(tmp_path)!r})
            await filled(store)
            print("written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    done = await asyncio.to_thread(run_python, script)
    assert done.returncode == -signal.SIGKILL and "written" in done.stdout, done.stderr
    store = EdgeStore(tmp_path)
    try:
        assert await store.count("ns.product--a") == len(TEXTS)
    finally:
        await store.close()


async def test_after_a_clean_restart_counts_reopen_no_collection_and_after_a_kill_every_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart's periodic checks count every product: after a clean close the counts the last run
    kept are used once (no collection reopened); a collection gone since is not counted from them."""
    first = EdgeStore(tmp_path)
    names = [f"ns.p{i}--a" for i in range(3)]
    for name in names:
        await filled(first, name)
        assert await first.count(name) == len(TEXTS)  # as an ingestion ends: the count it reports
    await first.close()
    loads = ShardLoads(monkeypatch)
    shutil.rmtree(tmp_path / "collections" / safe_dirname(names[2]))  # removed by hand while stopped
    again = EdgeStore(tmp_path)
    try:
        assert not (tmp_path / "counts.json").exists(), "read once: a crash of this run must not reuse it"
        assert [await again.count(n) for n in names[:2]] == [len(TEXTS)] * 2
        assert loads.count == 0, "the clean run's counts were used"
        with pytest.raises(CollectionMissing):
            await again.count(names[2])
        await again.upsert(names[0], IDS[:1], [unit(7)], TEXTS[:1], [{DIGEST_KEY: "d2"}])
        assert await again.count(names[0]) == len(TEXTS), "an upsert of an existing id: still exact"
        await again.delete_other_ingests(names[0], "d2")
        assert await again.count(names[0]) == 1, "a count after a write is the engine's"
    finally:
        # Not closed, as after a kill: the next run finds no counts and counts every collection itself.
        for name in list(again._open):
            await asyncio.to_thread(again._open.pop(name).engine.close)
    loads.count = 0
    third = EdgeStore(tmp_path)
    try:
        assert await third.count(names[1]) == len(TEXTS) and loads.count == 1
    finally:
        await third.close()


async def test_a_folder_open_in_another_process_is_an_error_not_a_hang(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    await filled(store)
    await store.search("ns.product--a", request(VECTORS[0], TEXTS[0]))  # open here (the builder wrote it)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path[:0] = {sys.path!r}
        from datamesh.adapters.edge import EdgeStore
        from datamesh.core.ports import VectorStoreError

        async def main():
            store = EdgeStore({str(tmp_path)!r})
            try:
                await store.count("ns.product--a")
            except VectorStoreError as exc:
                print("refused:", exc)

        asyncio.run(main())
        """
    )
    try:
        other = await asyncio.to_thread(run_python, script)
        assert "refused:" in other.stdout and "WAL" in other.stdout, other.stdout + other.stderr
    finally:
        await store.close()


async def test_a_new_collections_first_batch_is_written_without_opening_it_in_this_process(tmp_path: Path) -> None:
    """Opening a collection holds the GIL through the engine's fsyncs: a burst of new products froze the
    operator once per product. The builder process that made the collection writes its first batch."""
    store = EdgeStore(tmp_path)
    try:
        index = await filled(store)
        await store.delete_other_ingests(index, "d1")  # the only ingestion there is: nothing to open for
        assert await store.count(index) == len(IDS)
        assert index not in store._open
        hits = await store.search(index, request(VECTORS[1], TEXTS[1], limit=1))
        assert hits[0].id == IDS[1] and hits[0].payload["text"] == TEXTS[1]
        # Another product's collection, whose next ingestion replaces the first: its points go.
        other = await filled(store, "ns.other--a")
        await store.upsert(other, IDS[:1], VECTORS[:1], TEXTS[:1], [{"text": TEXTS[0], DIGEST_KEY: "d2"}])
        await store.delete_other_ingests(other, "d2")
        assert await store.count(other) == 1
    finally:
        await store.close()
    again = EdgeStore(tmp_path)  # what the builder wrote was flushed, and is there after a restart
    try:
        assert await again.count(index) == len(IDS)
        assert (await again.search(index, request(VECTORS[2], TEXTS[2], limit=1)))[0].id == IDS[2]
    finally:
        await again.close()


def test_the_builder_knows_every_distance_and_field_type_of_the_spec() -> None:
    """The builder maps the spec's names without importing the models: a new distance or field type
    it did not know would fail every product using it when its collection is made."""
    assert set(edge_builder.DISTANCES) == {d.value for d in Distance}
    assert set(edge_builder.PAYLOAD_TYPES) == {t.value for t in FieldType}


async def test_a_builder_process_imports_the_engine_and_not_the_operators_modules(
    tmp_path: Path, builder_pool: ChildProcesses
) -> None:
    """Up to four builders run while products are created, each a process of its own: numpy, pydantic and
    the project's models (none of which a builder uses) cost each one about 30 MiB."""
    store = EdgeStore(tmp_path)
    try:
        index = await filled(store)
        assert index not in store._open and await store.count(index) == len(IDS)  # the builder wrote it
    finally:
        await store.close()
    loaded = set(await builder_pool.run(eval, "list(__import__('sys').modules)"))
    assert "qdrant_edge" in loaded and "datamesh.adapters.edge_builder" in loaded
    heavy = {"numpy", "pydantic", "datamesh.resource.models", "datamesh.core.ports", "datamesh.adapters.edge"}
    assert not loaded & heavy


async def test_embedded_store_keeps_few_collections_open(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, max_open=2)
    try:
        for i in range(5):
            await filled(store, f"ns.p{i}--a")
        assert len(store._open) <= 2
        for i in range(5):
            hits = await store.search(f"ns.p{i}--a", request(VECTORS[1], TEXTS[1], limit=1))
            assert hits[0].id == IDS[1]
        assert len(store._open) <= 2
        threads = len(os.listdir("/proc/self/task"))
        assert threads < 64, "one search thread per open collection, not eight"
    finally:
        await store.close()


async def test_counts_follow_every_write_and_checking_closed_collections_does_not_reopen_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Periodic checks count every product's points: with more products than open collections, a
    count must not reopen a collection the store has closed, and must still be exact after writes."""
    store = EdgeStore(tmp_path, max_open=2)
    try:
        names = [f"ns.p{i}--a" for i in range(5)]
        for name in names:
            await filled(store, name)
            assert await store.count(name) == len(TEXTS)
        loads = ShardLoads(monkeypatch)
        for name in names:
            assert await store.count(name) == len(TEXTS)
        assert loads.count == 0, "counting unchanged collections reopened them"
        await store.delete_other_ingests(names[0], "another-digest")
        assert await store.count(names[0]) == 0, "a count after a delete is exact"
        await store.upsert(names[0], IDS[:2], VECTORS[:2], TEXTS[:2], [{DIGEST_KEY: "d2"}] * 2)
        assert await store.count(names[0]) == 2, "a count after an upsert is exact"
        await store.drop(names[1])
        with pytest.raises(CollectionMissing):
            await store.count(names[1])
    finally:
        await store.close()


async def test_a_malformed_vector_never_reaches_the_engine(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    try:
        index = await filled(store)
        with pytest.raises(StoreRejected, match="NaN"):
            await store.upsert(index, IDS[:1], [[float("nan")] * DIM], TEXTS[:1], [{}])
        assert await store.count(index) == len(TEXTS)
    finally:
        await store.close()


async def test_a_closed_store_says_so(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    await store.close()
    with pytest.raises(VectorStoreError, match="closed"):
        await store.count("ns.product")


async def test_a_collection_from_an_earlier_version_gets_the_indexes_its_filters_need(tmp_path: Path) -> None:
    """Filters on unindexed payload read every point (a routing search took ms, not tenths of one)."""
    store = EdgeStore(tmp_path)
    try:
        index = await filled(store)  # made without payload indexes
        upgraded = CollectionPlan("ns.product", index, DIM, Distance.cosine, {"_kind": FieldType.string})
        assert not await store.ensure_index(upgraded)
    finally:
        await store.close()
    reopened = EdgeStore(tmp_path)
    try:
        async with reopened._use(index) as shard:
            assert "_kind" in shard.engine.info().payload_schema
        assert await reopened.count(index) == len(TEXTS)
    finally:
        await reopened.close()


@pytest.mark.parametrize("mode", [SearchMode.hybrid, SearchMode.dense])
async def test_routing_searches_keep_to_the_products_and_kind_asked_for(store: VectorStore, mode: SearchMode) -> None:
    routing = CollectionPlan("routing", "routing", DIM, Distance.cosine, {PRODUCT_KEY: FieldType.string}, mode)
    assert await store.ensure_index(routing)
    owners = ["ns/a", "ns/b", "ns/c"]
    payloads = [{PRODUCT_KEY: owners[i % 3], KIND_KEY: "card" if i == 5 else "row", DIGEST_KEY: "d1"} for i in range(6)]
    await store.upsert("routing", IDS, VECTORS, TEXTS, payloads)

    async def found(**scope: Any) -> set[tuple[str, str]]:
        req = SearchRequest(VECTORS[0], TEXTS[0], 10, mode, kind="row", **scope)
        return {(h.payload[PRODUCT_KEY], h.payload[KIND_KEY]) for h in await store.search("routing", req)}

    assert await found(products=["ns/a"]) == {("ns/a", "row")}
    assert await found(excluded=["ns/a"]) == {("ns/b", "row"), ("ns/c", "row")}  # c's card is not a row
    assert await found(products=["ns/a", "ns/c"], excluded=["ns/a"]) == {("ns/c", "row")}


async def test_routing_points_counts_one_products_rows_or_card_of_one_ingestion(store: VectorStore) -> None:
    routing = CollectionPlan("routing", "routing", DIM, Distance.cosine, {PRODUCT_KEY: FieldType.string})
    assert await store.ensure_index(routing)
    # ns/a: rows 0, 2 of ingestion d1 and row 4 of d2; ns/b: rows 1, 3 and its card (5), all d1.
    payloads = [
        {
            PRODUCT_KEY: "ns/a" if i % 2 == 0 else "ns/b",
            KIND_KEY: "card" if i == 5 else "row",
            DIGEST_KEY: "d2" if i == 4 else "d1",
        }
        for i in range(6)
    ]
    await store.upsert("routing", IDS, VECTORS, TEXTS, payloads)
    assert await store.routing_points("routing", "ns/a", "d1") == 2
    assert await store.routing_points("routing", "ns/a", "d2") == 1
    assert await store.routing_points("routing", "ns/b", "d1") == 2  # its card is not a row
    assert await store.routing_points("routing", "ns/b", "d1", "card") == 1
    assert await store.routing_points("routing", "ns/a", "d1", "card") == 0
    assert await store.routing_points("routing", "ns/c", "d1") == 0


def test_tied_hits_come_back_in_the_same_order_whatever_order_the_engine_gave() -> None:
    """Fused scores tie often, and the engine breaks ties differently call to call (the same question
    once answered with different rows); the closer row wins a tie, then the id."""
    tied = [ScoredRow("b", 0.5, {}, 0.7), ScoredRow("a", 0.5, {}, 0.7), ScoredRow("c", 0.5, {}, 0.9)]
    best = ScoredRow("z", 0.9, {}, 0.1)
    for order in ([*tied, best], [best, *reversed(tied)], [tied[1], best, tied[2], tied[0]]):
        assert [r.id for r in stable_top(order, 3)] == ["z", "c", "a"]


class ServerLayouts:
    """qdrant-client's local mode, answering ``get_collection`` with the layout a server would report.

    No Qdrant server can run here and local mode keeps no shards, replicas or quantization, so this
    thin wrapper remembers what ``create_collection``/``update_collection`` asked for and reports it
    back as a server does; everything else is the real local mode.
    """

    def __init__(self) -> None:
        from qdrant_client import AsyncQdrantClient

        self.real = AsyncQdrantClient(location=":memory:")
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.layout: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def create_collection(self, name: str, **kwargs: Any) -> bool:
        self.calls.append(("create", kwargs))
        self.layout = {k: kwargs[k] for k in ("shard_number", "replication_factor", "write_consistency_factor")}
        self.layout.update(
            on_disk_payload=kwargs["on_disk_payload"],
            hnsw=kwargs["hnsw_config"],
            quantization=kwargs["quantization_config"],
            on_disk=kwargs["vectors_config"]["dense"].on_disk,
        )
        return bool(await self.real.create_collection(name, **kwargs))

    async def update_collection(self, name: str, **kwargs: Any) -> bool:
        from qdrant_client import models as qm

        self.calls.append(("update", kwargs))
        params = kwargs["collection_params"]
        self.layout.update(
            replication_factor=params.replication_factor,
            write_consistency_factor=params.write_consistency_factor,
            on_disk_payload=params.on_disk_payload,
            hnsw=kwargs["hnsw_config"],
            on_disk=kwargs["vectors_config"]["dense"].on_disk,
            quantization=None
            if kwargs["quantization_config"] == qm.Disabled.DISABLED
            else kwargs["quantization_config"],
        )
        return True

    async def get_collection(self, name: str) -> Any:
        info = await self.real.get_collection(name)
        params = info.config.params.model_copy(
            update={k: self.layout[k] for k in ("shard_number", "replication_factor", "write_consistency_factor")}
            | {"on_disk_payload": self.layout["on_disk_payload"]}
        )
        params.vectors["dense"].on_disk = self.layout["on_disk"]
        hnsw = info.config.hnsw_config.model_copy(update=self.layout["hnsw"].model_dump(exclude_none=True))
        config = info.config.model_copy(
            update={"params": params, "hnsw_config": hnsw, "quantization_config": self.layout["quantization"]}
        )
        return info.model_copy(update={"config": config})


async def test_a_qdrant_server_gets_the_products_layout_and_changes_it_in_place() -> None:
    client = ServerLayouts()
    store = QdrantStore(client)  # type: ignore[arg-type]
    layout = CollectionLayout(shards=3, replicas=2, write_consistency=2, quantization=Quantization.scalar)
    wanted = CollectionPlan("ns.product", "ns.product--a", DIM, Distance.cosine, {}, SearchMode.hybrid, layout)
    try:
        assert await store.ensure_index(wanted)
        (kind, created), *_ = client.calls
        assert kind == "create" and created["shard_number"] == 3 and created["replication_factor"] == 2
        assert created["write_consistency_factor"] == 2 and created["quantization_config"] is not None
        report = await store.apply_layout(wanted)
        assert report.applied == layout and report.changed == () and report.ignored == ()
        # More replicas and vectors on disk: changed in place, on the same collection.
        grown = replace(wanted, layout=layout.model_copy(update={"replicas": 3, "on_disk_vectors": True}))
        report = await store.apply_layout(grown)
        assert report.changed == ("onDiskVectors", "replicas")
        assert report.applied.replicas == 3 and report.applied.on_disk_vectors
        assert [kind for kind, _ in client.calls] == ["create", "update"]
        assert (await store.apply_layout(grown)).changed == ()  # nothing left to change
    finally:
        await store.close()


async def test_the_embedded_store_says_which_layout_settings_it_ignores(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    try:
        plain = plan("ns.product--a")
        await store.ensure_index(plain)
        assert (await store.apply_layout(plain)).ignored == ()  # the defaults ask nothing it lacks
        asked = replace(plain, layout=CollectionLayout(shards=2, on_disk_vectors=True, hnsw=HnswLayout(m=32)))
        report = await store.apply_layout(asked)
        assert report.ignored == ("shards 2", "hnsw m 32, efConstruct 100")  # on-disk vectors it has anyway
        assert report.applied.shards == 1 and report.applied.on_disk_vectors
    finally:
        await store.close()
