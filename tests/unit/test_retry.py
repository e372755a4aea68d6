"""Retry backoff: exponential caps with full jitter, seeded for repeatability."""

from __future__ import annotations

import random

import pytest

from server.dispatch.retry import RetryPolicy


def test_backoff_stays_under_an_exponential_cap() -> None:
    """Delay n is uniform in [0, min(max, initial * factor^(n-1))]."""
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=5.0, factor=2.0)
    rng = random.Random(7)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (10, 5.0)]:
        delays = [policy.backoff_s(attempt, rng) for _ in range(200)]
        assert min(delays) >= 0
        assert max(delays) <= cap
        assert max(delays) > cap * 0.8, "full jitter spreads over the whole range"


def test_invalid_policy_is_refused() -> None:
    """A policy that cannot make sense fails at construction, not at the first retry."""
    with pytest.raises(ValueError, match="max_backoff_s"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)
    with pytest.raises(ValueError, match="factor"):
        RetryPolicy(factor=0.5)
