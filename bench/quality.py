#!/usr/bin/env python
"""Benchmark: answer quality of the federated query service against two pooled baselines.

Not a test. In one run, over the labelled questions of ``bench/quality_data/questions.yaml``
and the mesh they are asked of (every product of ``examples/``, ``examples/inference/`` and
``bench/quality_data/products/``):

* **project**: the real query service, run in this process as local mode runs it: every product
  reconciled into a temporary state folder (``datamesh.local.LocalRun``), the query API served on
  127.0.0.1, every question sent to ``POST /v1/query``. The bench products' rows are files
  (``bench/quality_data/rows/*.jsonl``) their manifests name by a placeholder URL
  (``http://quality-data.invalid/rows/<name>.jsonl``): they are served on 127.0.0.1 and each
  URL points there, so the project reads them through its ``source.url`` path;
* **bm25**: Qdrant's own BM25 (qdrant-edge, IDF applied by the engine) over ALL rows of all
  products pooled, no routing;
* **dense**: exact cosine over ALL rows pooled, embedded with the same embedding model as the
  project (``--model``, default ``DEFAULT_EMBEDDING_MODEL``), no routing. Row embeddings are
  cached on disk under ``${XDG_CACHE_HOME:-~/.cache}/datamesh/bench-embeddings/``.

A baseline's "routed" products are the products in the order of their best row in its pooled
ranking. Printed: routing accuracy@1, product recall@3, row recall@5, MRR@10 and empty answers,
overall, per question kind and per source; wall time and questions/s; a PASS/FAIL line against
the targets; one JSON line with every figure. See bench/README.md.

    .venv/bin/python bench/quality.py                         # every system, every question
    .venv/bin/python bench/quality.py --systems bm25,dense --only bench --limit-questions 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "quality_data"
QUESTIONS = DATA / "questions.yaml"
# The bench products' rows: ROWS/<name>.jsonl, named in their manifests as ROWS_PLACEHOLDER + "rows/<name>.jsonl".
ROWS = DATA / "rows"
ROWS_PLACEHOLDER = "http://quality-data.invalid/"
# (source, folder of manifests): the mesh the questions are asked of.
MESH = (
    ("examples", REPO / "examples"),
    ("examples", REPO / "examples" / "inference"),
    ("bench", DATA / "products"),
)
SYSTEMS = ("project", "bm25", "dense")
KINDS = ("rows", "routing", "multi")
SOURCES = ("examples", "bench", "mixed")

# What is asked of the service, and the cut-offs of the figures.
QUERY_LIMIT = 10
BENCH_TOKEN = "quality-bench-token"
PER_PRODUCT = 10
ROUTING_K = 3
RECALL_K = 5
MRR_K = 10

# Targets of the PASS/FAIL line.
TARGET_ROUTING_ACC = 0.85
TARGET_EMPTY = 0
TARGET_UNSTABLE = 0  # questions answered differently when asked a second time


# ---------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Product:
    """One product of the mesh: what identifies its rows and what text it embeds."""

    ref: str  # namespace/name
    source: str  # examples | bench
    primary_key: tuple[str, ...]
    key_fields: tuple[str, ...]
    rows: tuple[dict[str, Any], ...] = ()

    def row_id(self, row: Mapping[str, Any]) -> str:
        return f"{self.ref}/{format_key([row.get(k) for k in self.primary_key])}"


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    kind: str  # rows | routing | multi
    products: tuple[str, ...]
    rows: tuple[str, ...]
    source: str  # examples | bench | mixed


def format_key(key: Any) -> str:
    """A primary-key value as it appears in a row id; a composite key's parts joined by '/'."""
    if isinstance(key, list | tuple):
        return "/".join(format_key(k) for k in key)
    return str(key)


def key_text(row: Mapping[str, Any], key_fields: Sequence[str]) -> str:
    """The text a product embeds for a row: its key fields joined by newlines (as ``datamesh.core.rows``)."""
    return "\n".join(str(row[k]) for k in key_fields if row.get(k) not in (None, ""))


