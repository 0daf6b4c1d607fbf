"""Capped exponential backoff with full jitter (0.5 s doubling to 30 s)."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` is a random delay in [0, min(cap, base * 2**attempt)]; ``reset()`` after a
    successful connect starts again from ``base``."""

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return float(min(self.cap, self.base * 2.0 ** min(self.attempt, 32)))

    def next(self) -> float:
        delay = self._rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
