"""SqliteTaskStore: the embedded default store (one file, WAL, group commits)."""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections.abc import Awaitable, Callable, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from server.model.errors import StoreError
from server.model.task import Task, TaskState

from . import codec
from .base import ListPage, ListQuery
from .group_commit import GroupCommitWriter

T = TypeVar("T")

SCHEMA_VERSION = 1
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
    idempotency_key TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency
    ON tasks (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (priority DESC, pk) WHERE state = 'QUEUED';
CREATE INDEX IF NOT EXISTS tasks_unfinished
    ON tasks (deadline) WHERE state IN ('QUEUED', 'RUNNING');
CREATE INDEX IF NOT EXISTS tasks_client ON tasks (client_id, pk);
"""
COLUMNS = (
    "id, client_id, type, state, priority, spec, sequence, attempt, backend, output, error,"
    " usage, created_at, started_at, ended_at, deadline, not_before, idempotency_key"
)
SELECT = f"SELECT pk, {COLUMNS} FROM tasks"  # noqa: S608 - constants only
INSERT = f"INSERT INTO tasks ({COLUMNS}) VALUES ({', '.join('?' * 18)})"  # noqa: S608
UPDATE = (
    "UPDATE tasks SET state=?, sequence=?, attempt=?, backend=?, output=?, error=?, usage=?,"
    " started_at=?, ended_at=?, not_before=? WHERE id=? AND sequence=?"
)
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class SqliteTaskStore:
    """Writes go through one group-committing writer thread; reads through one reader thread
    with its own connection (WAL lets them run while a write commits)."""

    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
        self._path = str(path)
        self._synchronous = synchronous.upper()
        self._writer = GroupCommitWriter(self._connect)
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None  # used only by the reader thread
        self._lock_file: BinaryIO | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def start(self) -> None:
        if self._reader is not None:
            return
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_exclusively()
        try:
            await asyncio.to_thread(self._migrate)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store at {self._path}: {exc}") from exc
        self._writer.start()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")

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
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            conn.close()

    async def close(self) -> None:
        await self._writer.close()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.submit(self._close_reader_conn)
            reader.shutdown(wait=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _close_reader_conn(self) -> None:
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise StoreError("the store is not open")

        def run() -> T:
            if self._reader_conn is None:
                self._reader_conn = self._connect()
            return query(self._reader_conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, run)
        except sqlite3.Error as exc:
            raise StoreError(f"the task store could not read: {exc}") from exc

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    def create(self, task: Task) -> Awaitable[tuple[Task, bool]]:
        row = _to_row(task)
        key = task.spec.idempotency_key

        def write(conn: sqlite3.Connection) -> tuple[Task, bool]:
            if key:
                existing = conn.execute(
                    f"{SELECT} WHERE client_id=? AND idempotency_key=?", (task.client_id, key)
                ).fetchone()
                if existing is not None:
                    return _from_row(existing), False
            conn.execute(INSERT, row)
            return task, True

        return self._writer.submit(write)

    async def get(self, task_id: str) -> Task | None:
        row = await self._read(lambda c: c.execute(f"{SELECT} WHERE id=?", (task_id,)).fetchone())
        return None if row is None else _from_row(row)

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
        page = rows[: query.limit]
        more = len(rows) > query.limit
        return ListPage([_from_row(r) for r in page], page[-1][0] if more and page else None)

    def update(self, task: Task, expected_sequence: int) -> Awaitable[bool]:
        params = _update_params(task, expected_sequence)
        return self._writer.submit(lambda c: c.execute(UPDATE, params).rowcount == 1)

    async def queued(self, limit: int, now: float, types: Set[str]) -> list[Task]:
        if not types:
            return []
        marks = ",".join("?" * len(types))
        sql = (
            f"{SELECT} WHERE state='QUEUED' AND not_before<=? AND type IN ({marks})"
            " ORDER BY priority DESC, pk LIMIT ?"
        )
        params = [now, *sorted(types), limit]
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [_from_row(r) for r in rows]

    async def in_states(self, states: Sequence[TaskState], limit: int) -> list[Task]:
        marks = ",".join("?" * len(states))
        sql = f"{SELECT} WHERE state IN ({marks}) ORDER BY pk LIMIT ?"
        params = [s.value for s in states] + [limit]
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [_from_row(r) for r in rows]

    async def expired(self, now: float, limit: int) -> list[Task]:
        sql = (
            f"{SELECT} WHERE state IN ('QUEUED', 'RUNNING') AND deadline<=?"
            " ORDER BY deadline LIMIT ?"
        )
        rows = await self._read(lambda c: c.execute(sql, (now, limit)).fetchall())
        return [_from_row(r) for r in rows]

    def statistics(self) -> dict[str, int]:
        return {"commit_groups": self._writer.groups, "writes": self._writer.writes}


def _to_row(task: Task) -> tuple[Any, ...]:
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
    )


def _update_params(task: Task, expected_sequence: int) -> tuple[Any, ...]:
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
        task.id,
        expected_sequence,
    )


def _from_row(row: tuple[Any, ...]) -> Task:
    (_pk, id_, client_id, _type, state, _prio, spec, sequence, attempt, backend, output,
     error, usage, created_at, started_at, ended_at, deadline, not_before, _key) = row  # fmt: skip
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
    )
