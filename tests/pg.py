"""The PostgreSQL server of this machine (and CI's) for tests: one database per test run,
dropped at its end, and a schema per store a test opens (the tests' SQLite file path names
it, so reopening the same "file" reopens the same schema)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import asyncpg

# The server and database the run's own database is created from (trust auth).
ADMIN_DSN = os.environ.get("TASKRING_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


class RunDatabase:
    """`create()` at the start of the run, `drop()` at its end (even with replicas still
    connected: WITH (FORCE))."""

    def __init__(self) -> None:
        self.name = f"taskring_test_{uuid.uuid4().hex[:12]}"
        self.dsn = _with_database(ADMIN_DSN, self.name)

    def create(self) -> None:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.name}"'))

    def drop(self) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))

    @staticmethod
    async def _admin(statement: str) -> None:
        try:
            conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise RuntimeError(
                f"the tests need PostgreSQL at {ADMIN_DSN} (set TASKRING_TEST_POSTGRES): {exc}"
            ) from exc
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    def url_for(self, path: Path) -> str:
        """The store URL standing in for the SQLite file `path`: a schema of its own."""
        schema = "t_" + hashlib.sha256(str(path).encode()).hexdigest()[:20]
        return f"{self.dsn}?search_path={schema}"
