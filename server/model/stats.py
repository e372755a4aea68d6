"""Task statistics as values: what the Stats RPC reports about a client's tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .task import Priority, TaskState


@dataclass(frozen=True, slots=True)
class StateCount:
    """How many tasks are in one state at one priority."""

    state: TaskState
    priority: Priority
    count: int


@dataclass(frozen=True, slots=True)
class GroupStats:
    """The finished tasks of one type whose last attempt ran on one backend ("" for tasks
    that never ran: cancelled or expired while QUEUED)."""

    task_type: str
    backend: str
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    # Sum of Task.attempt over the finished tasks (mean_attempts divides it).
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # Run time (ended_at - started_at) percentiles of SUCCEEDED and FAILED tasks that ran;
    # None when there were none.
    duration_p50_s: float | None = None
    duration_p90_s: float | None = None
    duration_p99_s: float | None = None
    duration_samples: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def success_rate(self) -> float:
        """succeeded / (succeeded + failed); 0.0 when neither happened. Cancellations are
        the client's choice, not an outcome of the work, so they count on neither side."""
        decided = self.succeeded + self.failed
        return self.succeeded / decided if decided else 0.0

    @property
    def mean_attempts(self) -> float:
        return self.attempts / self.finished if self.finished else 0.0


@dataclass(frozen=True, slots=True)
class TaskStats:
    """What a store computes for one StatsQuery."""

    # QUEUED and RUNNING tasks now, whenever they were created.
    queue_depth: tuple[StateCount, ...]
    # Tasks created within the window, in every state.
    window_counts: tuple[StateCount, ...]
    # Ordered by task type, then backend.
    groups: tuple[GroupStats, ...]
    # Most run times one group's percentiles were computed from (its newest tasks).
    duration_sample_limit: int


@dataclass(frozen=True, slots=True)
class StatsReport:
    """TaskStats with the scope and window they cover."""

    # Whose tasks were counted; "" for every client's (an admin caller).
    client_id: str
    window_s: float
    computed_at: float
    stats: TaskStats


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank percentile of `ordered` (ascending, not empty): the smallest value
    with at least p% of the values at or below it, so always a value that was observed.

    Example: for [1, 2, 3, 4] p50 is 2 (rank ceil(0.5 * 4) = 2) and p99 is 4.
    """
    if not ordered:
        raise ValueError("percentile of no values")
    # p * n first: 0.29 * 100 is 28.999..., 29 * 100 / 100 is 29.
    rank = max(1, math.ceil(p * len(ordered) / 100))
    return ordered[rank - 1]
