"""The Backend protocol: run one attempt of a task and stream its events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from server.model.task import Task, TaskError, TaskOutput, Usage


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Text the task produced so far (a chat reply as it is generated)."""

    text: str


@dataclass(frozen=True, slots=True)
class Completed:
    """The attempt succeeded; the last event of a successful execution."""

    output: TaskOutput
    usage: Usage | None = None


BackendEvent = OutputChunk | Completed


class BackendError(Exception):
    """An attempt failed. `retryable` says whether another attempt (elsewhere) may succeed.

    `backend_fault` says whether the failure is the backend's own (5xx, overload, timeout,
    connection refused, bad credentials): only those count towards its circuit breaker. A
    client's invalid request is not, or a few oversized prompts would open every circuit.
    `retry_after_s` is set when the backend asked for a pause (HTTP 429 Retry-After): the
    router gives it no work until then, without counting a failure."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool,
        backend_fault: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.error = TaskError(code, message, retryable)
        self.backend_fault = backend_fault
        self.retry_after_s = retry_after_s


class Backend(Protocol):
    """A member of the routing ring."""

    @property
    def name(self) -> str: ...

    @property
    def max_concurrency(self) -> int:
        """Attempts this backend runs at once; the dispatcher never exceeds it."""
        ...

    @property
    def task_types(self) -> frozenset[str]: ...

    def execute(self, task: Task) -> AsyncIterator[BackendEvent]:
        """Runs one attempt: yields chunks, ends with Completed, or raises BackendError.

        Cancelling the consuming task cancels the work (the iterator is closed)."""
        ...


class BackendBase:
    """What every Backend implementation carries: its name, how many attempts it runs at
    once, and the task types it runs (a base class; the protocol above is the contract)."""

    def __init__(self, name: str, max_concurrency: int, task_types: frozenset[str]) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._name = name
        self._max_concurrency = max_concurrency
        self._task_types = task_types

    @property
    def name(self) -> str:
        return self._name

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def task_types(self) -> frozenset[str]:
        return self._task_types
