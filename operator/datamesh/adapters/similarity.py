"""The cosine of a question's embedding with a returned row's, for merging across products."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from datamesh.core.plan import DENSE_VECTOR


def cosine(question: Sequence[float], row: Sequence[float] | None) -> float | None:
    """Cosine similarity (None without a row vector; 0.0 when either vector is zero)."""
    if row is None or len(row) != len(question):
        return None
    dot = math.fsum(a * b for a, b in zip(question, row, strict=True))
    norms = math.sqrt(math.fsum(a * a for a in question)) * math.sqrt(math.fsum(b * b for b in row))
    return dot / norms if norms > 0 else 0.0


def dense_of(vector: Any) -> Sequence[float] | None:
    """The dense vector of a returned point (both clients give named vectors as a dict)."""
    if isinstance(vector, dict):
        dense = vector.get(DENSE_VECTOR)
        return dense if isinstance(dense, list) else None
    return None
