"""Embedding providers behind one interface.

Model strings:

- ``onnx:all-MiniLM-L6-v2`` (the default): a semantic model run in this process by onnxruntime,
  its files installed with the package (nothing is downloaded).
- ``builtin:ngram-<dim>`` (or ``builtin``): offline, deterministic hashed word/char n-grams; tiny,
  lexical only, for tests that need no model.
- ``fastembed:<model>`` and ``sentence-transformers:<model>`` (``st:<model>``): local models,
  from the optional extras of the same names.
- any string with an ``endpoint``: sent as ``model`` to that OpenAI-compatible
  ``/v1/embeddings`` server (TEI, vLLM, Ollama, the built-in inference runtime).
- a bare name without endpoint: fastembed if it knows the model, else sentence-transformers.

Every provider returns L2-normalised vectors, so cosine similarity is a dot product.
"""

from __future__ import annotations

import re
import threading

from datamesh.adapters.embeddings.builtin import BUILTIN_FORM, BuiltinNgramProvider
from datamesh.adapters.embeddings.local_models import (
    FastEmbedProvider,
    SentenceTransformersProvider,
    extra_missing,
    fastembed_models,
    installed,
)
from datamesh.adapters.embeddings.onnx import ONNX_FORM, bundled_provider
from datamesh.adapters.embeddings.openai import OpenAICompatibleProvider
from datamesh.adapters.http import api_url
from datamesh.core.ports import EmbeddingProvider, ProviderUnavailableError, UnknownModelError
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL

ACCEPTED_FORMS = (
    f"accepted forms: {ONNX_FORM}, {BUILTIN_FORM}, "
    "'fastembed:<model>', 'sentence-transformers:<model>' (or 'st:<model>'), a bare model name "
    "(fastembed, then sentence-transformers), or any model name together with an OpenAI-compatible "
    f"embeddingEndpoint; unset means '{DEFAULT_EMBEDDING_MODEL}'"
)


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
    has_fastembed = installed("fastembed")
    if has_fastembed and name.lower() in fastembed_models():
        return FastEmbedProvider(name)
    if installed("sentence_transformers"):
        return SentenceTransformersProvider(name)
    if has_fastembed:
        raise UnknownModelError(
            f"fastembed does not know the model {name!r} and sentence-transformers is not installed; {ACCEPTED_FORMS}"
        )
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
    if scheme == "onnx":
        if not rest:
            raise UnknownModelError(f"'onnx:' needs a model name; {ACCEPTED_FORMS}")
        return bundled_provider(rest)
    if scheme == "fastembed":
        if not installed("fastembed"):
            raise extra_missing("fastembed", "fastembed")
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
    key = (model, api_url(endpoint, "embeddings") if endpoint else None)
    with _cache_lock:
        provider = _cache.get(key)
    if provider is not None:
        return provider
    try:
        provider = _create(model, endpoint)  # outside the lock: fastembed's import is slow
    except UnknownModelError as exc:
        if "accepted forms" in str(exc):
            raise
        raise UnknownModelError(f"{exc}; {ACCEPTED_FORMS}") from exc
    with _cache_lock:
        return _cache.setdefault(key, provider)
