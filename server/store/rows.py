"""A task as one row of a store's `tasks` table, and back: the same columns, in the same
order, in both stores (the spec, output, error and usage as codec's JSON text)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from server.model.aging import dispatch_order
from server.model.task import Task, TaskState

from . import codec
from .base import ListPage

# The columns every read selects, after the row's pk.
COLUMNS = (
    "id, client_id, type, state, priority, spec, sequence, attempt, backend, output, error,"
    " usage, created_at, started_at, ended_at, deadline, not_before, idempotency_key, attempts"
)
# An insert's: `owner` too, the replica whose dispatcher runs a RUNNING task (NULL in any
# other state). When that replica is gone, its tasks are orphans for another to re-queue.
INSERT_COLUMNS = f"{COLUMNS}, owner"
INSERT_COUNT = INSERT_COLUMNS.count(",") + 1
# An update's SET list, in update_params' order; its WHERE takes the id and the expected
# sequence (the optimistic check).
UPDATE_SET = (
    "state={}, sequence={}, attempt={}, backend={}, output={}, error={}, usage={},"
    " started_at={}, ended_at={}, not_before={}, owner={}, attempts={}"
)
UPDATE_SET_COUNT = UPDATE_SET.count("{}")


def owner_of(task: Task, replica: str) -> str | None:
    return replica if task.state is TaskState.RUNNING else None


def to_row(task: Task, replica: str) -> tuple[Any, ...]:
    """The values of INSERT_COLUMNS, written by `replica`."""
    return (
        task.id,
        task.client_id,
        task.spec.type,
        task.state.value,
        int(task.spec.priority),
        codec.encode_spec(task.spec),
        task.sequence,
        task.attempt,
        task.backend,
        codec.encode_output(task.output),
        codec.encode_error(task.error),
        codec.encode_usage(task.usage),
        task.created_at,
        task.started_at,
        task.ended_at,
        task.deadline,
        task.not_before,
        task.spec.idempotency_key or None,
        codec.encode_attempts(task.attempts),
        owner_of(task, replica),
    )


def update_params(task: Task, expected_sequence: int, replica: str) -> tuple[Any, ...]:
    """The values of UPDATE_SET, then the id and expected sequence of its WHERE."""
    return (
        task.state.value,
        task.sequence,
        task.attempt,
        task.backend,
        codec.encode_output(task.output),
        codec.encode_error(task.error),
        codec.encode_usage(task.usage),
        task.started_at,
        task.ended_at,
        task.not_before,
        owner_of(task, replica),
        codec.encode_attempts(task.attempts),
        task.id,
        expected_sequence,
    )


# Where a row (as SELECT reads it: pk first, then COLUMNS) holds what ranking needs.
_PRIORITY, _CREATED_AT = 5, 13


def in_dispatch_order(rows: Iterable[Any], now: float, aging_s: float, limit: int) -> list[Task]:
    """The first `limit` of `rows` in dispatch order (model/aging.py), as tasks. Ranking needs
    only two columns: the rows not taken are never decoded."""
    ranked = sorted(
        rows, key=lambda row: dispatch_order(row[_PRIORITY], row[_CREATED_AT], now, aging_s)
    )
    return [from_row(row) for row in ranked[:limit]]


def from_row(row: Iterable[Any]) -> Task:
    (_pk, id_, client_id, _type, state, _prio, spec, sequence, attempt, backend, output,
     error, usage, created_at, started_at, ended_at, deadline, not_before, _key,
     attempts) = row  # fmt: skip
    return Task(
        id=id_,
        client_id=client_id,
        spec=codec.decode_spec(spec),
        state=TaskState(state),
        created_at=created_at,
        deadline=deadline,
        sequence=sequence,
        attempt=attempt,
        backend=backend,
        output=codec.decode_output(output),
        error=codec.decode_error(error),
        usage=codec.decode_usage(usage),
        started_at=started_at,
        ended_at=ended_at,
        not_before=not_before,
        attempts=codec.decode_attempts(attempts),
    )


def page_of_rows(rows: Sequence[Any], limit: int) -> ListPage:
    """The page of `limit` tasks from rows read with one more, whose first column is the
    cursor (pk): the extra row tells whether another page exists."""
    page = rows[:limit]
    return ListPage([from_row(r) for r in page], [r[0] for r in page], len(rows) > limit)
