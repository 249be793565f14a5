#!/usr/bin/env python
"""Benchmark: a product's ingestion against the raw floor, in one run.

Not a test. For each size (1k, 10k and 100k rows by default), in this process:

- FLOOR: a new hybrid collection, then the same rows' key text embedded with the same embedder,
  in batches, and written with the embedded store's own batch upsert: nothing but the unavoidable
  steps, one after the other;
- PRODUCT: a DataProduct whose rows come from a ``url`` source (JSON lines served on 127.0.0.1),
  reconciled by the reconcile core into a store where the mesh already exists (a 64-row product
  was ingested first, so the routing collection, the model and the built-in model's embedding
  process are there), from start to Ready:
  download, two passes of parsing and validation, its collection, embedding, upserts into the
  product's collection and the routing collection, stale-point removal, the card, the catalog entry.

It prints rows/s of both and their ratio (target: the product at 0.8x the floor or better; sizes
under 10k rows are run five times, interleaved, and their medians compared), and the
process's peak RSS up to the end of the product's ingestion, before the floor of that size runs
(target: under 500 MiB at 100k rows), and the largest peak RSS of its child processes. Sampled
while the product ingests: the largest sum of this process's RSS and its children's (what a
container's memory holds), split into anonymous memory and file-backed pages (the engine's
memory-mapped collection files, which a memory limit reclaims).

    .venv/bin/python bench/ingest.py                               # builtin:ngram-384, 1k/10k/100k
    .venv/bin/python bench/ingest.py --model onnx:all-MiniLM-L6-v2 --sizes 1000,5000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from procstatus import status_fields, status_mib, summed_pss_mib

# The child processes (the store's builders, the built-in model's embedding process) import this script
# again, as ``spawn`` does, where the operator's import only its small entry module: the project is
# imported here only when this file runs as the benchmark, so the children weigh what the operator's do.
if __name__ == "__main__":
    import httpx
    from starlette.applications import Starlette
    from starlette.staticfiles import StaticFiles

    from datamesh.adapters import edge
    from datamesh.adapters.edge import EdgeStore
    from datamesh.adapters.embeddings import builtin
    from datamesh.adapters.embeddings.registry import resolve_provider
    from datamesh.adapters.files import FileCatalogBackend
    from datamesh.core.plan import DIGEST_KEY, ROW_KEY, TEXT_KEY, CollectionPlan, point_id, routing_fields
    from datamesh.engine.catalog_writer import CatalogWriter
    from datamesh.local import standalone_reconciler
    from datamesh.resource.models import Distance, SearchMode
    from datamesh.settings import OperatorSettings
    from datamesh.web.serving import serve_app

TARGET_RATIO = 0.8
TARGET_RSS_MIB = 500

WORDS = [
    "shipment",
    "delayed",
    "storm",
    "customs",
    "carrier",
    "invoice",
    "disputed",
    "refund",
    "churn",
    "price",
    "renewal",
    "contract",
    "ticket",
    "outage",
    "login",
    "password",
    "latency",
    "warehouse",
    "pallet",
    "freight",
    "port",
    "strike",
    "snow",
    "flood",
    "audit",
    "receipt",
    "hotel",
    "flight",
]


def rows(count: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Synthetic rows of realistic length (two key-text fields, a number), one at a time."""
    rng = random.Random(seed)
    for i in range(count):
        summary = " ".join(rng.choice(WORDS) for _ in range(8))
        detail = " ".join(rng.choice(WORDS) for _ in range(24))
        yield {"id": f"R-{i:07d}", "summary": summary, "detail": detail, "amount": rng.randint(1, 10_000)}


def product(name: str, url: str, model: str) -> dict[str, Any]:
    return {
        "apiVersion": "datamesh.io/v1alpha1",
        "kind": "DataProduct",
        "metadata": {"name": name, "namespace": "bench", "generation": 1, "uid": f"uid-{name}"},
        "spec": {
            "domain": "bench",
            "description": "Synthetic rows for the ingestion benchmark.",
            "schema": {
                "fields": [
                    {"name": "id", "primaryKey": True},
                    {"name": "summary"},
                    {"name": "detail"},
                    {"name": "amount", "type": "integer"},
                ]
            },
            "source": {"url": {"url": url, "format": "jsonl", "maxBytes": 1 << 30}},
            "semanticSearch": {"embeddingModel": model, "keyFields": ["summary", "detail"]},
        },
    }


