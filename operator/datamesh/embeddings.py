"""Embedding providers behind one interface.

Model strings:

- ``builtin:ngram-<dim>`` (or ``builtin``): offline, deterministic hashed word/char n-grams.
- ``fastembed:<model>`` and ``sentence-transformers:<model>`` (``st:<model>``): local models,
  from the optional extras of the same names.
- any string with an ``endpoint``: sent as ``model`` to that OpenAI-compatible
  ``/v1/embeddings`` server (TEI, vLLM, Ollama, the built-in inference runtime).
- a bare name without endpoint: fastembed if it knows the model, else sentence-transformers.

Every provider returns L2-normalised vectors, so cosine similarity is a dot product.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import re
import threading
import unicodedata
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx
import numpy as np

from datamesh.http_client import RetriesExhausted, request_with_retries, server_message

DEFAULT_MODEL = "builtin:ngram-384"
MIN_BUILTIN_DIM = 64
MAX_BUILTIN_DIM = 4096

ACCEPTED_FORMS = (
    f"accepted forms: 'builtin:ngram-<dim>' ({MIN_BUILTIN_DIM}..{MAX_BUILTIN_DIM}, default '{DEFAULT_MODEL}'), "
    "'fastembed:<model>', 'sentence-transformers:<model>' (or 'st:<model>'), a bare model name "
    "(fastembed, then sentence-transformers), or any model name together with an OpenAI-compatible "
    "embeddingEndpoint"
)


class EmbeddingError(Exception):
    """Embedding failed; ``transient`` says whether retrying later can help."""

    transient: bool = False


class UnknownModelError(EmbeddingError):
    """The model string is not understood or the model does not exist (permanent)."""


class ProviderUnavailableError(EmbeddingError):
    """The library of the provider is not installed (permanent until the image changes)."""


class EmbeddingServiceError(EmbeddingError):
    """A remote embedding service is down, overloaded or too slow, after retries (transient)."""

    transient = True


@runtime_checkable
class EmbeddingProvider(Protocol):
    """Turns texts into L2-normalised vectors of a fixed dimension."""

    model_id: str

    async def dimension(self) -> int:
        """Length of the vectors this provider returns."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in order."""
        ...


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero instead of turning into NaN."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix


