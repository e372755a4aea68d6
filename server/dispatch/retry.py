"""Retry backoff: exponential with full jitter (AWS Architecture Blog, "Exponential Backoff
and Jitter"), so retries of many tasks that failed together spread out instead of colliding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")

    def backoff_s(self, failed_attempt: int, rng: random.Random) -> float:
        """Delay before the attempt after `failed_attempt` (1-based): uniform in [0, cap]."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.factor ** (failed_attempt - 1))
        return rng.uniform(0.0, cap)
