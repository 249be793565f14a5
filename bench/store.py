#!/usr/bin/env python
"""Benchmark: the embedded store (Qdrant's engine, qdrant-edge) through the project's VectorStore port.

Not a test. Re-measures, through ``EdgeStore`` as the operator and the query service use it:

1. upsert rate (points/s) of batches of 256 points, dense + BM25, one collection;
2. one search at 400, 5,000 and 50,000 points, in each mode (dense, sparse = BM25 alone, hybrid =
   both fused by the engine), for 10 rows (a product's search) and 64 (a routing collection's),
   median of many;
3. the cost of many collections: 100 and 300 collections of 20 points each, opened and searched
   once each (the store keeps at most ``--max-open`` open), with the process's threads and RSS
   before and after, per collection;
4. one alias switch (``point_alias``) with 100 and 10,000 aliases in the store, against the floor
   of any atomic pointer swap: one small file written and renamed into place. A switch must not
   grow with the number of products;
5. deleting a product (``drop_product``: its alias and every collection built for it) with 100
   and 10,000 collection folders in the store, against dropping its one collection by name
   (``drop``). Finding a product's collections must not grow with the number of products.

The baseline of each search figure is the same engine calls made directly on the ``EdgeShard``
(taken from the store's own ``search_plan``: no port around them), so the port's overhead prints
as a ratio.

    .venv/bin/python bench/store.py
    .venv/bin/python bench/store.py --sizes 400,5000 --collections 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from datamesh.adapters.atomic import atomic_write
from datamesh.adapters.edge import EdgeStore, SearchPlan, cosine_query, safe_dirname
from datamesh.core.plan import DIGEST_KEY, TEXT_KEY, CollectionPlan
from datamesh.core.ports import SearchRequest
from datamesh.core.routing import POLICY
from datamesh.resource.models import Distance, SearchMode
from procstatus import status_mib

DIM = 384
WORDS = ["shipment", "delayed", "storm", "customs", "carrier", "invoice", "refund", "churn", "price", "outage", "login"]


def status() -> tuple[int, float]:
    """Threads and RSS (MiB) of this process."""
    return len(os.listdir("/proc/self/task")), status_mib("VmRSS")


def points(count: int, seed: int) -> tuple[list[str], list[list[float]], list[str], list[dict[str, str]]]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [" ".join(rng.choice(WORDS, 12)) + f" item{i}" for i in range(count)]
    ids = [f"00000000-0000-4000-8000-{seed:04d}{i:08d}" for i in range(count)]
    return ids, vectors.tolist(), texts, [{TEXT_KEY: t, DIGEST_KEY: "d"} for t in texts]


async def fill(store: EdgeStore, name: str, count: int, seed: int) -> float:
    """Create a hybrid collection of ``count`` points; seconds spent upserting."""
    await store.ensure_index(CollectionPlan(name, name, DIM, Distance.cosine, {}, SearchMode.hybrid))
    ids, vectors, texts, payloads = points(count, seed)
    started = time.perf_counter()
    for start in range(0, count, 256):
        end = start + 256
        await store.upsert(name, ids[start:end], vectors[start:end], texts[start:end], payloads[start:end])
    return time.perf_counter() - started


async def timed(call, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``repeats`` awaited calls (after one warm-up)."""
    await call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def searches(store: EdgeStore, name: str, repeats: int, limit: int) -> dict[str, tuple[float, float]]:
    """Per mode: (port seconds, direct engine seconds) of a search for ``limit`` rows."""
    question = "which shipment was delayed by the storm at customs"
    vector = np.random.default_rng(99).normal(size=DIM).astype(np.float32)
    vector /= np.linalg.norm(vector)
    dense = vector.tolist()
    out = {}
    for mode in (SearchMode.dense, SearchMode.sparse, SearchMode.hybrid):
        request = SearchRequest(dense, question, limit, mode)
        port = await timed(lambda request=request: store.search(name, request), repeats)
        async with store._use(name) as shard:  # the same engine calls, made directly
            plan = store.search_plan(shard, request)
            assert plan is not None
            engine = shard.engine

            async def direct(plan: SearchPlan = plan, engine: Any = engine) -> None:
                points = engine.query(plan.query)
                if plan.cosines_by_engine and points:  # the hits' cosines: the port's second query
                    engine.query(cosine_query(plan.dense, {p.id for p in points}))

            raw = await timed(direct, repeats)
        out[mode.value] = (port, raw)
    return out


