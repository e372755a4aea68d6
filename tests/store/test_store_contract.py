"""The TaskStore contract, run against every store implementation (real files)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from server.app import open_store
from server.config import StoreSettings
from server.model import states
from server.model.errors import StoreError
from server.model.task import (
    ChatInput,
    ChatMessage,
    CustomInput,
    CustomOutput,
    EmbedInput,
    EmbedOutput,
    Priority,
    Task,
    TaskError,
    TaskSpec,
    TaskState,
    Usage,
)
from server.store.base import ListQuery, TaskStore, Unfinished
from server.store.postgres import PostgresTaskStore
from server.store.sqlite import SqliteTaskStore
from tests.conftest import StoreUrl

StoreFactory = Callable[[], TaskStore]


@pytest.fixture
def make_store(store_url: StoreUrl, tmp_path: Path) -> StoreFactory:
    """A factory reopening the same underlying database each call (SQLite or PostgreSQL)."""
    path = tmp_path / "contract.db"
    return lambda: open_store(StoreSettings(url=store_url(path)))


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[TaskStore]:
    opened = make_store()
    await opened.start()
    yield opened
    await opened.close()


def new_task(n: int, **changes: object) -> Task:
    spec = TaskSpec(
        type="chat",
        input=ChatInput(
            "local-echo",
            (ChatMessage("system", "be brief"), ChatMessage("user", f"q{n}")),
            0.5,
            10,
            None,
            ("\n",),
        ),
        routing_key=f"r{n}",
        labels={"team": "a"},
    )
    task = Task(
        id=f"task-{n:04d}",
        client_id="client-a",
        spec=spec,
        state=TaskState.QUEUED,
        created_at=1000.0 + n,
        deadline=5000.0 + n,
    )
    return replace(task, **changes)  # type: ignore[arg-type]


async def test_created_task_reads_back_equal(store: TaskStore) -> None:
    """Every field survives the round trip, for chat, embed and custom tasks."""
    chat = new_task(1)
    embed = replace(
        new_task(2), spec=TaskSpec(type="embed", input=EmbedInput("local-hash", ("a", "b")))
    )
    custom = replace(
        new_task(3),
        spec=TaskSpec(
            type="sum",
            input=CustomInput({"xs": [1, 2], "nested": {"ok": True}}),
            priority=Priority.URGENT,
        ),
    )
    for task in (chat, embed, custom):
        assert await store.create(task) == (task, True)
        assert await store.get(task.id) == task
    assert await store.get("nope") is None


async def test_committed_writes_survive_reopening(make_store: StoreFactory) -> None:
    """What a write acknowledged is there after the store is closed and opened again."""
    first = make_store()
    await first.start()
    task = new_task(1)
    await first.create(task)
    done = states.succeed(
        states.start(task, "local-1", 1001.0),
        EmbedOutput(((0.5, -0.5),)),
        Usage(3, 4, 0.01),
        1002.0,
    )
    assert await first.update(states.start(task, "local-1", 1001.0), task.sequence)
    assert await first.update(done, task.sequence + 1)
    await first.close()
    await first.close()  # closing twice is harmless
    second = make_store()
    await second.start()
    assert await second.get(task.id) == done
    await second.close()


async def test_update_refuses_a_stale_sequence(store: TaskStore) -> None:
    """Two writers computing from the same version: only the first one lands."""
    task = new_task(1)
    await store.create(task)
    started = states.start(task, "local-1", 1.0)
    cancelled = states.cancel(task, 1.0)
    assert await store.update(started, task.sequence)
    assert not await store.update(cancelled, task.sequence)
    assert await store.get(task.id) == started


async def test_idempotency_key_returns_the_existing_task(store: TaskStore) -> None:
    """The same client and key give back the first task; other clients are independent."""
    first = new_task(1, spec=replace(new_task(1).spec, idempotency_key="k"))
    again = replace(first, id="other-id")
    other_client = replace(first, id="third-id", client_id="client-b")
    assert await store.create(first) == (first, True)
    assert await store.create(again) == (first, False)
    assert await store.create(other_client) == (other_client, True)


async def test_queued_returns_ready_tasks_by_priority_then_age(store: TaskStore) -> None:
    """Claim order: URGENT first, FIFO within a priority; backoff hides a task until due."""
    specs = [
        (0, Priority.LOW),
        (1, Priority.NORMAL),
        (2, Priority.URGENT),
        (3, Priority.NORMAL),
        (4, Priority.HIGH),
    ]
    for n, priority in specs:
        await store.create(new_task(n, spec=replace(new_task(n).spec, priority=priority)))
    await store.create(
        new_task(5, spec=replace(new_task(5).spec, priority=Priority.URGENT), not_before=2000.0)
    )
    ready = await store.queued(10, now=1500.0, types={"chat"})
    assert [t.id for t in ready] == [
        "task-0002",
        "task-0004",
        "task-0001",
        "task-0003",
        "task-0000",
    ]
    later = await store.queued(2, now=2000.0, types={"chat"})
    assert [t.id for t in later] == ["task-0002", "task-0005"]
    assert await store.queued(10, now=2000.0, types={"embed"}) == []
    assert await store.queued(10, now=2000.0, types=set()) == []


async def test_list_pages_filter_and_isolate_clients(store: TaskStore) -> None:
    """Newest first, page by page, only the asking client's tasks, filtered."""
    for n in range(5):
        await store.create(new_task(n))
    await store.create(new_task(9, client_id="client-b"))
    failed = states.fail(new_task(2), TaskError("X", "y"), 3.0)
    await store.update(failed, 1)
    first = await store.list_page(ListQuery(client_id="client-a", limit=2))
    assert [t.id for t in first.tasks] == ["task-0004", "task-0003"]
    assert first.next_cursor is not None
    rest = await store.list_page(
        ListQuery(client_id="client-a", limit=10, before_cursor=first.next_cursor)
    )
    assert [t.id for t in rest.tasks] == ["task-0002", "task-0001", "task-0000"]
    assert rest.next_cursor is None
    only_failed = await store.list_page(
        ListQuery(client_id="client-a", states=frozenset({TaskState.FAILED}))
    )
    assert [t.id for t in only_failed.tasks] == ["task-0002"]
    none_of_type = await store.list_page(
        ListQuery(client_id="client-a", types=frozenset({"embed"}))
    )
    assert none_of_type.tasks == []


