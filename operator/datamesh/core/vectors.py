"""The vector names of every collection, on both stores.

A module of its own, importing nothing: the embedded store's builder processes need these names
and nothing else of the core.
"""

from __future__ import annotations

DENSE_VECTOR = "dense"  # the key fields' embedding
SPARSE_VECTOR = "bm25"  # BM25 over their words
