"""Housekeeper: deletes finished tasks once they are older than the retention period.

Deletion goes in batches, one store write each (`TaskStore.delete_finished`), with the
event loop free between batches: a backlog of millions of old tasks (a first start with a
retention after running without one) is worked off without holding up Submits for more
than one batch's write at a time. Tasks stuck past their deadline are the dispatcher's
(its sweep fails them); this deletes only what has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .clock import Clock
from .events.hub import EventHub
from .model.errors import StoreError
from .store.base import TaskStore

_log = logging.getLogger(__name__)

# About 10-20 ms of the writer's time per batch here: short enough not to be noticed by a
# Submit waiting behind it, large enough to work off a backlog quickly.
DEFAULT_BATCH = 500
DEFAULT_INTERVAL_S = 60.0


class Housekeeper:
    def __init__(
        self,
        store: TaskStore,
        hub: EventHub,
        clock: Clock,
        retention_s: float,
        interval_s: float = DEFAULT_INTERVAL_S,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self._store = store
        self._hub = hub
        self._clock = clock
        self._retention_s = retention_s
        self._interval_s = interval_s
        self._batch = batch
        self._loop_task: asyncio.Task[None] | None = None
        self.deleted = 0

    def start(self) -> None:
        """Sweeps now and every `interval_s`; nothing when retention is 0 (keep for ever)."""
        if self._retention_s > 0 and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="housekeeping")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    async def sweep(self) -> int:
        """Deletes every finished task past retention, a batch at a time; how many."""
        before = self._clock.now() - self._retention_s
        deleted = 0
        while True:
            ids = await self._store.delete_finished(before, self._batch)
            for task_id in ids:
                self._hub.forget(task_id)
            deleted += len(ids)
            if len(ids) < self._batch:
                break
            await asyncio.sleep(0)  # let waiting Submits and events through between batches
        self.deleted += deleted
        return deleted

    async def _run(self) -> None:
        while True:
            try:
                if deleted := await self.sweep():
                    _log.info("deleted %d finished tasks older than the retention", deleted)
            except StoreError as exc:
                _log.warning("housekeeping paused: the store failed: %s", exc)
            await asyncio.sleep(self._interval_s)
