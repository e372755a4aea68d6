"""PostgresTaskStore: the store several router replicas share (asyncpg).

Claims lock the rows they take (`FOR UPDATE SKIP LOCKED`), so replicas claiming together
never take the same task nor wait for each other. A RUNNING task names its owner, whose
lease is a row of `replicas` renewed by a heartbeat; when it lapses, any replica re-queues
the task (`orphaned`). Every stored change is announced with NOTIFY by a trigger, and
`follow` passes other replicas' changes to this one (see server/events/feed.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence, Set
from typing import Any

import asyncpg

from server.model.aging import dispatch_order
from server.model.errors import StoreError
from server.model.stats import TaskStats
from server.model.task import Priority, Task, TaskState

from .aggregate import STATS_DURATIONS, assemble_stats
from .base import (
    Change,
    Claimed,
    ListPage,
    ListQuery,
    OnChange,
    Starter,
    StatsQuery,
    Unfinished,
)
from .pg_batches import WriteBatches
from .postgres_schema import MIGRATIONS, SCHEMA_VERSION, VERSIONS_TABLE
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

_log = logging.getLogger(__name__)

SELECT = f"SELECT pk, {COLUMNS} FROM tasks"  # noqa: S608 - constants only
INSERT = (
    f"INSERT INTO tasks ({INSERT_COLUMNS})"  # noqa: S608
    f" VALUES ({', '.join(f'${i}' for i in range(1, INSERT_COUNT + 1))})"
    " ON CONFLICT (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
)
UPDATE = (
    f"UPDATE tasks SET {UPDATE_SET.format(*(f'${i}' for i in range(1, UPDATE_SET_COUNT + 1)))}"  # noqa: S608
    f" WHERE id=${UPDATE_SET_COUNT + 1} AND sequence=${UPDATE_SET_COUNT + 2}"
)
# The tasks a batch's idempotency keys name, given as two arrays: client ids and keys.
KEYED = (
    f"{SELECT} WHERE idempotency_key IS NOT NULL AND (client_id, idempotency_key) IN"  # noqa: S608
    " (SELECT * FROM unnest($1::text[], $2::text[]))"
)


def _ready(columns: str, untried: str = "") -> str:
    """Up to $3 ready tasks ($1 now, $2 types) of each priority, oldest first: one range
    scan of tasks_queue per priority, never the whole queue (see model/aging.py)."""
    level = (
        f"(SELECT {columns} FROM tasks WHERE state='QUEUED' AND priority={{}}"  # noqa: S608 - constants only
        f" AND not_before<=$1 AND type=ANY($2::text[]){untried} ORDER BY pk LIMIT $3)"
    )
    return " UNION ALL ".join(level.format(int(p)) for p in reversed(Priority))


READY = _ready(f"pk, {COLUMNS}")
# A claim's candidates, unlocked: only what ranking needs, and not those it tried ($4). By
# id, not pk: asyncpg looks up an integer array type on each new connection's first use
# (~10 ms, enough to hold up a router's first claim), never a text array.
CANDIDATES = _ready("id, priority, created_at", " AND id<>ALL($4::text[])")
# Locks the chosen candidates still ready, skipping those another replica's claim holds.
LOCK_READY = (
    f"{SELECT} WHERE id=ANY($1::text[]) AND state='QUEUED' AND not_before<=$2"
    " FOR UPDATE SKIP LOCKED"
)
# Live: renewed within the lease. An owner with no row (deleted long dead) is not live.
ORPHANED = (
    f"{SELECT} WHERE state='RUNNING' AND owner IS DISTINCT FROM $1 AND NOT EXISTS ("  # noqa: S608
    " SELECT 1 FROM replicas r WHERE r.id=tasks.owner"
    "  AND r.heartbeat_at > clock_timestamp() - make_interval(secs => $2))"
    " ORDER BY pk LIMIT $3"
)
HEARTBEAT = (
    "INSERT INTO replicas (id, heartbeat_at) VALUES ($1, clock_timestamp())"
    " ON CONFLICT (id) DO UPDATE SET heartbeat_at=EXCLUDED.heartbeat_at"
)
# Replicas dead this long own nothing worth a row: their tasks count as orphans either way.
FORGET_DEAD_REPLICAS = (
    "DELETE FROM replicas WHERE heartbeat_at < clock_timestamp() - make_interval(secs => $1)"
)
DELETE_FINISHED = (
    "DELETE FROM tasks WHERE pk IN (SELECT pk FROM tasks"
    " WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND ended_at < $1"
    " ORDER BY ended_at LIMIT $2) RETURNING id"
)
# The Stats queries of sqlite.py in PostgreSQL's dialect (see aggregate.assemble_stats).
STATS_WINDOW = (
    "SELECT type, backend, state, priority, COUNT(*), SUM(attempt)::bigint,"
    " COALESCE(SUM((usage::json->>0)::bigint), 0)::bigint,"
    " COALESCE(SUM((usage::json->>1)::bigint), 0)::bigint,"
    " COALESCE(SUM((usage::json->>2)::float8), 0)"
    " FROM tasks WHERE {where} GROUP BY type, backend, state, priority"
)
STATS_QUEUE = (
    "SELECT state, priority, COUNT(*) FROM tasks"
    " WHERE state IN ('QUEUED', 'RUNNING') AND {where} GROUP BY state, priority"
)
MIGRATION_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtext('taskring ' || current_setting('search_path')))"
)
# Ends waits on a database that stopped answering: a request fails (UNAVAILABLE) rather
# than hang, and readiness turns NOT_SERVING.
COMMAND_TIMEOUT_S = 30.0
PING_TIMEOUT_S = 2.0
# Pauses between attempts to get the change feed's connection back.
FOLLOW_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)

_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@contextlib.contextmanager
def _errors(doing: str) -> Iterator[None]:
    """Database and connection failures as StoreError (the service maps it to UNAVAILABLE).
    The message names the failure, never the DSN, which may hold a password."""
    try:
        yield
    except _DATABASE_ERRORS as exc:
        raise StoreError(f"the task store could not {doing}: {type(exc).__name__}: {exc}") from exc


async def _create_schema(conn: asyncpg.Connection) -> str:
    """Creates the first schema of the search_path the store URL names (?search_path=…),
    which does not exist yet."""
    wanted = (await conn.fetchval("SHOW search_path")).split(",")[0].strip().strip('"')
    if not wanted or wanted == "$user":
        raise StoreError("no schema to create the tables in: name one with ?search_path=")
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(wanted)}")
    schema: str | None = await conn.fetchval("SELECT current_schema()")
    if schema is None:
        raise StoreError(f"could not create the schema {wanted!r} the store URL names")
    return schema


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def _lock_best(
    conn: asyncpg.Connection, limit: int, now: float, types: list[str], aging_s: float
) -> list[asyncpg.Record]:
    """Locks up to `limit` of the best ready tasks no other claim holds, and returns them.

    Ranks the unlocked candidates first, then locks only those it takes: locking every
    candidate (4 x limit) would hide the rest from other replicas' claims, which could then
    come back short with work waiting. Candidates another claim holds are skipped, and the
    next best tried, until `limit` are locked or no ready task is left untried.
    """
    locked: list[asyncpg.Record] = []
    tried: list[str] = []
    while len(locked) < limit:
        candidates = await conn.fetch(CANDIDATES, now, types, limit, tried)
        if not candidates:
            break
        candidates.sort(key=lambda r: dispatch_order(r[1], r[2], now, aging_s))
        ranked = [row[0] for row in candidates]
        while ranked and len(locked) < limit:
            batch, ranked = ranked[: limit - len(locked)], ranked[limit - len(locked) :]
            tried += batch
            locked += await conn.fetch(LOCK_READY, batch, now)
    return locked


class _Params:
    """Numbered placeholders ($1, $2, …) for a query built from optional parts."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


