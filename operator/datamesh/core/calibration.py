"""Putting the similarities of different embedding models on one scale.

A cosine from one model is not a cosine from another: a lexical model scores paraphrases at 0.15
where a semantic one scores them at 0.6. Each product records how similar its rows typically are
to each other (mean and spread, measured at ingestion); averaged per model, that says where the
model's scale sits. The model most products use is the reference; every other model's
similarities are mapped linearly onto it (same z-score, reference units), so same-model scores
stay exactly what they were and mixed ones compare.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """A linear map of one model's similarities onto the reference model's scale."""

    slope: float = 1.0
    offset: float = 0.0

    def __call__(self, similarity: float) -> float:
        return self.slope * similarity + self.offset


IDENTITY = Scale()


def model_scales(
    products: Mapping[str, tuple[Hashable, tuple[float, float] | None]],
) -> dict[Hashable, Scale]:
    """A scale per model, from each product's (model, calibration); the most used model is the reference."""
    stats: dict[Hashable, list[tuple[float, float]]] = {}
    users: dict[Hashable, int] = {}
    for model, calibration in products.values():
        users[model] = users.get(model, 0) + 1
        if calibration is not None:
            stats.setdefault(model, []).append(calibration)
    if len(users) < 2:
        return dict.fromkeys(users, IDENTITY)
    averaged = {
        model: (sum(m for m, _ in rows) / len(rows), sum(s for _, s in rows) / len(rows))
        for model, rows in stats.items()
    }
    reference = max(users, key=lambda m: (users[m], m in averaged, str(m)))
    if reference not in averaged:
        return dict.fromkeys(users, IDENTITY)
    ref_mean, ref_std = averaged[reference]
    scales: dict[Hashable, Scale] = {}
    for model in users:
        if model == reference or model not in averaged:
            scales[model] = IDENTITY
            continue
        mean, std = averaged[model]
        slope = ref_std / max(std, 1e-6)
        scales[model] = Scale(slope, ref_mean - mean * slope)
    return scales
