"""The TaskStore protocol: what the service needs from durable storage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from server.model.stats import TaskStats
from server.model.task import Priority, Task, TaskState


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One page of a client's tasks, newest first; `before_cursor` continues a listing."""

    client_id: str
    states: frozenset[TaskState] = frozenset()
    types: frozenset[str] = frozenset()
    limit: int = 50
    before_cursor: int | None = None


@dataclass(frozen=True, slots=True)
class ListPage:
    tasks: list[Task]
    # Each task's own cursor: a listing that goes on after tasks[i] passes cursors[i].
    cursors: list[int]
    more: bool  # whether tasks after these match the query

    @property
    def next_cursor(self) -> int | None:
        """Pass as ListQuery.before_cursor for the next page; None on the last page."""
        return self.cursors[-1] if self.more and self.cursors else None


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """Statistics of the tasks created at or after `created_after` (the window), and of the
    queue now. `client_id` None counts every client's tasks: for an admin caller, once API
    keys exist; callers pass their own client id until then."""

    client_id: str | None
    created_after: float
    types: frozenset[str] = frozenset()
    # Percentiles come from at most this many run times per (type, backend) group, the
    # newest: they are computed in Python, and this keeps that work bounded.
    duration_sample_limit: int = 10_000


# Given a ready task the claim read, the task as it starts (RUNNING on a member whose slot
# it reserved), or None to leave it queued. The dispatcher's: it runs on the event loop.
Starter = Callable[[Task], Task | None]


@dataclass(frozen=True, slots=True)
class Claimed:
    # How many ready tasks the claim read (whether or not they started).
    examined: int
    # The tasks the Starter started whose start was stored, as the Starter returned them;
    # the others were changed by another writer meanwhile and were not claimed.
    started: list[Task]


@dataclass(frozen=True, slots=True)
class Change:
    """A change another process stored (a store shared by several replicas announces each
    one): the task's id, its sequence and state after the change."""

    task_id: str
    sequence: int
    state: TaskState


OnChange = Callable[[Change], None]


@dataclass(frozen=True, slots=True)
class Unfinished:
    """A QUEUED or RUNNING task, as much as admission counts of it at a start."""

    task_id: str
    client_id: str
    deadline: float


class TaskStore(Protocol):
    # This process's name in the store: the owner of the RUNNING tasks it runs.
    replica: str

    """Every write is durable when its awaitable returns, and is applied atomically."""

    async def start(self) -> None:
        """Opens the store and creates or migrates its schema."""
        ...

    async def close(self) -> None:
        """Finishes pending writes and closes; safe to call twice or before start."""
        ...

    async def ping(self) -> None:
        """Raises StoreError when the store cannot serve reads and writes."""
        ...

    def statistics(self) -> dict[str, int]:
        """Counters since start, at least `writes` (each create or update) and
        `commit_groups` (the transactions that committed them)."""
        ...

    # create and update may be plain functions returning a future (SQLite's writer thread)
    # or coroutines (asyncpg): either way the caller awaits the result.
    def create(self, task: Task) -> Awaitable[tuple[Task, bool]]:
        """Stores a new task; returns (task, True), or (the existing task, False) when the
        client already submitted one with the same idempotency key."""
        ...

    def create_batch(self, tasks: Sequence[Task]) -> Awaitable[list[tuple[Task, bool]]]:
        """Stores new tasks in one transaction, all or none: one result per task, in order,
        as `create` would give for each in turn. So an idempotency key already stored, or
        used by an earlier task of the batch, gives (that task, False). Raises StoreError,
        having stored nothing, when any write fails."""
        ...

    async def get(self, task_id: str) -> Task | None: ...

    async def list_page(self, query: ListQuery) -> ListPage: ...

    async def stats(self, query: StatsQuery) -> TaskStats:
        """Counts and sums computed by the store itself (not by loading tasks), and run-time
        percentiles from a bounded sample; off the event loop."""
        ...

    def update(self, task: Task, expected_sequence: int) -> Awaitable[bool]:
        """Replaces the stored task if its sequence is still `expected_sequence`.

        Returns False (and writes nothing) when another writer changed it first: the
        optimistic check that keeps the dispatcher and Cancel from overwriting each other.
        """
        ...

    def delete_finished(self, ended_before: float, limit: int) -> Awaitable[list[str]]:
        """Deletes up to `limit` of the tasks that finished before `ended_before`, oldest
        first, in one write; returns the ids of those deleted."""
        ...

    async def queued(
        self, limit: int, now: float, types: Set[str], *, aging_s: float = 0.0
    ) -> list[Task]:
        """The first `limit` QUEUED tasks of `types` ready to run (not_before <= now) in
        dispatch order (server/model/aging.py `rank`): highest effective priority first,
        priorities rising one level per `aging_s` seconds waited (0: no aging), then oldest.
        Reads at most `limit` tasks of each priority, never the whole queue."""
        ...

    async def claim(
        self, limit: int, now: float, types: Set[str], start: Starter, *, aging_s: float = 0.0
    ) -> Claimed:
        """Claims up to `limit` of the ready tasks `queued` would return, passing each to
        `start` in that order and storing the starts it plans. No task is claimed by two
        dispatchers, even of different processes sharing the store."""
        ...

    async def orphaned(self, limit: int) -> list[Task]:
        """RUNNING tasks whose dispatcher is gone (its process died, or stopped renewing its
        lease), oldest first: any dispatcher may re-queue them."""
        ...

    def follow(self, on_change: OnChange, on_gap: Callable[[], None]) -> None:
        """From now on calls `on_change` for each change another process stores, in order,
        and `on_gap` when some may have been missed (the feed was cut and is back). A
        store no other process writes never calls either."""
        ...

    async def queue_depth(self) -> dict[Priority, int]:
        """How many tasks are QUEUED, by priority, backoff or not (metrics read it per
        scrape, so it must count without loading tasks)."""
        ...

    async def in_states(self, states: Sequence[TaskState], limit: int) -> list[Task]:
        """Tasks in any of `states`, oldest first (recovery after a restart)."""
        ...

    async def expired(self, now: float, limit: int) -> list[Task]:
        """Unfinished tasks whose deadline has passed."""
        ...

    async def unfinished(self) -> list[Unfinished]:
        """Every QUEUED or RUNNING task, three columns each (read once, at start, so that
        the caps on clients' unfinished tasks remember the backlog across a restart)."""
        ...
