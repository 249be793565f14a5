"""One ranking of the hits of several products, on their scores.

Hits of products embedded with the same model are merged on their cosine similarity to the
question, which means the same thing in every product. When the asked products use different
models, each similarity is first calibrated against its own product (how far above the product's
typical row-to-row similarity it lies, in standard deviations) so no model's scale wins by
itself. Either way the product's routing score weighs in, so a strong hit of a product the
question is clearly about ranks above an equally similar hit of a product it barely matched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MergePolicy:
    """The constants of merging; set by the quality benchmark, not per question."""

    route_weight: float = 0.3  # how much the product's routing score (relative to the best) counts
    calibrated_scale: float = 0.1  # maps a z-score onto the scale of a cosine (about 0.1 per deviation)


MERGE = MergePolicy()


@dataclass(frozen=True)
class Candidate:
    """A hit of one product: its key, its rank there, and its similarity to the question."""

    product: str
    key: object
    rank: int
    similarity: float | None


@dataclass(frozen=True)
class Merged:
    """A place in the merged ranking (pointing at a hit of a product's results)."""

    product: str
    key: object
    score: float


def relevance(
    candidate: Candidate,
    calibration: tuple[float, float] | None,
    calibrate: bool,
    policy: MergePolicy = MERGE,
) -> float:
    """A hit's similarity on the merged scale (calibrated when the products' models differ)."""
    similarity = candidate.similarity if candidate.similarity is not None else 0.0
    if not calibrate or calibration is None:
        return similarity
    mean, std = calibration
    return (similarity - mean) / max(std, 1e-6) * policy.calibrated_scale


def merge(
    results: Mapping[str, Sequence[Candidate]],
    route_scores: Mapping[str, float],
    calibrations: Mapping[str, tuple[float, float] | None],
    *,
    calibrate: bool,
    limit: int,
    policy: MergePolicy = MERGE,
) -> list[Merged]:
    """The best ``limit`` hits of every product together, best first (ties keep each product's order)."""
    best_route = max((s for p, s in route_scores.items() if p in results), default=0.0)
    scored: list[tuple[float, int, str, Merged]] = []
    for product, hits in results.items():
        share = route_scores.get(product, 0.0) / best_route if best_route > 0 else 1.0
        weight = 1.0 - policy.route_weight + policy.route_weight * share
        for hit in hits:
            value = relevance(hit, calibrations.get(product), calibrate, policy) * weight
            scored.append((-value, hit.rank, product, Merged(product, hit.key, round(value, 6))))
    scored.sort(key=lambda item: item[:3])
    return [item[3] for item in scored[:limit]]
