"""The cosine of a question's embedding with a returned row's, for merging across products."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from datamesh.core.plan import DENSE_VECTOR


def cosines(question: Sequence[float], rows: Sequence[Sequence[float] | None]) -> list[float | None]:
    """Cosine of the question with each row vector at once (None where a row has no vector)."""
    present = [i for i, row in enumerate(rows) if row is not None and len(row) == len(question)]
    out: list[float | None] = [None] * len(rows)
    if not present:
        return out
    matrix = np.asarray([rows[i] for i in present], dtype=np.float64)
    q = np.asarray(question, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1) * float(np.linalg.norm(q))
    values = np.divide(matrix @ q, norms, out=np.zeros(len(present)), where=norms > 0)
    for i, value in zip(present, values.tolist(), strict=True):
        out[i] = value
    return out


def dense_of(vector: Any) -> Sequence[float] | None:
    """The dense vector of a returned point (both clients give named vectors as a dict)."""
    if isinstance(vector, dict):
        dense = vector.get(DENSE_VECTOR)
        return dense if isinstance(dense, list) else None
    return None
