"""Retry policies: how many attempts a task gets and how long it waits between them, per
task type. Backoff is exponential with full jitter (AWS Architecture Blog, "Exponential
Backoff and Jitter"), so retries of many tasks that failed together spread out instead of
colliding. Only retryable errors are retried at all (TaskError.retryable, set where an
error is classified); a policy only says how.

    initial 0.2 s, factor 2, max 10 s: the wait after attempt n is uniform in
    [0, min(10, 0.2 * 2^(n-1))] — up to 0.2 s, 0.4 s, 0.8 s, ... then up to 10 s.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

# The most attempts a task may have, retries included (TaskLimits.max_attempts).
MAX_ATTEMPTS = 10
DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    factor: float = 2.0
    # Attempts of a task that asks for none (TaskSpec.max_attempts 0); a task may ask for
    # more or fewer, up to MAX_ATTEMPTS.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be between 1 and {MAX_ATTEMPTS}")

    def backoff_s(self, failed_attempt: int, rng: random.Random) -> float:
        """Delay before the attempt after `failed_attempt` (1-based): uniform in [0, cap]."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.factor ** (failed_attempt - 1))
        return rng.uniform(0.0, cap)


@dataclass(frozen=True, slots=True)
class RetryPolicies:
    """The policy of each task type: its own if configured, else the default."""

    default: RetryPolicy = field(default_factory=RetryPolicy)
    by_type: Mapping[str, RetryPolicy] = field(default_factory=dict)

    def for_type(self, task_type: str) -> RetryPolicy:
        return self.by_type.get(task_type, self.default)
