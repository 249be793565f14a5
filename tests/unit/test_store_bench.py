"""bench/store.py at its smallest: it runs to the end and prints every figure beside its floor.

The benchmark reaches into the embedded store's search (the engine calls it makes, to time them
directly); a change there once left it crashing unnoticed, since no test ran it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMALLEST = ["--sizes", "50", "--collections", "3", "--aliases", "3", "--repeats", "3"]


def test_the_store_benchmark_prints_each_search_beside_the_engine_calls_it_makes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "store.py"), *SMALLEST],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Per mode (dense, sparse, hybrid), a product's search and a routing collection's: port ms / engine ms (ratio).
    searches = re.findall(r"(\d+\.\d+) /\s+(\d+\.\d+) \(\s*(\d+\.\d+)x\)", done.stdout)
    assert len(searches) == 6, done.stdout
    assert all(float(port) > 0 and float(engine) > 0 for port, engine, _ in searches)
    assert "64 hits" in done.stdout
    assert re.search(r"alias switch with 3 aliases: .*x the floor\)", done.stdout)
    assert re.search(r"product deleted with 3 collections in the store: .*x the floor\)", done.stdout)
