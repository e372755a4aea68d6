"""A writer thread that commits SQLite writes in groups: one transaction (one fsync) for
every write that arrived while the previous transaction was committing.

Why: with synchronous=FULL each COMMIT waits for the disk. Committing writes one by one
would cap Submit at the disk's fsync rate; grouping lets throughput grow with load while
every caller still gets its answer only after its write is durable. A write is at most one
modifying statement, and SQLite undoes a failing statement alone (its statement journal)
while the transaction goes on, so one failing write does not undo its group; a write of
several statements (a batch of tasks) wraps them in a savepoint of its own to be the same.

    loop thread:  submit(op) ─▶ queue ─▶ writer: BEGIN; op1; op2; … opN; COMMIT
                  futures ◀── resolved together, one wake-up of the loop per group
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from server.model.errors import StoreError

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], Any]
_log = logging.getLogger(__name__)

# Bounds one transaction so a huge backlog still commits (and answers) in steps.
MAX_GROUP = 2000


class GroupCommitWriter:
    """Owns the only writing connection; `submit` is called from the event loop thread."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        # Items are (write, future), or None to stop; the queue does its own locking.
        self._queue: queue.SimpleQueue[tuple[Write, asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.groups = 0
        self.writes = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queues `write`; the future resolves once the group holding it has committed.

        A plain future rather than a coroutine: callers that must not lose the result when
        cancelled can shield it without wrapping it in a Task."""
        if self._thread is None or self._loop is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((write, future))
        return future

    async def close(self) -> None:
        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        self._queue.put(None)
        await asyncio.to_thread(thread.join)

    def _run(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            _log.exception("the sqlite writer cannot open the store")
            self._fail_pending(StoreError(f"the task store cannot be opened: {exc}"))
            return
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                group = [first]
                stop = False
                while len(group) < MAX_GROUP:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    group.append(item)
                self._commit(conn, group)
                if stop:
                    return
        finally:
            conn.close()

    def _fail_pending(self, error: StoreError) -> None:
        """Fails every queued write: nobody waits forever on a writer that is gone."""
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                outcomes.append((item[1], None, error))
        self._thread = None
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve_all, outcomes)

    def _commit(
        self, conn: sqlite3.Connection, group: list[tuple[Write, asyncio.Future[Any]]]
    ) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for index, (write, future) in enumerate(group):
                try:
                    result = write(conn)
                except Exception as exc:  # noqa: BLE001 - handed to the caller's future
                    outcomes.append((future, None, _translate(exc)))
                    if not conn.in_transaction:
                        # Some errors (disk full, I/O) roll back the whole transaction: the
                        # writes before this one are gone too, and later ones must not run
                        # outside a transaction. All of them fail, none half-done.
                        lost = StoreError(f"the task store rolled back a group: {exc}")
                        outcomes = [(f, None, lost) for _, f in group[:index]] + outcomes[-1:]
                        outcomes += [(f, None, lost) for _, f in group[index + 1 :]]
                        break
                else:
                    outcomes.append((future, result, None))
            else:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _log.exception("sqlite group commit failed")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = StoreError(f"the task store could not commit: {exc}")
            outcomes = [(future, None, error) for _, future in group]
        self.groups += 1
        self.writes += len(group)
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed while we committed
            self._loop.call_soon_threadsafe(_resolve_all, outcomes)


def _translate(exc: Exception) -> Exception:
    """sqlite3 errors become StoreError here, at the boundary; others pass unchanged."""
    if isinstance(exc, sqlite3.Error):
        error = StoreError(f"the task store refused a write: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _resolve_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.done():  # the caller was cancelled; its write is committed all the same
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