async def main(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        store = EdgeStore(Path(tmp) / "store", max_open=args.max_open)
        try:
            print(
                f"{'points':>8} {'upsert pts/s':>13}  " + "  ".join(f"{m:>22}" for m in ("dense", "sparse", "hybrid"))
            )
            print(f"{'':>8} {'':>13}  " + "  ".join(f"{'port ms / engine ms':>22}" for _ in range(3)))
            for size in sizes:
                name = f"bench.size-{size}"
                seconds = await fill(store, name, size, seed=size % 9973)
                for limit in (10, POLICY.fetch):  # a product's search, a routing collection's
                    found = await searches(store, name, args.repeats, limit)
                    cells = "  ".join(f"{p * 1000:>9.3f} / {r * 1000:>6.3f} ({p / r:4.1f}x)" for p, r in found.values())
                    label = f"{size / seconds:>13.0f}" if limit == 10 else f"{f'{limit} rows':>13}"
                    print(f"{size if limit == 10 else '':>8} {label}  {cells}", flush=True)
            for count in (int(c) for c in args.collections.split(",")):
                threads_before, rss_before = status()
                started = time.perf_counter()
                for i in range(count):
                    await fill(store, f"bench.many-{count}-{i}", 20, seed=i)
                request = SearchRequest([1.0] + [0.0] * (DIM - 1), "storm", 5, SearchMode.hybrid)
                for i in range(count):
                    await store.search(f"bench.many-{count}-{i}", request)
                threads, rss = status()
                print(
                    f"\n{count} collections of 20 points (at most {args.max_open} open): made and searched in "
                    f"{time.perf_counter() - started:.1f} s; threads {threads_before} -> {threads}; "
                    f"RSS {rss_before:.0f} -> {rss:.0f} MiB ({(rss - rss_before) / count:.2f} MiB per collection)",
                    flush=True,
                )
            print()
            for count in (int(c) for c in args.aliases.split(",")):
                await alias_switches(store, Path(tmp), count, args.repeats)
        finally:
            await store.close()
        for count in (int(c) for c in args.aliases.split(",")):
            await product_drops(Path(tmp) / f"drops-{count}", count, repeats=20)
    return 0


async def product_drops(root: Path, count: int, repeats: int) -> None:
    """Milliseconds to delete a product with ``count`` collection folders in the store, and to drop its collection."""
    # Empty folders named as collections are: what finding a product's collections has to look through.
    for i in range(count):
        (root / "collections" / safe_dirname(f"bench.other-{i}--a")).mkdir(parents=True)
    store = EdgeStore(root)
    try:
        timings: dict[str, list[float]] = {"drop_product": [], "drop": []}
        for k in range(repeats):
            for call in timings:
                index = f"bench.gone-{k}-{call}--a"
                await store.ensure_index(CollectionPlan(index[:-3], index, DIM, Distance.cosine, {}, SearchMode.hybrid))
                await store.point_alias(index[:-3], index)
                started = time.perf_counter()
                await (store.drop_product(index[:-3]) if call == "drop_product" else store.drop(index))
                timings[call].append(time.perf_counter() - started)
        product, floor = (statistics.median(timings[c]) for c in ("drop_product", "drop"))
        print(
            f"product deleted with {count} collections in the store: {product * 1000:.2f} ms; its collection "
            f"dropped by name {floor * 1000:.2f} ms ({product / floor:.1f}x the floor)",
            flush=True,
        )
    finally:
        await store.close()


async def alias_switches(store: EdgeStore, tmp: Path, count: int, repeats: int) -> None:
    """Milliseconds per alias switch with ``count`` aliases in the store, and the same per atomic file write."""
    first, second = "bench.alias--a", "bench.alias--b"
    for index in (first, second):
        await store.ensure_index(CollectionPlan("bench.alias", index, DIM, Distance.cosine, {}, SearchMode.hybrid))
    for i in range(count):  # many aliases, one collection: a switch's cost is the alias bookkeeping
        if await store.current_index(f"bench.alias-{i}") is None:
            await store.point_alias(f"bench.alias-{i}", first)
    started = time.perf_counter()
    for k in range(repeats):
        await store.point_alias(f"bench.alias-{k % count}", second if k % 2 == 0 else first)
    switch = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for k in range(repeats):
        atomic_write(tmp / "floor" / f"a{k % count}", json.dumps({"alias": f"bench.alias-{k}", "index": second}))
    floor = (time.perf_counter() - started) / repeats
    print(
        f"alias switch with {count} aliases: {switch * 1000:.3f} ms; one atomic file write {floor * 1000:.3f} ms "
        f"({switch / floor:.1f}x the floor)",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="400,5000,50000", help="Points per collection, comma-separated.")
    parser.add_argument("--collections", default="100,300", help="Numbers of small collections, comma-separated.")
    parser.add_argument("--max-open", type=int, default=256, help="Collections the store keeps open.")
    parser.add_argument("--repeats", type=int, default=200, help="Searches (and alias switches) per figure.")
    parser.add_argument("--aliases", default="100,10000", help="Aliases in the store, comma-separated.")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
