"""Statistics from the rows of a store's three Stats queries (both stores run the same
queries in their own SQL dialect, in one snapshot)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from server.model.stats import GroupStats, StateCount, TaskStats, percentile
from server.model.task import Priority, TaskState

from .base import StatsQuery

Row = Sequence[Any]

# Run times of the newest finished runs per group, at most {limit} (the placeholder of the
# store's dialect) each: the database sorts, Python gets a bounded list. Cancelled runs are
# left out (the client cut them short). The same SQL in both stores.
STATS_DURATIONS = (
    "SELECT type, backend, duration FROM ("
    " SELECT type, backend, ended_at - started_at AS duration, ROW_NUMBER() OVER ("
    "  PARTITION BY type, backend ORDER BY created_at DESC, pk DESC) AS newest"
    " FROM tasks WHERE state IN ('SUCCEEDED', 'FAILED') AND started_at IS NOT NULL"
    " AND {where}) AS runs WHERE newest <= {limit}"
)


def assemble_stats(
    query: StatsQuery,
    queue_rows: Iterable[Row],
    window_rows: Iterable[Row],
    duration_rows: Iterable[Row],
) -> TaskStats:
    """`queue_rows`: (state, priority, count) of the unfinished tasks. `window_rows`: (type,
    backend, state, priority, count, attempts, input tokens, output tokens, cost) of the
    tasks created in the window. `duration_rows`: (type, backend, run time) of the newest
    finished runs, at most `query.duration_sample_limit` per group."""
    groups: dict[tuple[str, str], GroupStats] = {}
    window_counts: dict[tuple[TaskState, Priority], int] = {}
    for (
        task_type,
        backend,
        state_,
        priority,
        count,
        attempts,
        tokens_in,
        tokens_out,
        cost,
    ) in window_rows:
        state = TaskState(state_)
        key = (state, Priority(priority))
        window_counts[key] = window_counts.get(key, 0) + count
        if not state.is_terminal:
            continue
        group = groups.get((task_type, backend)) or GroupStats(task_type, backend)
        outcome = state.value.lower()  # the field of GroupStats: succeeded, failed, cancelled
        groups[task_type, backend] = replace(
            group,
            **{outcome: getattr(group, outcome) + count},
            attempts=group.attempts + attempts,
            input_tokens=group.input_tokens + tokens_in,
            output_tokens=group.output_tokens + tokens_out,
            cost_usd=group.cost_usd + cost,
        )

    durations: dict[tuple[str, str], list[float]] = {}
    for task_type, backend, duration in duration_rows:
        # A wall clock stepped back mid-run would give a negative run time.
        durations.setdefault((task_type, backend), []).append(max(0.0, duration))
    for group_key, values in durations.items():
        values.sort()
        # Every run counted here is a finished task of the same snapshot: its group exists.
        groups[group_key] = replace(
            groups[group_key],
            duration_p50_s=percentile(values, 50),
            duration_p90_s=percentile(values, 90),
            duration_p99_s=percentile(values, 99),
            duration_samples=len(values),
        )

    return TaskStats(
        queue_depth=_state_counts({(TaskState(s), Priority(p)): n for s, p, n in queue_rows}),
        window_counts=_state_counts(window_counts),
        groups=tuple(groups[key] for key in sorted(groups)),
        duration_sample_limit=query.duration_sample_limit,
    )


_STATE_ORDER = {state: i for i, state in enumerate(TaskState)}


def _state_counts(counts: dict[tuple[TaskState, Priority], int]) -> tuple[StateCount, ...]:
    """In the life order of states (QUEUED first), then the highest priority first."""
    ordered = sorted(counts.items(), key=lambda kv: (_STATE_ORDER[kv[0][0]], -kv[0][1]))
    return tuple(StateCount(state, priority, n) for (state, priority), n in ordered if n)
