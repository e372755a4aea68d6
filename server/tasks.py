"""TaskManager: the operations behind TaskService, in domain terms (no protobuf here)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence, Set
from dataclasses import dataclass, replace

from .admission.limits import TypeLimiter
from .admission.priorities import PriorityCaps
from .admission.quotas import TaskQuotas
from .admission.validate import reportable, validate_spec
from .clock import Clock
from .config import TaskLimits
from .config_file import Limits
from .dispatch.dispatcher import Dispatcher
from .dispatch.retry import RetryPolicies
from .events.hub import EventHub, EventKind, TaskEvent
from .events.recorder import ChangeRecorder, past_unstored_output
from .model import states
from .model.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    RateLimitedError,
    TaskringError,
    UnavailableError,
)
from .model.ids import UuidV7Factory
from .model.stats import StatsReport
from .model.task import Task, TaskSpec, TaskState
from .store.base import ListQuery, StatsQuery, TaskStore
from .tasktypes import TaskType

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_STATS_WINDOW_S = 3600.0
# Bounds the rows one Stats call aggregates (the window query reads each task in it).
MAX_STATS_WINDOW_S = 7 * 86400.0
MAX_STATS_TYPES = 100
# Tasks in one SubmitBatch: one transaction, and a reply, of bounded size.
MAX_BATCH_TASKS = 1000

# What became of one task of a batch: (the task, created) as Submit answers, or why it
# was refused.
BatchOutcome = tuple[Task, bool] | TaskringError


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of List: its tasks, the token of the next page ("" on the last), and a
    token for each task that goes on right after it (for a reply cut short)."""

    tasks: list[Task]
    next_page_token: str
    _cursors: list[int]

    def token_after(self, index: int) -> str:
        """The page token that lists the tasks after tasks[index]."""
        return _encode_page_token(self._cursors[index])