def product_of(row_id: str) -> str:
    """``ns/name/key`` -> ``ns/name`` (the key may itself contain slashes)."""
    return "/".join(row_id.split("/", 2)[:2])


def rows_file(url: str) -> Path | None:
    """The file of ``bench/quality_data/rows/`` a placeholder URL names; None for any other URL."""
    if not url.startswith(ROWS_PLACEHOLDER):
        return None
    path = (DATA / url.removeprefix(ROWS_PLACEHOLDER)).resolve()
    return path if path.parent == ROWS.resolve() else None


def read_jsonl(path: Path) -> tuple[dict[str, Any], ...]:
    """The rows of a JSON Lines file (blank lines skipped), in order."""
    with path.open(encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def source_rows(path: Path, ref: str, spec: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """A product's rows for the baselines: its inline rows, or the rows file its placeholder URL names."""
    source = spec.get("source") or {}
    if not source.get("url"):
        return tuple(source.get("inline") or ())
    url = source["url"]
    file = rows_file(str(url.get("url", "")))
    if file is None or url.get("format") != "jsonl" or not file.is_file():
        sys.exit(f"{path}: {ref} reads {url.get('url')}: expected {ROWS_PLACEHOLDER}rows/<name>.jsonl, format jsonl")
    return read_jsonl(file)


def with_rows_at(
    bodies: Sequence[tuple[Path, dict[str, Any]]], base: str
) -> tuple[list[tuple[Path, dict[str, Any]]], int]:
    """``bodies`` with every placeholder source URL pointing at ``base`` instead (copies); how many were changed."""
    out: list[tuple[Path, dict[str, Any]]] = []
    changed = 0
    for path, body in bodies:
        url = ((body.get("spec") or {}).get("source") or {}).get("url") or {}
        if str(url.get("url", "")).startswith(ROWS_PLACEHOLDER):
            body = copy.deepcopy(body)
            body["spec"]["source"]["url"]["url"] = base.rstrip("/") + "/" + url["url"].removeprefix(ROWS_PLACEHOLDER)
            changed += 1
        out.append((path, body))
    return out, changed


class RowsFiles:
    """ASGI app serving ``ROWS`` at ``/rows/`` (Starlette's StaticFiles), counting the requests per path."""

    def __init__(self, folder: Path = ROWS) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Mount
        from starlette.staticfiles import StaticFiles

        self.app = Starlette(routes=[Mount("/rows", app=StaticFiles(directory=folder), name="rows")])
        self.requests: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests[scope["path"]] += 1
        await self.app(scope, receive, send)


def load_mesh() -> tuple[list[tuple[Path, dict[str, Any]]], dict[str, Product]]:
    """The manifests (as local mode loads them) and the products they declare, with their rows."""
    from datamesh.local import load_manifests

    bodies: list[tuple[Path, dict[str, Any]]] = []
    products: dict[str, Product] = {}
    for source, folder in MESH:
        loaded = load_manifests(folder)
        if loaded.errors:
            problems = "; ".join(f"{e.path} ({e.name}): {e.message}" for e in loaded.errors)
            sys.exit(f"refused manifests in {folder}: {problems}")
        for path, body in loaded.products:
            meta, spec = body["metadata"], body["spec"]
            ref = f"{meta['namespace']}/{meta['name']}"
            if ref in products:
                sys.exit(f"{path}: product {ref} declared twice in the mesh")
            fields = spec["schema"]["fields"]
            pks = tuple(f["name"] for f in fields if f.get("primaryKey"))
            search = spec.get("semanticSearch") or {}
            products[ref] = Product(
                ref=ref,
                source=source,
                primary_key=pks,
                key_fields=tuple(search.get("keyFields") or ()),
                rows=source_rows(path, ref, spec),
            )
            bodies.append((path, body))
    return bodies, products


def load_questions(products: Mapping[str, Product], path: Path = QUESTIONS) -> list[Question]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    questions = []
    for q in data["questions"]:
        sources = {products[p].source for p in q["products"]}
        source = sources.pop() if len(sources) == 1 else "mixed"
        questions.append(
            Question(q["id"], q["question"], q["kind"], tuple(q["products"]), tuple(q.get("rows") or ()), source)
        )
    return questions


# ------------------------------------------------------------------------------- the figures


def unique(items: Sequence[str]) -> list[str]:
    """``items`` in order, each once."""
    return list(dict.fromkeys(items))


def accuracy_at_1(ranked: Sequence[str], expected: Sequence[str]) -> float:
    """1 if the first of ``ranked`` is one of ``expected`` (either product of a multi question), else 0."""
    return 1.0 if ranked and ranked[0] in set(expected) else 0.0


def recall_at(ranked: Sequence[str], relevant: Sequence[str], k: int) -> float:
    """Share of ``relevant`` found among the first ``k`` distinct items of ``ranked``."""
    wanted = set(relevant)
    if not wanted:
        raise ValueError("recall of nothing relevant is undefined")
    return len(wanted.intersection(unique(ranked)[:k])) / len(wanted)


def mrr_at(ranked: Sequence[str], relevant: Sequence[str], k: int) -> float:
    """1/rank of the first relevant item among the first ``k`` distinct items of ``ranked``; 0 if none."""
    wanted = set(relevant)
    for rank, item in enumerate(unique(ranked)[:k], start=1):
        if item in wanted:
            return 1.0 / rank
    return 0.0


def products_by_best_row(ranked_rows: Sequence[str]) -> list[str]:
    """A pooled row ranking's products, ordered by the rank of each one's best row."""
    return unique([product_of(r) for r in ranked_rows])


@dataclass
class Answer:
    """What one system answered to one question, reduced to rankings."""

    products: list[str]
    rows: list[str]
    seconds: float = 0.0
    error: str | None = None
    low_confidence: bool | None = None


@dataclass
class Score:
    id: str
    kind: str
    source: str
    accuracy_at_1: float
    product_recall_at_3: float
    row_recall_at_5: float | None  # None: the question lists no rows (routing)
    mrr_at_10: float | None
    empty: bool
    error: str | None = None
    low_confidence: bool | None = None
    seconds: float = 0.0
    top_products: list[str] = field(default_factory=list)
    top_rows: list[str] = field(default_factory=list)


def score(question: Question, answer: Answer) -> Score:
    has_rows = bool(question.rows)
    return Score(
        id=question.id,
        kind=question.kind,
        source=question.source,
        accuracy_at_1=accuracy_at_1(answer.products, question.products),
        product_recall_at_3=recall_at(answer.products, question.products, ROUTING_K),
        row_recall_at_5=recall_at(answer.rows, question.rows, RECALL_K) if has_rows else None,
        mrr_at_10=mrr_at(answer.rows, question.rows, MRR_K) if has_rows else None,
        empty=not answer.rows,
        error=answer.error,
        low_confidence=answer.low_confidence,
        seconds=answer.seconds,
        top_products=answer.products[:ROUTING_K],
        top_rows=unique(answer.rows)[:MRR_K],
    )


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarise(scores: Sequence[Score]) -> dict[str, Any]:
    """The figures of a group of questions (means; row figures over the questions that list rows)."""
    with_rows = [s for s in scores if s.row_recall_at_5 is not None]
    return {
        "questions": len(scores),
        "with_rows": len(with_rows),
        "routing_accuracy_at_1": _mean([s.accuracy_at_1 for s in scores]),
        "product_recall_at_3": _mean([s.product_recall_at_3 for s in scores]),
        "row_recall_at_5": _mean([s.row_recall_at_5 for s in with_rows if s.row_recall_at_5 is not None]),
        "mrr_at_10": _mean([s.mrr_at_10 for s in with_rows if s.mrr_at_10 is not None]),
        "empty_answers": sum(s.empty for s in scores),
        "errors": sum(s.error is not None for s in scores),
        "low_confidence": sum(bool(s.low_confidence) for s in scores),
    }


def groups_of(scores: Sequence[Score]) -> dict[str, dict[str, Any]]:
    """Figures overall, per kind and per source (groups without questions left out)."""
    groups = {"overall": summarise(scores)}
    for kind in KINDS:
        chosen = [s for s in scores if s.kind == kind]
        if chosen:
            groups[f"kind:{kind}"] = summarise(chosen)
    for source in SOURCES:
        chosen = [s for s in scores if s.source == source]
        if chosen:
            groups[f"source:{source}"] = summarise(chosen)
    return groups


def _check(target: str, value: float, bound: float, ok: bool) -> dict[str, Any]:
    return {"target": target, "value": value, "bound": bound, "ok": ok}


def targets(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The PASS/FAIL checks: the project beats every baseline run on row recall@5 and MRR@10,
    routes at least ``TARGET_ROUTING_ACC`` right and never answers with nothing."""
    if "project" not in results:
        return {"pass": None, "checks": []}
    project = results["project"]["groups"]["overall"]
    baselines = {name: r["groups"]["overall"] for name, r in results.items() if name != "project"}
    checks = []
    for figure, label in (("row_recall_at_5", "row recall@5"), ("mrr_at_10", "MRR@10")):
        mine = project[figure] or 0.0
        for name, theirs in baselines.items():
            other = theirs[figure] or 0.0
            checks.append(_check(f"{label} > {name}", mine, other, mine > other))
    acc = project["routing_accuracy_at_1"] or 0.0
    checks.append(_check(f"routing acc@1 >= {TARGET_ROUTING_ACC}", acc, TARGET_ROUTING_ACC, acc >= TARGET_ROUTING_ACC))
    empty = project["empty_answers"]
    checks.append(_check(f"empty answers <= {TARGET_EMPTY}", empty, TARGET_EMPTY, empty <= TARGET_EMPTY))
    unstable = len(results["project"].get("unstable", []))
    checks.append(
        _check(
            f"answers changed on asking again <= {TARGET_UNSTABLE}",
            unstable,
            TARGET_UNSTABLE,
            unstable <= TARGET_UNSTABLE,
        )
    )
    return {"pass": all(c["ok"] for c in checks), "checks": checks}


# -------------------------------------------------------------------- the project's answers


def project_ranking(
    answer: Mapping[str, Any], primary_keys: Mapping[str, Sequence[str]] | None = None
) -> tuple[list[str], list[str]]:
    """(products best first, row ids best first) of a ``/v1/query`` answer.

    New shape: ``routedTo`` = [{product, score, ...}], ``merged`` = [{product, key, score}] (``key``
    a primary-key value, or a list for composite keys). Old shape: ``merged`` items carry the row's
    fields in ``payload``; the key is read there with the product's primary key fields
    (``primary_keys``: ``ns/name`` -> field names, from the manifests), else the point ``id``.
    Without ``routedTo`` the products come in the order of their best merged row.
    """
    primary_keys = primary_keys or {}
    rows: list[str] = []
    for item in answer.get("merged") or []:
        product = item.get("product")
        if not product:
            continue
        if "key" in item:
            key: Any = item["key"]
        else:
            payload = item.get("payload") or {}
            fields = list(primary_keys.get(product) or ())
            if fields and all(f in payload for f in fields):
                key = [payload[f] for f in fields]
            elif "id" in item:
                key = item["id"]
            else:
                continue
        rows.append(f"{product}/{format_key(key)}")
    rows = unique(rows)
    routed = [r["product"] for r in answer.get("routedTo") or [] if isinstance(r, Mapping) and r.get("product")]
    products = unique(routed) if routed else products_by_best_row(rows)
    return products, rows


# ----------------------------------------------------------------------------- the systems


def consumers_of(body: Mapping[str, Any]) -> list[str]:
    """Who may read a product (its access.consumers, '*' by default)."""
    return list(((body.get("spec") or {}).get("access") or {}).get("consumers") or ["*"])


class System(Protocol):
    name: str

    async def setup(self) -> None: ...

    async def ask(self, question: str) -> Answer: ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


class ProjectSystem:
    """The query service as local mode runs it, asked over HTTP; the bench rows served on 127.0.0.1."""

    name = "project"

    def __init__(self, bodies: list[tuple[Path, dict[str, Any]]], products: Mapping[str, Product]) -> None:
        self.bodies = bodies
        self.primary_keys = {ref: p.primary_key for ref, p in products.items()}
        self._stack = contextlib.AsyncExitStack()
        self._per_product = True  # dropped if the service refuses the field (current main has no perProduct)
        self.models: dict[str, int] = {}
        self.not_ready: list[str] = []
        self.rows_url = ""
        self.rows_products = 0
        self.rows_files: RowsFiles | None = None

    async def setup(self) -> None:
        import httpx
        from rich.console import Console

        from datamesh.local import LocalRun
        from datamesh.query.access import Authenticator
        from datamesh.query.app import create_app
        from datamesh.query.catalog_sources import FileCatalogSource
        from datamesh.query.settings import QuerySettings
        from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL
        from datamesh.web.serving import serve_app

        # The bench products' rows, served as a file server would: each placeholder URL points here.
        self.rows_files = RowsFiles()
        self.rows_url = await self._stack.enter_async_context(serve_app(self.rows_files))
        bodies, self.rows_products = with_rows_at(self.bodies, self.rows_url)
        state = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="datamesh-quality-")))
        run = LocalRun(state, Console(stderr=True, quiet=True))
        self._stack.push_async_callback(run.close)
        results = await run.reconcile_all(bodies)
        for body, outcome in results:
            ref = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
            if str(outcome.status.phase) != "Ready":
                self.not_ready.append(f"{ref} {outcome.status.phase}: {outcome.status.message}")
            search = body["spec"].get("semanticSearch") or {}
            model = search.get("embeddingModel") or DEFAULT_EMBEDDING_MODEL
            self.models[model] = self.models.get(model, 0) + 1
        # The benchmark asks as a caller who may read every product (the mesh has restricted ones):
        # a group for every group any product admits.
        groups = sorted(
            {c.removeprefix("group:") for _, body in self.bodies for c in consumers_of(body) if c.startswith("group:")}
        )
        tokens = {BENCH_TOKEN: {"identity": "quality-bench", "groups": groups}}
        settings = QuerySettings(catalog_file=str(run.catalog_path))
        app = create_app(FileCatalogSource(run.catalog_path), run.store, settings, Authenticator(tokens))
        url = await self._stack.enter_async_context(serve_app(app))
        self.client = await self._stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=120.0, headers={"Authorization": f"Bearer {BENCH_TOKEN}"})
        )
        for _ in range(100):
            if (await self.client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)

    async def ask(self, question: str) -> Answer:
        body: dict[str, Any] = {"question": question, "limit": QUERY_LIMIT}
        if self._per_product:
            body["perProduct"] = PER_PRODUCT
        response = await self.client.post("/v1/query", json=body)
        if response.status_code == 422 and self._per_product and "perProduct" in response.text:
            self._per_product = False
            return await self.ask(question)
        if response.status_code != 200:
            return Answer([], [], error=f"HTTP {response.status_code}: {response.text[:300]}")
        answer = response.json()
        products, rows = project_ranking(answer, self.primary_keys)
        low = answer.get("lowConfidence")
        return Answer(products, rows, low_confidence=bool(low) if low is not None else None)

    async def close(self) -> None:
        await self._stack.aclose()

    def describe(self) -> str:
        models = ", ".join(f"{m} ({n} products)" for m, n in sorted(self.models.items()))
        shape = "perProduct sent" if self._per_product else "perProduct refused (old API), limit only"
        ready = f"NOT READY: {'; '.join(self.not_ready)}" if self.not_ready else "every product Ready"
        gets = sum(self.rows_files.requests.values()) if self.rows_files else 0
        rows = f"rows of {self.rows_products} products read from {self.rows_url}/rows/ ({gets} requests)"
        return f"embedding models {models}; {shape}; {rows}; {ready}"


class PooledRows:
    """Every row of the mesh, in one list: ids and embedded texts."""

    def __init__(self, products: Mapping[str, Product]) -> None:
        self.ids: list[str] = []
        self.texts: list[str] = []
        for product in products.values():
            for row in product.rows:
                text = key_text(row, product.key_fields)
                if text.strip():
                    self.ids.append(product.row_id(row))
                    self.texts.append(text)


class Bm25Baseline:
    """Qdrant's BM25 (qdrant-edge, IDF by the engine) over every row pooled."""

    name = "bm25"
    batch = 256

    def __init__(self, pool: PooledRows) -> None:
        self.pool = pool
        self._tmp = tempfile.TemporaryDirectory(prefix="datamesh-quality-bm25-")

    async def setup(self) -> None:
        import qdrant_edge as qe

        self.qe = qe
        config = qe.EdgeConfig(
            sparse_vectors={"bm25": qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)}, max_search_threads=1
        )
        self.shard = qe.EdgeShard.create(str(Path(self._tmp.name) / "shard"), config)
        self.bm25 = qe.Bm25()
        points = []
        for i, text in enumerate(self.pool.texts):
            vector = self.bm25.embed_document(text)
            if vector.indices:  # a stopword-only text has no terms: it can never match
                points.append(qe.Point(i, {"bm25": vector}))
        for start in range(0, len(points), self.batch):
            self.shard.update(qe.UpdateOperation.upsert_points(points[start : start + self.batch]))

    async def ask(self, question: str) -> Answer:
        qe = self.qe
        vector = self.bm25.embed_query(question)
        if not vector.indices:
            return Answer([], [])
        request = qe.QueryRequest(
            limit=len(self.pool.ids), query=qe.Query.Nearest(vector, using="bm25"), with_payload=False
        )
        hits = self.shard.query(request)
        ranked = [self.pool.ids[int(h.id)] for h in hits]
        return Answer(products_by_best_row(ranked), ranked[:MRR_K])

    async def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.shard.close()
        self._tmp.cleanup()

    def describe(self) -> str:
        return f"{len(self.pool.ids)} rows, qdrant-edge Bm25() defaults, Modifier.Idf"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "datamesh" / "bench-embeddings"


class EmbeddingCache:
    """Row embeddings on disk, keyed by (model, sha256 of the text): one ``.npz`` per model."""

    def __init__(self, model: str, root: Path | None = None) -> None:
        self.model = model
        digest = hashlib.sha256(model.encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)[:60]
        self.path = (root or cache_root()) / f"{slug}-{digest}.npz"
        self.hits = 0
        self.misses = 0

    def _load(self) -> dict[str, np.ndarray]:
        if not self.path.exists():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["model"]) != self.model:
                    return {}
                return dict(zip((str(k) for k in data["keys"]), data["vectors"], strict=True))
        except (OSError, ValueError, KeyError):
            return {}  # unreadable: embed again

    def _save(self, known: dict[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp.npz")
        keys = list(known)
        np.savez(tmp, model=np.array(self.model), keys=np.array(keys), vectors=np.stack([known[k] for k in keys]))
        os.replace(tmp, self.path)

    async def vectors(self, provider: Any, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        known = self._load()
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in known}
        self.hits, self.misses = len(keys) - sum(k in missing for k in keys), len(missing)
        todo = list(missing.items())
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            embedded = await provider.embed([t for _, t in chunk])
            for (k, _), v in zip(chunk, embedded, strict=True):
                known[k] = np.asarray(v, dtype=np.float32)
        if todo:
            self._save(known)
        return np.stack([known[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)


class DenseBaseline:
    """Exact cosine over every row pooled, with the project's embedding model."""

    name = "dense"

    def __init__(self, pool: PooledRows, model: str) -> None:
        self.pool = pool
        self.model = model
        self.cache = EmbeddingCache(model)

    async def setup(self) -> None:
        from datamesh.adapters.embeddings.registry import resolve_provider

        self.provider = resolve_provider(self.model)
        self.matrix = await self.cache.vectors(self.provider, self.pool.texts)

    async def ask(self, question: str) -> Answer:
        (vector,) = await self.provider.embed([question])
        scores = self.matrix @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")
        ranked = [self.pool.ids[i] for i in order]
        return Answer(products_by_best_row(ranked), ranked[:MRR_K])

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return (
            f"{len(self.pool.ids)} rows, model {self.model}, cache {self.cache.hits} hits / "
            f"{self.cache.misses} embedded ({self.cache.path})"
        )


# ------------------------------------------------------------------------------------- run


async def run_system(system: System, questions: Sequence[Question]) -> dict[str, Any]:
    started = time.perf_counter()
    await system.setup()
    setup_s = time.perf_counter() - started
    scores: list[Score] = []
    try:
        asked = time.perf_counter()
        for question in questions:
            t0 = time.perf_counter()
            try:
                answer = await system.ask(question.text)
            except Exception as exc:
                answer = Answer([], [], error=f"{type(exc).__name__}: {exc}")
            answer.seconds = time.perf_counter() - t0
            scores.append(score(question, answer))
        query_s = time.perf_counter() - asked
        # Asked again: an answer that changes with nothing else changed is a bug a user would notice.
        unstable = []
        for question, first in zip(questions, scores, strict=True):
            try:
                again = score(question, await system.ask(question.text))
            except Exception as exc:
                again = score(question, Answer([], [], error=f"{type(exc).__name__}: {exc}"))
            if (again.top_products, again.top_rows, again.error) != (first.top_products, first.top_rows, first.error):
                unstable.append(question.id)
    finally:
        await system.close()
    latencies = sorted(s.seconds for s in scores)
    return {
        "describe": system.describe(),
        "setup_s": round(setup_s, 3),
        "query_s": round(query_s, 3),
        "questions_per_s": round(len(scores) / query_s, 2) if query_s > 0 else None,
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "groups": groups_of(scores),
        "unstable": unstable,
        "scores": scores,
    }


def _fmt(value: Any, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.3f}".rjust(width)
    return str(value).rjust(width)


def report(results: Mapping[str, Mapping[str, Any]], questions: Sequence[Question], meta: Mapping[str, Any]) -> str:
    lines = [
        f"quality benchmark: {len(questions)} questions over {meta['products']} products ({meta['rows']} rows); "
        f"whole run {meta['wall_s']:.1f} s",
        "  kinds "
        + ", ".join(f"{k} {sum(q.kind == k for q in questions)}" for k in KINDS)
        + "; sources "
        + ", ".join(f"{s} {sum(q.source == s for q in questions)}" for s in SOURCES),
        "",
    ]
    for name, r in results.items():
        lines.append(f"{name:8s} {r['describe']}")
    lines += ["", f"{'system':8s} {'setup s':>8s} {'query s':>8s} {'q/s':>8s} {'p50 ms':>8s}  changed when asked again"]
    for name, r in results.items():
        unstable = r.get("unstable", [])
        lines.append(
            f"{name:8s} {_fmt(r['setup_s'], 8)} {_fmt(r['query_s'], 8)} {_fmt(r['questions_per_s'], 8)} "
            f"{_fmt(r['p50_ms'], 8)}  {len(unstable)}{(' (' + ', '.join(unstable[:10]) + ')') if unstable else ''}"
        )
    header = f"  {'system':8s} {'acc@1':>7s} {'prodR@3':>8s} {'rowR@5':>7s} {'MRR@10':>7s} {'empty':>6s} {'errors':>7s}"
    first = next(iter(results.values()))
    for group, figures in first["groups"].items():
        lines += ["", f"{group} ({figures['questions']} questions, {figures['with_rows']} with rows)", header]
        for name, r in results.items():
            g = r["groups"][group]
            lines.append(
                f"  {name:8s} {_fmt(g['routing_accuracy_at_1'], 7)} {_fmt(g['product_recall_at_3'], 8)} "
                f"{_fmt(g['row_recall_at_5'], 7)} {_fmt(g['mrr_at_10'], 7)} {_fmt(g['empty_answers'], 6)} "
                f"{_fmt(g['errors'], 7)}"
            )
    return "\n".join(lines)


def verdict(checks: Mapping[str, Any]) -> str:
    if checks["pass"] is None:
        return "PASS/FAIL: n/a (the project was not run)"
    parts = [
        f"{c['target']}: {_fmt(c['value'], 0).strip()} vs {_fmt(c['bound'], 0).strip()} {'ok' if c['ok'] else 'MISSED'}"
        for c in checks["checks"]
    ]
    missed = sum(not c["ok"] for c in checks["checks"])
    head = "PASS" if checks["pass"] else f"FAIL ({missed} of {len(checks['checks'])} targets missed)"
    return f"{head}: " + "; ".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--limit-questions", type=int, default=None, metavar="N", help="only the first N questions")
    parser.add_argument("--only", choices=("examples", "bench"), help="only the questions about these products")
    parser.add_argument("--json-out", type=Path, help="write every figure and per-question result to this file")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated, among {','.join(SYSTEMS)} (default: all)"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_EMBEDDING_MODEL,
        help=f"embedding model of the dense baseline (default: the project's default, {DEFAULT_EMBEDDING_MODEL})",
    )
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {unknown}; choose among {', '.join(SYSTEMS)}")
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    bodies, products = load_mesh()
    questions = load_questions(products)
    if args.only:
        questions = [q for q in questions if q.source == args.only]
    if args.limit_questions is not None:
        questions = questions[: args.limit_questions]
    if not questions:
        print("no questions selected", file=sys.stderr)
        return 2
    pool = PooledRows(products)
    makers = {
        "project": lambda: ProjectSystem(bodies, products),
        "bm25": lambda: Bm25Baseline(pool),
        "dense": lambda: DenseBaseline(pool, args.model),
    }
    results: dict[str, dict[str, Any]] = {}
    for name in args.systems:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = await run_system(makers[name](), questions)
        if name == "project":
            system_notes = results[name]["describe"]
            print(f"  {system_notes}", file=sys.stderr, flush=True)
    meta = {"products": len(products), "rows": len(pool.ids), "wall_s": round(time.perf_counter() - started, 2)}
    print(report(results, questions, meta))
    checks = targets(results)
    print()
    print(verdict(checks))
    figures = {
        "benchmark": "quality",
        "questions": len(questions),
        "only": args.only,
        "dense_model": args.model,
        **meta,
        "systems": {
            name: {k: v for k, v in r.items() if k not in ("scores", "describe")} for name, r in results.items()
        },
        "targets": checks,
    }
    print(json.dumps(figures, separators=(",", ":")))
    if args.json_out:
        detail = {
            **figures,
            "describe": {name: r["describe"] for name, r in results.items()},
            "per_question": {name: [asdict(s) for s in r["scores"]] for name, r in results.items()},
        }
        args.json_out.write_text(json.dumps(detail, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
