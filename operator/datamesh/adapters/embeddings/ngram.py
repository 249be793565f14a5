"""The built-in model itself: text to signed, feature-hashed word and character n-gram vectors.

Imports numpy and the standard library only: a large batch is embedded in a child process (see
``builtin``), which imports this module and nothing else of the project (its models and pydantic
would cost the child about 13 MiB).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero instead of turning into NaN."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix


_TOKEN = re.compile(r"[^\W_]+")
_STOP_WORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "all",
        "also",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
    ]
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
    elif word.endswith(("sses", "ches", "shes", "xes", "zes")):
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
        bigrams = [self.bigram(a.stem, b.stem) for a, b in itertools.pairwise(content)]
        return content, bigrams


_FEATURISER = _Featuriser()
_FEATURISER_LOCK = threading.Lock()


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
    return normalise_rows(out)


def encode(texts: Sequence[str], dim: int) -> np.ndarray:
    """The texts' vectors as a float64 (n, dim) array of unit (or zero) rows, in blocks of bounded memory."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, dim), dtype=np.float64)
    blocks = [_hashed_vectors(texts[i : i + _CHUNK], dim) for i in range(0, len(texts), _CHUNK)]
    return blocks[0] if len(blocks) == 1 else np.vstack(blocks)