class PostgresTaskStore:
    def __init__(self, dsn: str, pool_size: int = 10, lease_s: float = 10.0) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self._dsn = dsn
        self._pool_size = pool_size
        self.lease_s = lease_s
        # This process: the owner of the tasks its dispatcher runs, and the writer named in
        # the change feed (so that it can skip its own changes).
        self.replica = uuid.uuid4().hex
        self._pool: asyncpg.Pool | None = None
        self._channel = ""
        self._heartbeat: asyncio.Task[None] | None = None
        self._writes = WriteBatches(self._acquire, (StoreError, *_DATABASE_ERRORS))
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._pool is not None:
            return
        with _errors("connect to PostgreSQL"):
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings={"taskring.replica": self.replica},
            )
        try:
            with _errors("create or migrate its schema"):
                await self._migrate()
                await self._renew_lease()
        except BaseException:
            await self.close()
            raise
        self._heartbeat = asyncio.create_task(self._keep_lease(), name="store-lease")

    async def _migrate(self) -> None:
        async with self._acquire() as conn, conn.transaction():
            # One replica migrates (or creates the schema) at a time; the others then find
            # the work done.
            await conn.execute(MIGRATION_LOCK)
            schema = await conn.fetchval("SELECT current_schema()")
            if schema is None:
                schema = await _create_schema(conn)
            self._channel = f"taskring_{schema}"
            await conn.execute(VERSIONS_TABLE)
            version = await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM taskring_migrations"
            )
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database has schema version {version}, newer than this server's"
                    f" {SCHEMA_VERSION}: upgrade taskring"
                )
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(migration)
                await conn.execute("INSERT INTO taskring_migrations (version) VALUES ($1)", number)
                _log.info("PostgreSQL schema %s migrated to version %d", schema, number)

    async def _renew_lease(self) -> None:
        await self._pool_or_fail().execute(HEARTBEAT, self.replica)

    async def _keep_lease(self) -> None:
        """Renews the lease three times per lease period: one missed beat is not fatal."""
        beats = 0
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._renew_lease()
                beats += 1
                if beats % 100 == 0:
                    await self._pool_or_fail().execute(FORGET_DEAD_REPLICAS, 100 * self.lease_s)
            except (StoreError, *_DATABASE_ERRORS) as exc:
                _log.warning("could not renew this replica's lease: %s", exc)

    async def close(self) -> None:
        for task in (self._heartbeat, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._heartbeat = self._follower = None
        pool, self._pool = self._pool, None
        if pool is not None:
            # Gone at once rather than after the lease: this replica runs nothing now (the
            # dispatcher re-queued its tasks before the store closes).
            with contextlib.suppress(*_DATABASE_ERRORS):
                await pool.execute("DELETE FROM replicas WHERE id=$1", self.replica, timeout=2.0)
            with contextlib.suppress(*_DATABASE_ERRORS):
                await asyncio.wait_for(pool.close(), 5.0)

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    def _acquire(self) -> Any:
        return self._pool_or_fail().acquire()

    async def _tasks(self, sql: str, *args: Any) -> list[Task]:
        """The tasks a SELECT of whole rows returns."""
        with _errors("read"):
            rows = await self._pool_or_fail().fetch(sql, *args)
        return [from_row(row) for row in rows]

    async def ping(self) -> None:
        with _errors("answer"):
            await self._pool_or_fail().fetchval("SELECT 1", timeout=PING_TIMEOUT_S)

    async def create(self, task: Task) -> tuple[Task, bool]:
        row = to_row(task, self.replica)
        key = task.spec.idempotency_key

        async def write(conn: asyncpg.Connection) -> asyncpg.Record | None:
            if (await conn.execute(INSERT, *row)).endswith(" 1"):
                return None
            # The key was used before (the insert yielded to that task's row).
            return await conn.fetchrow(
                f"{SELECT} WHERE client_id=$1 AND idempotency_key=$2", task.client_id, key
            )

        with _errors("store the task"):
            existing = await self._writes.submit(write)
        if existing is None:
            return task, True
        return from_row(existing), False

    async def create_batch(self, tasks: Sequence[Task]) -> list[tuple[Task, bool]]:
        """Inserts in order, each yielding to a stored key as `create` does (a key repeated
        in the batch yields to its first task, inserted just before), then reads the rows
        the keys name: a keyed task whose own row is there was created, else it replays
        the task found. Two round trips however many tasks (executemany pipelines)."""
        rows = [to_row(task, self.replica) for task in tasks]
        keyed = [(task.client_id, task.spec.idempotency_key) for task in tasks]
        keyed = [pair for pair in keyed if pair[1]]

        async def write(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            await conn.executemany(INSERT, rows)
            if not keyed:
                return []
            clients, keys = zip(*keyed, strict=True)
            found: list[asyncpg.Record] = await conn.fetch(KEYED, list(clients), list(keys))
            return found

        # A write fails alone in its group (WriteBatches): none of this batch is stored.
        with _errors("store the tasks"):
            found = await self._writes.submit(write)
        by_key = {(row["client_id"], row["idempotency_key"]): row for row in found}
        results: list[tuple[Task, bool]] = []
        for task in tasks:
            row = by_key.get((task.client_id, task.spec.idempotency_key))
            if row is None or row["id"] == task.id:
                results.append((task, True))
            else:
                results.append((from_row(row), False))
        return results

    async def get(self, task_id: str) -> Task | None:
        found = await self._tasks(f"{SELECT} WHERE id=$1", task_id)
        return found[0] if found else None

    async def list_page(self, query: ListQuery) -> ListPage:
        p = _Params()
        where = [f"client_id={p(query.client_id)}"]
        if query.states:
            where.append(f"state=ANY({p(sorted(s.value for s in query.states))}::text[])")
        if query.types:
            where.append(f"type=ANY({p(sorted(query.types))}::text[])")
        if query.before_cursor is not None:
            where.append(f"pk<{p(query.before_cursor)}")
        # One row more than asked tells whether another page exists.
        sql = f"{SELECT} WHERE {' AND '.join(where)} ORDER BY pk DESC LIMIT {p(query.limit + 1)}"
        with _errors("read"):
            rows = await self._pool_or_fail().fetch(sql, *p.values)
        return page_of_rows(rows, query.limit)

    async def stats(self, query: StatsQuery) -> TaskStats:
        p = _Params()
        scope: list[str] = []
        if query.client_id is not None:
            scope.append(f"client_id={p(query.client_id)}")
        if query.types:
            scope.append(f"type=ANY({p(sorted(query.types))}::text[])")
        queue_sql = STATS_QUEUE.format(where=" AND ".join(scope) or "TRUE")
        windowed = " AND ".join([*scope, f"created_at>={p(query.created_after)}"])
        limit = p(query.duration_sample_limit)
        with _errors("compute statistics"):
            # One snapshot for the three, like SQLite's read transaction.
            async with (
                self._acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                # Each query gets only the parameters it names ($n beyond its own are
                # an error to PostgreSQL): the queue's are a prefix of the others'.
                queue_rows = await conn.fetch(queue_sql, *p.values[: len(scope)])
                window_rows = await conn.fetch(
                    STATS_WINDOW.format(where=windowed), *p.values[: len(scope) + 1]
                )
                duration_rows = await conn.fetch(
                    STATS_DURATIONS.format(where=windowed, limit=limit), *p.values
                )
        return assemble_stats(query, queue_rows, window_rows, duration_rows)

    async def update(self, task: Task, expected_sequence: int) -> bool:
        params = update_params(task, expected_sequence, self.replica)

        async def write(conn: asyncpg.Connection) -> bool:
            return bool(await conn.execute(UPDATE, *params) == "UPDATE 1")

        with _errors("store the change"):
            return await self._writes.submit(write)

    async def delete_finished(self, ended_before: float, limit: int) -> list[str]:
        with _errors("delete finished tasks"):
            rows = await self._pool_or_fail().fetch(DELETE_FINISHED, ended_before, limit)
        return [row[0] for row in rows]

    async def queued(
        self, limit: int, now: float, types: Set[str], *, aging_s: float = 0.0
    ) -> list[Task]:
        if not types or limit <= 0:
            return []
        with _errors("read"):
            rows = await self._pool_or_fail().fetch(READY, now, sorted(types), limit)
        return in_dispatch_order(rows, now, aging_s, limit)

    async def claim(
        self, limit: int, now: float, types: Set[str], start: Starter, *, aging_s: float = 0.0
    ) -> Claimed:
        """Locks the ready rows no other replica has locked, writes the starts `start`
        plans and commits: the rows it skips are being claimed elsewhere."""
        if not types or limit <= 0:
            return Claimed(examined=0, started=[])
        with _errors("claim tasks"):
            async with self._acquire() as conn, conn.transaction():
                rows = await _lock_best(conn, limit, now, sorted(types), aging_s)
                candidates = in_dispatch_order(rows, now, aging_s, limit)
                plans = [(t, started) for t in candidates if (started := start(t)) is not None]
                if plans:
                    await conn.executemany(
                        UPDATE,
                        [update_params(new, old.sequence, self.replica) for old, new in plans],
                    )
        return Claimed(examined=len(candidates), started=[started for _, started in plans])

    async def orphaned(self, limit: int) -> list[Task]:
        return await self._tasks(ORPHANED, self.replica, self.lease_s, limit)

    async def queue_depth(self) -> dict[Priority, int]:
        sql = "SELECT priority, COUNT(*) FROM tasks WHERE state='QUEUED' GROUP BY priority"
        with _errors("read"):
            rows = await self._pool_or_fail().fetch(sql)
        return {Priority(priority): count for priority, count in rows}

    async def in_states(self, states: Sequence[TaskState], limit: int) -> list[Task]:
        sql = f"{SELECT} WHERE state=ANY($1::text[]) ORDER BY pk LIMIT $2"
        return await self._tasks(sql, [s.value for s in states], limit)

    async def expired(self, now: float, limit: int) -> list[Task]:
        sql = (
            f"{SELECT} WHERE state IN ('QUEUED', 'RUNNING') AND deadline<=$1"
            " ORDER BY deadline LIMIT $2"
        )
        return await self._tasks(sql, now, limit)

    async def unfinished(self) -> list[Unfinished]:
        sql = "SELECT id, client_id, deadline FROM tasks WHERE state IN ('QUEUED', 'RUNNING')"
        with _errors("read"):
            rows = await self._pool_or_fail().fetch(sql)
        return [Unfinished(task_id, client_id, deadline) for task_id, client_id, deadline in rows]

    def follow(self, on_change: OnChange, on_gap: Callable[[], None]) -> None:
        """Calls `on_change` for each change another replica stores, in commit order, and
        `on_gap` after the feed's connection came back (changes may have been missed)."""
        if self._follower is None:
            self._follower = asyncio.create_task(
                self._follow(on_change, on_gap), name="store-changes"
            )

    async def _follow(self, on_change: OnChange, on_gap: Callable[[], None]) -> None:
        def notified(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            task_id, sequence, state, writer = str(payload).split(" ")
            if writer != self.replica:
                on_change(Change(task_id, int(sequence), TaskState(state)))

        failures = 0
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=PING_TIMEOUT_S * 5)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self._channel, notified)
                if failures:
                    _log.warning("the change feed is back")
                    on_gap()
                failures = 0
                # A connection dropped without a word (a network cut) is found by the ping.
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5.0)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT_S)
                raise ConnectionError("the change feed's connection closed")
            except _DATABASE_ERRORS as exc:
                delay = FOLLOW_RETRY_S[min(failures, len(FOLLOW_RETRY_S) - 1)]
                if not failures:
                    _log.warning("the change feed failed (%s); reconnecting", exc)
                failures += 1
                await asyncio.sleep(delay)
            finally:
                if conn is not None:
                    with contextlib.suppress(*_DATABASE_ERRORS):
                        await asyncio.wait_for(conn.close(), PING_TIMEOUT_S)

    def statistics(self) -> dict[str, int]:
        pool = self._pool
        return {
            "pool_size": 0 if pool is None else pool.get_size(),
            "commit_groups": self._writes.batches,
            "writes": self._writes.writes,
        }
