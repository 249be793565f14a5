"""Which products a question goes to, from the evidence of their rows and cards.

The mesh's routing collection (one per embedding model) holds every row of every product and one
card per product. A question is searched there once (hybrid: its embedding and its words), and
each product's evidence is read off the hits: its best row's similarity, its card's similarity,
and how much of the fused ranking its rows take. The products with the strongest evidence are
asked; there is no threshold that empties an answer: when the evidence is weak the best
candidates are still asked and the answer says it is low-confidence, and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoutingPolicy:
    """The constants of routing; set by the quality benchmark (bench/quality.py), not per question."""

    fetch: int = 64  # rows of the routing collection read per question
    rrf_k: int = 2  # rank constant of the rank-mass signal
    card_weight: float = 0.7  # a card matching is weaker evidence than a row matching
    mass_weight: float = 0.15  # several rows matching is stronger evidence than one
    keep_ratio: float = 0.9  # ask products scoring at least this share of the best one
    # A best row this many standard deviations above the product's typical row-to-row similarity is
    # a confident match, whatever the model's scale (the product's calibration says what is typical).
    confident_z: float = 2.0
    margin: float = 0.02  # best two products closer than this (and not both asked): ambiguous
    low_confidence_products: int = 3  # how many products a low-confidence answer asks


POLICY = RoutingPolicy()


@dataclass
class Evidence:
    """What the routing search found for one product."""

    product: str
    best_row: float | None = None
    card: float | None = None
    rank_mass: float = 0.0
    rows: int = 0
    matched: list[str] = field(default_factory=list)  # row keys of its best hits, for `why`
    # The share of the candidates its ranking came from: a ranking over few products says less.
    share: float = 1.0
    calibration: tuple[float, float] | None = None  # mean and spread of its row-to-row similarity

    def z(self) -> float | None:
        """How far its best row stands above its typical row-to-row similarity, in deviations."""
        if self.best_row is None or self.calibration is None:
            return None
        mean, std = self.calibration
        return (self.best_row - mean) / max(std, 1e-6)


@dataclass(frozen=True)
class Route:
    """A product to ask, its score and a human-readable reason."""

    product: str
    score: float
    why: str
    named: bool = False


@dataclass(frozen=True)
class Selection:
    """The routes of one question, and whether the evidence is too weak to trust."""

    routes: list[Route]
    ranked: list[Route]  # every candidate, best first (what was not asked, too)
    low_confidence: bool
    reason: str | None


def add_row_hit(
    evidence: Evidence, rank: int, similarity: float | None, key: object, policy: RoutingPolicy = POLICY
) -> None:
    """Fold one row hit of the fused routing ranking (rank from 0) into a product's evidence."""
    evidence.rows += 1
    evidence.rank_mass += 1.0 / (policy.rrf_k + rank + 1)
    if similarity is not None and (evidence.best_row is None or similarity > evidence.best_row):
        evidence.best_row = similarity
    if len(evidence.matched) < 3:
        evidence.matched.append(str(key))


def score(evidence: Evidence, policy: RoutingPolicy = POLICY) -> float:
    """One number per product: the best of its row and card evidence, plus a share of its rank mass."""
    row = evidence.best_row or 0.0
    card = (evidence.card or 0.0) * policy.card_weight
    return round(max(row, card) + policy.mass_weight * min(evidence.rank_mass, 1.0) * evidence.share, 6)


def why(evidence: Evidence) -> str:
    """The evidence in words."""
    parts = []
    if evidence.best_row is not None:
        rows = f"{evidence.rows} matching row{'s' if evidence.rows != 1 else ''}"
        parts.append(f"{rows} (best similarity {evidence.best_row:.2f}; e.g. {', '.join(evidence.matched)})")
    if evidence.card is not None:
        parts.append(f"description similarity {evidence.card:.2f}")
    return "; ".join(parts) or "no matching row or description"


def select(
    evidence: Sequence[Evidence],
    *,
    max_products: int,
    named: Sequence[str] = (),
    policy: RoutingPolicy = POLICY,
) -> Selection:
    """The products to ask: every named one, else the best and those close to it (never none)."""
    ranked = sorted(
        (Route(e.product, score(e, policy), why(e), e.product in named) for e in evidence),
        key=lambda r: (-r.score, r.product),
    )
    if not ranked:
        return Selection([], [], True, "no product you may read can answer questions")
    if named:
        chosen = [r for r in ranked if r.named][:max_products]
        return Selection(chosen, ranked, False, None)
    best = ranked[0].score
    by_product = {e.product: e for e in evidence}
    strongest = max((z for e in by_product.values() if (z := e.z()) is not None), default=None)
    low = strongest is None or strongest < policy.confident_z
    reason = None
    if low:
        how = "no row matches" if strongest is None else f"the best row is {strongest:.1f} deviations above typical"
        reason = f"{how} (a confident match is {policy.confident_z:g}): no product clearly holds the answer"
    keep = policy.low_confidence_products if low else 1
    chosen = [r for i, r in enumerate(ranked) if i < keep or r.score >= best * policy.keep_ratio][:max_products]
    if not low and len(ranked) > len(chosen) and best - ranked[len(chosen)].score < policy.margin:
        reason = f"{ranked[0].product} and {ranked[len(chosen)].product} match almost equally well"
        low = True
    return Selection(chosen, ranked, low, reason)