async def test_recovery_and_deadline_queries(store: TaskStore) -> None:
    """in_states finds tasks left RUNNING; expired finds unfinished tasks past deadline."""
    for n in range(3):
        await store.create(new_task(n))
    running = states.start(new_task(1), "b", 1.0)
    await store.update(running, 1)
    assert [t.id for t in await store.in_states([TaskState.RUNNING], 10)] == ["task-0001"]
    assert [t.id for t in await store.expired(now=5001.5, limit=10)] == ["task-0000", "task-0001"]


async def test_unfinished_lists_each_queued_or_running_task_with_its_client(
    store: TaskStore,
) -> None:
    """What the caps on unfinished tasks are seeded from at start: finished tasks are left
    out, each other task comes with its client and deadline."""
    await store.create(new_task(0))
    await store.create(new_task(1, client_id="client-b"))
    await store.create(new_task(2))
    await store.update(states.start(new_task(1, client_id="client-b"), "b", 1.0), 1)
    await store.update(states.cancel(new_task(2), 2.0), 1)
    unfinished = sorted(await store.unfinished(), key=lambda u: u.task_id)
    assert unfinished == [
        Unfinished("task-0000", "client-a", 5000.0),
        Unfinished("task-0001", "client-b", 5001.0),
    ]


async def test_concurrent_writes_commit_in_groups(
    store: SqliteTaskStore | PostgresTaskStore,
) -> None:
    """Many writers at once are all committed, sharing transactions (group commit)."""
    tasks = [new_task(n) for n in range(300)]
    results = await asyncio.gather(*(store.create(t) for t in tasks))
    assert all(created for _, created in results)
    stats = store.statistics()
    assert stats["writes"] >= 300
    assert stats["commit_groups"] < 300
    assert len((await store.list_page(ListQuery(client_id="client-a", limit=1000))).tasks) == 300


@pytest.mark.sqlite_only  # group commit is the SQLite store's
async def test_one_failing_write_does_not_undo_its_group(store: SqliteTaskStore) -> None:
    """A write that violates a constraint fails alone; the others in its group commit."""
    await store.create(new_task(1))
    # Hold the writer so that the next writes queue up and share one transaction.
    taken, release = threading.Event(), threading.Event()

    def hold(_: object) -> bool:
        taken.set()
        return release.wait(5)

    held = store._writer.submit(hold)
    await asyncio.to_thread(taken.wait, 5)
    groups_before = store.statistics()["commit_groups"]
    duplicate = store.create(new_task(1))  # same id: a bug, surfaces as an error
    fine = store.create(new_task(2))
    release.set()
    await held
    results = await asyncio.gather(duplicate, fine, return_exceptions=True)
    assert store.statistics()["commit_groups"] - groups_before == 2, "held group + one more"
    assert isinstance(results[0], StoreError)
    assert results[1] == (new_task(2), True)
    assert await store.get("task-0002") == new_task(2)


@pytest.mark.postgresql_only
async def test_a_failing_write_fails_alone_in_its_group(store: TaskStore) -> None:
    """A write that violates a constraint fails; the others committed with it do not."""
    await store.create(new_task(1))
    results = await asyncio.gather(
        store.create(new_task(1)),  # same id: a bug, surfaces as an error
        store.create(new_task(2)),
        store.update(states.start(new_task(1), "b", 1.0), 1),
        return_exceptions=True,
    )
    assert isinstance(results[0], StoreError)
    assert list(results[1:]) == [(new_task(2), True), True]
    assert await store.get("task-0002") == new_task(2)


