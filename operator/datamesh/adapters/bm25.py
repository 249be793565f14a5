"""BM25 sparse vectors of the key fields' words, the same for both stores.

Qdrant's own BM25 tokenizer (English stop words, Snowball stemmer), from qdrant-edge, turns a
document into term-frequency weights and a question into its unique tokens; the collection's IDF
modifier (on a server and in the embedded engine alike) supplies the inverse document frequency
at query time, so a rare word of the question weighs most.
"""

from __future__ import annotations

import functools
import threading

import qdrant_edge as qe

_local = threading.local()


def _model() -> qe.Bm25:
    # One tokenizer per thread: documents are encoded in worker threads.
    model: qe.Bm25 | None = getattr(_local, "model", None)
    if model is None:
        model = _local.model = qe.Bm25()
    return model


@functools.lru_cache(maxsize=2048)  # a batch goes to a product's collection and to the routing collection
def document_vector(text: str) -> qe.SparseVector | None:
    """The BM25 vector of a row's text (None when it has no indexable word)."""
    vector = _model().embed_document(text)
    return vector if vector.indices else None


def query_vector(text: str) -> qe.SparseVector | None:
    """The BM25 vector of a question (None when it has no indexable word)."""
    vector = _model().embed_query(text)
    return vector if vector.indices else None
