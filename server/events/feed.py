"""ChangeFeed: what other replicas store reaches this one (a store shared by several
router processes, see TaskStore.follow).

Each announced change is small (id, sequence, state). A task this replica's watchers follow
is read back from the store and its watchers get the change; any other copy the hub keeps
is dropped, so Get reads the store. An attempt running here that another replica ended
(Cancel, a re-queue after this replica's lease lapsed) is stopped, and a newly queued task
wakes the claim loop.

Reading the row gives the task as it is now, not each change on the way: changes that
land faster than a row is read arrive as one, as for a slow watcher. Output is never
lost (the delta is the text the watcher has not seen yet), and states arrive in order.

The end of a task that holds some of its client's quotas here (admitted through this
replica, ended by another) is read too, watched or not, for the usage that corrects its
charge (TaskEnds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from server.dispatch.dispatcher import Dispatcher
from server.model.errors import StoreError
from server.model.task import ChatOutput, Task, TaskState, chat_text
from server.store.base import Change, TaskStore

from .hub import EventHub, EventKind, TaskEvent

_log = logging.getLogger(__name__)


class TaskEnds(Protocol):
    """What hears of the ends of tasks it holds (admission's TaskQuotas)."""

    def holds(self, task_id: str) -> bool: ...

    def ended(self, task: Task) -> None: ...

    def ended_unread(self, task_id: str) -> None: ...


class ChangeFeed:
    def __init__(
        self,
        store: TaskStore,
        hub: EventHub,
        dispatcher: Dispatcher,
        ends: TaskEnds | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._dispatcher = dispatcher
        self._ends = ends
        # One read at a time per task; a change during a read asks for one more.
        self._reading: dict[str, asyncio.Task[None]] = {}
        self._read_again: set[str] = set()
        # Reads of ended tasks for `ends` (a terminal state comes once: one read each).
        self._settling: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._store.follow(self.on_change, self.on_gap)

    def on_change(self, change: Change) -> None:
        self._dispatcher.changed_elsewhere(change.task_id, change.sequence)
        if change.state is TaskState.QUEUED:
            self._dispatcher.wake()
        refreshing = False
        if self._hub.watched(change.task_id):
            latest = self._hub.latest(change.task_id)
            if latest is None or change.sequence > latest.sequence:
                self._refresh(change.task_id)  # which tells `ends` too
                refreshing = True
        else:
            self._hub.drop(change.task_id)
        ends = self._ends
        if ends is None or refreshing or not change.state.is_terminal:
            return
        if ends.holds(change.task_id):
            settle = asyncio.create_task(self._settle(ends, change.task_id), name="feed:settle")
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)

    def on_gap(self) -> None:
        """Changes may have been missed: every watched task is read again, every other copy
        dropped, and the claim loop looks at the queue."""
        for task_id in self._hub.cached():
            if self._hub.watched(task_id):
                self._refresh(task_id)
            else:
                self._hub.drop(task_id)
        self._dispatcher.wake()

    def _refresh(self, task_id: str) -> None:
        if task_id in self._reading:
            self._read_again.add(task_id)
            return
        reading = asyncio.create_task(self._read(task_id), name=f"feed:{task_id}")
        self._reading[task_id] = reading

    async def _read(self, task_id: str) -> None:
        try:
            while True:
                self._read_again.discard(task_id)
                try:
                    current = await self._store.get(task_id)
                except StoreError as exc:
                    # The feed's own reconnection reports the gap; watchers get the change
                    # with the next one.
                    _log.warning("could not read task %s after a change: %s", task_id, exc)
                    return
                if current is not None:
                    # Before its watchers hear of the end, as on the replica that stored it.
                    ends = self._ends
                    if current.is_terminal and ends is not None and ends.holds(task_id):
                        ends.ended(current)
                    for event in events_between(self._hub.latest(task_id), current):
                        self._hub.publish(event)
                if task_id not in self._read_again:
                    return
        finally:
            del self._reading[task_id]

    async def _settle(self, ends: TaskEnds, task_id: str) -> None:
        """Tells `ends` how a task it holds ended, as stored."""
        try:
            ended = await self._store.get(task_id)
        except StoreError as exc:
            _log.warning("could not read task %s after its end: %s", task_id, exc)
            ended = None
        if ended is not None and ended.is_terminal:
            ends.ended(ended)
        else:  # gone already (retention), or unreadable: its charge stays as it was
            ends.ended_unread(task_id)

    async def close(self) -> None:
        reads = [*self._reading.values(), *self._settling]
        for read in reads:
            read.cancel()
        for read in reads:
            with contextlib.suppress(asyncio.CancelledError):
                await read


def events_between(before: Task | None, after: Task) -> list[TaskEvent]:
    """The events that take a watcher from `before` (what it has seen) to `after` (as
    stored now): the output it has not seen as a delta, then the state if it changed."""
    if before is None:
        return [TaskEvent(EventKind.STATE, after)]
    if after.sequence <= before.sequence:
        return []
    seen, now = chat_text(before.output), chat_text(after.output)
    same_run = after.attempt == before.attempt and now.startswith(seen)
    delta = now[len(seen) :] if same_run else ""
    if after.state is before.state and same_run:
        return [TaskEvent(EventKind.OUTPUT, after, delta)] if delta else []
    events = []
    if delta and after.sequence - 1 > before.sequence:
        # The text came before the change of state, as it does on the replica that ran it.
        with_text = before.evolve(output=ChatOutput(now), sequence=after.sequence - 1)
        events.append(TaskEvent(EventKind.OUTPUT, with_text, delta))
    events.append(TaskEvent(EventKind.STATE, after))
    return events
