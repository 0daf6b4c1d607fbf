"""Reconnect backoff: full jitter, 0.5 s doubling to a 30 s cap, reset after a connect."""

from __future__ import annotations

import random

from outpost.link.backoff import Backoff


def test_delays_stay_within_the_doubling_ceiling_and_the_cap() -> None:
    backoff = Backoff(rng=random.Random(7))
    ceilings = []
    for _ in range(200):
        ceiling = backoff.ceiling()
        delay = backoff.next()
        assert 0 <= delay <= ceiling <= 30.0
        ceilings.append(ceiling)
    assert ceilings[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert set(ceilings[6:]) == {30.0}


def test_jitter_spreads_delays_over_the_whole_range() -> None:
    rng = random.Random(1)
    delays = []
    for _ in range(500):
        backoff = Backoff(rng=rng)
        backoff.attempt = 10
        delays.append(backoff.next())
    assert min(delays) < 3.0 and max(delays) > 27.0


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff()
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.ceiling() == 0.5
    assert backoff.next() <= 0.5
