#!/usr/bin/env python
"""Benchmark: federated ``/v1/query`` over 1, 10 and 100 products against one direct search.

Not a test. In one run, with an embedded Qdrant (in this process) and built-in embeddings:

1. 100 products are reconciled with the reconcile core: the first 10 are copies of the
   logistics example (names and domains varied), the other 90 copies of the other examples;
2. baseline: one direct qdrant-client search of one product in this process, as a client
   of the mesh would do it without the service: embed the question + ``query_points``;
3. the query service runs under uvicorn on 127.0.0.1 over a catalog of 1, 10, then 100 of
   those products; a client in a separate process (so it does not share this process's GIL
   with the server) sends the same shipping question: serial requests for p50/p95, then 16
   concurrent clients for throughput. With 1 and 10 products every product is asked; with
   100 the question is routed among all 100 and asks the 10 relevant ones (the cap).

The table gives p50/p95 and their ratio to the direct search, and throughput. The HTTP floor
(``GET /healthz`` from the same client) is printed too: it is the part of every federated
request that a direct in-process search never pays.

    .venv/bin/python bench/query.py                  # about a minute
    .venv/bin/python bench/query.py --serial 100 --concurrent 400
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import multiprocessing
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.files import FileCatalogBackend, read_catalog_file
from datamesh.adapters.stores import open_store
from datamesh.core.ports import VectorStore
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.local import standalone_reconciler
from datamesh.query.access import Authenticator
from datamesh.query.app import create_app
from datamesh.query.catalog_sources import StaticCatalogSource
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CatalogEntry
from datamesh.settings import (
    OperatorSettings,
    StoreSettings,
)
from datamesh.web.serving import serve_app

REPO = Path(__file__).resolve().parents[1]

QUESTION = "which shipments were delayed by weather?"
# The tiny lexical model for every product: the benchmark measures the query path (routing, fan-out,
# Qdrant), not the products' embedding model (routing still embeds each question with the default model).
MODEL = "builtin:ngram-384"
LIMIT = 5
CONCURRENCY = 16


def product_bodies(count: int) -> list[dict[str, Any]]:
    """``count`` products: 10 logistics copies first, then copies of the other examples."""
    examples = [
        yaml.safe_load(p.read_text())
        for p in sorted((REPO / "examples").glob("*.yaml"))
        if p.name != "00-namespaces.yaml"
    ]
    logistics = next(e for e in examples if e["metadata"]["name"] == "shipment-delays")
    others = [e for e in examples if e is not logistics]
    bodies = []
    for i in range(count):
        base = logistics if i < 10 else others[i % len(others)]
        body = copy.deepcopy(base)
        body["metadata"] = {
            "name": f"{base['metadata']['name']}-{i:03d}",
            "namespace": base["metadata"]["namespace"],
            "generation": 1,
            "uid": f"bench-{i}",
        }
        body["spec"]["domain"] = f"{base['spec']['domain']}-{i // 10}"
        body["spec"]["access"] = {"consumers": ["*"]}
        body["spec"]["semanticSearch"]["embeddingModel"] = MODEL
        bodies.append(body)
    return bodies


async def build(store: VectorStore, count: int, catalog_path: Path) -> list[CatalogEntry]:
    """Reconcile ``count`` products into ``store``; their catalog entries in creation order."""
    settings = OperatorSettings(catalog_flush_seconds=0.05, metrics_port=0)
    writer = CatalogWriter(
        FileCatalogBackend(catalog_path), "catalog", settings.catalog_shard_bytes, settings.catalog_flush_seconds
    )
    bodies = product_bodies(count)
    async with httpx.AsyncClient() as http:
        reconciler = standalone_reconciler(settings, store, writer, http)
        outcomes = await asyncio.gather(*(reconciler.reconcile(b) for b in bodies))
    await writer.close()
    bad = [
        b["metadata"]["name"] for b, o in zip(bodies, outcomes, strict=True) if o is None or o.status.phase != "Ready"
    ]
    if bad:
        raise SystemExit(f"products not Ready: {bad}")
    entries = read_catalog_file(catalog_path)
    return [entries[f"{b['metadata']['namespace']}.{b['metadata']['name']}"] for b in bodies]


async def direct_search(store: VectorStore, collection: str, repeats: int) -> list[float]:
    """Latencies (s) of embed + qdrant-client query_points on one collection, in process."""
    provider = resolve_provider(MODEL)
    latencies = []
    for _ in range(repeats):
        started = time.perf_counter()
        (vector,) = await provider.embed([QUESTION])
        result = await store.client.query_points(collection, query=vector, limit=LIMIT, with_payload=True)
        latencies.append(time.perf_counter() - started)
        assert result.points
    return latencies


# ==== the client (runs in a child process) ===================================================


async def _batch(url: str, body: dict[str, Any] | None, serial: int, concurrent: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def once() -> tuple[float, dict[str, Any] | None]:
            started = time.perf_counter()
            response = await (http.get("/healthz") if body is None else http.post("/v1/query", json=body))
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            return elapsed, response.json() if body is not None else None

        for _ in range(3):  # a warm connection, like a client that keeps one
            _, answer = await once()
        latencies = [(await once())[0] for _ in range(serial)]
        remaining = concurrent

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await once()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - started
    return {
        "latencies": latencies,
        "wall": wall,
        "requests": concurrent,
        "asked": len(answer["results"]) + len(answer["errors"]) if answer else 0,
        "errors": len(answer["errors"]) if answer else 0,
    }


def client_batch(url: str, body: dict[str, Any] | None, serial: int, concurrent: int) -> dict[str, Any]:
    """One batch of serial then concurrent requests, in the client process."""
    return asyncio.run(_batch(url, body, serial, concurrent))


# ==== main ===================================================================================


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Case:
    """One line of the table: latencies and throughput gathered over the rounds."""

    def __init__(self, label: str, catalog: int | str, url: str = "", body: dict[str, Any] | None = None) -> None:
        self.label, self.catalog, self.url, self.body = label, catalog, url, body
        self.latencies: list[float] = []
        self.wall = 0.0
        self.requests = 0
        self.asked = 0
        self.errors = 0

    def add(self, result: dict[str, Any]) -> None:
        self.latencies += result["latencies"]
        self.wall += result["wall"]
        self.requests += result["requests"]
        self.asked, self.errors = result["asked"], self.errors + result["errors"]

    @property
    def throughput(self) -> float:
        return self.requests / self.wall if self.wall else float("nan")


async def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    store = open_store(StoreSettings(url=None))
    with tempfile.TemporaryDirectory() as tmp:
        entries = await build(store, 100, Path(tmp) / "catalog.json")
    print(
        f"built 100 products in {time.perf_counter() - started:.1f}s "
        f"({sum(e.records or 0 for e in entries)} rows, embedded Qdrant, {MODEL})"
    )

    # One service per catalog size, all on this process's loop and Qdrant, measured in
    # interleaved rounds so that background load on the machine hits every case alike.
    body = {"question": QUESTION, "limit": LIMIT}
    cases = [Case("HTTP floor (GET /healthz)", "-")]
    direct = Case("direct qdrant-client search (1 product)", "-")
    direct.asked = 1
    async with contextlib.AsyncExitStack() as servers:
        for size in (1, 10, 100):
            source = StaticCatalogSource({e.key: e for e in entries[:size]})
            app = create_app(source, store, QuerySettings(allow_anonymous=True), Authenticator(allow_anonymous=True))
            url = await servers.enter_async_context(serve_app(app))
            cases.append(Case(f"federated /v1/query, {size} product{'s' if size > 1 else ''}", size, url, body))
        cases[0].url = cases[1].url
        await direct_search(store, entries[0].collection or "", 20)  # warm-up
        loop = asyncio.get_running_loop()
        serial, concurrent = max(1, args.serial // args.rounds), max(CONCURRENCY, args.concurrent // args.rounds)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in range(args.rounds):
                direct.latencies += await direct_search(store, entries[0].collection or "", serial)
                for case in cases:
                    case.add(await loop.run_in_executor(pool, client_batch, case.url, case.body, serial, concurrent))
    await store.close()

    d50, d95 = pct(direct.latencies, 0.5), pct(direct.latencies, 0.95)
    print()
    print(
        f"{'case':<40} {'catalog':>7} {'asked':>5} {'p50 ms':>8} {'p95 ms':>8} {'p50/direct':>10} {'p95/direct':>10} "
        f"{'req/s @16':>10}"
    )
    print("-" * 104)
    print(
        f"{direct.label:<40} {'-':>7} {1:>5} {d50 * 1000:>8.2f} {d95 * 1000:>8.2f} {1.0:>10.2f} {1.0:>10.2f} {'-':>10}"
    )
    for case in cases:
        p50, p95 = pct(case.latencies, 0.5), pct(case.latencies, 0.95)
        print(
            f"{case.label:<40} {case.catalog!s:>7} {case.asked:>5} {p50 * 1000:>8.2f} {p95 * 1000:>8.2f} "
            f"{p50 / d50:>10.2f} {p95 / d95:>10.2f} {case.throughput:>10.0f}"
        )
        if case.errors:
            print(f"  ! {case.errors} product errors seen")
    floor = pct(cases[0].latencies, 0.5)
    one = pct(cases[1].latencies, 0.5)
    print()
    print("ratios:")
    for case in cases[1:]:
        p50, p95 = pct(case.latencies, 0.5), pct(case.latencies, 0.95)
        print(
            f"  {case.catalog:>3} products: p50/direct={p50 / d50:.2f} p95/direct={p95 / d95:.2f} "
            f"p50/federated-1={p50 / one:.2f} "
            f"(p50 - HTTP floor)/direct={(p50 - floor) / d50:.2f} throughput={case.throughput:.0f} req/s"
        )
    print(
        f"  p50 100 products / 10 products = {pct(cases[3].latencies, 0.5) / pct(cases[2].latencies, 0.5):.2f} "
        "(routing over the larger catalog)"
    )
    print(
        f"\n{args.rounds} interleaved rounds; {serial * args.rounds} serial requests and {concurrent * args.rounds} "
        f"at {CONCURRENCY} concurrent clients per case; "
        f"total {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serial", type=int, default=300, help="Serial requests per case (latency percentiles).")
    parser.add_argument(
        "--concurrent", type=int, default=800, help="Requests per case at 16 concurrent clients (throughput)."
    )
    parser.add_argument("--rounds", type=int, default=10, help="Interleaved rounds the requests are split into.")
    asyncio.run(main(parser.parse_args()))
