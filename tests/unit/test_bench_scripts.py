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

REPO = Path(__file__).resolve().parents[2]


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
    cases = re.findall(r"^(federated\(.+?\))\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+.*\s(\d+)$", out, re.M)
    assert [(label, int(asked)) for label, asked, *_ in cases] == [
        ("federated(1)", 1),
        ("federated(10)", 10),
        ("federated(12 in catalog)", 10),
    ], out
    for _, _, floor, p50, ratio, non_2xx in cases:
        assert float(floor) > 0 and float(p50) > 0
        assert abs(float(p50) / float(floor) - float(ratio)) < 0.02  # the ratio is the p50 over the floor printed
        assert non_2xx == "0", out
    assert len(re.findall(r"^  (ok  |MISS) ", out, re.M)) == 4, out  # each target, met or not
