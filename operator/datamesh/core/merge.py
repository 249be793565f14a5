"""One ranking of the hits of several products, on their scores.

Hits are merged on their cosine similarity to the question, which means the same thing in every
product embedded with the same model; a product embedded with another model has its similarities
mapped onto the mesh's reference scale first (``datamesh.core.calibration``). The product's own
hybrid ranking adds its words' evidence, and its routing score weighs in, so a strong hit of a
product the question is clearly about ranks above an equally similar hit of one it barely matched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from datamesh.core.calibration import IDENTITY, Scale


@dataclass(frozen=True)
class MergePolicy:
    """The constants of merging; set by the quality benchmark, not per question."""

    route_weight: float = 0.5  # how much the product's routing score (relative to the best) counts
    fused_weight: float = 0.2  # how much the product's own hybrid ranking (its words, too) counts


MERGE = MergePolicy()


@dataclass(frozen=True)
class Candidate:
    """A hit of one product: its key, its rank there, and its similarity to the question."""

    product: str
    key: object
    rank: int
    similarity: float | None
    fused: float = 0.0  # the product's own ranking score, as a share of its best possible (0..1)


@dataclass(frozen=True)
class Merged:
    """A place in the merged ranking (pointing at a hit of a product's results)."""

    product: str
    key: object
    score: float


def relevance(candidate: Candidate, scale: Scale = IDENTITY, policy: MergePolicy = MERGE) -> float:
    """A hit's similarity on the mesh's reference scale, plus its words' evidence."""
    similarity = scale(candidate.similarity) if candidate.similarity is not None else 0.0
    return similarity + policy.fused_weight * candidate.fused


def merge(
    results: Mapping[str, Sequence[Candidate]],
    route_scores: Mapping[str, float],
    scales: Mapping[str, Scale],
    *,
    limit: int,
    policy: MergePolicy = MERGE,
) -> list[Merged]:
    """The best ``limit`` hits of every product together, best first (ties keep each product's order)."""
    best_route = max((s for p, s in route_scores.items() if p in results), default=0.0)
    scored: list[tuple[float, int, str, Candidate]] = []
    for product, hits in results.items():
        share = route_scores.get(product, 0.0) / best_route if best_route > 0 else 1.0
        weight = 1.0 - policy.route_weight + policy.route_weight * share
        scale = scales.get(product, IDENTITY)
        for hit in hits:
            scored.append((-relevance(hit, scale, policy) * weight, hit.rank, product, hit))
    scored.sort(key=lambda item: item[:3])
    return [Merged(product, hit.key, round(-value, 6)) for value, _, product, hit in scored[:limit]]
