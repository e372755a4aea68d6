"""Claims, owners and the change feed: what lets several replicas share one store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from server.app import open_store
from server.config import StoreSettings
from server.model import states
from server.model.errors import StoreError
from server.model.task import ChatOutput, Priority, Task, TaskState
from server.store.base import Change, TaskStore
from tests.conftest import StoreUrl
from tests.store.test_store_contract import new_task

Opener = Callable[..., TaskStore]


@pytest.fixture
async def open_(store_url: StoreUrl, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens stores on one database (one file, or one schema); closes them all after."""
    opened: list[TaskStore] = []
    url = store_url(tmp_path / "shared.db")

    def open_store_(**settings: float) -> TaskStore:
        store = open_store(StoreSettings(url=url, **settings))  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_store_
    for store in reversed(opened):
        await store.close()


def starter(
    backend: str = "b", refuse: frozenset[str] = frozenset()
) -> Callable[[Task], Task | None]:
    return lambda task: None if task.id in refuse else states.start(task, backend, 10.0)


async def test_claim_starts_ready_tasks_by_priority_and_leaves_what_start_refuses(
    open_: Opener,
) -> None:
    store = open_()
    await store.start()
    for n, priority in [(1, Priority.NORMAL), (2, Priority.HIGH), (3, Priority.NORMAL)]:
        await store.create(new_task(n, spec=replace(new_task(n).spec, priority=priority)))
    claimed = await store.claim(2, 10.0, {"chat"}, starter(refuse=frozenset({"task-0002"})))
    assert claimed.examined == 2
    assert [t.id for t in claimed.started] == ["task-0001"]
    assert (await store.get("task-0001")) == claimed.started[0]
    left = await store.queued(10, 10.0, {"chat"})
    assert [t.id for t in left] == ["task-0002", "task-0003"]


def aged(n: int, priority: Priority, created_at: float, task_type: str = "chat") -> Task:
    """Task n of `priority` and type, created at `created_at` (its wait starts there)."""
    spec = replace(new_task(n).spec, priority=priority, type=task_type)
    return new_task(n, spec=spec, created_at=created_at)


async def test_claim_takes_a_low_task_that_waited_three_aging_periods_before_newer_urgent_ones(
    open_: Opener,
) -> None:
    """With aging_s 60, LOW tasks that waited 180 s compete as URGENT and, older, go first,
    however many newer URGENT tasks wait (more than the claim's limit here); a ready task of
    a type not asked for is left alone, however old."""
    store = open_()
    await store.start()
    await store.create(aged(0, Priority.LOW, 1000.0, task_type="embed"))
    for n in (1, 2):
        await store.create(aged(n, Priority.LOW, 1000.0 + n))
    for n in range(3, 8):
        await store.create(aged(n, Priority.URGENT, 1100.0 + n))
    await store.create(aged(8, Priority.HIGH, 1100.0))
    now = 1182.0  # task 1 waited 181 s, task 2 180 s, the URGENT ones ~80 s

    claimed = await store.claim(3, now, {"chat"}, starter(), aging_s=60.0)

    # task-0008 (HIGH, waited 82 s) is URGENT too, and older than the native URGENT ones.
    assert [t.id for t in claimed.started] == ["task-0001", "task-0002", "task-0008"]
    left = await store.queued(10, now, {"chat"}, aging_s=60.0)
    assert [t.id for t in left] == ["task-0003", "task-0004", "task-0005", "task-0006", "task-0007"]


async def test_claim_without_aging_keeps_priority_order_however_long_tasks_wait(
    open_: Opener,
) -> None:
    """aging_s 0: URGENT > HIGH > NORMAL > LOW, oldest first within each."""
    store = open_()
    await store.start()
    for n, priority in [(1, Priority.LOW), (2, Priority.HIGH), (3, Priority.URGENT)]:
        await store.create(aged(n, priority, 1000.0 + n))
    await store.create(aged(4, Priority.HIGH, 1004.0))
    claimed = await store.claim(3, 1e6, {"chat"}, starter(), aging_s=0.0)
    assert [t.id for t in claimed.started] == ["task-0003", "task-0002", "task-0004"]


async def test_running_tasks_of_a_store_closed_without_requeueing_are_orphans(
    open_: Opener,
) -> None:
    """A process that stops (or dies) with tasks RUNNING leaves them to the next one;
    the tasks a live store runs itself are never its own orphans."""
    first = open_()
    await first.start()
    for n in range(1, 4):
        await first.create(new_task(n))
    await first.claim(2, 10.0, {"chat"}, starter())
    assert await first.orphaned(10) == []
    await first.close()

    second = open_()
    await second.start()
    assert [t.id for t in await second.orphaned(10)] == ["task-0001", "task-0002"]
    await second.claim(1, 10.0, {"chat"}, starter())
    assert [t.id for t in await second.orphaned(10)] == ["task-0001", "task-0002"]


