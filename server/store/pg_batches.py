"""WriteBatches: concurrent writes to PostgreSQL share transactions (group commit).

Every write NOTIFYs (the change feed's trigger), and PostgreSQL lets one notifying
transaction commit at a time: with a transaction per write, Submits went through one
commit after another (~1,200/s here, the event loop far from busy). Writes that arrive
while a batch commits wait for the next batch, so a commit carries as many as arrived.
A write that fails its batch (a bug, such as a duplicate id) fails alone: the batch is
rolled back and each of its writes is tried again in a transaction of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from server.model.errors import StoreError

T = TypeVar("T")
Write = Callable[[asyncpg.Connection], Awaitable[Any]]
# Batches in flight at once: one fills while another commits.
CONCURRENT_BATCHES = 2


class WriteBatches:
    def __init__(self, acquire: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> None:
        self._acquire = acquire
        self._errors = errors
        self._pending: list[tuple[Write, asyncio.Future[Any]]] = []
        self._flushing = 0
        self.batches = 0
        self.writes = 0

    def submit(self, write: Callable[[asyncpg.Connection], Awaitable[T]]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((write, future))
        if self._flushing < CONCURRENT_BATCHES:
            self._flushing += 1
            asyncio.get_running_loop().create_task(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._commit(batch)
        finally:
            self._flushing -= 1

    async def _commit(self, batch: list[tuple[Write, asyncio.Future[Any]]]) -> None:
        self.batches += 1
        self.writes += len(batch)
        try:
            async with self._acquire() as conn, conn.transaction():
                results = [await write(conn) for write, _ in batch]
        except self._errors as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            for one in batch:  # each alone: only the failing one fails
                await self._commit([one])
            return
        except BaseException as exc:  # cancelled (the store closing): nobody may hang
            for _, future in batch:
                _settle(future, exc=StoreError(f"the write was abandoned: {exc!r}"))
            raise
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result=result)


def _settle(
    future: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None
) -> None:
    if future.done():  # the caller went away
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