class TaskManager:
    def __init__(
        self,
        store: TaskStore,
        hub: EventHub,
        recorder: ChangeRecorder,
        dispatcher: Dispatcher,
        clock: Clock,
        limits: TaskLimits,
        retry: RetryPolicies,
        known_types: Callable[[], Set[str]],
        custom_types: Mapping[str, TaskType] | None = None,
        new_id: Callable[[], str] | None = None,
        priority_caps: PriorityCaps | None = None,
        quotas: TaskQuotas | None = None,
        type_limiter: TypeLimiter | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._recorder = recorder
        self._dispatcher = dispatcher
        self._clock = clock
        self._limits = limits
        self._retry = retry
        # A callable: members (and the types they run) change while the server runs.
        self._known_types = known_types
        self._custom_types = custom_types or {}
        self._new_id = new_id or UuidV7Factory()
        self._priority_caps = priority_caps or PriorityCaps(Limits())
        # Token budgets and caps on unfinished tasks; given back as tasks end (the
        # ChangeRecorder's on_end), or here when a write stores nothing.
        self._quotas = quotas or TaskQuotas(Limits(), clock)
        # Rate limits per task type ([quotas.types]), across all clients.
        self._type_limiter = type_limiter or TypeLimiter({})
        self._accepting = True

    def stop_accepting(self) -> None:
        """From now on Submit and SubmitBatch answer UNAVAILABLE (the server is shutting down)."""
        self._accepting = False

    async def submit(self, client_id: str, spec: TaskSpec) -> tuple[Task, bool]:
        if not self._accepting:
            raise UnavailableError("the server is shutting down; submit to another replica")
        now = self._clock.now()
        task = await self._admitted(client_id, spec, now)
        spec = task.spec
        started = self._dispatcher.start_at_submit(task, now)
        try:
            creation = asyncio.ensure_future(self._store.create(started or task))
        except BaseException:
            self._quotas.release(task.id)
            if started is not None:
                self._dispatcher.release(started)
            raise
        if started is not None and not spec.idempotency_key:
            self._dispatcher.start_early(started)
        # Settled from the write itself, like every change (see ChangeRecorder): a Submit
        # whose caller went away mid-commit still publishes its task and hands it over.
        creation.add_done_callback(functools.partial(self._settle, task, started))
        stored, created = await asyncio.shield(creation)
        if not created and stored.spec != spec:
            raise _key_reused(spec, stored)
        return stored, created

    async def _admitted(self, client_id: str, asked: TaskSpec, now: float) -> Task:
        """The new task `asked` describes, admitted: checked, with its defaults and its
        priority within the client's cap, and holding its share of the type's rate and
        the client's quotas. Raises InvalidArgumentError naming each problem, or
        RateLimitedError."""
        spec = asked
        if not spec.max_attempts:  # the task type's retry policy says how many
            spec = replace(spec, max_attempts=self._retry.for_type(spec.type).max_attempts)
        spec = validate_spec(spec, self._limits, self._known_types(), self._custom_types)
        spec = self._priority_caps.apply(client_id, spec)
        task = Task(
            id=self._new_id(),
            client_id=client_id,
            spec=spec,
            state=TaskState.QUEUED,
            created_at=now,
            deadline=now + spec.timeout_s,
        )
        # Checked and held before the write, with no await in between: concurrent Submits
        # each see the ones before them.
        self._quotas.admit(task)
        # The type's token last: a bucket's token cannot be handed back, the quotas' hold
        # can, so a task another check refuses takes nothing of its type's rate. The await
        # never suspends (the bucket has room, or it raises).
        try:
            await self._type_limiter.admit(spec.type)
        except BaseException:
            self._quotas.release(task.id)
            raise
        return task

    def _settle(
        self, task: Task, started: Task | None, creation: asyncio.Future[tuple[Task, bool]]
    ) -> None:
        failed = creation.cancelled() or creation.exception() is not None
        if failed or not creation.result()[1]:
            # Not stored, or an idempotent replay: the slot reserved for it is not needed,
            # nor what it holds of its client's quotas.
            self._quotas.release(task.id)
            if started is not None:
                self._dispatcher.release(started)
            return
        stored = creation.result()[0]
        # A task started at submit was stored RUNNING; its QUEUED moment is published too,
        # so every watcher sees the same states whichever way it went.
        if started is not None:
            self._hub.publish(TaskEvent(EventKind.STATE, task))
        self._hand_over(stored)

    def _hand_over(self, stored: Task) -> None:
        """Publishes a task just stored and gives it to the dispatcher."""
        self._hub.publish(TaskEvent(EventKind.STATE, stored))
        self._dispatcher.submitted(stored)

    async def submit_batch(self, client_id: str, specs: Sequence[TaskSpec]) -> list[BatchOutcome]:
        """Submits each spec as `submit` would, storing the valid ones in one transaction;
        one outcome per spec, in order. Fails as a whole only while shutting down or when
        the store fails (nothing stored). `specs` may be empty (the batch's tasks were all
        refused before they got here); the caller bounds the batch with check_batch_size.

        Unlike Submit, no task starts before its commit: a batch is for throughput, and its
        tasks queue behind each other in priority order as the dispatcher claims them."""
        if not self._accepting:
            raise UnavailableError("the server is shutting down; submit to another replica")
        outcomes: dict[int, BatchOutcome] = {}
        fresh: list[tuple[int, Task]] = []
        now = self._clock.now()
        for index, asked in enumerate(specs):
            try:
                # Each task on its own, in request order, as the tasks of Submits would be.
                task = await self._admitted(client_id, asked, now)
            except (InvalidArgumentError, RateLimitedError) as exc:
                outcomes[index] = exc
                continue
            fresh.append((index, task))
        stored = await self._create_batch([task for _, task in fresh]) if fresh else []
        for (index, task), (kept, created) in zip(fresh, stored, strict=True):
            if not created and kept.spec != task.spec:
                outcomes[index] = _key_reused(task.spec, kept)
            else:
                outcomes[index] = (kept, created)
        return [outcomes[index] for index in range(len(specs))]

    async def _create_batch(self, tasks: list[Task]) -> list[tuple[Task, bool]]:
        try:
            creation = asyncio.ensure_future(self._store.create_batch(tasks))
        except BaseException:
            self._release_all(tasks)
            raise
        # As Submit's: settled from the write itself, whether or not the caller still waits.
        creation.add_done_callback(functools.partial(self._settle_batch, tasks))
        return await asyncio.shield(creation)

    def _settle_batch(
        self, tasks: list[Task], creation: asyncio.Future[list[tuple[Task, bool]]]
    ) -> None:
        if creation.cancelled() or creation.exception() is not None:
            self._release_all(tasks)  # nothing was stored
            return
        for task, (stored, created) in zip(tasks, creation.result(), strict=True):
            if created:
                self._hand_over(stored)
            else:  # a replay: the task admitted was not stored
                self._quotas.release(task.id)

    def _release_all(self, tasks: list[Task]) -> None:
        for task in tasks:
            self._quotas.release(task.id)

    async def get(self, client_id: str, task_id: str) -> Task:
        _check_id(task_id)
        task = self._hub.latest(task_id) or await self._store.get(task_id)
        # Another client's task answers NOT_FOUND too: its existence is not theirs to learn.
        if task is None or task.client_id != client_id:
            raise NotFoundError(task_id)
        return task

    async def list(
        self,
        client_id: str,
        states_: Set[TaskState],
        types: Set[str],
        page_size: int,
        page_token: str,
    ) -> TaskPage:
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgumentError.single("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        query = ListQuery(
            client_id=client_id,
            states=frozenset(states_),
            types=frozenset(types),
            limit=page_size or DEFAULT_PAGE_SIZE,
            before_cursor=_decode_page_token(page_token),
        )
        page = await self._store.list_page(query)
        token = "" if page.next_cursor is None else _encode_page_token(page.next_cursor)
        return TaskPage(page.tasks, token, page.cursors)

    async def stats(
        self, client_id: str | None, types: Sequence[str], window_s: float | None
    ) -> StatsReport:
        """The queue now and the tasks created within the last `window_s` (None: an hour).

        `client_id` None counts every client's tasks: for an admin caller once API keys
        exist. Until then the servicer always passes the caller's own id.
        """
        problems: list[FieldViolation] = []
        if window_s is None:
            window_s = DEFAULT_STATS_WINDOW_S
        elif not 0 < window_s <= MAX_STATS_WINDOW_S:
            problems.append(
                FieldViolation(
                    "window",
                    f"must be positive and at most {MAX_STATS_WINDOW_S:.0f}s (7 days);"
                    " leave it unset for the last hour",
                )
            )
        if len(types) > MAX_STATS_TYPES:
            problems.append(FieldViolation("types", f"at most {MAX_STATS_TYPES} types"))
        problems += [
            FieldViolation(f"types[{i}]", "must not be empty; omit it to count every type")
            for i, task_type in enumerate(types)
            if not task_type
        ]
        if problems:  # a thousand empty types must not make a thousand violations
            raise InvalidArgumentError(reportable(problems, "types"))
        now = self._clock.now()
        query = StatsQuery(client_id, created_after=now - window_s, types=frozenset(types))
        stats = await self._store.stats(query)
        return StatsReport(client_id or "", window_s, now, stats)

    async def cancel(self, client_id: str, task_id: str) -> Task:
        task = await self.get(client_id, task_id)
        while True:
            if task.is_terminal:
                raise FailedPreconditionError(
                    f"task {task_id} already finished ({task.state.value}); nothing to cancel"
                )
            if self._dispatcher.running(task_id):
                stopped = await self._dispatcher.cancel(task_id)
                if stopped is not None and stopped.state is TaskState.CANCELLED:
                    return stopped
            else:
                cancelled = states.cancel(task, self._clock.now())
                if task.state is TaskState.RUNNING:
                    # Running on another replica, whose watchers may have seen output
                    # deltas it has not stored yet: skip their numbers.
                    cancelled = past_unstored_output(cancelled)
                event = TaskEvent(EventKind.STATE, cancelled)
                if await self._recorder.record([event], task.sequence):
                    return cancelled
            # It finished, or the dispatcher claimed or changed it meanwhile: look again, in
            # the store itself (the hub's copy may not show that change yet).
            current = await self._store.get(task_id)
            if current is None or current.client_id != client_id:
                raise NotFoundError(task_id)
            task = current

    async def watch(
        self, client_id: str, task_id: str, after_sequence: int
    ) -> AsyncGenerator[TaskEvent, None]:
        """The task's snapshot (or the events after `after_sequence`), then each new event
        in order, ending after the terminal state."""
        if after_sequence < 0:
            raise InvalidArgumentError.single("after_sequence", "must not be negative")
        with self._hub.subscribe(task_id) as watch:
            # Subscribed first, read second: nothing published in between is missed.
            current = await self.get(client_id, task_id)
            # What this watch starts from: changes another replica stores are told as
            # events from here (ChangeFeed).
            self._hub.seed(current)
            if after_sequence > current.sequence:
                raise InvalidArgumentError.single(
                    "after_sequence",
                    f"task {task_id} is at sequence {current.sequence}; resume from a sequence"
                    " a previous Stream delivered",
                )
            last = after_sequence
            if after_sequence < current.sequence:
                replay = None
                if after_sequence > 0:
                    replay = self._hub.history(task_id, after_sequence, current.sequence)
                if replay is None:
                    replay = [TaskEvent(EventKind.SNAPSHOT, current)]
                for replayed in replay:
                    yield replayed
                last = current.sequence
            if current.is_terminal:
                return
            while (event := await watch.next_event()) is not None:
                if event.sequence <= last:
                    continue
                yield event
                last = event.sequence
                if event.kind is EventKind.STATE and event.task.is_terminal:
                    return


def check_batch_size(count: int) -> None:
    """InvalidArgumentError on SubmitBatch's `tasks` unless it holds 1 to MAX_BATCH_TASKS."""
    if count < 1:
        raise InvalidArgumentError.single("tasks", "at least one task is required")
    if count > MAX_BATCH_TASKS:
        raise InvalidArgumentError.single(
            "tasks",
            f"at most {MAX_BATCH_TASKS} tasks in one batch, not {count}; split it into several",
        )


def _key_reused(spec: TaskSpec, stored: Task) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"idempotency key {spec.idempotency_key!r} was used for a different task"
        f" ({stored.id}); use a new key for a new task"
    )


def _check_id(task_id: str) -> None:
    if not task_id:
        raise InvalidArgumentError.single("task_id", "required")
    if len(task_id) > 64:
        raise InvalidArgumentError.single("task_id", "not a task id (at most 64 characters)")


def _encode_page_token(cursor: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{cursor}".encode()).decode()


def _decode_page_token(token: str) -> int | None:
    if not token:
        return None
    try:
        version, cursor = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        value = int(cursor)
        if version != "v1" or not 0 < value < 2**63:
            raise ValueError(token)
        return value
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgumentError.single(
            "page_token", "not a token from a previous List response; omit it for the first page"
        ) from None
