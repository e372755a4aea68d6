"""The state machine: the one table of allowed transitions and the functions that apply them.

Every function returns a new Task with `sequence` advanced by one, so watchers can order
and resume events by sequence number alone. Callers persist the result before publishing it.
"""

from __future__ import annotations

from .errors import InvalidTransitionError
from .task import (
    ChatOutput,
    EndedAttempt,
    Task,
    TaskError,
    TaskOutput,
    TaskState,
    Usage,
    chat_text,
)

Q, R, S, F, C = (
    TaskState.QUEUED,
    TaskState.RUNNING,
    TaskState.SUCCEEDED,
    TaskState.FAILED,
    TaskState.CANCELLED,
)

ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    # Claimed by the dispatcher; cancelled by its client; past its deadline before it ran.
    Q: frozenset({R, C, F}),
    # Finished; or back to the queue for a retry or after its router died.
    R: frozenset({S, F, C, Q}),
    S: frozenset(),
    F: frozenset(),
    C: frozenset(),
}


def can_transition(current: TaskState, to: TaskState) -> bool:
    return to in ALLOWED[current]


def _move(task: Task, to: TaskState, **changes: object) -> Task:
    if not can_transition(task.state, to):
        raise InvalidTransitionError(
            f"task {task.id} cannot go from {task.state.value} to {to.value}"
        )
    return task.evolve(state=to, sequence=task.sequence + 1, **changes)


def start(task: Task, backend: str, now: float) -> Task:
    """QUEUED → RUNNING on `backend`: a new attempt begins with no output yet."""
    return _move(
        task,
        R,
        backend=backend,
        attempt=task.attempt + 1,
        started_at=now,
        output=None,
        not_before=0.0,
    )


def _history(
    task: Task, outcome: TaskState, error: TaskError | None, now: float
) -> tuple[EndedAttempt, ...]:
    """The task's attempts, with the running one added as ended now (if one runs)."""
    if task.state is not R:
        return task.attempts
    started_at = task.started_at if task.started_at is not None else now
    ended = EndedAttempt(task.attempt, task.backend, started_at, now, outcome, error)
    return (*task.attempts, ended)


def succeed(task: Task, output: TaskOutput, usage: Usage | None, now: float) -> Task:
    attempts = _history(task, S, None, now)
    return _move(task, S, output=output, usage=usage, error=None, ended_at=now, attempts=attempts)


def fail(task: Task, error: TaskError, now: float) -> Task:
    return _move(task, F, error=error, ended_at=now, attempts=_history(task, F, error, now))


def cancel(task: Task, now: float) -> Task:
    error = TaskError("CANCELLED", "cancelled by the client")
    return _move(task, C, error=error, ended_at=now, attempts=_history(task, C, None, now))


def requeue(task: Task, error: TaskError | None, not_before: float, now: float) -> Task:
    """RUNNING → QUEUED: the attempt failed retryably or its process went away."""
    attempts = _history(task, Q, error, now)
    return _move(task, Q, error=error, output=None, not_before=not_before, attempts=attempts)


def append_output(task: Task, text: str) -> Task:
    """Chat text produced while RUNNING: not a state change, but it takes a sequence number."""
    if task.state is not R:
        raise InvalidTransitionError(f"task {task.id} is {task.state.value}, not RUNNING")
    return task.evolve(output=ChatOutput(chat_text(task.output) + text), sequence=task.sequence + 1)
