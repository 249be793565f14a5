"""Which products a question goes to, from the evidence of their rows and cards.

The mesh's routing collection (one per embedding model) holds the rows of every product (a
uniform sample of a large product's, so one big product neither dominates it nor doubles its
ingestion) and one card per product. A question is searched there once (hybrid: its embedding
and its words), and each product's evidence is read off the hits: its best row's similarity and
its card's. The products with the strongest evidence are asked; there is no threshold that
empties an answer:
when the evidence is weak the best candidates are still asked and the answer says it is
low-confidence, and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from datamesh.core.calibration import IDENTITY, Scale


@dataclass(frozen=True)
class RoutingPolicy:
    """The constants of routing; set by the quality benchmark (bench/quality.py), not per question."""

    fetch: int = 64  # rows of the routing collection read per question
    # Descriptions read per question: only those near the best can be asked or make it ambiguous.
    cards: int = 32
    # A question matching a product's description is at least as telling as one matching a row:
    # "where do we track X?" is about the product, not about any one of its rows.
    card_weight: float = 1.2
    keep_ratio: float = 0.7  # ask products scoring at least this share of the best one
    keep_row: float = 1.01  # and products whose best row is at least this share of the best row anywhere
    # Asked at least: a question spanning two products still reaches both, and the merge's
    # routing weight keeps a weaker product's rows below a stronger one's.
    min_products: int = 3
    # A best row this many standard deviations above the product's typical row-to-row similarity is
    # a confident match, whatever the model's scale (the product's calibration says what is typical).
    confident_z: float = 2.0
    margin: float = 0.02  # best two products closer than this (and not both asked): ambiguous


POLICY = RoutingPolicy()


@dataclass
class Evidence:
    """What the routing search found for one product."""

    product: str
    best_row: float | None = None
    card: float | None = None
    rows: int = 0
    matched: list[str] = field(default_factory=list)  # row keys of its best hits, for `why`
    calibration: tuple[float, float] | None = None  # mean and spread of its row-to-row similarity
    scale: Scale = IDENTITY  # its model's similarities on the mesh's reference scale

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
    evidence: Evidence = field(repr=False, compare=False)
    named: bool = False

    @property
    def why(self) -> str:
        """The evidence in words (only the routes an answer shows need them)."""
        return describe(self.evidence)


@dataclass(frozen=True)
class Selection:
    """The routes of one question, and whether the evidence is too weak to trust."""

    routes: list[Route]
    # Every candidate with evidence, best first, and the first of the others (at zero) in name order.
    ranked: list[Route]
    low_confidence: bool
    reason: str | None


def add_row_hit(evidence: Evidence, similarity: float | None, key: object) -> None:
    """Fold one row hit of the routing search into a product's evidence."""
    evidence.rows += 1
    if similarity is not None and (evidence.best_row is None or similarity > evidence.best_row):
        evidence.best_row = similarity
    if len(evidence.matched) < 3:
        evidence.matched.append(str(key))


def score(evidence: Evidence, policy: RoutingPolicy = POLICY) -> float:
    """One number per product: the stronger of its best row's and its description's similarity.

    Both on the reference model's scale, so products embedded with different models compare.
    """
    row = evidence.scale(evidence.best_row) if evidence.best_row is not None else 0.0
    card = evidence.scale(evidence.card) * policy.card_weight if evidence.card is not None else 0.0
    return round(max(row, card), 6)


def describe(evidence: Evidence) -> str:
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
    others: Iterable[str] = (),
) -> Selection:
    """The products to ask: every named one, else the best and those close to it (never none).

    ``others``: every candidate's name in name order, for the candidates without evidence; each of
    them scores zero, so only as many as the choice can reach are weighed one by one (with
    thousands of candidates and a few dozen hits, weighing every one was most of the routing).
    """
    wanted_names = set(named)
    weighed = [Route(e.product, score(e, policy), e, e.product in wanted_names) for e in evidence]
    held = {r.product for r in weighed}
    enough = max_products + policy.min_products + 1
    unweighed: list[str] = []
    for product in others:
        if len(unweighed) >= enough:
            break
        if product not in held:
            unweighed.append(product)
    unweighed += [p for p in wanted_names if p not in held and p not in unweighed]
    weighed += [Route(p, 0.0, Evidence(p), p in wanted_names) for p in unweighed]
    ranked = sorted(weighed, key=lambda r: (-r.score, r.product))
    if not ranked:
        return Selection([], [], True, "no product you may read can answer questions")
    if named:
        chosen = [r for r in ranked if r.named][:max_products]
        return Selection(chosen, ranked, False, None)
    best = ranked[0].score
    strongest = max((z for e in evidence if (z := e.z()) is not None), default=None)
    low = strongest is None or strongest < policy.confident_z
    reason = None
    if low:
        how = "no row matches" if strongest is None else f"the best row is {strongest:.1f} deviations above typical"
        reason = f"{how} (a confident match is {policy.confident_z:g}): no product clearly holds the answer"
    rows = {e.product: e.scale(e.best_row) for e in evidence if e.best_row is not None}
    best_row = max(rows.values(), default=None)

    def wanted(i: int, route: Route) -> bool:
        row = rows.get(route.product)
        close_row = best_row is not None and row is not None and row >= best_row * policy.keep_row
        return i < policy.min_products or route.score >= best * policy.keep_ratio or close_row

    chosen = [r for i, r in enumerate(ranked) if wanted(i, r)]
    chosen = chosen[:max_products]
    if not low and len(ranked) > len(chosen) and best - ranked[len(chosen)].score < policy.margin:
        reason = f"{ranked[0].product} and {ranked[len(chosen)].product} match almost equally well"
        low = True
    return Selection(chosen, ranked, low, reason)
