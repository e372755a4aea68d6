"""EventHub: fans out each task's persisted events to its watchers, in sequence order.

Each watcher has its own bounded buffer, so a slow watcher never blocks the publisher or
other watchers. When a buffer holds `coalesce_after` events, further output deltas are
merged into the last buffered delta (the watcher skips intermediate sequence numbers but
loses no text); state changes are never merged or dropped. Example with coalesce_after=2:

    buffer [RUNNING#3, delta#4 "He"] + delta#5 "llo" → [RUNNING#3, delta#5 "Hello"]

The hub also keeps a short history per task so a watcher that reconnects with
`after_sequence` gets exactly the events it missed, and the latest task for a fast snapshot.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from server.model.task import Task


class EventKind(enum.Enum):
    SNAPSHOT = "snapshot"
    STATE = "state"
    OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """`task` is the task after the event; `text` is the appended output for OUTPUT. The
    OUTPUT events watchers and the history get carry their task without its output (see
    `without_output`)."""

    kind: EventKind
    task: Task
    text: str = ""
    # What a sender made of this event, by the sender's name: Stream keeps its encoding
    # here, so the first watcher encodes an event and every other watcher sends the same
    # bytes (a finished task with a 100 KiB reply costs ~0.4 ms to encode, per watcher
    # otherwise). The hub never reads it; a coalesced delta is a new event, with its own.
    memo: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def sequence(self) -> int:
        return self.task.sequence

    def without_output(self) -> TaskEvent:
        """This event with its task's output left out: what watchers and the history keep
        of a delta, which is its text and number. The task holds the whole output so far,
        and one copy per delta kept would grow with the square of a reply's length (256
        deltas of a 100 KiB reply: 25 MiB per running task); the latest task keeps it."""
        return TaskEvent(self.kind, self.task.evolve(output=None), self.text)


class Watch:
    """One watcher's buffer. Read with `await next_event()`; None means the hub closed."""

    def __init__(self, task_id: str, coalesce_after: int) -> None:
        self.task_id = task_id
        self._coalesce_after = coalesce_after
        self._buffer: deque[TaskEvent] = deque()
        # Set while next_event waits for a push. A bare future rather than asyncio.Event:
        # Event.wait looks up the running loop on every call, which on Python 3.11 costs a
        # getpid() system call, once per event per watcher.
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def push(self, event: TaskEvent) -> None:
        last = self._buffer[-1] if self._buffer else None
        if (
            len(self._buffer) >= self._coalesce_after
            and event.kind is EventKind.OUTPUT
            and last is not None
            and last.kind is EventKind.OUTPUT
        ):
            self._buffer[-1] = TaskEvent(EventKind.OUTPUT, event.task, last.text + event.text)
        else:
            self._buffer.append(event)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_event(self) -> TaskEvent | None:
        while not self._buffer:
            if self._closed:
                return None
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buffer.popleft()

    @property
    def pending(self) -> int:
        return len(self._buffer)


@dataclass(slots=True)
class _TaskLog:
    latest: Task
    events: deque[TaskEvent]


class EventHub:
    """Publishing is synchronous and O(watchers of that task); it never awaits."""

    def __init__(
        self,
        history_per_task: int = 256,
        finished_tasks_kept: int = 2000,
        coalesce_after: int = 16,
    ) -> None:
        self._history_per_task = history_per_task
        self._finished_kept = finished_tasks_kept
        self._coalesce_after = coalesce_after
        self._watches: dict[str, set[Watch]] = {}
        # Recent events per task; unfinished tasks first, finished ones evicted oldest first.
        self._logs: dict[str, _TaskLog] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._closed = False
        self.published = 0

    def publish(self, event: TaskEvent) -> None:
        task_id = event.task.id
        log = self._logs.get(task_id)
        if log is None:
            log = self._logs[task_id] = _TaskLog(event.task, deque(maxlen=self._history_per_task))
        elif event.sequence <= log.latest.sequence:
            return  # already published (or superseded): order and uniqueness over all else
        log.latest = event.task
        if event.kind is EventKind.OUTPUT:
            event = event.without_output()
        log.events.append(event)
        if event.task.is_terminal:
            # Every event holds the task as it was then, output included: a finished task's
            # history could hold hundreds of copies of its reply. A watcher resuming it
            # gets the final task as a snapshot instead, which restates everything.
            log.events.clear()
            self._keep_finished(task_id)
        for watch in self._watches.get(task_id, ()):
            watch.push(event)
        self.published += 1

    def latest(self, task_id: str) -> Task | None:
        log = self._logs.get(task_id)
        return None if log is None else log.latest

    def seed(self, task: Task) -> None:
        """Keeps `task`, read from the store, as the latest copy when the hub has none or an
        older one, without publishing it: the base a change from another replica is told
        against (see ChangeFeed)."""
        log = self._logs.get(task.id)
        if log is not None:
            if task.sequence > log.latest.sequence:
                log.latest = task
            return
        self._logs[task.id] = _TaskLog(task, deque(maxlen=self._history_per_task))
        if task.is_terminal:
            self._keep_finished(task.id)

    def _keep_finished(self, task_id: str) -> None:
        """Counts a finished task among the few kept, evicting the oldest beyond them."""
        self._finished[task_id] = None
        while len(self._finished) > self._finished_kept:
            old, _ = self._finished.popitem(last=False)
            self._logs.pop(old, None)

    def watched(self, task_id: str) -> bool:
        return task_id in self._watches

    def cached(self) -> list[str]:
        """The ids of the tasks the hub keeps a copy of."""
        return list(self._logs)

    def drop(self, task_id: str) -> None:
        """Forgets a task another replica changed, finished or not: Get then reads the
        store rather than an old copy."""
        self._logs.pop(task_id, None)
        self._finished.pop(task_id, None)

    def forget(self, task_id: str) -> None:
        """Drops what the hub keeps of a finished task that was deleted from the store, so
        that Get does not answer with it from here."""
        if task_id in self._finished:
            self.drop(task_id)

    def history(self, task_id: str, after_sequence: int, upto: int) -> list[TaskEvent] | None:
        """The events numbered after_sequence+1 … upto, or None if any of them is gone."""
        log = self._logs.get(task_id)
        if log is None:
            return None
        events = [e for e in log.events if after_sequence < e.sequence <= upto]
        # Coalescing happens per watcher, not here: the history holds every sequence number
        # that was published, so a complete replay starts right after `after_sequence`.
        if not events or events[0].sequence != after_sequence + 1 or events[-1].sequence != upto:
            return None
        return events

    @contextmanager
    def subscribe(self, task_id: str) -> Iterator[Watch]:
        watch = Watch(task_id, self._coalesce_after)
        if self._closed:
            watch.close()
        self._watches.setdefault(task_id, set()).add(watch)
        try:
            yield watch
        finally:
            watchers = self._watches.get(task_id)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._watches[task_id]

    def close(self) -> None:
        """Ends every watch (shutdown): each Stream finishes cleanly instead of hanging."""
        self._closed = True
        for watchers in self._watches.values():
            for watch in watchers:
                watch.close()

    def statistics(self) -> dict[str, int]:
        return {
            "watchers": sum(len(w) for w in self._watches.values()),
            "tasks_tracked": len(self._logs),
            "events_published": self.published,
        }
