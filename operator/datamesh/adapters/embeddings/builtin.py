"""The built-in embedding model: offline, deterministic hashed word and character n-grams.

Tiny and dependency-free, it stays as the fallback for tests that need no model. It matches
spelling, not meaning. The model itself is ``ngram``; this module is its provider, and the
vector helpers the other providers share.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from datamesh.adapters.embeddings import ngram
from datamesh.adapters.embeddings.ngram import normalise_rows as normalise_rows
from datamesh.adapters.processes import ChildProcesses
from datamesh.core.ports import EmbeddingServiceError, UnknownModelError

MIN_BUILTIN_DIM = 64
MAX_BUILTIN_DIM = 4096
BUILTIN_FORM = f"'builtin:ngram-<dim>' ({MIN_BUILTIN_DIM}..{MAX_BUILTIN_DIM})"


def as_lists(matrix: np.ndarray) -> list[list[float]]:
    """A float matrix as plain lists (what the ports and JSON carry)."""
    rows: list[list[float]] = matrix.tolist()
    return rows


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


_INLINE_TEXTS = 16  # a question is cheaper here than a trip to the child process


class BuiltinNgramProvider:
    """Offline, deterministic lexical embeddings: hashed word uni/bigrams and char 3-5-grams."""

    def __init__(self, dim: int = 384) -> None:
        if not MIN_BUILTIN_DIM <= dim <= MAX_BUILTIN_DIM:
            raise UnknownModelError(f"builtin:ngram-{dim}: dimension must be {MIN_BUILTIN_DIM}..{MAX_BUILTIN_DIM}")
        self.dim = dim
        self.model_id = f"builtin:ngram-{dim}"

    def __repr__(self) -> str:
        return f"BuiltinNgramProvider({self.dim})"

    async def dimension(self) -> int:
        """The configured dimension."""
        return self.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Synchronous embedding into a float64 (n, dim) array of unit (or zero) rows."""
        return ngram.encode(texts, self.dim)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text; empty texts give zero vectors. A batch is embedded in a child process."""
        if len(texts) <= _INLINE_TEXTS:
            return as_lists(self.encode(texts))
        try:
            matrix = await _ENCODER.run(ngram.encode, list(texts), self.dim)
        except BrokenProcessPool as exc:
            raise EmbeddingServiceError(f"{self.model_id}: the embedding process died twice") from exc
        return as_lists(matrix)


# Hashing holds the GIL (about 0.3 ms a text): in a thread, a batch let nothing run beside it (a
# thread beside it kept 15-20 of 300 ms), so an ingestion's writes waited for its embedding. In a
# child process the two overlap on two cores. One child: this process needs the other core. The child
# imports ``ngram`` alone.
_ENCODER = ChildProcesses(1)
