"""Embedding models in this process: load time, memory, texts per second, question latency, a long text.

    .venv/bin/python bench/embeddings.py                         # the default model and the built-in one
    .venv/bin/python bench/embeddings.py onnx:all-MiniLM-L6-v2   # one model

One child process per model, so load time and memory are the model's alone. The texts are the key
fields of the example products (``examples/*.yaml``), repeated to 1,000. The settings in effect
are the process's ``DATAMESH_EMBEDDING_*`` ones (default: one onnxruntime thread, two inferences
at once); ``taskset -c 0`` pins a run to one core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ["onnx:all-MiniLM-L6-v2", "builtin:ngram-384"]

CHILD = """
import asyncio, json, statistics, sys, time
from pathlib import Path

import yaml

sys.path.insert(0, "bench")  # run from the repository's root
from procstatus import status_mib

def rss_mb():
    return status_mib("VmRSS")

def peak_mb():
    return status_mib("VmHWM")

texts = []
docs = [d for p in sorted(Path("examples").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
for doc in docs:
    spec = doc.get("spec") or {}
    keys = (spec.get("semanticSearch") or {}).get("keyFields") or []
    for row in (spec.get("source") or {}).get("inline") or []:
        texts.append("\\n".join(str(row[k]) for k in keys if row.get(k) is not None))
texts = (texts * (1000 // len(texts) + 1))[:1000]
long_text = " ".join((" ".join(texts).split() * 100)[:5000])

from datamesh.adapters.embeddings.registry import resolve_provider

async def main(model):
    out = {"model": model, "rss_before_load_mb": round(rss_mb())}
    provider = resolve_provider(model)
    started = time.perf_counter()
    out["dimension"] = await provider.dimension()
    await provider.embed(["warm up"])
    out["load_s"] = round(time.perf_counter() - started, 2)
    out["rss_after_load_mb"] = round(rss_mb())
    started = time.perf_counter()
    await provider.embed(texts)
    out["texts_per_s"] = round(len(texts) / (time.perf_counter() - started), 1)
    out["mean_words"] = round(statistics.mean(len(t.split()) for t in texts), 1)
    latencies = []
    for i in range(50):
        started = time.perf_counter()
        await provider.embed([f"which shipments were delayed by weather? ({i})"])
        latencies.append(time.perf_counter() - started)
    out["question_ms_p50"] = round(statistics.median(latencies) * 1000, 1)
    started = time.perf_counter()
    await provider.embed([long_text] * 8 + texts[:56])
    out["5000_words_x8_in_64_s"] = round(time.perf_counter() - started, 2)
    out["rss_end_mb"], out["peak_rss_mb"] = round(rss_mb()), round(peak_mb())
    return out

print(json.dumps(asyncio.run(main(sys.argv[1]))))
"""


def main() -> None:
    for model in sys.argv[1:] or MODELS:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, model], cwd=REPO, capture_output=True, text=True, env=os.environ, check=False
        )
        if out.returncode:
            print(f"{model}: failed\n{out.stderr}", file=sys.stderr)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print("  ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