@pytest.mark.postgresql_only
async def test_claims_of_two_replicas_at_once_never_take_the_same_task(open_: Opener) -> None:
    one, two = open_(), open_()
    await asyncio.gather(one.start(), two.start())  # both migrate the same new schema
    await asyncio.gather(*(one.create(new_task(n)) for n in range(200)))
    await claim_all_at_once(one, two, 200, now=10.0)


@pytest.mark.postgresql_only
async def test_aged_claims_of_two_replicas_never_take_the_same_task(
    open_: Opener,
) -> None:
    """Each replica's claim locks the rows it reads at every priority (FOR UPDATE SKIP
    LOCKED): with aging mixing the priorities, still no task is claimed twice."""
    one, two = open_(), open_()
    await asyncio.gather(one.start(), two.start())
    priorities = list(Priority)
    await asyncio.gather(*(one.create(aged(n, priorities[n % 4], 1000.0 + n)) for n in range(200)))
    await claim_all_at_once(one, two, 200, now=1150.0, aging_s=60.0)


async def claim_all_at_once(
    one: TaskStore, two: TaskStore, count: int, now: float, aging_s: float = 0.0
) -> None:
    """Both replicas claim 10 at a time, 12 times each, all at once: each of the `count`
    tasks is started exactly once, and both replicas started some."""
    claims = await asyncio.gather(
        *(
            store.claim(10, now, {"chat"}, starter(name), aging_s=aging_s)
            for _ in range(12)
            for name, store in [("one", one), ("two", two)]
        )
    )
    ids = [task.id for claimed in claims for task in claimed.started]
    assert len(ids) == len(set(ids)) == count
    backends = {task.backend for claimed in claims for task in claimed.started}
    assert backends == {"one", "two"}, "both replicas claimed some"


@pytest.mark.postgresql_only
async def test_a_replicas_tasks_become_orphans_only_when_its_lease_lapses(open_: Opener) -> None:
    """Liveness is the owner's heartbeat within the lease (by the database's clock)."""
    owner = open_(lease_s=30.0)  # beats every 10 s
    await owner.start()
    await owner.create(new_task(1))
    await owner.claim(1, 10.0, {"chat"}, starter())
    patient = open_(lease_s=30.0)
    await patient.start()
    assert await patient.orphaned(10) == []
    # A replica that counts leases of 0.2 s sees the owner's beat as lapsed soon after.
    strict = open_(lease_s=0.2)
    await strict.start()
    await asyncio.sleep(0.3)
    assert [t.id for t in await strict.orphaned(10)] == ["task-0001"]


@pytest.mark.postgresql_only
async def test_follow_tells_other_replicas_changes_in_order_but_not_its_own(
    open_: Opener,
) -> None:
    watcher, writer = open_(), open_()
    await watcher.start()
    await writer.start()
    heard: list[Change] = []
    own: list[Change] = []
    arrived = asyncio.Event()

    def on_change(change: Change) -> None:
        heard.append(change)
        if change.state is TaskState.SUCCEEDED:
            arrived.set()

    watcher.follow(on_change, lambda: None)
    writer.follow(own.append, lambda: None)
    await asyncio.sleep(0.2)  # the feed's LISTEN is in place
    task = new_task(1)
    await writer.create(task)
    running = states.start(task, "b", 10.0)
    assert await writer.update(running, task.sequence)
    done = states.succeed(running, ChatOutput("hi"), None, 11.0)
    assert await writer.update(done, running.sequence)
    await asyncio.wait_for(arrived.wait(), 5)
    assert [(c.task_id, c.sequence, c.state) for c in heard] == [
        ("task-0001", task.sequence, TaskState.QUEUED),
        ("task-0001", running.sequence, TaskState.RUNNING),
        ("task-0001", done.sequence, TaskState.SUCCEEDED),
    ]
    assert own == []


@pytest.mark.postgresql_only
async def test_a_schema_newer_than_the_server_is_refused(
    open_: Opener, store_url: StoreUrl, tmp_path: Path
) -> None:
    store = open_()
    await store.start()
    await store.close()
    conn = await asyncpg.connect(store_url(tmp_path / "shared.db"))
    try:
        await conn.execute("INSERT INTO taskring_migrations (version) VALUES (99)")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="version 99, newer than this server's"):
        await open_().start()
