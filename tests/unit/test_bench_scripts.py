"""The benchmarks at their smallest: each runs to the end and prints every figure beside its floor.

They are not tests of speed (nothing here asserts a figure), but they reach into the code they time:
bench/store.py calls the embedded store's engine directly and bench/query.py builds its floor from
the query engine's own routing view. A change there once left bench/store.py crashing unnoticed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from datamesh.resource.models import DataProductSpec
from tests.harness import REPO, bench_script


def bench(script: str, *args: str, cwd: Path) -> str:
    """What ``bench/<script>`` prints, once it has run to the end."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_store_benchmark_prints_each_search_beside_the_engine_calls_it_makes(tmp_path: Path) -> None:
    out = bench("store.py", "--sizes", "50", "--collections", "3", "--aliases", "3", "--repeats", "3", cwd=tmp_path)
    # Per mode (dense, sparse, hybrid), a product's search and a routing collection's: port ms / engine ms (ratio).
    searches = re.findall(r"(\d+\.\d+) /\s+(\d+\.\d+) \(\s*(\d+\.\d+)x\)", out)
    assert len(searches) == 6, out
    assert all(float(port) > 0 and float(engine) > 0 for port, engine, _ in searches)
    assert "64 rows" in out
    assert re.search(r"alias switch with 3 aliases: .*x the floor\)", out)
    assert re.search(r"product deleted with 3 collections in the store: .*x the floor\)", out)


def test_the_query_benchmark_prints_each_case_beside_its_floor_and_counts_failed_answers(tmp_path: Path) -> None:
    # The built-in model and exact searches (no index checks to wait for): about 10 s.
    smallest = ["--model", "builtin:ngram-384", "--catalog", "12", "--serial", "4", "--concurrent", "16"]
    out = bench("query.py", *smallest, "--rounds", "1", "--index-min-points", "0", cwd=tmp_path)
    number = r"\s+([\d.]+)"
    cases = re.findall(r"^(federated\(.+?\))\s+(\d+)" + number * 8 + r"\s+(\d+)$", out, re.M)
    assert [(label, int(asked)) for label, asked, *_ in cases] == [
        ("federated(1)", 1),
        ("federated(10)", 10),
        ("federated(12 in catalog)", 10),
    ], out
    for _, _, floor, p50, _, ratio, _, _, hot_floor, hot_ratio, non_2xx in cases:
        assert float(floor) > 0 and float(p50) > 0 and float(hot_floor) > 0
        # Each ratio is the p50 over the floor printed beside it.
        assert abs(float(p50) / float(floor) - float(ratio)) < 0.02
        assert abs(float(p50) / float(hot_floor) - float(hot_ratio)) < 0.02
        assert non_2xx == "0", out
    assert re.search(r"GET /healthz\): p50 [\d.]+ ms; back to back [\d.]+ ms", out), out
    assert len(re.findall(r"^  (ok  |MISS) ", out, re.M)) == 4, out  # each target, met or not


def _stanza(package: str, section: str, summary: str) -> str:
    return f"Package: {package}\nVersion: 1.0-1\nSection: {section}\nDescription: {summary}\nDescription-md5: 0\n"


def test_the_debian_corpus_deals_each_product_rows_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/query.py --corpus debian, on an apt index made here (the machine's own may be missing)."""
    stanzas = [
        _stanza(f"{section}-tool-{i:02d}", section, f"{section} helper number {i}")
        for section in ("net", "sound", "mail")
        for i in range(10)
    ]
    stanzas.append(_stanza("zz-copy", "net", "NET helper number 3"))  # the same summary as net-tool-03, but for case
    monkeypatch.syspath_prepend(str(REPO / "bench" / "quality_data"))
    import build_products  # type: ignore[import-not-found]  # the quality data's script, not a package

    monkeypatch.setattr(build_products, "apt_cat", lambda path: "\n".join(stanzas))
    query = bench_script("query")

    bodies = query.debian_bodies(4, "builtin:ngram-384")

    rows = [[r["package"] for r in b["spec"]["source"]["inline"]] for b in bodies]
    assert [len(r) for r in rows] == [7, 7, 7, 7]  # 30 distinct summaries dealt to 4 products
    dealt = [p for r in rows for p in r]
    assert len(set(dealt)) == len(dealt) == 28, "no row is in two products"
    assert "zz-copy" not in dealt
    assert dealt == sorted(dealt, key=lambda p: (p.split("-")[0], p))  # each section's, in name order
    assert len({b["metadata"]["name"] for b in bodies}) == 4
    for body in bodies:
        DataProductSpec.model_validate(body["spec"])  # a product the operator accepts
    with pytest.raises(SystemExit, match="cannot give 31 products a row each"):
        query.debian_bodies(31, "builtin:ngram-384")
