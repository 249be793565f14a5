#!/usr/bin/env python3
"""Validate the quality benchmark's labelled questions against the products they name.

    .venv/bin/python bench/quality_data/check_labels.py [--questions FILE]

Loads every DataProduct manifest of the mesh the benchmark asks (``examples/*.yaml``,
``examples/inference/*.yaml`` and ``bench/quality_data/products/*.yaml``; ``examples/invalid``
is skipped) with its rows: inline rows from the manifest, and for a ``source.url`` source the
file of ``bench/quality_data/rows/`` named as the URL's last segment (one JSON object per line;
the benchmark's manifests point at ``http://quality-data.invalid/rows/<name>.jsonl``). Then it
checks ``questions.yaml``:

* ids are present and unique, and there are at least ``MIN_QUESTIONS`` questions;
* ``kind`` is rows, routing or multi, with consistent products and rows: routing has one product
  and no rows; rows has one product and 1 to ``MAX_ROWS`` rows; multi has two different products
  and at least one row from each;
* every product (``namespace/name``) exists, and every row id (``namespace/name/<primary key>``)
  names a row of that product that is also listed in the question's products;
* no row is listed twice in one question, and no question text is repeated.

Prints counts per kind and per product, then either ``OK`` (exit 0) or every problem (exit 1).
Standard library and PyYAML only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MANIFEST_GLOBS = ["examples/*.yaml", "examples/inference/*.yaml", "bench/quality_data/products/*.yaml"]
ROWS_DIR = "bench/quality_data/rows"
MIN_QUESTIONS = 120
MAX_ROWS = 5
KINDS = ("rows", "routing", "multi")


def url_rows(repo: Path, url: str, where: str) -> list[dict]:
    """The rows of a ``source.url``: the jsonl file of ``ROWS_DIR`` named as the URL's last segment."""
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    path = repo / ROWS_DIR / name
    if not name.endswith(".jsonl") or not path.is_file():
        sys.exit(f"{where}: source url {url} names no file of {ROWS_DIR}/ (expected <name>.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                sys.exit(f"{path}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def load_products(repo: Path) -> dict[str, set[str]]:
    """``namespace/name`` -> set of primary-key values (as strings) of its rows (inline or url)."""
    products: dict[str, set[str]] = {}
    for pattern in MANIFEST_GLOBS:
        for path in sorted(repo.glob(pattern)):
            with path.open(encoding="utf-8") as fh:
                for doc in yaml.safe_load_all(fh):
                    if not isinstance(doc, dict) or doc.get("kind") != "DataProduct":
                        continue
                    meta, spec = doc["metadata"], doc["spec"]
                    key = f"{meta['namespace']}/{meta['name']}"
                    if key in products:
                        sys.exit(f"{path}: product {key} defined twice")
                    pks = [f["name"] for f in spec["schema"]["fields"] if f.get("primaryKey")]
                    if len(pks) != 1:
                        sys.exit(f"{path}: {key} needs exactly one primaryKey field, has {pks}")
                    source = spec.get("source") or {}
                    if source.get("url"):
                        rows = url_rows(repo, source["url"]["url"], f"{path}: {key}")
                    else:
                        rows = source.get("inline") or []
                    values = [str(r[pks[0]]) for r in rows]
                    if len(set(values)) != len(values):
                        sys.exit(f"{path}: {key} has duplicate primary keys")
                    products[key] = set(values)
    return products


def split_row_id(row_id: str) -> tuple[str, str]:
    """``ns/name/pk`` -> (``ns/name``, ``pk``); the key may itself contain slashes."""
    parts = row_id.split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(row_id)
    return f"{parts[0]}/{parts[1]}", parts[2]


def check(questions: list, products: dict[str, set[str]]) -> tuple[list[str], Counter, Counter, Counter]:
    problems: list[str] = []
    kinds: Counter = Counter()
    per_product: Counter = Counter()
    rows_per_product: Counter = Counter()
    seen_ids: set[str] = set()
    seen_text: dict[str, str] = {}
    for index, q in enumerate(questions):
        where = f"question #{index + 1}"
        if not isinstance(q, dict):
            problems.append(f"{where}: not a mapping")
            continue
        qid = q.get("id")
        if not qid or not isinstance(qid, str):
            problems.append(f"{where}: missing id")
        else:
            where = qid
            if qid in seen_ids:
                problems.append(f"{qid}: duplicate id")
            seen_ids.add(qid)
        text = q.get("question")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: missing question text")
        else:
            norm = " ".join(text.lower().split())
            if norm in seen_text:
                problems.append(f"{where}: same question text as {seen_text[norm]}")
            seen_text[norm] = where
        kind = q.get("kind")
        if kind not in KINDS:
            problems.append(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        kinds[kind] += 1
        prods = q.get("products")
        rows = q.get("rows")
        if not isinstance(prods, list) or not all(isinstance(p, str) for p in prods):
            problems.append(f"{where}: products must be a list of namespace/name")
            continue
        if rows is None or not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
            problems.append(f"{where}: rows must be a list (empty for routing)")
            continue
        if len(set(prods)) != len(prods):
            problems.append(f"{where}: a product is listed twice")
        for p in prods:
            per_product[p] += 1
            if p not in products:
                problems.append(f"{where}: unknown product {p}")
        if len(set(rows)) != len(rows):
            problems.append(f"{where}: a row is listed twice")
        row_products: Counter = Counter()
        for r in rows:
            try:
                prod, pk = split_row_id(r)
            except ValueError:
                problems.append(f"{where}: row id {r!r} is not namespace/name/<primary key>")
                continue
            row_products[prod] += 1
            if prod not in prods:
                problems.append(f"{where}: row {r} belongs to {prod}, which is not in products")
            if prod in products and pk not in products[prod]:
                problems.append(f"{where}: no row with primary key {pk!r} in {prod}")
            rows_per_product[prod] += 1
        if kind == "routing":
            if len(prods) != 1:
                problems.append(f"{where}: routing needs exactly one product, has {len(prods)}")
            if rows:
                problems.append(f"{where}: routing must not list rows")
        elif kind == "rows":
            if len(prods) != 1:
                problems.append(f"{where}: rows needs exactly one product, has {len(prods)}")
            if not 1 <= len(rows) <= MAX_ROWS:
                problems.append(f"{where}: rows needs 1..{MAX_ROWS} rows, has {len(rows)}")
        elif kind == "multi":
            if len(prods) != 2:
                problems.append(f"{where}: multi needs exactly two products, has {len(prods)}")
            for p in prods:
                if row_products[p] == 0:
                    problems.append(f"{where}: multi lists no row of {p}")
    if len(questions) < MIN_QUESTIONS:
        problems.append(f"only {len(questions)} questions, need at least {MIN_QUESTIONS}")
    return problems, kinds, per_product, rows_per_product


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=Path, default=HERE / "questions.yaml")
    parser.add_argument("--repo", type=Path, default=REPO, help="repository root (default: this checkout)")
    args = parser.parse_args()

    products = load_products(args.repo)
    with args.questions.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        print(f"{args.questions}: expected a mapping with a 'questions' list")
        return 1

    problems, kinds, per_product, rows_per_product = check(questions, products)

    total = len(questions)
    print(f"products: {len(products)} ({sum(len(v) for v in products.values())} rows)")
    print(f"questions: {total}")
    for kind in KINDS:
        n = kinds.get(kind, 0)
        print(f"  {kind:8s} {n:4d}  ({100 * n / max(total, 1):.0f}%)")
    print("questions per product (a multi question counts for both; labelled rows in brackets):")
    for name in sorted(products):
        print(
            f"  {name:40s} {len(products[name]):4d} rows  {per_product.get(name, 0):4d} questions  "
            f"[{rows_per_product.get(name, 0)}]"
        )
    unasked = [p for p in sorted(products) if not per_product.get(p)]
    if unasked:
        print(f"note: no question names {', '.join(unasked)}")
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
