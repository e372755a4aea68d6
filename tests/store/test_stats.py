"""TaskStore.stats: the store's own aggregation over a window of tasks (real SQLite files)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from server.app import open_store
from server.config import StoreSettings
from server.model.stats import GroupStats, StateCount
from server.model.task import CustomInput, Priority, Task, TaskSpec, TaskState, Usage
from server.store.base import StatsQuery, TaskStore
from server.store.sqlite import SCHEMA_VERSION
from tests.conftest import StoreUrl

StoreFactory = Callable[[], TaskStore]
T0 = 10_000.0  # the window starts here in most tests


@pytest.fixture
def make_store(store_url: StoreUrl, tmp_path: Path) -> StoreFactory:
    """A factory reopening the same underlying database each call (SQLite or PostgreSQL)."""
    path = tmp_path / "stats.db"
    return lambda: open_store(StoreSettings(url=store_url(path)))


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[TaskStore]:
    opened = make_store()
    await opened.start()
    yield opened
    await opened.close()


def task(
    n: int,
    state: TaskState = TaskState.SUCCEEDED,
    *,
    task_type: str = "chat",
    backend: str = "b1",
    created_at: float = T0 + 100,
    run_s: float | None = 1.0,
    priority: Priority = Priority.NORMAL,
    **changes: object,
) -> Task:
    """Task n as the dispatcher would have left it: a finished one ran `run_s` seconds
    (None: never ran) on `backend`, starting 10 s after it was created."""
    ran = run_s is not None and state is not TaskState.QUEUED
    started = created_at + 10 if ran else None
    value = Task(
        id=f"t{n:04d}",
        client_id="client-a",
        spec=TaskSpec(type=task_type, input=CustomInput({"n": n}), priority=priority),
        state=state,
        created_at=created_at,
        deadline=created_at + 10_000,
        attempt=1 if ran else 0,
        backend=backend if ran else "",
        started_at=started,
        ended_at=started + run_s if started is not None and run_s is not None else None,
    )
    if state.is_terminal and value.ended_at is None:
        value = replace(value, ended_at=created_at + 5)
    return replace(value, **changes)  # type: ignore[arg-type]


async def create_all(store: TaskStore, *tasks: Task) -> None:
    for value in tasks:
        assert (await store.create(value))[1]


def by_group(groups: tuple[GroupStats, ...]) -> dict[tuple[str, str], GroupStats]:
    return {(g.task_type, g.backend): g for g in groups}


async def test_stats_sum_counts_usage_and_nearest_rank_percentiles(store: TaskStore) -> None:
    """Per (type, backend): outcomes, attempts, tokens and cost summed; run-time
    percentiles by nearest rank over SUCCEEDED and FAILED runs (cancelled ones left out)."""
    usage = Usage(10, 20, 0.125)
    succeeded = [task(n, run_s=float(n), usage=usage) for n in range(1, 11)]  # 1..10 s
    failed = [
        task(11, TaskState.FAILED, run_s=20.0, attempt=3),
        task(12, TaskState.FAILED, run_s=30.0, attempt=2),
    ]
    cancelled_mid_run = task(13, TaskState.CANCELLED, run_s=99.0)
    other_backend = task(14, backend="b2", run_s=0.5, usage=Usage(1, 1, 0.0))
    embed = task(15, task_type="embed", run_s=2.0, usage=Usage(7, 0, 0.01))
    await create_all(store, *succeeded, *failed, cancelled_mid_run, other_backend, embed)

    stats = await store.stats(StatsQuery("client-a", created_after=T0))

    groups = by_group(stats.groups)
    assert list(groups) == [("chat", "b1"), ("chat", "b2"), ("embed", "b1")]
    chat = groups["chat", "b1"]
    assert (chat.succeeded, chat.failed, chat.cancelled, chat.finished) == (10, 2, 1, 13)
    assert chat.success_rate == 10 / 12
    assert chat.attempts == 10 + 3 + 2 + 1
    assert chat.mean_attempts == 16 / 13
    assert (chat.input_tokens, chat.output_tokens) == (100, 200)
    assert chat.cost_usd == pytest.approx(1.25)
    # Twelve run times [1..10, 20, 30]: ranks ceil(.5*12)=6, ceil(.9*12)=11, ceil(.99*12)=12.
    assert chat.duration_samples == 12
    assert (chat.duration_p50_s, chat.duration_p90_s, chat.duration_p99_s) == (6.0, 20.0, 30.0)
    assert groups["chat", "b2"].duration_p50_s == 0.5
    assert groups["embed", "b1"] == GroupStats(
        "embed", "b1", succeeded=1, attempts=1, input_tokens=7, cost_usd=0.01,
        duration_p50_s=2.0, duration_p90_s=2.0, duration_p99_s=2.0, duration_samples=1,
    )  # fmt: skip
    assert stats.window_counts == (
        StateCount(TaskState.SUCCEEDED, Priority.NORMAL, 12),
        StateCount(TaskState.FAILED, Priority.NORMAL, 2),
        StateCount(TaskState.CANCELLED, Priority.NORMAL, 1),
    )
    assert stats.queue_depth == ()


async def test_stats_window_starts_at_created_after_but_queue_depth_has_no_age_limit(
    store: TaskStore,
) -> None:
    """Only tasks created at or after the window's start count; unfinished tasks are in the
    queue depth however old, by state and then priority, highest first."""
    await create_all(
        store,
        task(1, created_at=T0 - 0.001),  # just before the window
        task(2, created_at=T0),  # its first instant
        task(3, TaskState.QUEUED, created_at=T0 - 5000, priority=Priority.LOW),
        task(4, TaskState.QUEUED, priority=Priority.URGENT),
        task(5, TaskState.QUEUED, priority=Priority.LOW),
        task(6, TaskState.RUNNING, run_s=None, started_at=T0 + 110, attempt=1, backend="b1"),
    )
    stats = await store.stats(StatsQuery("client-a", created_after=T0))
    assert [(g.task_type, g.finished) for g in stats.groups] == [("chat", 1)]
    assert stats.queue_depth == (
        StateCount(TaskState.QUEUED, Priority.URGENT, 1),
        StateCount(TaskState.QUEUED, Priority.LOW, 2),
        StateCount(TaskState.RUNNING, Priority.NORMAL, 1),
    )
    assert stats.window_counts == (
        StateCount(TaskState.QUEUED, Priority.URGENT, 1),
        StateCount(TaskState.QUEUED, Priority.LOW, 1),
        StateCount(TaskState.RUNNING, Priority.NORMAL, 1),
        StateCount(TaskState.SUCCEEDED, Priority.NORMAL, 1),
    )


async def test_stats_scope_by_client_and_type(store: TaskStore) -> None:
    """A client sees only its own tasks; client_id None (an admin, later) sees everyone's;
    `types` narrows every figure."""
    await create_all(
        store,
        task(1),
        task(2, task_type="embed"),
        task(3, client_id="client-b"),
        task(4, TaskState.QUEUED, client_id="client-b"),
        task(5, TaskState.QUEUED, task_type="embed"),
    )
    mine = await store.stats(StatsQuery("client-a", created_after=T0))
    assert [(g.task_type, g.finished) for g in mine.groups] == [("chat", 1), ("embed", 1)]
    assert sum(c.count for c in mine.queue_depth) == 1
    everyone = await store.stats(StatsQuery(None, created_after=T0))
    assert [(g.task_type, g.finished) for g in everyone.groups] == [("chat", 2), ("embed", 1)]
    assert sum(c.count for c in everyone.queue_depth) == 2
    chat_only = await store.stats(StatsQuery("client-a", T0, types=frozenset({"chat"})))
    assert [(g.task_type, g.finished) for g in chat_only.groups] == [("chat", 1)]
    assert chat_only.queue_depth == ()
    assert await store.stats(StatsQuery("client-c", created_after=T0)) == replace(
        mine, queue_depth=(), window_counts=(), groups=()
    )


async def test_percentiles_come_from_the_newest_runs_up_to_the_limit(store: TaskStore) -> None:
    """With a sample limit of 3, a group's percentiles use its three newest runs and say so;
    its counts still cover every task."""
    # Created in order; the newest three ran 7, 8 and 9 s.
    await create_all(store, *(task(n, created_at=T0 + n, run_s=float(n)) for n in range(10)))
    stats = await store.stats(StatsQuery("client-a", T0, duration_sample_limit=3))
    (chat,) = stats.groups
    assert chat.finished == 10
    assert chat.duration_samples == 3
    assert (chat.duration_p50_s, chat.duration_p99_s) == (8.0, 9.0)
    assert stats.duration_sample_limit == 3


@pytest.mark.sqlite_only  # edits the file's schema
async def test_database_from_before_stats_opens_and_gains_its_index(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    """A file written before Stats existed (no tasks_client_created index) opens, keeps its
    rows and schema version, gets the index, and its tasks are counted."""
    first = make_store()
    await first.start()
    await create_all(first, task(1), task(2, TaskState.FAILED))
    await first.close()
    with sqlite3.connect(tmp_path / "stats.db") as conn:  # the schema as it shipped before
        conn.execute("DROP INDEX tasks_client_created")
    with sqlite3.connect(tmp_path / "stats.db") as conn:
        assert "tasks_client_created" not in {
            r[1] for r in conn.execute("PRAGMA index_list(tasks)")
        }

    reopened = make_store()
    await reopened.start()
    try:
        stats = await reopened.stats(StatsQuery("client-a", created_after=T0))
        assert [(g.succeeded, g.failed) for g in stats.groups] == [(1, 1)]
        assert await reopened.get("t0001") == task(1)
    finally:
        await reopened.close()
    with sqlite3.connect(tmp_path / "stats.db") as conn:
        assert "tasks_client_created" in {r[1] for r in conn.execute("PRAGMA index_list(tasks)")}
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM tasks WHERE client_id=? AND created_at>=?",
            ("client-a", T0),
        ).fetchall()
        assert "tasks_client_created" in str(plan), plan
