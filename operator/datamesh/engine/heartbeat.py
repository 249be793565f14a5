"""Whether the operator still makes progress: what its liveness probe asks.

An event loop that is blocked outright stops answering the probe by itself. The case this
covers is the quiet one: the loop runs, but reconciles hang (a call that never returns, an
API server or store that stopped answering), so work piles up and nothing finishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Heartbeat:
    """Work in flight and the time of the last progress (a finished piece, or a batch written)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.in_flight = 0
        self._last = clock()

    def beat(self) -> None:
        """Progress was made."""
        self._last = self._clock()

    @contextmanager
    def working(self) -> Iterator[None]:
        """One piece of work: progress when it ends, however it ends."""
        if self.in_flight == 0:
            self.beat()  # after an idle spell, the wait starts now, not at the last progress
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.beat()

    def stalled_for(self) -> float | None:
        """Seconds since the last progress while work is in flight; None when idle."""
        return self._clock() - self._last if self.in_flight else None

    def stall(self, limit: float) -> str | None:
        """Why the operator counts as stuck (no progress for over ``limit`` seconds with work in flight), or None."""
        stalled = self.stalled_for()
        if stalled is None or stalled <= limit:
            return None
        return f"no reconcile finished for {stalled:.0f} s while {self.in_flight} are in flight (limit {limit:g} s)"
