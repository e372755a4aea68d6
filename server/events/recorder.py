"""ChangeRecorder: the one way a task change reaches watchers. State changes are stored
first, then published; output deltas go out first (see `publish_output`).

Every end of a task this process stores passes here (an attempt's success or failure,
Cancel, a deadline passing, an orphan on its last attempt): `on_end` hears of each, once,
with the task as stored."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from server.model.task import Task
from server.store.base import TaskStore

from .hub import EventHub, TaskEvent

_log = logging.getLogger(__name__)

# The most output deltas of a task that may have reached watchers without being stored
# (see ChangeRecorder.publish_output).
MAX_UNSTORED_DELTAS = 64


def past_unstored_output(change: Task) -> Task:
    """`change`, made to a RUNNING task by someone other than its attempt (recovery of an
    orphan, a Cancel on another replica), numbered past the output deltas the attempt may
    have published and not stored: a sequence number a watcher saw is never reused."""
    return change.evolve(sequence=change.sequence + MAX_UNSTORED_DELTAS)


OnSaved = Callable[[TaskEvent], None]
OnEnd = Callable[[Task], None]


class ChangeRecorder:
    def __init__(self, store: TaskStore, hub: EventHub, on_end: OnEnd | None = None) -> None:
        self._store = store
        self._hub = hub
        # Admission's quotas: what a task held is given back when it ends.
        self._on_end = on_end

    def record(
        self,
        events: list[TaskEvent],
        expected_sequence: int,
        on_saved: OnSaved | None = None,
    ) -> asyncio.Future[bool]:
        """Stores the task of the last event if nobody changed it since `expected_sequence`,
        then publishes `events` in order (several when one write carries several changes).
        Resolves to False (nothing published) when another writer got there first.

        Publishing (and `on_saved`) hangs on the write itself, not on the caller: a caller
        cancelled mid-write cannot leave a committed change unpublished, which would keep
        watchers waiting and the hub's cache stale. The callback runs before the caller
        resumes, so the caller sees the change already published.
        """
        write = asyncio.ensure_future(self._store.update(events[-1].task, expected_sequence))
        write.add_done_callback(functools.partial(self._publish, events, on_saved))
        return asyncio.shield(write)

    def published(self, events: list[TaskEvent]) -> None:
        """Publishes changes the caller stored itself (a store's claim writes its starts)."""
        for event in events:
            self._hub.publish(event)

    def publish_output(self, event: TaskEvent) -> None:
        """Publishes an output delta before it is stored (see `store_output`).

        A token reaches its watchers without waiting for a commit (on this machine the
        commit was half of the latency the router added to the first token), and the
        attempt stores its output every so often, not per delta: storing the whole text on
        each token made a long reply cost the square of its length in writes. What a
        watcher may have seen that is not stored is bounded: the attempt publishes at most
        MAX_UNSTORED_DELTAS deltas past the last stored one, and a change anyone else makes
        to a running task (recovery, a Cancel on another replica) skips that many sequence
        numbers, so a number seen is never reused. State changes never take this path: one
        seen is one stored."""
        self._hub.publish(event)

    def store_output(self, task: Task, expected_sequence: int) -> asyncio.Future[bool]:
        """Stores `task` (its output so far, published already) if nobody changed it since
        `expected_sequence`; False if someone did. Returns the write itself: a caller that
        may be cancelled awaits it through asyncio.shield, and keeps it, so that whatever it
        records next waits for it."""
        return asyncio.ensure_future(self._store.update(task, expected_sequence))

    def _publish(
        self, events: list[TaskEvent], on_saved: OnSaved | None, write: asyncio.Future[bool]
    ) -> None:
        if write.cancelled() or write.exception() is not None:
            return  # the caller (if still there) gets the error through the shield
        if not write.result():
            task = events[-1].task
            _log.info("task %s changed concurrently; dropped %s", task.id, task.state.value)
            return
        if on_saved is not None:
            on_saved(events[-1])
        # Before watchers hear of the end: a client that saw its task end may submit the
        # next one at once, and finds its quotas given back.
        task = events[-1].task
        if task.is_terminal and self._on_end is not None:
            self._on_end(task)
        for event in events:
            self._hub.publish(event)
