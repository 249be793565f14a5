"""Retry pauses: capped exponential backoff with full jitter."""

from __future__ import annotations

import random


def backoff_delay(retry: int, base: float, cap: float, *, jitter: bool = True) -> float:
    """The pause before retry number ``retry`` (1, 2, ...): ``base`` doubling up to ``cap``.

    With ``jitter`` the pause is drawn from the upper half, so clients that failed together do
    not retry together.
    """
    delay = min(cap, base * 2 ** max(retry - 1, 0))
    return float(delay * random.uniform(0.5, 1.0) if jitter else delay)
