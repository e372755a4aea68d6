"""ChangeRecorder: the one way a task change reaches watchers: stored first, then published."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.store.base import TaskStore

from .hub import EventHub, TaskEvent

_log = logging.getLogger(__name__)


class ChangeRecorder:
    def __init__(self, store: TaskStore, hub: EventHub) -> None:
        self._store = store
        self._hub = hub

    async def record(
        self,
        events: list[TaskEvent],
        expected_sequence: int,
        on_saved: Callable[[TaskEvent], None] | None = None,
    ) -> bool:
        """Stores the task of the last event if nobody changed it since `expected_sequence`,
        then publishes `events` in order (several when one write carries several changes).
        False (nothing published) when another writer got there first.

        Shielded: once a write is sent it is also published (and `on_saved` told), even if
        the caller is cancelled meanwhile; a committed but unpublished change would leave
        watchers waiting and readers of the hub's cache seeing an old state.
        """
        write = asyncio.ensure_future(self._store.update(events[-1].task, expected_sequence))
        try:
            ok = await asyncio.shield(write)
        except asyncio.CancelledError:
            self._publish(await write, events, on_saved)
            raise
        self._publish(ok, events, on_saved)
        return ok

    def _publish(
        self, ok: bool, events: list[TaskEvent], on_saved: Callable[[TaskEvent], None] | None
    ) -> None:
        if not ok:
            task = events[-1].task
            _log.info("task %s changed concurrently; dropped %s", task.id, task.state.value)
            return
        if on_saved is not None:
            on_saved(events[-1])
        for event in events:
            self._hub.publish(event)
