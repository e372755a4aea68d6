"""The state machine: every allowed transition works, every other one is refused."""

from __future__ import annotations

import itertools
import random
import uuid

import pytest

from server.model import states
from server.model.errors import InvalidTransitionError
from server.model.ids import UuidV7Factory
from server.model.task import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    EndedAttempt,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
    Usage,
)

SPEC = TaskSpec(type="chat", input=ChatInput("local-echo", (ChatMessage("user", "hi"),)))


def task_in(state: TaskState) -> Task:
    return Task(
        id="t1", client_id="c", spec=SPEC, state=state, created_at=1.0, deadline=100.0, sequence=5
    )


EXPECTED = {
    (TaskState.QUEUED, TaskState.RUNNING),
    (TaskState.QUEUED, TaskState.CANCELLED),
    (TaskState.QUEUED, TaskState.FAILED),
    (TaskState.RUNNING, TaskState.SUCCEEDED),
    (TaskState.RUNNING, TaskState.FAILED),
    (TaskState.RUNNING, TaskState.CANCELLED),
    (TaskState.RUNNING, TaskState.QUEUED),
}


@pytest.mark.parametrize(("current", "to"), list(itertools.product(TaskState, TaskState)))
def test_transition_table_allows_exactly_the_documented_moves(
    current: TaskState, to: TaskState
) -> None:
    """QUEUED→RUNNING|CANCELLED|FAILED, RUNNING→SUCCEEDED|FAILED|CANCELLED|QUEUED, no more."""
    assert states.can_transition(current, to) == ((current, to) in EXPECTED)


def test_terminal_states_have_no_way_out() -> None:
    """SUCCEEDED, FAILED and CANCELLED are final."""
    for state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED):
        assert state.is_terminal
        with pytest.raises(InvalidTransitionError):
            states.cancel(task_in(state), 2.0)
        with pytest.raises(InvalidTransitionError):
            states.start(task_in(state), "b", 2.0)


def test_start_begins_a_new_attempt_on_a_backend() -> None:
    """QUEUED→RUNNING counts the attempt, names the backend and clears old output."""
    started = states.start(task_in(TaskState.QUEUED), "local-1", 3.0)
    assert (started.state, started.attempt, started.backend, started.started_at) == (
        TaskState.RUNNING,
        1,
        "local-1",
        3.0,
    )
    assert started.sequence == 6


def test_every_change_advances_the_sequence_by_one() -> None:
    """Watchers order and resume by sequence: each change takes the next number."""
    task = states.start(task_in(TaskState.QUEUED), "b", 1.0)
    task = states.append_output(task, "Hel")
    task = states.append_output(task, "lo")
    assert task.output == ChatOutput("Hello")
    done = states.succeed(task, ChatOutput("Hello", "stop"), Usage(1, 2), 2.0)
    assert [task.sequence, done.sequence] == [8, 9]
    assert done.ended_at == 2.0


def test_requeue_keeps_the_error_and_waits_for_backoff() -> None:
    """A retry goes back to QUEUED with the failed attempt's error and a not-before time."""
    running = states.start(task_in(TaskState.QUEUED), "b", 1.0)
    error = TaskError("BACKEND_ERROR", "overloaded", retryable=True)
    queued = states.requeue(running, error, not_before=4.0, now=2.0)
    assert (queued.state, queued.error, queued.not_before, queued.attempt) == (
        TaskState.QUEUED,
        error,
        4.0,
        1,
    )
    again = states.start(queued, "c", 5.0)
    assert again.attempt == 2
    assert again.not_before == 0.0


def test_each_ended_attempt_is_kept_with_its_backend_times_and_error() -> None:
    """Every way an attempt ends adds it to the history; ending a task that never ran
    (cancelled or past its deadline while QUEUED) adds none."""
    error = TaskError("BACKEND_ERROR", "overloaded", retryable=True)
    first = states.requeue(states.start(task_in(TaskState.QUEUED), "b", 1.0), error, 4.0, 2.0)
    second = states.start(first, "c", 5.0)
    done = states.succeed(second, ChatOutput("hi"), None, 6.0)
    assert done.attempts == (
        EndedAttempt(1, "b", 1.0, 2.0, TaskState.QUEUED, error),
        EndedAttempt(2, "c", 5.0, 6.0, TaskState.SUCCEEDED, None),
    )
    bad = TaskError("INVALID_INPUT", "no")
    failed = states.fail(states.start(first, "d", 7.0), bad, 8.0)
    assert failed.attempts[-1] == EndedAttempt(2, "d", 7.0, 8.0, TaskState.FAILED, bad)
    cancelled = states.cancel(states.start(first, "e", 9.0), 10.0)
    assert cancelled.attempts[-1] == EndedAttempt(2, "e", 9.0, 10.0, TaskState.CANCELLED)
    assert states.cancel(first, 11.0).attempts == first.attempts
    assert states.fail(first, bad, 11.0).attempts == first.attempts


def test_output_only_while_running() -> None:
    """Output deltas outside RUNNING are a bug, refused loudly."""
    with pytest.raises(InvalidTransitionError):
        states.append_output(task_in(TaskState.QUEUED), "x")


def test_task_ids_are_unique_time_ordered_uuid7() -> None:
    """Ids are valid UUIDv7 strings, distinct, and sort by creation time."""
    ticks = iter(range(1_700_000_000_000, 1_700_000_001_000))
    new_id = UuidV7Factory(random.Random(1), clock_ms=lambda: next(ticks))
    ids = [new_id() for _ in range(500)]
    assert len(set(ids)) == 500
    assert ids == sorted(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
