#!/usr/bin/env python
"""Benchmark: the federated ``/v1/query`` against its floor, in one run.

Not a test. With the embedded store (Qdrant's engine, in this process) and one embedding model:

1. three meshes are reconciled with the reconcile core, each in a store of its own: 1 copy of the
   logistics example; 10 copies (names and domains varied); and those 10 with 90 copies of the
   other examples, 100 products. No two products hold the same rows, as in a real mesh: each row of
   a copy adds the opening words of another row of its example and names the copy's site and month,
   and the other examples' copies keep three rows in four of theirs (the same rows copied into
   hundreds of products break the embedded store's HNSW index, which then falls back on exact
   searches: see docs/scaling.md); with ``--corpus debian`` the largest catalog's other products are
   Debian's package summaries instead (real, distinct text: 24 rows a product at 2,000, 5 at 10,000);
2. a query service runs under uvicorn on 127.0.0.1 for each mesh, its catalog the mesh's products
   (in the largest, the question is routed among 100 and asks the 10 logistics copies);
3. a client in another process (so it does not share this process's GIL with the server) asks the
   same shipping question: serial requests for p50/p95, then 16 concurrent clients for throughput,
   counting every answer that is not 2xx (a benchmark that crashes on a 503 hides it);
4. the FLOOR of each case is measured in the same rounds: one trivial HTTP round trip to the same
   server (``GET /healthz``) plus the direct engine work the query makes, called in this process one
   after the other with the same embedder: embedding the question once, the two routing searches
   (rows, descriptions) and one search per product the service asked. Each serial question is
   followed by one floor and one ``GET /healthz``, each after the same pause (the hand-over to or
   from the client process), so the floor runs as a served question does: after an idle pause, which
   costs a trivial round trip on this machine about 1.6 ms more than back to back. The floor as it
   was measured before 2026-12-03 is printed beside it (``b2b floor``): ``GET /healthz`` back to
   back plus the engine work called back to back.

Every figure is printed as a ratio to its floor. Targets (issue 9): federated(10) p50 within 1.2x
its floor; federated(N in catalog, 10 routed; ``--catalog N``, default 100) within 1.1x
federated(10); no non-2xx answer at 16 clients.

    .venv/bin/python bench/query.py                       # a few minutes (embeds 2,600 rows first)
    .venv/bin/python bench/query.py --model builtin:ngram-384 --rounds 4
    .venv/bin/python bench/query.py --model builtin:ngram-384 --catalog 10000 --rounds 2   # issue 14
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import multiprocessing
import random
import re
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from datamesh.adapters.edge import EdgeStore
from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.files import FileCatalogBackend, read_catalog_file
from datamesh.adapters.stores import open_store
from datamesh.core.ports import EmbeddingProvider, SearchRequest, VectorStore
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.local import standalone_reconciler
from datamesh.query.access import Authenticator
from datamesh.query.app import create_app
from datamesh.query.catalog_sources import StaticCatalogSource
from datamesh.query.engine import CandidateView, routing_requests
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CatalogEntry
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL
from datamesh.settings import OperatorSettings, StoreSettings
from datamesh.web.serving import serve_app

REPO = Path(__file__).resolve().parents[1]
QUESTION = "which shipments were held up by snow storms?"
PER_PRODUCT = 5
BUILD_BATCH = 200
CONCURRENCY = 16


SITES = ["Antwerp", "Bilbao", "Cork", "Dortmund", "Espoo", "Faro", "Graz", "Haarlem", "Izmir", "Jena", "Kaunas"]
MAX_VALUE = 256  # characters of an inline value
DEBIAN_ROWS = 24  # rows of a Debian product at most (the logistics example has 24)
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]


def varied(body: dict[str, Any], copy_number: int, keep: float) -> None:
    """Make a copy's rows its own: each key field gets the opening words of another row of the same example
    and names the copy's site and month; ``keep``: the share of the rows the copy keeps."""
    rng = random.Random(copy_number)
    spec = body["spec"]
    original = spec["source"]["inline"]
    rows = rng.sample(original, max(1, round(len(original) * keep))) if keep < 1 else original
    site, month = SITES[copy_number % len(SITES)], MONTHS[copy_number // len(SITES) % len(MONTHS)]
    where = f"{site} site, {month} batch {copy_number}"
    for row in rows:
        for key in spec["semanticSearch"]["keyFields"]:
            other = rng.choice(original).get(key)
            if isinstance(row.get(key), str) and isinstance(other, str):
                added = f" Also: {' '.join(other.split()[:8])} ({where})"
                row[key] = row[key][: MAX_VALUE - len(added)] + added  # inline values are limited
    spec["source"]["inline"] = rows


def debian_packages() -> list[dict[str, str]]:
    """Debian bookworm/main's packages (name, section, one-line summary), one per distinct summary, by name.

    Read from this machine's apt index (``apt-get update`` writes it), with the quality data's parser.
    """
    scripts = str(REPO / "bench" / "quality_data")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import build_products  # type: ignore[import-not-found]  # the quality data's script, not a module

    seen: set[str] = set()
    packages = []
    for stanza in sorted(
        build_products.parse_stanzas(build_products.apt_cat(build_products.PACKAGES)), key=lambda s: s["Package"]
    ):
        summary = build_products.collapse(stanza.get("Description", ""))
        if summary and summary.lower() not in seen:
            seen.add(summary.lower())
            section = stanza.get("Section", "misc")
            packages.append({"package": stanza["Package"], "section": section, "summary": summary})
    return packages


def debian_bodies(count: int, model: str) -> list[dict[str, Any]]:
    """``count`` products of Debian packages: each section's, in name order, dealt out in blocks (no two rows alike)."""
    packages = sorted(debian_packages(), key=lambda p: (p["section"], p["package"]))
    per = min(DEBIAN_ROWS, len(packages) // max(1, count))
    if per < 1:
        raise SystemExit(f"{len(packages)} Debian packages cannot give {count} products a row each")
    bodies = []
    for i in range(count):
        rows = packages[i * per : (i + 1) * per]
        sections = sorted({r["section"] for r in rows})
        section = re.sub(r"[^a-z0-9]+", "-", sections[0].lower()).strip("-") or "misc"
        names = ", ".join(r["package"] for r in rows[:4])
        bodies.append(
            {
                "metadata": {
                    "name": f"deb-{section[:40]}-{i:05d}",
                    "namespace": "debian",
                    "generation": 1,
                    "uid": f"bench-deb-{i}",
                },
                "spec": {
                    "domain": f"debian-{section[:40]}",
                    "description": f"Debian packages of the {', '.join(sections)} section: {names} and others.",
                    "owner": {"team": "debian-mirror"},
                    "schema": {
                        "fields": [
                            {"name": "package", "type": "string", "primaryKey": True},
                            {"name": "section", "type": "string", "filterable": True},
                            {"name": "summary", "type": "string", "required": True},
                        ]
                    },
                    "access": {"consumers": ["*"]},
                    "semanticSearch": {"keyFields": ["package", "summary"], "embeddingModel": model},
                    "source": {"inline": rows},
                },
            }
        )
    return bodies


def product_bodies(count: int, model: str, corpus: str = "examples") -> list[dict[str, Any]]:
    """``count`` products: 10 logistics copies first, then products of the corpus, each with rows of its own.

    ``corpus`` ``examples``: copies of the other examples, varied; ``debian``: Debian's package summaries.
    """
    examples = [
        yaml.safe_load(p.read_text())
        for p in sorted((REPO / "examples").glob("*.yaml"))
        if p.name != "00-namespaces.yaml"
    ]
    logistics = next(e for e in examples if e["metadata"]["name"] == "shipment-delays")
    others = [e for e in examples if e is not logistics]
    bodies = []
    for i in range(min(count, 10) if corpus == "debian" else count):
        base = logistics if i < 10 else others[i % len(others)]
        body = copy.deepcopy(base)
        body["metadata"] = {
            "name": f"{base['metadata']['name']}-{i:05d}",
            "namespace": base["metadata"]["namespace"],
            "generation": 1,
            "uid": f"bench-{i}",
        }
        body["spec"]["domain"] = f"{base['spec']['domain']}-{i // 10}"
        body["spec"]["access"] = {"consumers": ["*"]}
        body["spec"]["semanticSearch"]["embeddingModel"] = model
        varied(body, i, 1.0 if base is logistics else 0.75)
        bodies.append(body)
    if corpus == "debian" and count > 10:
        bodies += debian_bodies(count - 10, model)
    return bodies


def read_reported(catalog_path: Path) -> dict[str, CatalogEntry]:
    """The catalog as the query service reads it, printing its size on the wire and in memory."""
    tracemalloc.start()
    entries = read_catalog_file(catalog_path)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(
        f"  catalog of {len(entries)} products: {catalog_path.stat().st_size / 2**20:.2f} MiB on the wire, "
        f"{held / 2**20:.1f} MiB as the query service holds it ({held / max(1, len(entries)) / 1024:.1f} KiB each)",
        flush=True,
    )
    return entries


async def build(
    store: VectorStore, count: int, catalog_path: Path, model: str, corpus: str = "examples"
) -> list[CatalogEntry]:
    """Reconcile ``count`` products into ``store``; their catalog entries in creation order."""
    settings = OperatorSettings(catalog_flush_seconds=0.05, metrics_port=0)
    writer = CatalogWriter(
        FileCatalogBackend(catalog_path), "catalog", settings.catalog_shard_bytes, settings.catalog_flush_seconds
    )
    bodies = product_bodies(count, model, corpus)
    outcomes = []
    async with httpx.AsyncClient() as http:
        reconciler = standalone_reconciler(settings, store, writer, http)
        # In batches the size of the store's open-collection cache: all at once, a large mesh's
        # collections are evicted and reopened in turn (the bench would measure that, not the query).
        for i in range(0, len(bodies), BUILD_BATCH):
            batch = bodies[i : i + BUILD_BATCH]
            outcomes += await asyncio.gather(*(reconciler.reconcile(b) for b in batch))
            if len(bodies) > BUILD_BATCH:
                print(f"  reconciled {i + len(batch)}/{len(bodies)}", flush=True)
    await writer.close()
    bad = [
        b["metadata"]["name"] for b, o in zip(bodies, outcomes, strict=True) if o is None or o.status.phase != "Ready"
    ]
    if bad:
        raise SystemExit(f"products not Ready: {bad}")
    entries = read_reported(catalog_path)
    return [entries[f"{b['metadata']['namespace']}.{b['metadata']['name']}"] for b in bodies]


@dataclass(frozen=True)
class FloorPlan:
    """What the floor's engine calls need, worked out once per case from the service's own routing view."""

    provider: EmbeddingProvider
    routing: tuple[tuple[str, int, dict[str, list[str]]], ...]  # per routing collection: candidates, filter
    collections: tuple[str, ...]  # of the products the service asked

    @classmethod
    def of(cls, model: str, candidates: Sequence[CatalogEntry], asked: Sequence[str]) -> FloorPlan:
        view = CandidateView.of(candidates, candidates)
        return cls(
            provider=resolve_provider(model),
            routing=tuple((c, len(group), scope) for (c, _), (group, scope) in view.groups.items()),
            collections=tuple(view.by_product[p].collection or "" for p in asked),
        )


async def engine_floor(store: VectorStore, plan: FloorPlan) -> float:
    """Seconds of the engine work one query makes, called directly one after the other."""
    started = time.perf_counter()
    (vector,) = await plan.provider.embed([QUESTION])
    for collection, asked, scope in plan.routing:
        for search in routing_requests(vector, QUESTION, asked, scope):
            await store.search(collection, search)
    for collection in plan.collections:
        await store.search(collection, SearchRequest(vector, QUESTION, PER_PRODUCT))
    return time.perf_counter() - started


# ==== the client (runs in a child process) ===================================================


async def _timed(http: httpx.AsyncClient, body: dict[str, Any] | None) -> tuple[float, httpx.Response]:
    """A question (``body``) or, for None, ``GET /healthz``: its seconds and its response."""
    started = time.perf_counter()
    response = await (http.get("/healthz") if body is None else http.post("/v1/query", json=body))
    return time.perf_counter() - started, response


async def _batch(url: str, body: dict[str, Any], concurrent: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        remaining = concurrent
        loaded: list[float] = []

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                elapsed, response = await _timed(http, body)
                loaded.append(elapsed)
                statuses[response.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - started
    return {"loaded": loaded, "wall": wall, "requests": concurrent, "statuses": statuses}


def client_batch(url: str, body: dict[str, Any], concurrent: int) -> dict[str, Any]:
    """``concurrent`` requests from 16 clients at once, in the client process: throughput and p50 under load."""
    return asyncio.run(_batch(url, body, concurrent))


_kept: dict[str, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}


def client_step(url: str, body: dict[str, Any] | None) -> tuple[float, int, list[str]]:
    """One request on a connection kept between calls, as a client keeps one between its questions.

    Returns its seconds, its status and (for a question) the products the service asked.
    """
    loop, http = _connection(url)
    elapsed, response = loop.run_until_complete(_timed(http, body))
    answer = response.json() if body is not None and response.is_success else {}
    return elapsed, response.status_code, [r["product"] for r in answer.get("routedTo", [])]


def client_hot_round_trips(url: str, count: int) -> list[float]:
    """``count`` GET /healthz back to back (the floor's round trip before 2026-12-03): seconds each."""
    loop, http = _connection(url)

    async def run() -> list[float]:
        return [(await _timed(http, None))[0] for _ in range(count)]

    return loop.run_until_complete(run())


def _connection(url: str) -> tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]:
    if url not in _kept:
        _kept[url] = asyncio.new_event_loop(), httpx.AsyncClient(base_url=url, timeout=30)
    return _kept[url]


# ==== main ===================================================================================


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


class Case:
    """One line of the table: the federated query over one catalog, and its floor."""

    def __init__(
        self, label: str, store: VectorStore, entries: list[CatalogEntry], url: str, body: dict[str, Any]
    ) -> None:
        self.label, self.store, self.entries, self.url, self.body = label, store, entries, url, body
        self.latencies: list[float] = []
        self.loaded: list[float] = []
        self.floor: list[float] = []  # the engine work, each right after a question (as the service runs it)
        self.back_to_back: list[float] = []  # the same, called in a loop (as the floor was before 2026-12-03)
        self.rtt: list[float] = []  # GET /healthz to this case's server, each after a question and a floor
        self.hot_rtt: list[float] = []  # the same, back to back
        self.round_ratios: list[float] = []  # p50/floor of each round: how much one run's ratio can move
        self.wall = 0.0
        self.requests = 0
        self.statuses: Counter[int] = Counter()
        self.asked: list[str] = []

    def add(self, result: dict[str, Any]) -> None:
        """A batch of concurrent requests (``client_batch``)."""
        self.loaded += result["loaded"]
        self.wall += result["wall"]
        self.requests += result["requests"]
        self.statuses.update(result["statuses"])

    @property
    def throughput(self) -> float:
        return self.requests / self.wall if self.wall else float("nan")

    @property
    def non_2xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if not 200 <= s < 300)


async def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    body = {"question": QUESTION, "limit": 10, "perProduct": PER_PRODUCT}
    cases: list[Case] = []
    async with contextlib.AsyncExitStack() as servers:
        largest = f"federated({args.catalog} in catalog)"
        for label, count in (("federated(1)", 1), ("federated(10)", 10), (largest, args.catalog)):
            # One mesh per case: a routing collection holds the points of its catalog's products only.
            store = open_store(StoreSettings(url=None, optimize_min_points=args.index_min_points))
            servers.push_async_callback(store.close)
            tmp = servers.enter_context(tempfile.TemporaryDirectory())
            entries = await build(store, count, Path(tmp) / "catalog.json", args.model, args.corpus)
            if isinstance(store, EdgeStore):  # large collections (the routing one) get their HNSW index first
                indexing = time.perf_counter()
                await store.settled()
                routing = await store.index_state(entries[0].routing_collection or "")
                how = (
                    f"index used, {routing.candidates} candidates per search (recall {routing.recall:.2f})"
                    if routing.used
                    else "exact searches" + (f" (index recall {routing.recall:.2f})" if routing.recall else "")
                )
                print(
                    f"  {label}: indexes built in {time.perf_counter() - indexing:.1f}s; routing collection "
                    f"{routing.points} points, {how}",
                    flush=True,
                )
            source = StaticCatalogSource({e.key: e for e in entries})
            settings = QuerySettings(allow_anonymous=True, max_products=10)
            app = create_app(source, store, settings, Authenticator(allow_anonymous=True))
            url = await servers.enter_async_context(serve_app(app))
            cases.append(Case(label, store, entries, url, body))
        rows = sum(e.records or 0 for c in cases for e in c.entries)
        built = f"built {11 + args.catalog} products in {time.perf_counter() - started:.1f}s"
        print(f"{built} ({rows} rows, embedded store, {args.model})")
        loop = asyncio.get_running_loop()
        serial, concurrent = max(1, args.serial // args.rounds), max(CONCURRENCY, args.concurrent // args.rounds)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:

            async def step(url: str, question: dict[str, Any] | None) -> tuple[float, int, list[str]]:
                return await loop.run_in_executor(pool, client_step, url, question)

            plans = {}
            for case in cases:  # a warm connection, like a client that keeps one; what the service asks
                for _ in range(3):
                    _, _, case.asked = await step(case.url, case.body)
                await step(case.url, None)
                plans[case.label] = FloorPlan.of(args.model, case.entries, case.asked)
            # Interleaved rounds: background load on the machine hits every case and its floor alike.
            for _ in range(args.rounds):
                for case in cases:
                    plan = plans[case.label]
                    latencies, floors, rtts = [], [], []
                    # A question, the floor's engine work, a GET /healthz: each after the same pause (the
                    # hand-over to or from the client process), so the floor runs as a served question does,
                    # not in a hot loop of its own (there a round trip took half the time: bench/README.md).
                    for _ in range(serial):
                        elapsed, status, _ = await step(case.url, case.body)
                        latencies.append(elapsed)
                        case.statuses[status] += 1
                        floors.append(await engine_floor(case.store, plan))
                        rtts.append((await step(case.url, None))[0])
                    case.latencies += latencies
                    case.floor += floors
                    case.rtt += rtts
                    case.back_to_back += [await engine_floor(case.store, plan) for _ in range(serial)]
                    case.hot_rtt += await loop.run_in_executor(pool, client_hot_round_trips, case.url, serial)
                    case.add(await loop.run_in_executor(pool, client_batch, case.url, case.body, concurrent))
                    case.round_ratios.append(pct(latencies, 0.5) / (pct(rtts, 0.5) + pct(floors, 0.5)))

    rtt = pct([t for c in cases for t in c.rtt], 0.5)
    hot_rtt = pct([t for c in cases for t in c.hot_rtt], 0.5)
    print(f"\nHTTP round trip (GET /healthz): p50 {rtt * 1000:.2f} ms; back to back {hot_rtt * 1000:.2f} ms\n")
    header = (
        f"{'case':<27} {'asked':>5} {'floor ms':>9} {'p50 ms':>8} {'p95 ms':>8} {'p50/floor':>9} "
        f"{'req/s@16':>9} {'p50@16 ms':>10} {'b2b floor':>9} {'p50/b2b':>7} {'non-2xx':>8}"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[str, float] = {}
    for case in cases:
        floor = pct(case.rtt, 0.5) + pct(case.floor, 0.5)
        hot = pct(case.hot_rtt, 0.5) + pct(case.back_to_back, 0.5)
        p50, p95 = pct(case.latencies, 0.5), pct(case.latencies, 0.95)
        ratios[case.label] = p50 / floor
        print(
            f"{case.label:<27} {len(case.asked):>5} {floor * 1000:>9.2f} {p50 * 1000:>8.2f} {p95 * 1000:>8.2f} "
            f"{p50 / floor:>9.2f} {case.throughput:>9.0f} {pct(case.loaded, 0.5) * 1000:>10.2f} "
            f"{hot * 1000:>9.2f} {p50 / hot:>7.2f} {case.non_2xx:>8}"
        )
    spread = ", ".join(f"{c.label} {min(c.round_ratios):.2f}-{max(c.round_ratios):.2f}" for c in cases)
    print(f"\np50/floor of each round ({serial} requests each), lowest-highest: {spread}")
    flat = pct(cases[2].latencies, 0.5) / pct(cases[1].latencies, 0.5)
    non_2xx = sum(c.non_2xx for c in cases)
    for case in cases:
        if case.non_2xx:  # which answers: a 503 is a timeout, a 502 a product that failed
            print(f"  {case.label}: " + ", ".join(f"HTTP {s} x{n}" for s, n in sorted(case.statuses.items())))
    p50_10 = pct(cases[1].latencies, 0.5) * 1000
    checks = [
        ("federated(10) p50 <= 1.2 x floor", ratios["federated(10)"], ratios["federated(10)"] <= 1.2),
        (f"federated({args.catalog}, 10 routed) <= 1.1 x federated(10)", flat, flat <= 1.1),
        ("non-2xx answers at 16 clients == 0", float(non_2xx), non_2xx == 0),
        ("federated(10) p50 < 25 ms (semantic default)", p50_10, p50_10 < 25),
    ]
    print()
    for label, value, ok in checks:
        print(f"  {'ok  ' if ok else 'MISS'} {label}: {value:.2f}")
    print(
        f"\n{args.rounds} interleaved rounds; {serial * args.rounds} serial requests and {concurrent * args.rounds} "
        f"at {CONCURRENCY} concurrent clients per case; total {time.perf_counter() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_EMBEDDING_MODEL, help="Embedding model of every product.")
    parser.add_argument(
        "--index-min-points",
        type=int,
        default=StoreSettings().optimize_min_points,
        help="Embedded store: collections of this many points get an HNSW index (0: every search exact).",
    )
    parser.add_argument(
        "--corpus",
        choices=("examples", "debian"),
        default="examples",
        help="The other products of the largest catalog: varied copies of the examples, or Debian's packages.",
    )
    parser.add_argument("--serial", type=int, default=200, help="Serial requests per case (latency percentiles).")
    parser.add_argument("--concurrent", type=int, default=800, help="Requests per case at 16 concurrent clients.")
    parser.add_argument("--rounds", type=int, default=8, help="Interleaved rounds the requests are split into.")
    parser.add_argument(
        "--catalog", type=int, default=100, help="Products in the largest case's catalog (10 of them answer)."
    )
    raise SystemExit(asyncio.run(main(parser.parse_args())))