async def floor(store: EdgeStore, size: int, model: str, batch: int, routing: bool = False) -> float:
    """Seconds to create a collection, embed the rows and upsert them, with nothing else.

    With ``routing``, each batch is also upserted a second time (with a routing point's payload)
    into a second collection, as the mesh's routing collection needs.
    """
    provider = resolve_provider(model)
    await provider.embed(["warm up"])  # loading a model is not part of ingesting
    dimension = await provider.dimension()
    plan = CollectionPlan("floor", f"floor--{size}", dimension, Distance.cosine, {}, SearchMode.hybrid)
    second = CollectionPlan("route", f"route--{size}", dimension, Distance.cosine, {}, SearchMode.hybrid)
    if routing:
        await store.ensure_index(second)  # the mesh's routing collection exists before a product arrives
    data = rows(size)
    started = time.perf_counter()
    await store.ensure_index(plan)
    while part := list(itertools.islice(data, batch)):
        texts = [f"{r['summary']}\n{r['detail']}" for r in part]
        vectors = await provider.embed(texts)
        ids = [point_id("bench", "floor", [r["id"]]) for r in part]
        payloads = [{**r, TEXT_KEY: t, DIGEST_KEY: "d"} for r, t in zip(part, texts, strict=True)]
        await store.upsert(plan.index, ids, vectors, texts, payloads)
        if routing:
            routed = [{**routing_fields("bench/floor", "d"), ROW_KEY: r["id"]} for r in part]
            await store.upsert(second.index, ids, vectors, texts, routed)
    return time.perf_counter() - started


async def ingest(store: EdgeStore, url: str, name: str, model: str, state: Path) -> float:
    """Seconds from the start of a reconcile to its Ready outcome."""
    settings = OperatorSettings(catalog_flush_seconds=0.0, metrics_port=0)
    catalog = CatalogWriter(FileCatalogBackend(state / f"{name}.json"), "catalog", 800_000, 0.0)
    async with httpx.AsyncClient(timeout=120) as http:
        reconciler = standalone_reconciler(settings, store, catalog, http)
        started = time.perf_counter()
        outcome = await reconciler.reconcile(product(name, url, model))
        elapsed = time.perf_counter() - started
    await catalog.close()
    if outcome is None or outcome.status.phase != "Ready":
        raise SystemExit(f"{name} did not become Ready: {outcome.status.message if outcome else None}")
    return elapsed


def trials(size: int) -> int:
    """Runs of one size: 5 below 10k rows, 1 from there (each long enough to measure well)."""
    return 5 if size < 10_000 else 1


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mib() -> float:
    """The largest peak RSS of this process's live children (the embedding and shard-building processes)."""
    return max([status_mib("VmHWM", child.pid) for child in multiprocessing.active_children()], default=0.0)