def cosine_scores(query: Sequence[float], matrix: Sequence[Sequence[float]]) -> list[float]:
    """Cosine similarity of ``query`` with each row of ``matrix`` (0.0 where a vector is zero)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 0:
        return []
    q = np.asarray(query, dtype=np.float64)
    qn = float(np.linalg.norm(q))
    rn = np.linalg.norm(m, axis=1)
    denom = rn * qn
    scores = np.zeros(len(m), dtype=np.float64)
    np.divide(m @ q, denom, out=scores, where=denom > 0)
    return scores.tolist()


# ==== built-in hashed n-gram provider ========================================================

_TOKEN = re.compile(r"[^\W_]+")
_STOP_WORDS = frozenset(
    """a about above after again all also am an and any are as at be been before being below between both but by
    can could did do does doing during each few for from further had has have having he her here hers him his how
    i if in into is it its itself just me more most my of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your yours""".split()
)
_WORD_WEIGHT = 1.0
_BIGRAM_WEIGHT = 0.7
# Each word yields ~15 char n-grams: a low weight each keeps spelling overlap a supporting
# signal, so sharing whole (stemmed) words still counts most.
_CHAR_WEIGHT = 0.25
_CHAR_NS = (3, 4, 5)
_HASH_PERSON = b"datamesh-ngram1"  # part of the model: changing it changes every vector
_HASH_BITS = np.uint64(52)
_SIGN_MASK = np.uint64(1 << 51)
_BUCKET_MASK = np.uint64((1 << 51) - 1)
_CACHE_LIMIT = 200_000
_THREAD_THRESHOLD = 256  # texts; smaller batches are cheaper inline than in a worker thread
_CHUNK = 2048  # texts per dense block: bounds memory at high dimensions; row ids fit in 12 bits


def _hash52(feature: str) -> int:
    # blake2b, never hash(): vectors must agree across processes, machines and Python versions.
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, person=_HASH_PERSON).digest()
    return int.from_bytes(digest, "little") >> 12


def _stem(word: str) -> str:
    """Light suffix stripping, so 'delays'/'delayed'/'delay' and 'pricing'/'price' meet."""
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith(("ches", "shes", "xes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    stripped = False
    if word.endswith("ing") and len(word) >= 6:
        word, stripped = word[:-3], True
    elif word.endswith("ed") and len(word) >= 5 and not word.endswith("eed"):
        word, stripped = word[:-2], True
    if stripped and len(word) >= 3 and word[-1] == word[-2] and word[-1] not in "aeiouylsz":
        word = word[:-1]  # 'stopped' -> 'stop', as Porter does
    if word.endswith("e") and len(word) >= 4 and not word.endswith("ee"):
        word = word[:-1]  # 'price' and 'pricing' both end up as 'pric'
    return word


@dataclass(frozen=True)
class _WordFeatures:
    stem: str
    stop: bool
    hashes: np.ndarray  # uint64 (52 bits used): the unigram, then its char n-grams
    weights: np.ndarray


class _Featuriser:
    """Text -> hashed features, with per-word results cached (vocabularies repeat a lot)."""

    def __init__(self) -> None:
        self._words: dict[str, _WordFeatures] = {}
        self._bigrams: dict[tuple[str, str], int] = {}
        self._grams: dict[str, int] = {}  # char n-grams recur across words far more than words do

    def tokens(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text)
        if not text.isascii():
            # Fold accents so 'café' and 'cafe' share features.
            text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        return _TOKEN.findall(text.casefold())

    def word(self, token: str) -> _WordFeatures:
        hit = self._words.get(token)
        if hit is not None:
            return hit
        stem = _stem(token)
        marked = f"<{stem}>"
        grams = [marked[i : i + n] for n in _CHAR_NS for i in range(len(marked) - n + 1)]
        if not grams:  # a one-letter word is its own 3-gram
            grams = [marked]
        hashes = np.fromiter((_hash52("w:" + stem), *map(self.gram, grams)), dtype=np.uint64, count=len(grams) + 1)
        weights = np.full(len(hashes), _CHAR_WEIGHT)
        weights[0] = _WORD_WEIGHT
        feats = _WordFeatures(stem, token in _STOP_WORDS, hashes, weights)
        if len(self._words) >= _CACHE_LIMIT:
            self._words.clear()
        self._words[token] = feats
        return feats

    def gram(self, gram: str) -> int:
        h = self._grams.get(gram)
        if h is None:
            h = _hash52("c:" + gram)
            if len(self._grams) >= _CACHE_LIMIT:
                self._grams.clear()
            self._grams[gram] = h
        return h

    def bigram(self, a: str, b: str) -> int:
        key = (a, b)
        h = self._bigrams.get(key)
        if h is None:
            h = _hash52(f"b:{a} {b}")
            if len(self._bigrams) >= _CACHE_LIMIT:
                self._bigrams.clear()
            self._bigrams[key] = h
        return h

    def features(self, text: str) -> tuple[list[_WordFeatures], list[int]]:
        """The text's content words and the hashes of its word bigrams."""
        words = [self.word(t) for t in self.tokens(text)]
        content = [w for w in words if not w.stop]
        if not content:  # a text of stop words only still deserves a vector
            content = words
        bigrams = [self.bigram(a.stem, b.stem) for a, b in zip(content, content[1:])]
        return content, bigrams


_FEATURISER = _Featuriser()
_FEATURISER_LOCK = threading.Lock()


def terms(text: str) -> list[tuple[str, str]]:
    """(stem, word) of each content word of ``text``, in order, as the built-in model sees them."""
    with _FEATURISER_LOCK:  # the word cache is shared with embedding worker threads
        words = [(_FEATURISER.word(t), t) for t in _FEATURISER.tokens(text)]
    return [(w.stem, t) for w, t in words if not w.stop]


