"""The domain error tree. The API maps each class to one gRPC status code (api/status.py).

TaskringError
├── InvalidArgumentError       bad input; carries the field violations to fix
├── NotFoundError              no such task (for this client)
├── AlreadyExistsError         an idempotency key reused for a different task
├── FailedPreconditionError    the request is valid but not in the task's current state
├── InvalidTransitionError     a state change the state machine forbids: a bug (INTERNAL)
├── UnavailableError           the service cannot take the request now (shutting down)
├── StoreError                 the store failed; retryable
├── UnauthenticatedError       no API key, or one the server does not know
├── PermissionDeniedError      a valid key that may not do this (an admin's call)
└── RateLimitedError           over a limit of the client's (calls per second, token
                               budget, unfinished tasks); says when to retry
"""

from __future__ import annotations

from dataclasses import dataclass


class TaskringError(Exception):
    """Root of every error the service raises on purpose."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One thing wrong with a request: the field path and what to fix."""

    field: str
    description: str


class InvalidArgumentError(TaskringError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgumentError:
        return cls([FieldViolation(field, description)])


class NotFoundError(TaskringError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} not found")


class AlreadyExistsError(TaskringError):
    pass


class FailedPreconditionError(TaskringError):
    pass


class InvalidTransitionError(TaskringError):
    pass


class UnavailableError(TaskringError):
    pass


class StoreError(TaskringError):
    pass


class UnauthenticatedError(TaskringError):
    pass


class PermissionDeniedError(TaskringError):
    pass


class RateLimitedError(TaskringError):
    """Over one of admission's limits; `limit` names which, for the metrics: "rate" (the
    client's calls per second), "type_rate", "max_queued" or "token_budget"."""

    def __init__(self, message: str, retry_after_s: float, limit: str) -> None:
        self.retry_after_s = retry_after_s
        self.limit = limit
        super().__init__(message)