class MemorySampler:
    """This process's anonymous and file-backed RSS, and its children's, sampled while a product ingests.

    The kernel keeps a peak of the whole RSS only. Much of it at 100k rows is the engine's memory-mapped
    collection files (page cache, which a memory limit reclaims rather than kills for); the children
    (the embedding process) count too in a container's memory. Their RSS counts the pages they share with
    this process (the interpreter, the libraries) once in each; the proportional set sizes count them once.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (anonymous, file-backed, children) MiB
        self.peak_pss = 0.0  # MiB, this process's and its children's proportional set sizes summed
        self.children_at_peak: dict[str, list[float]] = {}  # each child's RSS (MiB) at the largest sum, by role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss = status_fields(("RssAnon", "RssFile", "RssShmem"))
        anonymous, mapped = rss.get("RssAnon", 0) / 1024, (rss.get("RssFile", 0) + rss.get("RssShmem", 0)) / 1024
        live = multiprocessing.active_children()
        each = {child.pid: status_mib("VmRSS", child.pid) for child in live}
        children = sum(each.values())
        if anonymous + mapped + children > sum(self.peak):
            self.peak = (anonymous, mapped, children)
            roles = dict.fromkeys(builtin._ENCODER.pids(), "embedding") | dict.fromkeys(edge._BUILDER.pids(), "builder")
            self.children_at_peak = {}
            for pid, mib in each.items():
                self.children_at_peak.setdefault(roles.get(pid, "other"), []).append(mib)
        self.peak_pss = max(self.peak_pss, summed_pss_mib([os.getpid(), *(child.pid for child in live if child.pid)]))


async def main(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"model {args.model}; batch {args.batch}; embedded store (qdrant-edge)")
    print(
        f"{'rows':>8} {'floor rows/s':>13} {'+routing rows/s':>15} {'product rows/s':>15} {'ratio':>6} "
        f"{'ratio(+r)':>8} {'peak RSS MiB':>13} {'child RSS MiB':>13}"
    )
    worst = worst_routed = float("inf")
    product_rss = child_rss = 0.0
    together = (0.0, 0.0, 0.0)  # the largest sampled sum of this process's RSS (anonymous, file) and its children's
    together_pss = 0.0
    children_at_peak: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        served = root / "rows"
        served.mkdir()
        app = Starlette()
        app.mount("/rows", StaticFiles(directory=served))
        warmup = served / "warmup.jsonl"
        # More rows than the embedder takes inline: its child process is started, as in a running operator.
        warmup.write_text("".join(json.dumps(row) + "\n" for row in rows(64, seed=1)))
        async with serve_app(app) as base:
            for size in sizes:
                path = served / f"rows-{size}.jsonl"
                with path.open("w") as out:
                    out.writelines(json.dumps(row) + "\n" for row in rows(size))
                url = f"{base}/rows/{path.name}"
                # Small sizes take under a second, where one busy moment moves the ratio by a third:
                # they are run several times, interleaved, and their medians compared.
                runs: list[tuple[float, float, float]] = []
                for trial in range(trials(size)):
                    store = EdgeStore(root / f"product-{size}-{trial}")
                    try:
                        # A mesh that already exists: the routing collection, the model and its process are there.
                        await ingest(store, f"{base}/rows/{warmup.name}", f"w{size}", args.model, root)
                        with MemorySampler() as memory:
                            product_s = await ingest(store, url, f"p{size}", args.model, root)
                        if sum(memory.peak) > sum(together):
                            together, children_at_peak = memory.peak, memory.children_at_peak
                        together_pss = max(together_pss, memory.peak_pss)
                    finally:
                        await store.close()
                    product_rss = max(product_rss, peak_rss_mib())  # before a floor runs: the peak is the process's
                    child_rss = max(child_rss, children_peak_rss_mib())
                    floors = []
                    for routing in (False, True):
                        floor_store = EdgeStore(root / f"floor-{size}-{routing}-{trial}")
                        try:
                            floors.append(await floor(floor_store, size, args.model, args.batch, routing))
                        finally:
                            await floor_store.close()
                    runs.append((floors[0], floors[1], product_s))
                floor_s, routed_s, product_s = (statistics.median(r[k] for r in runs) for k in range(3))
                ratio, ratio_routed = floor_s / product_s, routed_s / product_s
                worst = min(worst, ratio)
                worst_routed = min(worst_routed, ratio_routed)
                rates = f"{size / floor_s:>13.0f} {size / routed_s:>15.0f} {size / product_s:>15.0f}"
                spread = sorted(f / p for f, _, p in runs)
                ranged = f"  ({len(runs)} runs, ratio {spread[0]:.2f}-{spread[-1]:.2f})" if len(runs) > 1 else ""
                memory = f"{product_rss:>13.0f} {child_rss:>13.0f}"
                print(f"{size:>8} {rates} {ratio:>6.2f} {ratio_routed:>8.2f} {memory}{ranged}", flush=True)
    verdict = "OK" if worst >= TARGET_RATIO else "MISS"
    print(
        f"\nproduct ingestion at {worst:.2f}x the floor at worst (target {TARGET_RATIO}x: {verdict}); "
        f"{worst_routed:.2f}x the floor that also writes the routing points"
    )
    verdict = "OK" if product_rss < TARGET_RSS_MIB else "MISS"
    print(
        f"peak RSS {product_rss:.0f} MiB at {size} rows (target under {TARGET_RSS_MIB} MiB: {verdict}); "
        f"its largest child process (embedding, shard creation) {child_rss:.0f} MiB"
    )
    anonymous, mapped, children = together
    print(
        f"sampled every 0.1 s while products ingested, at the largest sum: {sum(together):.0f} MiB with the child "
        f"processes; this process {anonymous:.0f} MiB anonymous + {mapped:.0f} MiB file-backed (the engine's "
        f"memory-mapped collection files: page cache that a memory limit reclaims), children {children:.0f} MiB"
    )
    roles = ", ".join(
        f"{role} {' + '.join(f'{m:.0f}' for m in mibs)}" for role, mibs in sorted(children_at_peak.items())
    )
    print(f"the children then (RSS MiB): {roles or 'none'}")
    print(
        f"the same processes' proportional set sizes at their largest sum: {together_pss:.0f} MiB (the pages they "
        "share, the interpreter and its libraries, counted once as a container's memory counts them)"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:ngram-384", help="Embedding model of the product and the floor.")
    parser.add_argument("--sizes", default="1000,10000,100000", help="Row counts, comma-separated.")
    parser.add_argument("--batch", type=int, default=256, help="Rows per batch (the operator's default).")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
