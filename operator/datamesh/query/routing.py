"""Which products a question should go to: hybrid semantic + lexical match on product cards.

The semantic score is the cosine between the question and each card (``CatalogEntry.card()``)
embedded with the built-in model, which is offline and cheap enough to run on every request;
card vectors are cached per entry and recomputed when the card changes. The lexical score is
BM25-style: the IDF-weighted share of the question's content words found in the card, with
term-frequency saturation and length normalisation. Both are in [0, 1] and averaged, so one
threshold means the same thing whatever the catalog size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# terms: the built-in model's tokenizer, stemmer and stop words, so routing and the built-in
# embeddings agree on what a word is.
from datamesh.adapters.embeddings.builtin import terms
from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.core.ports import EmbeddingProvider
from datamesh.resource.catalog import CatalogEntry
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL

ROUTABLE_PHASES = frozenset({"Ready", "Degraded"})
DEFAULT_THRESHOLD = 0.12
SEMANTIC_WEIGHT = 0.5
BM25_K1 = 1.2
BM25_B = 0.75
_MAX_SHOWN_TERMS = 5


@dataclass(frozen=True)
class Route:
    """A product a question is routed to, with its score in [0, 1] and a human-readable reason."""

    entry: CatalogEntry
    score: float
    why: str

    @property
    def product(self) -> str:
        return product_ref(self.entry)

    @property
    def degraded(self) -> bool:
        return self.entry.phase == "Degraded"


def product_ref(entry: CatalogEntry) -> str:
    """How the API names a product: ``<namespace>/<name>``."""
    return f"{entry.namespace}/{entry.name}"


def routable(entry: CatalogEntry) -> bool:
    """Whether a product can answer questions at all: Ready or Degraded, with a collection."""
    return entry.phase in ROUTABLE_PHASES and bool(entry.collection)


@dataclass
class _Card:
    entry: CatalogEntry  # the object the card was made from: the same object needs no re-check
    text: str
    vector: np.ndarray
    terms: Counter[str]
    length: int


@dataclass
class _Pool:
    """The stacked card vectors of one set of candidates, reused while the catalog is unchanged."""

    cards: list[_Card]
    matrix: np.ndarray
    lengths: np.ndarray


class Router:
    """Routes questions over a catalog; keeps the card vectors and term counts between calls."""

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, semantic_weight: float = SEMANTIC_WEIGHT) -> None:
        self.model = model
        self.semantic_weight = semantic_weight
        self._provider: EmbeddingProvider | None = None
        self._cards: dict[str, _Card] = {}
        self._pool: tuple[tuple[int, ...], _Pool] | None = None

    @property
    def provider(self) -> EmbeddingProvider:
        if self._provider is None:
            self._provider = resolve_provider(self.model)
        return self._provider

    async def _pool_of(self, entries: Sequence[CatalogEntry]) -> _Pool:
        """Cards of ``entries`` (embedded when new or changed) and their stacked vectors."""
        identity = tuple(id(e) for e in entries)
        if (
            self._pool is not None
            and self._pool[0] == identity
            and all(c.entry is e for c, e in zip(self._pool[1].cards, entries, strict=True))
        ):
            return self._pool[1]
        stale: list[tuple[int, str]] = []
        for i, e in enumerate(entries):
            cached = self._cards.get(e.key)
            if cached is not None and cached.entry is e:
                continue
            text = e.card()
            if cached is not None and cached.text == text:
                cached.entry = e  # same card, new object (e.g. only the record count changed)
                continue
            stale.append((i, text))
        if stale:
            vectors = await self.provider.embed([t for _, t in stale])
            for (i, text), vector in zip(stale, vectors, strict=True):
                counts = Counter(stem for stem, _ in terms(text))
                self._cards[entries[i].key] = _Card(
                    entries[i], text, np.asarray(vector, dtype=np.float64), counts, max(1, sum(counts.values()))
                )
        cards = [self._cards[e.key] for e in entries]
        pool = _Pool(cards, np.stack([c.vector for c in cards]), np.array([c.length for c in cards], dtype=np.float64))
        self._pool = (identity, pool)
        return pool

    def _forget_missing(self, present: set[str]) -> None:
        # Bounded memory: drop cards of products that left the catalog.
        if len(self._cards) > 2 * len(present) + 64:
            self._cards = {k: v for k, v in self._cards.items() if k in present}

    async def route(
        self,
        question: str,
        entries: Mapping[str, CatalogEntry] | Iterable[CatalogEntry],
        *,
        domains: Sequence[str] | None = None,
        products: Sequence[str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        max_products: int = 10,
    ) -> list[Route]:
        """The products to ask among ``entries`` (the caller's visible ones), best first; see the module docstring.

        Products named in ``products`` are routed to whatever their score
        (the caller chose them); ``domains`` narrows the candidates and the threshold still applies.
        """
        all_entries = list(entries.values() if isinstance(entries, Mapping) else entries)
        self._forget_missing({e.key for e in all_entries})
        pool = sorted((e for e in all_entries if routable(e)), key=product_ref)
        if not pool or max_products < 1:
            return []
        cards = await self._pool_of(pool)
        semantic = await self._semantic(question, cards.matrix)
        lexical, matched = self._lexical(question, cards)
        scores = self.semantic_weight * semantic + (1 - self.semantic_weight) * lexical

        wanted_products = set(products or ())
        wanted_domains = {d.lower() for d in domains or ()}
        chosen: list[tuple[float, str, int]] = []
        for i, entry in enumerate(pool):
            ref = product_ref(entry)
            if wanted_products and ref not in wanted_products:
                continue
            if wanted_domains and entry.domain.lower() not in wanted_domains:
                continue
            if not wanted_products and scores[i] < threshold:
                continue
            # Rounded so float noise cannot reorder equal scores between runs.
            chosen.append((-round(float(scores[i]), 9), ref, i))
        chosen.sort()
        routes = []
        for _, ref, i in chosen[:max_products]:
            routes.append(
                Route(
                    pool[i],
                    round(float(scores[i]), 4),
                    self._why(pool[i], ref in wanted_products, semantic[i], lexical[i], matched[i]),
                )
            )
        return routes

    async def _semantic(self, question: str, matrix: np.ndarray) -> np.ndarray:
        (qv,) = await self.provider.embed([question])
        # Unit vectors: the dot product is the cosine; an unrelated card can score slightly below 0.
        scores: np.ndarray = np.clip(matrix @ np.asarray(qv, dtype=np.float64), 0.0, 1.0)
        return scores

    @staticmethod
    def _lexical(question: str, pool: _Pool) -> tuple[np.ndarray, list[list[str]]]:
        shown: dict[str, str] = {}
        for stem, word in terms(question):
            shown.setdefault(stem, word)
        stems = list(shown)
        cards, lengths = pool.cards, pool.lengths
        n = len(cards)
        if not stems:
            return np.zeros(n), [[] for _ in cards]
        tf = np.array([[c.terms.get(s, 0) for s in stems] for c in cards], dtype=np.float64)
        df = (tf > 0).sum(axis=0)
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths / lengths.mean())
        saturation = np.minimum(tf * (BM25_K1 + 1) / (tf + norm[:, None]), 1.0)
        scores = saturation @ idf / idf.sum()
        matched = [[shown[s] for s, hit in zip(stems, row, strict=True) if hit] for row in tf > 0]
        return scores, matched

    @staticmethod
    def _why(entry: CatalogEntry, explicit: bool, semantic: float, lexical: float, matched: list[str]) -> str:
        parts = ["requested by name" if explicit else ""]
        if matched:
            more = f" (+{len(matched) - _MAX_SHOWN_TERMS})" if len(matched) > _MAX_SHOWN_TERMS else ""
            parts.append(f"card mentions {', '.join(matched[:_MAX_SHOWN_TERMS])}{more}")
        parts.append(f"semantic {semantic:.2f}, lexical {lexical:.2f}")
        if entry.phase == "Degraded":
            parts.append("DEGRADED: results may be missing or stale")
        return "; ".join(p for p in parts if p)
