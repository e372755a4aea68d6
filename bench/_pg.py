"""A throwaway PostgreSQL database per configuration of the stores stage, and the
PostgreSQL processes working for it, whose CPU the stage reports beside the routers'.

Each configuration gets a database of its own (taskring_bench_<random>, created beside the
one --postgresql-url names), so no rows, dead tuples or statistics of one load reach the
next; the routers create their schema and tables in it at start, as deployed. It is dropped
WITH (FORCE) when the configuration ends, also on error, Ctrl-C or --max-seconds; a drop
that fails is logged with the statement to run by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from _console import BenchError, log

from server.config import mask_password

# The schema the routers are told to use (and create): a named one, as a deployment that
# shares a database with other software would, rather than `public`.
SCHEMA = "taskring"
CONNECT_TIMEOUT_S = 10.0
# What a Submit reply promises depends on these server settings, so the report names them.
DURABILITY_SETTINGS = ("synchronous_commit", "fsync", "wal_sync_method", "commit_delay")


def database_url(admin_url: str, database: str, schema: str | None = None) -> str:
    """admin_url with its database replaced (and ?search_path=schema added), keeping any
    other query parameter (sslmode, ...)."""
    parts = urllib.parse.urlsplit(admin_url)
    query = urllib.parse.parse_qsl(parts.query)
    if schema is not None:
        query = [(k, v) for k, v in query if k != "search_path"] + [("search_path", schema)]
    return urllib.parse.urlunsplit(
        parts._replace(path=f"/{database}", query=urllib.parse.urlencode(query))
    )


# The server's processes that work for the bench's database: its backends (the routers'
# pools and change feeds, autovacuum workers) and the shared background processes, which
# have no database (WAL writer, checkpointer, background writer...). Backends of other
# databases (e.g. a test run beside the bench) are left out; the shared ones are not.
PROCESSES = (
    "SELECT pid FROM pg_stat_activity WHERE (datname=$1 OR datname IS NULL)"
    " AND pid <> pg_backend_pid()"
)


@dataclass(frozen=True, slots=True)
class BenchDatabase:
    """A database created for one configuration: the routers' store URL, what a commit
    promises on this server, and (`processes`) the server's processes working for it."""

    name: str
    store_url: str
    durability: str
    admin: asyncpg.Connection  # to the admin database: for pg_stat_activity
    local: bool  # the server's processes are this machine's (their CPU is readable)

    async def processes(self) -> list[int] | None:
        """PIDs of PostgreSQL's processes working for this database now; None when the
        server is not on this machine."""
        if not self.local:
            return None
        try:
            rows = await self.admin.fetch(PROCESSES, self.name, timeout=5.0)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log(f"  PostgreSQL's processes not found ({exc}): its CPU is not measured")
            return None
        return [row[0] for row in rows]


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        where = mask_password(url)
        raise BenchError(f"PostgreSQL at {where} is needed for the stores stage: {exc}") from exc


def is_postgres(pid: int) -> bool:
    """Whether this machine's process `pid` is PostgreSQL's: not when the server runs on
    another machine or in another PID namespace (a container), where PIDs mean other things."""
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="ascii").strip() == "postgres"
    except OSError:
        return False


async def _describe(conn: asyncpg.Connection) -> tuple[str, bool]:
    settings = [f"{name}={await conn.fetchval(f'SHOW {name}')}" for name in DURABILITY_SETTINGS]
    backend: int = await conn.fetchval("SELECT pg_backend_pid()")
    durability = f"each Submit reply follows a commit (PostgreSQL {', '.join(settings)})"
    return durability, is_postgres(backend)


@contextlib.asynccontextmanager
async def bench_database(admin_url: str) -> AsyncIterator[BenchDatabase]:
    """Create a fresh database on the server of admin_url; drop it on leaving, whatever
    happened (WITH (FORCE): routers still connected, e.g. after a failure, are cut off)."""
    name = f"taskring_bench_{uuid.uuid4().hex[:12]}"
    conn = await _connect(admin_url)
    try:
        durability, local = await _describe(conn)
        await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            log(f"PostgreSQL database {name} created")
            url = database_url(admin_url, name, SCHEMA)
            yield BenchDatabase(name, url, durability, conn, local)
        finally:
            await _drop(conn, name)
    finally:
        await conn.close()


async def _drop(conn: asyncpg.Connection, name: str) -> None:
    statement = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    try:
        await conn.execute(statement, timeout=30.0)
    except asyncio.CancelledError:  # a second Ctrl-C while dropping
        log(f"interrupted while dropping the database {name}; run: psql -c '{statement}'")
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log(f"could not drop the database {name} ({exc}); run: psql -c '{statement}'")
    else:
        log(f"PostgreSQL database {name} dropped")