def _hashed_vectors(texts: Sequence[str], dim: int) -> np.ndarray:
    """Signed feature hashing with sublinear tf of a block of texts into an (n, dim) matrix."""
    n = len(texts)
    assert n <= _CHUNK
    word_hashes: list[np.ndarray] = []
    word_weights: list[np.ndarray] = []
    bigram_hashes: list[int] = []
    word_counts = np.zeros(n, dtype=np.int64)
    bigram_counts = np.zeros(n, dtype=np.int64)
    with _FEATURISER_LOCK:  # the caches are shared by worker threads
        for i, text in enumerate(texts):
            words, bigrams = _FEATURISER.features(text)
            for w in words:
                word_hashes.append(w.hashes)
                word_weights.append(w.weights)
                word_counts[i] += len(w.hashes)
            bigram_hashes.extend(bigrams)
            bigram_counts[i] = len(bigrams)
    out = np.zeros((n, dim), dtype=np.float64)
    if not word_hashes:
        return out
    hashes = np.concatenate([*word_hashes, np.asarray(bigram_hashes, dtype=np.uint64)])
    weights = np.concatenate([*word_weights, np.full(len(bigram_hashes), _BIGRAM_WEIGHT)])
    row_ids = np.arange(n, dtype=np.uint64)
    rows = np.concatenate([np.repeat(row_ids, word_counts), np.repeat(row_ids, bigram_counts)])
    # One sortable key per (text, feature): its run lengths after sorting are the term
    # frequencies. Feature hashes keep 52 bits so the row fits above them.
    keys = (rows << _HASH_BITS) | hashes
    order = np.argsort(keys, kind="stable")
    keys, weights = keys[order], weights[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    first = np.flatnonzero(starts)
    tf = np.diff(np.append(first, len(keys)))
    keys, weights = keys[first], weights[first]
    values = weights * (1.0 + np.log(tf))
    # Signed hashing: collisions cancel out on average instead of piling up.
    values = np.where(keys & _SIGN_MASK, -values, values)
    buckets = ((keys & _BUCKET_MASK) % np.uint64(dim)).astype(np.int64)
    flat = (keys >> _HASH_BITS).astype(np.int64) * dim + buckets
    out += np.bincount(flat, weights=values, minlength=n * dim).reshape(n, dim)
    return _normalise_rows(out)


class BuiltinNgramProvider:
    """Offline, deterministic lexical embeddings: hashed word uni/bigrams and char 3-5-grams."""

    def __init__(self, dim: int = 384) -> None:
        if not MIN_BUILTIN_DIM <= dim <= MAX_BUILTIN_DIM:
            raise UnknownModelError(f"builtin:ngram-{dim}: dimension must be {MIN_BUILTIN_DIM}..{MAX_BUILTIN_DIM}; {ACCEPTED_FORMS}")
        self.dim = dim
        self.model_id = f"builtin:ngram-{dim}"

    def __repr__(self) -> str:
        return f"BuiltinNgramProvider({self.dim})"

    async def dimension(self) -> int:
        """The configured dimension."""
        return self.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Synchronous embedding into a float64 (n, dim) array of unit (or zero) rows."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float64)
        blocks = [_hashed_vectors(texts[i : i + _CHUNK], self.dim) for i in range(0, len(texts), _CHUNK)]
        return blocks[0] if len(blocks) == 1 else np.vstack(blocks)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text; empty texts give zero vectors."""
        if len(texts) > _THREAD_THRESHOLD:
            return await asyncio.to_thread(lambda: self.encode(texts).tolist())
        return self.encode(texts).tolist()


# ==== local model libraries ===================================================================


def _extra_missing(extra: str, module: str, cause: BaseException | None = None) -> ProviderUnavailableError:
    err = ProviderUnavailableError(
        f"the {extra} provider needs the '{module}' package, which is not installed: "
        f"pip install 'datamesh-operator[{extra}]' (or use 'builtin:ngram-384', or an OpenAI-compatible embeddingEndpoint)"
    )
    err.__cause__ = cause
    return err


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _fastembed_models() -> dict[str, int]:
    """Models fastembed knows (name, lower-cased -> dimension), without downloading anything."""
    try:
        from fastembed import TextEmbedding
    except ImportError as e:
        raise _extra_missing("fastembed", "fastembed", e) from e
    models: dict[str, int] = {}
    for entry in TextEmbedding.list_supported_models():
        info = entry if isinstance(entry, dict) else getattr(entry, "__dict__", {})
        name = info.get("model")
        if name:
            models[str(name).lower()] = int(info.get("dim") or 0)
    return models


class _LocalModelProvider:
    """Common lazy loading for in-process model libraries; inference runs in a worker thread."""

    model_id: str
    name: str

    def __init__(self) -> None:
        self._model: Any = None
        self._dim: int | None = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        raise NotImplementedError

    def _encode(self, model: Any, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _loaded(self) -> Any:
        with self._lock:  # one load, even when several threads ask at once
            if self._model is None:
                self._model = self._load()
            return self._model

    def _run(self, texts: list[str]) -> np.ndarray:
        model = self._loaded()
        out = np.asarray(self._encode(model, texts), dtype=np.float64)
        return _normalise_rows(out.reshape(len(texts), -1))

    async def dimension(self) -> int:
        """Dimension of the loaded model (loads it on first use)."""
        if self._dim is None:
            self._dim = int((await asyncio.to_thread(self._run, ["dimension probe"])).shape[1])
        return self._dim

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors from the model, computed in a worker thread."""
        texts = list(texts)
        if not texts:
            return []
        out = await asyncio.to_thread(self._run, texts)
        self._dim = out.shape[1]
        return out.tolist()


class FastEmbedProvider(_LocalModelProvider):
    """A fastembed ``TextEmbedding`` model (ONNX, CPU)."""

    def __init__(self, name: str, cache_dir: str | None = None) -> None:
        super().__init__()
        known = _fastembed_models()
        if name.lower() not in known:
            sample = ", ".join(sorted(known)[:8])
            raise UnknownModelError(f"fastembed does not know the model {name!r} (it knows e.g. {sample}); {ACCEPTED_FORMS}")
        self.name = name
        self.model_id = f"fastembed:{name}"
        self._cache_dir = cache_dir
        self._dim = known[name.lower()] or None

    def _load(self) -> Any:
        from fastembed import TextEmbedding

        try:
            return TextEmbedding(model_name=self.name, cache_dir=self._cache_dir)
        except ValueError as e:
            raise UnknownModelError(f"fastembed cannot load {self.name!r}: {e}") from e
        except Exception as e:  # noqa: BLE001 - a listed model that fails to load is a download/network problem
            raise EmbeddingServiceError(f"fastembed could not fetch or load {self.name!r}: {type(e).__name__}: {e}") from e

    def _encode(self, model: Any, texts: list[str]) -> np.ndarray:
        return np.stack(list(model.embed(texts)))


class SentenceTransformersProvider(_LocalModelProvider):
    """A sentence-transformers model (a hub name or a local folder)."""

    def __init__(self, name: str, device: str | None = None) -> None:
        super().__init__()
        if not _installed("sentence_transformers"):
            raise _extra_missing("sentence-transformers", "sentence_transformers")
        if not name:
            raise UnknownModelError(f"sentence-transformers needs a model name; {ACCEPTED_FORMS}")
        self.name = name
        self.model_id = f"sentence-transformers:{name}"
        self._device = device

    def _load(self) -> Any:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise _extra_missing("sentence-transformers", "sentence_transformers", e) from e
        try:
            return SentenceTransformer(self.name, device=self._device)
        except OSError as e:
            text = str(e)
            if "not a valid model identifier" in text or "Repository Not Found" in text or "404" in text:
                raise UnknownModelError(f"sentence-transformers has no model {self.name!r}: {text}") from e
            raise EmbeddingServiceError(f"sentence-transformers could not fetch or load {self.name!r}: {text}") from e

    def _encode(self, model: Any, texts: list[str]) -> np.ndarray:
        return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


# ==== OpenAI-compatible HTTP ==================================================================


def embeddings_url(base: str) -> str:
    """``{base}/v1/embeddings`` for a base URL given with or without a trailing ``/v1``."""
    base = base.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return f"{base}/v1/embeddings"


class _LoopState:
    def __init__(self, client: httpx.AsyncClient, concurrency: int) -> None:
        self.client = client
        self.semaphore = asyncio.Semaphore(concurrency)


class OpenAICompatibleProvider:
    """Any server with an OpenAI-style ``POST /v1/embeddings`` (TEI, vLLM, Ollama, datamesh)."""

    def __init__(
        self,
        model: str,
        endpoint: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        batch_size: int = 64,
        max_concurrency: int = 4,
        attempts: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        api_key: str | None = None,
    ) -> None:
        if not model:
            raise UnknownModelError(f"an embedding endpoint needs a model name; {ACCEPTED_FORMS}")
        if not re.match(r"^https?://", endpoint.strip()):
            raise UnknownModelError(f"embedding endpoint {endpoint!r} must be an http(s) URL")
        self.model_id = model
        self.url = embeddings_url(endpoint)
        self.batch_size = max(1, batch_size)
        self.attempts = max(1, attempts)
        self._concurrency = max(1, max_concurrency)
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout, write=read_timeout, pool=read_timeout)
        self._backoff = (backoff_base, backoff_max)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._dim: int | None = None
        # httpx connections and asyncio primitives belong to one event loop: keep one set per loop.
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"OpenAICompatibleProvider({self.model_id!r}, {self.url!r})"

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
            client = httpx.AsyncClient(timeout=self._timeout, limits=limits, headers=self._headers)
            state = self._states[loop] = _LoopState(client, self._concurrency)
        return state

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.aclose()

    async def dimension(self) -> int:
        """Discovered once by embedding a probe text."""
        if self._dim is None:
            await self._request(["dimension probe"])
        assert self._dim is not None
        return self._dim

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Batches of ``batch_size`` texts, sent concurrently (bounded), results in input order."""
        texts = list(texts)
        if not texts:
            return []
        # Servers refuse empty inputs; an empty text has no meaning anyway, so it maps to zeros.
        todo = [i for i, t in enumerate(texts) if t.strip()]
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        tasks = [asyncio.ensure_future(self._request([texts[i] for i in b])) for b in batches]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        dim = await self.dimension() if len(todo) < len(texts) else self._dim
        out: list[list[float]] = [[] for _ in texts]
        for batch, vectors in zip(batches, results, strict=True):
            for i, v in zip(batch, vectors, strict=True):
                out[i] = v
        for i, v in enumerate(out):
            if not v:
                out[i] = [0.0] * (dim or 0)
        return out

    async def _request(self, texts: list[str]) -> list[list[float]]:
        state = self._state()
        base, cap = self._backoff
        try:
            response = await request_with_retries(
                state.client, "POST", self.url, json={"model": self.model_id, "input": texts},
                attempts=self.attempts, backoff_base=base, backoff_max=cap, semaphore=state.semaphore,
            )
        except RetriesExhausted as e:
            raise EmbeddingServiceError(f"embedding service {self.url} failed after {e.attempts} attempts: {e.cause}") from e
        if response.status_code >= 400:
            raise EmbeddingError(f"embedding service {self.url} answered HTTP {response.status_code} for model {self.model_id!r}: {server_message(response)}")
        return self._parse(response, len(texts))

    def _parse(self, response: httpx.Response, expected: int) -> list[list[float]]:
        try:
            data = response.json()["data"]
            items = sorted(data, key=lambda d: d.get("index", 0))
            matrix = np.asarray([d["embedding"] for d in items], dtype=np.float64)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EmbeddingError(f"embedding service {self.url} sent a malformed response ({type(e).__name__}: {e}): {response.text[:200]!r}") from e
        if matrix.ndim != 2 or matrix.shape[0] != expected or matrix.shape[1] == 0:
            raise EmbeddingError(f"embedding service {self.url} returned {matrix.shape} vectors for {expected} texts")
        if not np.all(np.isfinite(matrix)):
            raise EmbeddingError(f"embedding service {self.url} returned non-finite values")
        if self._dim is None:
            self._dim = matrix.shape[1]
        elif self._dim != matrix.shape[1]:
            raise EmbeddingError(f"embedding service {self.url} changed dimension from {self._dim} to {matrix.shape[1]}")
        return _normalise_rows(matrix).tolist()


# ==== resolution ==============================================================================

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]*):(.*)$", re.DOTALL)
_BUILTIN = re.compile(r"^ngram-(\d+)$")
_cache: dict[tuple[str, str | None], EmbeddingProvider] = {}
_cache_lock = threading.Lock()


def _builtin(rest: str | None) -> BuiltinNgramProvider:
    if not rest:
        return BuiltinNgramProvider(384)
    m = _BUILTIN.match(rest.strip().lower())
    if not m:
        raise UnknownModelError(f"unknown builtin model 'builtin:{rest}'; {ACCEPTED_FORMS}")
    return BuiltinNgramProvider(int(m.group(1)))


def _bare(name: str) -> EmbeddingProvider:
    """A name without scheme: fastembed if it knows it, else sentence-transformers."""
    has_fastembed = _installed("fastembed")
    if has_fastembed and name.lower() in _fastembed_models():
        return FastEmbedProvider(name)
    if _installed("sentence_transformers"):
        return SentenceTransformersProvider(name)
    if has_fastembed:
        raise UnknownModelError(f"fastembed does not know the model {name!r} and sentence-transformers is not installed; {ACCEPTED_FORMS}")
    raise ProviderUnavailableError(
        f"model {name!r} needs fastembed or sentence-transformers, and neither is installed: "
        f"pip install 'datamesh-operator[fastembed]' or 'datamesh-operator[sentence-transformers]'; {ACCEPTED_FORMS}"
    )


def _create(model: str, endpoint: str | None) -> EmbeddingProvider:
    if endpoint:
        return OpenAICompatibleProvider(model, endpoint)
    if model.lower() == "builtin":
        return _builtin(None)
    m = _SCHEME.match(model)
    if m is None:
        return _bare(model)
    scheme, rest = m.group(1).lower(), m.group(2).strip()
    if scheme == "builtin":
        return _builtin(rest)
    if scheme == "fastembed":
        if not _installed("fastembed"):
            raise _extra_missing("fastembed", "fastembed")
        if not rest:
            raise UnknownModelError(f"'fastembed:' needs a model name; {ACCEPTED_FORMS}")
        return FastEmbedProvider(rest)
    if scheme in ("sentence-transformers", "st"):
        return SentenceTransformersProvider(rest)
    raise UnknownModelError(f"unknown embedding model scheme {scheme!r} in {model!r}; {ACCEPTED_FORMS}")


def resolve_provider(model: str, endpoint: str | None = None) -> EmbeddingProvider:
    """The provider for a model string (and optional OpenAI-compatible endpoint), cached per pair."""
    model = (model or "").strip()
    if not model:
        raise UnknownModelError(f"empty embedding model; {ACCEPTED_FORMS}")
    endpoint = (endpoint or "").strip() or None
    key = (model, embeddings_url(endpoint) if endpoint else None)
    with _cache_lock:
        provider = _cache.get(key)
    if provider is not None:
        return provider
    provider = _create(model, endpoint)  # outside the lock: fastembed's import is slow
    with _cache_lock:
        return _cache.setdefault(key, provider)


def clear_provider_cache() -> None:
    """Forget cached providers (tests, or after installing a library at runtime)."""
    with _cache_lock:
        _cache.clear()
