"""Routing on evidence and merging on scores: the pure decisions, on hand-made evidence."""

from __future__ import annotations

import pytest

from datamesh.core.calibration import Scale, model_scales
from datamesh.core.merge import Candidate, merge, relevance
from datamesh.core.routing import Evidence, RoutingPolicy, add_row_hit, score, select


def evidence(product: str, best_row: float | None, card: float | None = None, typical: float = 0.1) -> Evidence:
    found = Evidence(product, card=card, calibration=(typical, 0.1))
    if best_row is not None:
        add_row_hit(found, best_row, "k1")
    return found


def test_a_row_or_the_description_is_evidence_whichever_is_stronger() -> None:
    policy = RoutingPolicy(card_weight=1.2)
    assert score(evidence("a", 0.62, card=0.30), policy) == 0.62
    assert score(evidence("b", 0.40, card=0.50), policy) == 0.6  # "where do we track X?" matches the description
    assert score(evidence("c", None, card=None), policy) == 0.0


def test_the_best_products_are_asked_and_never_none() -> None:
    ranked = [evidence("x/strong", 0.70), evidence("x/close", 0.60), evidence("x/far", 0.20), evidence("x/none", None)]
    chosen = select(ranked, max_products=10, policy=RoutingPolicy(min_products=1, keep_ratio=0.8))
    assert [r.product for r in chosen.routes] == ["x/strong", "x/close"]
    assert not chosen.low_confidence and chosen.reason is None
    assert [r.product for r in chosen.ranked] == ["x/strong", "x/close", "x/far", "x/none"]
    at_least = select(ranked, max_products=10, policy=RoutingPolicy(min_products=3, keep_ratio=0.8))
    assert [r.product for r in at_least.routes] == ["x/strong", "x/close", "x/far"]
    capped = select(ranked, max_products=1, policy=RoutingPolicy(min_products=3))
    assert [r.product for r in capped.routes] == ["x/strong"]


@pytest.mark.parametrize(
    "found",
    [
        {},  # nothing matched: the first products by name are still asked
        {"m/p040": (0.7, None)},  # one strong product among many with no evidence
        {"m/p003": (0.30, 0.25), "m/p077": (0.29, None), "m/p150": (None, 0.26)},  # close ones: ambiguous
        {"m/p010": (-0.2, -0.3), "m/p011": (-0.1, None)},  # negative similarities rank below zero
    ],
)
@pytest.mark.parametrize("named", [(), ("m/p120", "m/p040")])
def test_candidates_without_evidence_are_weighed_at_zero_as_if_each_had_an_empty_evidence(
    found: dict[str, tuple[float | None, float | None]], named: tuple[str, ...]
) -> None:
    products = [f"m/p{i:03d}" for i in range(200)]
    hits = [evidence(p, row, card=card) for p, (row, card) in found.items()]
    one_by_one = select([*hits, *(Evidence(p) for p in products if p not in found)], max_products=5, named=named)
    at_zero = select(hits, max_products=5, named=named, others=products)
    assert [(r.product, r.score) for r in at_zero.routes] == [(r.product, r.score) for r in one_by_one.routes]
    assert (at_zero.low_confidence, at_zero.reason) == (one_by_one.low_confidence, one_by_one.reason)
    assert len(at_zero.ranked) < len(one_by_one.ranked) == len(products), "the others are not each weighed"


def test_weak_evidence_is_answered_and_flagged_low_confidence() -> None:
    weak = [evidence("w/a", 0.18, typical=0.1), evidence("w/b", 0.15, typical=0.1)]
    chosen = select(weak, max_products=10)
    assert chosen.routes and chosen.low_confidence
    assert "0.8 deviations above typical" in (chosen.reason or "")
    nothing = select([evidence("n/a", None), evidence("n/b", None)], max_products=10)
    assert nothing.routes and nothing.low_confidence and "no row matches" in (nothing.reason or "")


def test_named_products_are_asked_whatever_their_evidence() -> None:
    ranked = [evidence("n/good", 0.8), evidence("n/poor", 0.05)]
    chosen = select(ranked, max_products=10, named=["n/poor"])
    assert [(r.product, r.named) for r in chosen.routes] == [("n/poor", True)]


def test_merging_is_on_scores_weighed_by_routing_not_interleaving() -> None:
    results = {
        "p/a": [Candidate("p/a", "a1", 0, 0.80), Candidate("p/a", "a2", 1, 0.75)],
        "p/b": [Candidate("p/b", "b1", 0, 0.60)],
    }
    merged = merge(results, {"p/a": 0.8, "p/b": 0.8}, {}, limit=3)
    assert [m.key for m in merged] == ["a1", "a2", "b1"], "a product's second hit outranks another's first"
    weighed = merge(results, {"p/a": 0.3, "p/b": 0.8}, {}, limit=3)
    assert [m.key for m in weighed] == ["b1", "a1", "a2"], "a product the question barely matched ranks lower"


def test_different_models_are_put_on_one_scale_before_routing_and_merging() -> None:
    # A lexical model scores paraphrases low for every row; the semantic one (used by most products) high.
    scales = model_scales(
        {
            "p/s1": ("semantic", (0.30, 0.10)),
            "p/s2": ("semantic", (0.20, 0.10)),
            "p/lex": ("lexical", (0.05, 0.02)),
        }
    )
    assert scales["semantic"] == Scale(), "the main model's similarities stay what they are"
    lexical = scales["lexical"]
    assert lexical(0.09) == pytest.approx(
        0.25 + 2 * 0.10
    )  # two deviations above its typical: the same on the main scale
    strong_lexical = Candidate("p/lex", "l1", 0, 0.09)
    semantic = Candidate("p/s1", "s1", 0, 0.40)
    assert relevance(strong_lexical) < relevance(semantic) < relevance(strong_lexical, lexical)
    merged = merge(
        {"p/lex": [strong_lexical], "p/s1": [semantic]}, {"p/lex": 1.0, "p/s1": 1.0}, {"p/lex": lexical}, limit=2
    )
    assert [m.key for m in merged] == ["l1", "s1"]
    routed = select(
        [
            Evidence("p/lex", best_row=0.09, scale=lexical, calibration=(0.05, 0.02)),
            Evidence("p/s1", best_row=0.40, calibration=(0.30, 0.10)),
        ],
        max_products=1,
    )
    assert [r.product for r in routed.routes] == ["p/lex"]
