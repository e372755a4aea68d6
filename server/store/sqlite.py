"""SqliteTaskStore: the embedded default store (one file, WAL, group commits)."""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from server.model.errors import StoreError
from server.model.stats import TaskStats
from server.model.task import Priority, Task, TaskState

from .aggregate import STATS_DURATIONS, assemble_stats
from .base import Claimed, ListPage, ListQuery, OnChange, Starter, StatsQuery, Unfinished
from .group_commit import GroupCommitWriter
from .rows import (
    COLUMNS,
    INSERT_COLUMNS,
    INSERT_COUNT,
    UPDATE_SET,
    UPDATE_SET_COUNT,
    from_row,
    in_dispatch_order,
    page_of_rows,
    to_row,
    update_params,
)

T = TypeVar("T")

# Bumped only for a change an older server could not live with: it refuses a file whose
# version is newer than its own. An added index is not one (older servers keep it up to date
# without knowing it), so tasks_client_created left the version at 1.
SCHEMA_VERSION = 1
# Run at every start: each statement is IF NOT EXISTS, so a file made by an older server
# gains what it lacks (tasks_client_created came with Stats) and keeps its rows.
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    pk              INTEGER PRIMARY KEY,  -- insertion order: List pages and FIFO within a priority
    id              TEXT NOT NULL UNIQUE,
    client_id       TEXT NOT NULL,
    type            TEXT NOT NULL,
    state           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    spec            TEXT NOT NULL,
    sequence        INTEGER NOT NULL,
    attempt         INTEGER NOT NULL,
    backend         TEXT NOT NULL,
    output          TEXT,
    error           TEXT,
    usage           TEXT,
    created_at      REAL NOT NULL,
    started_at      REAL,
    ended_at        REAL,
    deadline        REAL NOT NULL,
    not_before      REAL NOT NULL,
    idempotency_key TEXT,
    owner           TEXT, -- the store instance (process) running a RUNNING task
    attempts        TEXT  -- the ended attempts (codec.encode_attempts); NULL: none
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency
    ON tasks (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (priority DESC, pk) WHERE state = 'QUEUED';
CREATE INDEX IF NOT EXISTS tasks_unfinished
    ON tasks (deadline) WHERE state IN ('QUEUED', 'RUNNING');
CREATE INDEX IF NOT EXISTS tasks_client ON tasks (client_id, pk);
-- Stats: a client's tasks created within a window, without reading their older ones.
CREATE INDEX IF NOT EXISTS tasks_client_created ON tasks (client_id, created_at);
-- Retention: the oldest finished tasks, without reading the unfinished or recent ones.
CREATE INDEX IF NOT EXISTS tasks_finished
    ON tasks (ended_at) WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED');
"""
SELECT = f"SELECT pk, {COLUMNS} FROM tasks"  # noqa: S608 - constants only
INSERT = f"INSERT INTO tasks ({INSERT_COLUMNS}) VALUES ({', '.join('?' * INSERT_COUNT)})"  # noqa: S608
UPDATE = f"UPDATE tasks SET {UPDATE_SET.format(*'?' * UPDATE_SET_COUNT)} WHERE id=? AND sequence=?"  # noqa: S608
# One statement (one write of a group commit) deletes at most `limit` of the oldest.
DELETE_FINISHED = (
    "DELETE FROM tasks WHERE pk IN (SELECT pk FROM tasks"
    " WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND ended_at < ?"
    " ORDER BY ended_at LIMIT ?) RETURNING id"
)
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class _Reader:
    """One thread with its own connection: queries run there, off the event loop."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._connect = connect
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used only by the thread

    def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)

    async def run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None:
            raise StoreError("the store is not open")

        def run() -> T:
            if self._conn is None:
                self._conn = self._connect()
            return query(self._conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except sqlite3.Error as exc:
            raise StoreError(f"the task store could not read: {exc}") from exc

    def interrupt(self) -> None:
        """Makes the running query fail at once (sqlite3_interrupt is safe from any thread)."""
        conn = self._conn
        if conn is not None:
            conn.interrupt()

    def close(self) -> None:
        """Waits for the running query; safe to call twice or before start."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.submit(self._close_conn)
            executor.shutdown(wait=True)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SqliteTaskStore:
    """Writes go through one group-committing writer thread; reads through one reader thread
    with its own connection (WAL lets them run while a write commits). Stats have a reader
    of their own: an aggregation over a busy hour must not hold up the dispatcher's claims
    (`queued`) and Get, which share the first."""

    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
        self._path = str(path)
        self._synchronous = synchronous.upper()
        self._writer = GroupCommitWriter(self._connect)
        self._reader = _Reader(self._connect, "sqlite-reader")
        self._stats_reader = _Reader(self._connect, "sqlite-stats")
        self._started = False
        self._lock_file: BinaryIO | None = None
        # Owner of the tasks this process runs. The file lock makes this the only live
        # process on the file, so a RUNNING task of any other owner is an orphan.
        self.replica = uuid.uuid4().hex

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def start(self) -> None:
        if self._started:
            return
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_exclusively()
        try:
            await asyncio.to_thread(self._migrate)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store at {self._path}: {exc}") from exc
        self._writer.start()
        self._reader.start()
        self._stats_reader.start()
        self._started = True

    def _lock_exclusively(self) -> None:
        """One server per SQLite file: a second one would re-queue the first one's running
        tasks as if their process had died. The lock goes away with the process."""
        self._lock_file = open(f"{self._path}.lock", "a+b")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise StoreError(
                f"another taskring server is using {self._path}; stop it or choose another"
                " TASKRING_STORE (use PostgreSQL to run several replicas)"
            ) from None

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} has schema version {version}, newer than this server's"
                    f" {SCHEMA_VERSION}: upgrade taskring"
                )
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
            if "owner" not in columns:  # a file from before owners: its RUNNING are orphans
                conn.execute("ALTER TABLE tasks ADD COLUMN owner TEXT")
            if "attempts" not in columns:  # a file from before attempt history
                conn.execute("ALTER TABLE tasks ADD COLUMN attempts TEXT")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            conn.close()

    async def close(self) -> None:
        await self._writer.close()
        # A Stats aggregation can take a while: stop it rather than wait for it here, on the
        # loop's thread (it only reads). The other reader's queries are short.
        self._stats_reader.interrupt()
        self._reader.close()
        self._stats_reader.close()
        self._started = False
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        return await self._reader.run(query)

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    def create(self, task: Task) -> Awaitable[tuple[Task, bool]]:
        row = to_row(task, self.replica)
        return self._writer.submit(lambda conn: _create(conn, task, row))

    def create_batch(self, tasks: Sequence[Task]) -> Awaitable[list[tuple[Task, bool]]]:
        rows = [to_row(task, self.replica) for task in tasks]

        def write(conn: sqlite3.Connection) -> list[tuple[Task, bool]]:
            # One write of a group commit, but many statements: the savepoint takes back
            # this batch's inserts if one fails, and leaves the group's other writes be.
            conn.execute("SAVEPOINT batch")
            try:
                results = [_create(conn, task, row) for task, row in zip(tasks, rows, strict=True)]
            except BaseException:
                # Unless the error ended the whole transaction (then the group fails).
                if conn.in_transaction:
                    conn.execute("ROLLBACK TO batch")
                    conn.execute("RELEASE batch")
                raise
            conn.execute("RELEASE batch")
            return results

        return self._writer.submit(write)

    async def get(self, task_id: str) -> Task | None:
        row = await self._read(lambda c: c.execute(f"{SELECT} WHERE id=?", (task_id,)).fetchone())
        return None if row is None else from_row(row)

    async def list_page(self, query: ListQuery) -> ListPage:
        where = ["client_id=?"]
        params: list[Any] = [query.client_id]
        if query.states:
            where.append(f"state IN ({','.join('?' * len(query.states))})")
            params.extend(sorted(s.value for s in query.states))
        if query.types:
            where.append(f"type IN ({','.join('?' * len(query.types))})")
            params.extend(sorted(query.types))
        if query.before_cursor is not None:
            where.append("pk < ?")
            params.append(query.before_cursor)
        # One row more than asked tells whether another page exists.
        sql = f"{SELECT} WHERE {' AND '.join(where)} ORDER BY pk DESC LIMIT ?"
        params.append(query.limit + 1)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return page_of_rows(rows, query.limit)

    async def stats(self, query: StatsQuery) -> TaskStats:
        return await self._stats_reader.run(lambda c: _stats(c, query))

    def delete_finished(self, ended_before: float, limit: int) -> Awaitable[list[str]]:
        """Deletes up to `limit` of the tasks that finished before `ended_before`, oldest
        first; the ids of those deleted."""
        return self._writer.submit(
            lambda c: [row[0] for row in c.execute(DELETE_FINISHED, (ended_before, limit))]
        )

    def update(self, task: Task, expected_sequence: int) -> Awaitable[bool]:
        params = update_params(task, expected_sequence, self.replica)
        return self._writer.submit(lambda c: c.execute(UPDATE, params).rowcount == 1)

    async def queued(
        self, limit: int, now: float, types: Set[str], *, aging_s: float = 0.0
    ) -> list[Task]:
        if not types or limit <= 0:
            return []
        # Up to `limit` of each priority, oldest first (see model/aging.py): one range scan of
        # tasks_queue per priority, however long the queue.
        level = (
            f"SELECT * FROM ({SELECT} WHERE state='QUEUED' AND priority={{}} AND not_before<=?"  # noqa: S608 - constants and placeholders only
            f" AND type IN ({','.join('?' * len(types))}) ORDER BY pk LIMIT ?)"
        )
        sql = " UNION ALL ".join(level.format(int(p)) for p in reversed(Priority))
        params = [now, *sorted(types), limit] * len(Priority)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return in_dispatch_order(rows, now, aging_s, limit)

    async def orphaned(self, limit: int) -> list[Task]:
        sql = f"{SELECT} WHERE state='RUNNING' AND (owner IS NULL OR owner!=?) ORDER BY pk LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, (self.replica, limit)).fetchall())
        return [from_row(r) for r in rows]

    async def claim(
        self, limit: int, now: float, types: Set[str], start: Starter, *, aging_s: float = 0.0
    ) -> Claimed:
        """Reads the ready tasks, then writes each start `start` plans with the optimistic
        check: this process is the file's only writer, so no lock is needed."""
        candidates = await self.queued(limit, now, types, aging_s=aging_s)
        plans = [(task, started) for task in candidates if (started := start(task)) is not None]
        # Sent together: one group commit for the whole batch.
        results = await asyncio.gather(
            *(self.update(started, task.sequence) for task, started in plans),
            return_exceptions=True,
        )
        stored = [started for (_, started), ok in zip(plans, results, strict=True) if ok is True]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None and not stored:
            raise failure
        return Claimed(examined=len(candidates), started=stored)

    def follow(self, on_change: OnChange, on_gap: Callable[[], None]) -> None:
        """Nothing to follow: the file lock makes this process the file's only writer."""

    async def queue_depth(self) -> dict[Priority, int]:
        # Counted over the partial index tasks_queue (exactly the QUEUED rows, priority in
        # it): the table itself is not read.
        sql = "SELECT priority, COUNT(*) FROM tasks WHERE state='QUEUED' GROUP BY priority"
        rows = await self._read(lambda c: c.execute(sql).fetchall())
        return {Priority(priority): count for priority, count in rows}

    async def in_states(self, states: Sequence[TaskState], limit: int) -> list[Task]:
        marks = ",".join("?" * len(states))
        sql = f"{SELECT} WHERE state IN ({marks}) ORDER BY pk LIMIT ?"
        params = [s.value for s in states] + [limit]
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [from_row(r) for r in rows]

    async def expired(self, now: float, limit: int) -> list[Task]:
        sql = (
            f"{SELECT} WHERE state IN ('QUEUED', 'RUNNING') AND deadline<=?"
            " ORDER BY deadline LIMIT ?"
        )
        rows = await self._read(lambda c: c.execute(sql, (now, limit)).fetchall())
        return [from_row(r) for r in rows]

    async def unfinished(self) -> list[Unfinished]:
        sql = "SELECT id, client_id, deadline FROM tasks WHERE state IN ('QUEUED', 'RUNNING')"
        rows = await self._read(lambda c: c.execute(sql).fetchall())
        return [Unfinished(task_id, client_id, deadline) for task_id, client_id, deadline in rows]

    def statistics(self) -> dict[str, int]:
        return {"commit_groups": self._writer.groups, "writes": self._writer.writes}


def _create(conn: sqlite3.Connection, task: Task, row: tuple[Any, ...]) -> tuple[Task, bool]:
    """Inserts `task` (as `row`), or finds the task its client's idempotency key names."""
    key = task.spec.idempotency_key
    if key:
        existing = conn.execute(
            f"{SELECT} WHERE client_id=? AND idempotency_key=?", (task.client_id, key)
        ).fetchone()
        if existing is not None:
            return from_row(existing), False
    conn.execute(INSERT, row)
    return task, True


# Per (type, backend, state, priority) of the tasks created in the window: a few dozen rows
# however many tasks there are. `usage` is codec.encode_usage's JSON array
# [input_tokens, output_tokens, cost_usd], summed where it lies rather than decoded per task.
STATS_WINDOW = (
    "SELECT type, backend, state, priority, COUNT(*), SUM(attempt),"
    " COALESCE(SUM(json_extract(usage, '$[0]')), 0),"
    " COALESCE(SUM(json_extract(usage, '$[1]')), 0),"
    " TOTAL(json_extract(usage, '$[2]'))"
    " FROM tasks WHERE {where} GROUP BY type, backend, state, priority"
)
# Whatever their age. INDEXED BY: left to itself the planner walks the client's whole
# history by tasks_client_created; the partial index holds only the unfinished tasks.
STATS_QUEUE = (
    "SELECT state, priority, COUNT(*) FROM tasks INDEXED BY tasks_unfinished"
    " WHERE state IN ('QUEUED', 'RUNNING') AND {where} GROUP BY state, priority"
)


def _stats(conn: sqlite3.Connection, query: StatsQuery) -> TaskStats:
    """Runs on the stats reader's thread: three queries in one read transaction, so the
    counts, sums and run times come from the same snapshot."""
    scope: list[str] = []
    params: list[Any] = []
    # client_id None (an admin caller, once API keys exist) has no index for its window
    # and reads the whole table: give created_at one of its own before that lands.
    if query.client_id is not None:
        scope.append("client_id=?")
        params.append(query.client_id)
    if query.types:
        scope.append(f"type IN ({','.join('?' * len(query.types))})")
        params.extend(sorted(query.types))
    windowed = " AND ".join([*scope, "created_at>=?"])
    window_params = [*params, query.created_after]
    conn.execute("BEGIN")
    try:
        queue_rows = conn.execute(
            STATS_QUEUE.format(where=" AND ".join(scope) or "1"), params
        ).fetchall()
        window_rows = conn.execute(STATS_WINDOW.format(where=windowed), window_params).fetchall()
        duration_rows = conn.execute(
            STATS_DURATIONS.format(where=windowed, limit="?"),
            [*window_params, query.duration_sample_limit],
        ).fetchall()
    finally:
        conn.execute("COMMIT")

    return assemble_stats(query, queue_rows, window_rows, duration_rows)