async def test_closed_store_refuses_work(make_store: StoreFactory) -> None:
    """Using a store that is not open is a clear StoreError, not a hang."""
    store = make_store()
    with pytest.raises(StoreError):
        await store.get("x")
    await store.close()  # close before start is harmless


async def test_custom_output_round_trips(store: TaskStore) -> None:
    """Structured output of a custom task is stored as given."""
    task = new_task(1)
    await store.create(task)
    running = states.start(task, "b", 1.0)
    await store.update(running, 1)
    done = states.succeed(running, CustomOutput({"summary": "ok", "n": 3}), None, 2.0)
    await store.update(done, 2)
    assert await store.get(task.id) == done


def keyed(n: int, key: str, **changes: object) -> Task:
    return new_task(n, spec=replace(new_task(n).spec, idempotency_key=key), **changes)


async def test_a_batch_is_stored_in_order_with_its_idempotency_replays(store: TaskStore) -> None:
    """Each task of a batch fares as `create` would in turn: a key stored before, or used
    earlier in the batch, gives back that task; the rest are stored in batch order."""
    before = keyed(0, "old")
    await store.create(before)
    batch = [
        new_task(1),
        keyed(2, "old"),  # stored before the batch
        keyed(3, "new"),
        keyed(4, "new"),  # used by the task just before, in this batch
        keyed(5, "new", client_id="client-b"),  # keys are per client
    ]
    results = await store.create_batch(batch)
    assert results == [
        (batch[0], True),
        (before, False),
        (batch[2], True),
        (batch[2], False),
        (batch[4], True),
    ]
    for task in (before, batch[0], batch[2], batch[4]):
        assert await store.get(task.id) == task
    assert await store.get(batch[1].id) is None
    assert await store.get(batch[3].id) is None
    page = await store.list_page(ListQuery(client_id="client-a"))
    assert [t.id for t in page.tasks] == ["task-0003", "task-0001", "task-0000"], "newest first"


async def test_a_batch_failing_midway_stores_none_of_its_tasks(store: TaskStore) -> None:
    """The third task's id is taken (a bug, as a duplicate id always is): the write fails
    after two inserts, and those two are undone with it."""
    await store.create(new_task(7))
    batch = [new_task(1), keyed(2, "k"), new_task(7), new_task(3)]
    with pytest.raises(StoreError):
        await store.create_batch(batch)
    for task in batch:
        if task.id != "task-0007":
            assert await store.get(task.id) is None, task.id
    # Nothing half-done holds the key or the store: the same tasks go in on their own.
    assert await store.create_batch([new_task(1), keyed(2, "k")]) == [
        (new_task(1), True),
        (keyed(2, "k"), True),
    ]


@pytest.mark.sqlite_only  # group commit is the SQLite store's
async def test_a_failing_batch_leaves_the_other_writes_of_its_group(store: SqliteTaskStore) -> None:
    """A batch whose write fails midway shares a transaction with other writes: its own
    inserts are undone (its savepoint), the others commit."""
    await store.create(new_task(7))
    taken, release = threading.Event(), threading.Event()

    def hold(_: object) -> bool:
        taken.set()
        return release.wait(5)

    held = store._writer.submit(hold)
    await asyncio.to_thread(taken.wait, 5)
    groups_before = store.statistics()["commit_groups"]
    before = store.create(new_task(1))
    failing = store.create_batch([new_task(2), new_task(7), new_task(3)])
    after = store.create(new_task(4))
    release.set()
    await held
    results = await asyncio.gather(before, failing, after, return_exceptions=True)
    assert store.statistics()["commit_groups"] - groups_before == 2, "held group + one more"
    assert isinstance(results[1], StoreError)
    assert [results[0], results[2]] == [(new_task(1), True), (new_task(4), True)]
    assert await store.get("task-0002") is None
    assert await store.get("task-0003") is None
    assert await store.get("task-0004") == new_task(4)


@pytest.mark.postgresql_only
async def test_a_failing_batch_fails_alone_in_its_group(store: TaskStore) -> None:
    """A batch whose write fails midway, committed with other writes: it stores nothing,
    they are stored."""
    await store.create(new_task(7))
    results = await asyncio.gather(
        store.create(new_task(1)),
        store.create_batch([new_task(2), new_task(7), new_task(3)]),
        store.create(new_task(4)),
        return_exceptions=True,
    )
    assert isinstance(results[1], StoreError)
    assert [results[0], results[2]] == [(new_task(1), True), (new_task(4), True)]
    assert await store.get("task-0002") is None
    assert await store.get("task-0004") == new_task(4)
