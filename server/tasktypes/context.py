"""TaskContext: what a custom handler may know about the task it runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from server.clock import Clock, SystemClock
from server.model.task import Task


@dataclass(frozen=True, slots=True)
class TaskContext:
    """Passed as the second argument to a handler that declares one (`async def f(input,
    ctx)`). Handlers that only need their input leave it out.

    task_id    the task's id, for logs and for idempotent writes to other systems
    task_type  the custom type's name, as configured
    attempt    1 for the first execution; higher when a retryable failure is retried
    labels     the labels the client set on the task (read-only)
    deadline   when the task fails with DEADLINE_EXCEEDED, in seconds since the epoch
    """

    task_id: str
    task_type: str
    attempt: int
    labels: Mapping[str, str]
    deadline: float
    clock: Clock = field(default_factory=SystemClock, repr=False, compare=False)

    @classmethod
    def of(cls, task: Task, clock: Clock) -> TaskContext:
        # A read-only copy: a handler must not change the stored task through its labels.
        labels = MappingProxyType(dict(task.spec.labels))
        return cls(task.id, task.spec.type, task.attempt, labels, task.deadline, clock)

    def remaining_s(self) -> float:
        """Seconds left before the deadline (0 when it has passed): e.g. a budget to give
        a model call, or a reason to return a shorter answer than to be cut off."""
        return max(0.0, self.deadline - self.clock.now())
