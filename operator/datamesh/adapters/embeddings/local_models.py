"""Embedding models run in this process by optional libraries: fastembed and sentence-transformers."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from datamesh.adapters.embeddings.builtin import as_lists, normalise_rows
from datamesh.core.ports import EmbeddingServiceError, ProviderUnavailableError, UnknownModelError


def extra_missing(extra: str, module: str, cause: BaseException | None = None) -> ProviderUnavailableError:
    err = ProviderUnavailableError(
        f"the {extra} provider needs the '{module}' package, which is not installed: "
        f"pip install 'datamesh-operator[{extra}]' (or use 'builtin:ngram-384', or an OpenAI-compatible "
        "embeddingEndpoint)"
    )
    err.__cause__ = cause
    return err


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def fastembed_models() -> dict[str, int]:
    """Models fastembed knows (name, lower-cased -> dimension), without downloading anything."""
    try:
        from fastembed import TextEmbedding
    except ImportError as e:
        raise extra_missing("fastembed", "fastembed", e) from e
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
        return normalise_rows(out.reshape(len(texts), -1))

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
        return as_lists(out)


class FastEmbedProvider(_LocalModelProvider):
    """A fastembed ``TextEmbedding`` model (ONNX, CPU)."""

    def __init__(self, name: str, cache_dir: str | None = None) -> None:
        super().__init__()
        known = fastembed_models()
        if name.lower() not in known:
            sample = ", ".join(sorted(known)[:8])
            raise UnknownModelError(f"fastembed does not know the model {name!r} (it knows e.g. {sample})")
        self.name = name
        self.model_id = f"fastembed:{name}"
        self._cache_dir = cache_dir
        self._dim = known[name.lower()] or None

    def _load(self) -> Any:
        from fastembed import TextEmbedding

        try:
            return TextEmbedding(model_name=self.name, cache_dir=self._cache_dir)
        except ValueError as e:
            # The name was checked against fastembed's list in __init__, so a ValueError here is almost
            # always "Could not load model ... from any source": the download failed (offline, hub
            # down), which may heal. Only an unsupported model is permanent.
            if "not supported" in str(e).lower():
                raise UnknownModelError(f"fastembed cannot load {self.name!r}: {e}") from e
            raise EmbeddingServiceError(
                f"fastembed could not fetch or load {self.name!r} (offline, or the model hub is unreachable; "
                f"retried later): {e}"
            ) from e
        except Exception as e:
            raise EmbeddingServiceError(
                f"fastembed could not fetch or load {self.name!r}: {type(e).__name__}: {e}"
            ) from e

    def _encode(self, model: Any, texts: list[str]) -> np.ndarray:
        return np.stack(list(model.embed(texts)))


class SentenceTransformersProvider(_LocalModelProvider):
    """A sentence-transformers model (a hub name or a local folder)."""

    def __init__(self, name: str, device: str | None = None) -> None:
        super().__init__()
        if not installed("sentence_transformers"):
            raise extra_missing("sentence-transformers", "sentence_transformers")
        if not name:
            raise UnknownModelError("sentence-transformers needs a model name")
        self.name = name
        self.model_id = f"sentence-transformers:{name}"
        self._device = device

    def _load(self) -> Any:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise extra_missing("sentence-transformers", "sentence_transformers", e) from e
        try:
            return SentenceTransformer(self.name, device=self._device)
        except OSError as e:
            text = str(e)
            if "not a valid model identifier" in text or "Repository Not Found" in text or "404" in text:
                raise UnknownModelError(f"sentence-transformers has no model {self.name!r}: {text}") from e
            raise EmbeddingServiceError(f"sentence-transformers could not fetch or load {self.name!r}: {text}") from e

    def _encode(self, model: Any, texts: list[str]) -> np.ndarray:
        vectors: np.ndarray = model.encode(
            texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors
