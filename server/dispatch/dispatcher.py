"""Dispatcher: claims queued tasks by priority, routes each over the ring, runs attempts on
backends within their concurrency limits, and applies deadlines, retries and cancellation.

Every state change is written to the store (optimistically, on the sequence it was computed
from) before it is published to watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from opentelemetry.context import Context

from server.backends.base import Backend, BackendError, BackendEvent, Completed, OutputChunk
from server.clock import Clock
from server.events.hub import EventKind, TaskEvent
from server.events.recorder import MAX_UNSTORED_DELTAS, ChangeRecorder, past_unstored_output
from server.model import states
from server.model.aging import DEFAULT_AGING_S
from server.model.errors import StoreError
from server.model.task import Task, TaskError, TaskState
from server.observability import logs
from server.observability.metrics import NO_METRICS, Metrics
from server.observability.tracing import TaskSpans
from server.store.base import TaskStore

from .members import Members
from .retry import RetryPolicies

_log = logging.getLogger(__name__)

# Pauses between tries of an attempt's final write when the store fails (then one last try).
FINAL_WRITE_RETRIES_S = (0.1, 0.5, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    # How often to look for tasks whose retry backoff ended or whose deadline passed.
    poll_interval_s: float = 0.5
    # How often to look for RUNNING tasks whose router died (see TaskStore.orphaned): with
    # a shared store, how soon after a replica's lease lapses its tasks run again.
    orphan_check_interval_s: float = 2.0
    # App passes the configured ones ([retry] in TASKRING_CONFIG).
    retry: RetryPolicies = field(default_factory=RetryPolicies)
    # A queued task's priority rises one level per this many seconds waited (see
    # server/model/aging.py); 0 turns aging off. `[priorities] aging_s` of the file.
    aging_s: float = DEFAULT_AGING_S
    # The most attempts of a task type running at once in this router, across all members
    # (`[quotas.types."<type>"] max_running` of the file); a type not named has no cap.
    max_running_by_type: Mapping[str, int] = field(default_factory=dict)
    # How often a running attempt stores the output it has streamed (watchers get each
    # token at once either way): how far a Get or Stream on another replica lags behind,
    # and how many writes a long reply costs (each stores the whole text so far).
    output_store_interval_s: float = 0.25


class StopReason(enum.Enum):
    CLIENT = "client"  # Cancel: the attempt ends CANCELLED
    SHUTDOWN = "shutdown"  # the server stops: the task goes back to the queue
    NOT_STORED = "not stored"  # started at Submit, whose write then failed: drop it
    SUPERSEDED = "superseded"  # another replica ended or re-queued it: drop it


class _End:
    """Marks the end of a backend's event stream in the attempt's queue."""


class _Flush:
    """Wakes an attempt whose published output may be due to be stored (an output write
    ended, or its interval passed)."""


_FLUSH = _Flush()
Queued = BackendEvent | BaseException | _End | _Flush


class _Superseded(Exception):  # noqa: N818 - a signal, not an error users see
    """The task changed under the attempt (another writer won): stop without writing."""


@dataclass(slots=True)
class _Attempt:
    task: Task
    backend: str
    runner: asyncio.Task[None] | None = None
    # Why the attempt must stop, once someone asked it to.
    stop_reason: StopReason | None = None
    # Set on the runner's first step. A task cancelled before that never enters its
    # try/finally, so until then a stop is only recorded, and the runner acts on it.
    started: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # For an attempt started alongside its task's first write (see Dispatcher.start_early):
    # True once that write committed, False if it failed. The attempt writes nothing, and so
    # publishes nothing, before it is True.
    stored: asyncio.Future[bool] | None = None
    # The context of the attempt's span (its task's Submit span); None when tracing is off.
    trace_parent: Context | None = None
    # The sequence of the task as last stored: `task` may be ahead of it by output deltas
    # published and not stored yet (at most MAX_UNSTORED_DELTAS).
    stored_sequence: int = 0
    # The write of the output, while it may still be committing, and the sequence it
    # stores; when the last one began (loop time); the timer that wakes the attempt to
    # store what it published since.
    output_write: asyncio.Future[bool] | None = None
    output_write_sequence: int = 0
    output_stored_at: float = float("-inf")
    flush_timer: asyncio.TimerHandle | None = None


class Dispatcher:
    def __init__(
        self,
        store: TaskStore,
        recorder: ChangeRecorder,
        members: Members,
        clock: Clock,
        settings: DispatchSettings,
        rng: random.Random | None = None,
        metrics: Metrics = NO_METRICS,
        spans: TaskSpans | None = None,
    ) -> None:
        self._store = store
        self._recorder = recorder
        self.members = members
        members.on_available = self.wake
        self._clock = clock
        self._settings = settings
        self.retry = settings.retry
        self._rng = rng or random.Random()
        # Dispatch and attempt spans; None when tracing is off (the hot path's only cost).
        self._spans = spans
        self._metrics = metrics
        # Attempts running in this process, by task id; only the event loop thread touches it.
        self._running: dict[str, _Attempt] = {}
        # Slots held per capped task type (those in settings.max_running_by_type): taken
        # with a member's slot, given back with it; and the types now at their cap, which
        # the claim leaves out. Only the event loop thread touches either.
        self._type_running: dict[str, int] = dict.fromkeys(settings.max_running_by_type, 0)
        self._types_full: set[str] = set()
        # True while the last look at the store left no ready task of a type some member
        # has room for: a new task may then start at once, stored RUNNING by Submit's own
        # write (no queue to jump, one write and one store read fewer per task).
        self._queue_drained = False
        # True when the last look left out a type because no member had room for it: a
        # slot given back may then let its waiting tasks run, so the queue is read again.
        self._types_left_out = False
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.started = 0
        self.finished: dict[str, int] = {}

    @property
    def task_types(self) -> frozenset[str]:
        return self.members.task_types

    def wake(self) -> None:
        """Looks at the queue again now: a member may have become able to take work."""
        self._queue_drained = False
        self._wakeup.set()

    async def start(self) -> None:
        """Re-queues tasks left RUNNING by a process that is gone, then starts claiming."""
        if self._loop_task is not None:
            return
        await self._adopt_orphans()
        self._loop_task = asyncio.create_task(self._claim_loop(), name="dispatcher")

    async def _adopt_orphans(self) -> None:
        """Re-queues the RUNNING tasks whose process died (a previous run of this one, or
        another replica whose lease lapsed); fails those that were on their last attempt."""
        interrupted = TaskError("INTERRUPTED", "the router running the task stopped", True)
        while batch := await self._store.orphaned(500):
            adopted = 0
            for task in batch:
                # A task that takes its process down with it must not do so forever.
                if task.attempt >= task.spec.max_attempts:
                    after = states.fail(task, interrupted, self._clock.now())
                else:
                    after = states.requeue(task, interrupted, 0.0, self._clock.now())
                # Output deltas may have been published, but not stored, before the process
                # died (ChangeRecorder.publish_output): no watcher resuming after one may
                # miss this change.
                after = past_unstored_output(after)
                # False: another replica adopted it first.
                adopted += await self._recorder.record([_state(after)], task.sequence)
            _log.info("re-queued %d tasks whose router stopped while they ran", adopted)
            if adopted:
                self.wake()
            if len(batch) < 500 or not adopted:
                return

    async def _claim_loop(self) -> None:
        next_sweep = 0.0
        next_orphan_check = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wakeup.clear()
            try:
                if loop.time() >= next_sweep:  # on a timer, not on every wake-up
                    next_sweep = loop.time() + self._settings.poll_interval_s
                    self.members.tick()
                    await self._expire_overdue()
                if loop.time() >= next_orphan_check:
                    next_orphan_check = loop.time() + self._settings.orphan_check_interval_s
                    await self._adopt_orphans()
                more = await self._claim()
            except StoreError:
                _log.exception("dispatch paused: the store failed")
                more = False
            if more and self._free_slots() > 0:
                continue  # the store had more ready work than we took
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._settings.poll_interval_s)

    def _free_slots(self) -> int:
        return self.members.free_slots()

    def start_at_submit(self, task: Task, now: float) -> Task | None:
        """`task` already RUNNING on a member with room, with the slot reserved, when
        nothing waits in the queue ahead of it; None when it must queue. The caller stores
        the result, then calls `submitted` (or `release` if the write failed)."""
        if self._stopping or not self._queue_drained:
            return None
        backend = self._acquire(task)
        if backend is None:
            self._queue_drained = False  # it will wait: later arrivals queue behind it
            return None
        return states.start(task, backend, now)

    def start_early(self, task: Task) -> None:
        """Runs `task`, as returned by `start_at_submit`, while Submit's write of it is
        still committing: the backend's work (a provider's time to first token, say) then
        overlaps the commit instead of following it. The attempt holds its writes, and so
        its output, until `submitted` says the task is stored; if the write fails,
        `release` stops the attempt and nothing of it is seen. The cost of a failed write
        is a backend call nobody asked for; a Submit that may be a replay (an idempotency
        key) must not start early, as its task may be another's already."""
        self._launch(task, stored=asyncio.get_running_loop().create_future())

    def submitted(self, task: Task) -> None:
        """A new task is stored: run it if it was started at submit, else look at the queue."""
        early = self._running.get(task.id)
        if early is not None and early.stored is not None:
            if not early.stored.done():
                early.stored.set_result(True)
        elif task.state is TaskState.RUNNING:
            self._launch(task)
        else:
            if self._spans is not None:
                self._spans.queued(task.id)  # called in Submit's context: its span
            self._queue_drained = False
            self._wakeup.set()

    def release(self, task: Task) -> None:
        """Gives back the slot `start_at_submit` reserved: the task was not stored (an early
        attempt gives it back itself once stopped)."""
        early = self._running.get(task.id)
        if early is not None and early.stored is not None:
            if not early.stored.done():
                early.stored.set_result(False)
            self._stop(early, StopReason.NOT_STORED)
            return
        self._release(task.spec.type, task.backend)

    def _acquire(self, task: Task) -> str | None:
        """A member's slot for `task`, and one of its type's if the type is capped; None
        when either is full (then neither is held)."""
        task_type = task.spec.type
        if task_type in self._types_full:
            return None
        backend = self.members.acquire(task)
        running = self._type_running.get(task_type)
        if backend is None or running is None:
            return backend
        self._type_running[task_type] = running + 1
        if running + 1 >= self._settings.max_running_by_type[task_type]:
            self._types_full.add(task_type)
        return backend

    def _release(self, task_type: str, backend: str) -> None:
        """Gives back what `_acquire` took."""
        self.members.release(backend)
        running = self._type_running.get(task_type)
        if running is None:
            return
        self._type_running[task_type] = running - 1
        if task_type in self._types_full:
            self._types_full.discard(task_type)
            # Its queued tasks may run again: none may start at Submit ahead of them.
            self.wake()

    def _launch(self, task: Task, stored: asyncio.Future[bool] | None = None) -> None:
        attempt = _Attempt(task, task.backend, stored=stored, stored_sequence=task.sequence)
        if self._stopping:
            # Stored RUNNING by a Submit that was committing as shutdown began: hand it
            # straight back to the queue rather than run it unsupervised.
            attempt.stop_reason = StopReason.SHUTDOWN
        if self._spans is not None:
            attempt.trace_parent = self._spans.dispatched(task)
        run = self._run(attempt) if attempt.trace_parent is None else self._run_traced(attempt)
        attempt.runner = asyncio.create_task(run, name=f"attempt:{task.id}")
        self._running[task.id] = attempt
        self.started += 1

    async def _claim(self) -> bool:
        """Starts ready tasks in free slots; True if it started some and the store may hold
        more ready work (it filled every slot asked for)."""
        free = self._free_slots()
        if free <= 0:
            return False
        now = self._clock.now()
        planned: list[Task] = []  # as started, each holding a member's slot
        overdue: list[Task] = []
        left_waiting = 0

        def start(task: Task) -> Task | None:
            nonlocal left_waiting
            if task.id in self._running:
                return None
            if task.deadline <= now:
                overdue.append(task)
                return None
            backend = self._acquire(task)  # reserved now so the next task sees it
            if backend is None:
                left_waiting += 1
                return None
            planned.append(states.start(task, backend, now))
            return planned[-1]

        # Only types some backend has room for, and not at their own cap: tasks waiting for
        # a full backend or type must not hide the ready tasks of other types behind them.
        types = self.members.types_with_room() - self._types_full
        self._types_left_out = types != self.members.task_types
        try:
            claimed = await self._store.claim(
                free, now, types, start, aging_s=self._settings.aging_s
            )
        except BaseException:
            for task in planned:
                self._release(task.spec.type, task.backend)
            raise
        stored = {task.id for task in claimed.started}
        for task in planned:
            if task.id not in stored:  # cancelled or changed since it was read
                self._release(task.spec.type, task.backend)
        for task in claimed.started:
            self._recorder.published([_state(task)])
            self._launch(task)
        await asyncio.gather(*(self._fail_deadline(task) for task in overdue))
        self._queue_drained = claimed.examined < free and not left_waiting
        # Only worth looking again at once if this round made progress: unroutable tasks
        # (their backends full) would otherwise be re-read in a tight loop.
        return bool(claimed.started) and claimed.examined == free

    async def _run_traced(self, attempt: _Attempt) -> None:
        """`_run` inside the attempt's span (see server/observability/tracing.py), for a
        task whose trace is kept."""
        spans, parent = self._spans, attempt.trace_parent
        if spans is None or parent is None:
            await self._run(attempt)
            return
        with spans.attempt(attempt.task, parent) as span:
            try:
                await self._run(attempt)
            finally:
                spans.finished(span, attempt.task)
        if attempt.task.state is TaskState.QUEUED:
            # The retry belongs to the same trace; its wait starts now. (No await since the
            # requeue was stored: the claim loop cannot have taken it yet.)
            spans.queued(attempt.task.id, parent)

    async def _run(self, attempt: _Attempt) -> None:
        # The attempt's asyncio task, and those it starts, log with the task's ids.
        logs.bind_task(attempt.task.id, attempt.task.client_id)
        try:
            ending = await self._attempt(attempt)
            if ending is not None and not attempt.task.is_terminal:
                await self._finish(attempt, ending)
            _log_outcome(attempt.task)
        except _Superseded:
            pass  # another writer (Cancel, a deadline sweep) already decided the outcome
        except StoreError:
            # Even the retried final write failed: the task stays RUNNING in the store and
            # recovery re-queues it at the next start.
            _log.exception("task %s: could not store the end of its attempt", attempt.task.id)
        except Exception:  # noqa: BLE001 - a bug here must not leave the task RUNNING unseen
            _log.exception("task %s: the attempt ended with an internal error", attempt.task.id)
            error = TaskError("INTERNAL", "the router failed while running the task", False)
            with contextlib.suppress(Exception):
                await self._finish(attempt, states.fail(attempt.task, error, self._clock.now()))
        finally:
            self._release(attempt.task.spec.type, attempt.backend)
            self._running.pop(attempt.task.id, None)
            attempt.done.set()
            # A freed slot matters only to tasks left waiting: with the queue drained
            # of every type, reading it again finds nothing (one store read per task
            # fewer, at any load).
            if not self._queue_drained or self._types_left_out:
                self._wakeup.set()

    async def _attempt(self, attempt: _Attempt) -> Task | None:  # noqa: PLR0911 - one per way it ends
        """Runs one attempt. Returns the change that ends it, or None when the attempt
        already stored its own ending (success)."""
        backend = self.members.backends[attempt.backend]
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout_at(loop.time() + attempt.task.deadline - self._clock.now())
        try:
            attempt.started = True
            if attempt.stop_reason is not None:
                raise asyncio.CancelledError  # stopped before it began; handled below
            async with deadline:
                await self._execute(attempt, backend)
        except TimeoutError as exc:
            await _output_settled(attempt)
            if attempt.task.is_terminal:
                return None  # it finished just as the deadline struck
            # A remote call's own deadline is the task's and may fire first.
            if deadline.expired() or self._clock.now() >= attempt.task.deadline:
                return self._deadline_failure(attempt.task)
            # The backend's own timeout (an HTTP client's, say): worth another attempt.
            self.members.failed(attempt.backend, None)
            error = TaskError("BACKEND_TIMEOUT", f"the backend timed out: {exc}", True)
            return self._after_failure(attempt.task, error)
        except BackendError as exc:
            self.members.failed(attempt.backend, exc)
            return self._after_failure(attempt.task, exc.error)
        except asyncio.CancelledError:
            await _output_settled(attempt)
            if attempt.task.is_terminal:
                return None  # it finished while the stop was on its way
            if attempt.stop_reason is StopReason.SUPERSEDED:
                raise _Superseded from None
            if attempt.stop_reason is StopReason.CLIENT:
                return states.cancel(attempt.task, self._clock.now())
            error = TaskError("INTERRUPTED", "the server shut down while the task ran", True)
            return states.requeue(attempt.task, error, 0.0, self._clock.now())
        except (_Superseded, StoreError):
            raise
        except Exception:  # noqa: BLE001 - a handler's bug fails its task, not the dispatcher
            _log.exception("attempt of task %s failed unexpectedly", attempt.task.id)
            error = TaskError("INTERNAL", "the executor failed unexpectedly", False)
            return states.fail(attempt.task, error, self._clock.now())
        return None

    async def _execute(self, attempt: _Attempt, backend: Backend) -> None:
        """Pumps the backend's events through a queue so that output produced while the
        attempt is busy (publishing, or storing what it published) goes out merged."""
        events: asyncio.Queue[Queued] = asyncio.Queue()
        pump = asyncio.create_task(_pump(backend.execute(attempt.task), events))
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                text = "".join(e.text for e in batch if isinstance(e, OutputChunk))
                end = next((e for e in batch if not isinstance(e, OutputChunk | _Flush)), None)
                if isinstance(end, Completed):
                    await self._complete(attempt, text, end)
                    return
                if text:
                    await self._publish_output(attempt, text)
                if isinstance(end, BaseException):
                    raise end
                if isinstance(end, _End):
                    raise BackendError(
                        "BACKEND_ERROR", "the backend ended without a result", retryable=True
                    )
                self._store_output_when_due(attempt, events)
        finally:
            if attempt.flush_timer is not None:
                attempt.flush_timer.cancel()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    def _after_failure(self, task: Task, error: TaskError) -> Task:
        now = self._clock.now()
        if error.retryable and task.attempt < task.spec.max_attempts:
            policy = self.retry.for_type(task.spec.type)
            not_before = now + policy.backoff_s(task.attempt, self._rng)
            if not_before < task.deadline:
                return states.requeue(task, error, not_before, now)
        return states.fail(task, error, now)

    def _deadline_failure(self, task: Task) -> Task:
        error = TaskError(
            "DEADLINE_EXCEEDED", f"the task did not finish within {task.spec.timeout_s:g}s"
        )
        return states.fail(task, error, self._clock.now())

    async def _complete(self, attempt: _Attempt, text: str, completed: Completed) -> None:
        """Last output and success in one write: both events are durable when it commits."""
        events = [_output(attempt.task, text)] if text else []
        before = events[-1].task if events else attempt.task
        result = states.succeed(before, completed.output, completed.usage, self._clock.now())
        self.members.succeeded(attempt.backend)
        await self._save_attempt(attempt, [*events, _state(result)])
        self._count(result)

    async def _finish(self, attempt: _Attempt, result: Task) -> None:
        """Stores how the attempt ended. A store failure here is retried while the attempt
        keeps its slot: giving up would leave the task RUNNING until the next restart."""
        for delay_s in (*FINAL_WRITE_RETRIES_S, None):
            try:
                await self._save_attempt(attempt, [_state(result)])
                break
            except StoreError as exc:
                if delay_s is None:
                    raise
                _log.warning(
                    "task %s: could not store %s (%s); retrying",
                    attempt.task.id,
                    result.state.value,
                    exc,
                )
                await asyncio.sleep(delay_s)
        self._count(result)

    def _count(self, result: Task) -> None:
        key = result.state.value
        self.finished[key] = self.finished.get(key, 0) + 1
        # Only stored endings reach here: an attempt superseded by another writer, or whose
        # end the store refused, is not an execution's outcome to report.
        ended = result.ended_at if result.ended_at is not None else self._clock.now()
        started = result.started_at if result.started_at is not None else ended
        self._metrics.attempt_ended(result, ended - started)
        if result.state is TaskState.QUEUED:
            self._queue_drained = False
            self._wakeup.set()

    async def _save_attempt(self, attempt: _Attempt, events: list[TaskEvent]) -> None:
        """Stores the attempt's next change; raises _Superseded if someone else changed the
        task meanwhile (the attempt then has nothing more to say about it)."""

        def saved(event: TaskEvent) -> None:
            attempt.task = event.task
            attempt.stored_sequence = event.task.sequence

        await _until_stored(attempt)
        await _output_settled(attempt)
        if not await self._recorder.record(events, attempt.stored_sequence, saved):
            raise _Superseded

    async def _publish_output(self, attempt: _Attempt, text: str) -> None:
        """Sends `text` to the task's watchers as its next delta, to be stored later (see
        ChangeRecorder.publish_output); first stores what was published, if that delta
        would put more than MAX_UNSTORED_DELTAS ahead of the store."""
        await _until_stored(attempt)
        if attempt.task.sequence - attempt.stored_sequence >= MAX_UNSTORED_DELTAS:
            # As far ahead of the store as watchers may be: store before sending more.
            await _output_settled(attempt)
            if attempt.task.sequence - attempt.stored_sequence >= MAX_UNSTORED_DELTAS:
                await asyncio.shield(self._store_output(attempt))
                _output_write_ended(attempt)
        event = _output(attempt.task, text)
        attempt.task = event.task
        self._recorder.publish_output(event)

    def _store_output_when_due(self, attempt: _Attempt, events: asyncio.Queue[Queued]) -> None:
        """Starts storing the output published so far, or arranges to be woken when that is
        due: one write at a time, at most one per output_store_interval_s."""
        write = attempt.output_write
        if write is not None:
            if not write.done():
                return  # its end wakes the attempt
            _output_write_ended(attempt)
        if attempt.task.sequence == attempt.stored_sequence:
            return
        loop = asyncio.get_running_loop()
        due = attempt.output_stored_at + self._settings.output_store_interval_s
        if loop.time() < due:
            if attempt.flush_timer is None:
                attempt.flush_timer = loop.call_at(due, _wake, attempt, events)
            return
        self._store_output(attempt).add_done_callback(lambda _: events.put_nowait(_FLUSH))

    def _store_output(self, attempt: _Attempt) -> asyncio.Future[bool]:
        attempt.output_stored_at = asyncio.get_running_loop().time()
        write = self._recorder.store_output(attempt.task, attempt.stored_sequence)
        attempt.output_write = write
        attempt.output_write_sequence = attempt.task.sequence
        return write

    async def _fail_deadline(self, task: Task) -> None:
        if self._spans is not None:
            self._spans.forget(task.id)
        await self._recorder.record([_state(self._deadline_failure(task))], task.sequence)

    async def _expire_overdue(self) -> None:
        """Fails queued tasks past their deadline (running ones time out in their attempt)."""
        overdue = [
            task
            for task in await self._store.expired(self._clock.now(), 500)
            if task.id not in self._running and task.state is TaskState.QUEUED
        ]
        # Together, so they share one group commit instead of one each.
        await asyncio.gather(*(self._fail_deadline(task) for task in overdue))

    def running(self, task_id: str) -> bool:
        return task_id in self._running

    async def cancel(self, task_id: str) -> Task | None:
        """Cancels the attempt running here and waits until CANCELLED is stored; None if the
        task is not running in this process."""
        attempt = self._running.get(task_id)
        if attempt is None or attempt.runner is None:
            return None
        self._stop(attempt, StopReason.CLIENT)
        await attempt.done.wait()
        return attempt.task

    def changed_elsewhere(self, task_id: str, sequence: int) -> None:
        """Another replica stored a change of `task_id`: if it is running here, that change
        ended this attempt (Cancel there, or a re-queue after this replica's lease lapsed),
        whose work is then stopped rather than finished for nothing."""
        attempt = self._running.get(task_id)
        if attempt is not None and sequence > attempt.task.sequence:
            _log.info("task %s was changed by another replica; stopping its attempt", task_id)
            self._stop(attempt, StopReason.SUPERSEDED)

    @staticmethod
    def _stop(attempt: _Attempt, reason: StopReason) -> None:
        attempt.stop_reason = reason
        if attempt.started and attempt.runner is not None:
            attempt.runner.cancel()

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stops claiming; lets running attempts finish for `grace_s`, then hands the rest
        back to the queue. Safe to call twice or before start."""
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        attempts = list(self._running.values())
        if attempts and grace_s > 0:
            waiters = [asyncio.ensure_future(a.done.wait()) for a in attempts]
            await asyncio.wait(waiters, timeout=grace_s)
            for waiter in waiters:
                waiter.cancel()
        for attempt in list(self._running.values()):
            self._stop(attempt, StopReason.SHUTDOWN)
        while self._running:  # including any launched while we waited
            await next(iter(self._running.values())).done.wait()

    def active(self) -> dict[tuple[str, str], int]:
        """Attempts running in this process by (task type, member); read per metrics scrape,
        so that running attempts cost no bookkeeping of their own."""
        counts: dict[tuple[str, str], int] = {}
        for attempt in self._running.values():
            key = (attempt.task.spec.type, attempt.backend)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def statistics(self) -> dict[str, object]:
        return {
            "running": len(self._running),
            "busy": {v.status.name: v.status.load for v in self.members.views()},
            "started": self.started,
            "finished": dict(self.finished),
        }


async def _output_settled(attempt: _Attempt) -> None:
    """Waits for the output write in flight, if any: the change the attempt stores next
    must not commit before it. (On PostgreSQL two writes of one task could otherwise commit
    out of order: the later first, the output then refused as stale.) A write that failed
    leaves `stored_sequence` behind, so the next write fails too and says why."""
    write = attempt.output_write
    if write is not None:
        with contextlib.suppress(Exception):
            await asyncio.shield(write)
            _output_write_ended(attempt)
        attempt.output_write = None


def _output_write_ended(attempt: _Attempt) -> None:
    """Takes in the attempt's output write, which has ended: what it stored is the base of
    the next write, or if it stored nothing, raises why (_Superseded: someone else changed
    the task). Read from the write itself, not in a callback of it: a write already done
    when awaited does not suspend the attempt, so its callbacks may not have run yet."""
    write, attempt.output_write = attempt.output_write, None
    if write is None:
        return
    if not write.result():
        raise _Superseded
    attempt.stored_sequence = attempt.output_write_sequence


def _wake(attempt: _Attempt, events: asyncio.Queue[Queued]) -> None:
    attempt.flush_timer = None
    events.put_nowait(_FLUSH)


async def _until_stored(attempt: _Attempt) -> None:
    """Waits until an early attempt's task is stored; _Superseded if it never will be."""
    if attempt.stored is not None and not await asyncio.shield(attempt.stored):
        raise _Superseded


def _log_outcome(task: Task) -> None:
    """A line for each attempt that did not succeed (at DEBUG when it did): failures are
    what operators look for, and a line per success would cost every task."""
    error = task.error
    if task.state is TaskState.SUCCEEDED:
        _log.debug("attempt %d on %s succeeded", task.attempt, task.backend)
    elif task.state is TaskState.QUEUED and error is not None:
        _log.warning(
            "attempt %d on %s failed; will retry: %s: %s",
            task.attempt,
            task.backend,
            error.code,
            error.message,
        )
    elif task.state is TaskState.FAILED and error is not None:
        _log.warning(
            "task failed on %s after %d attempts: %s: %s",
            task.backend,
            task.attempt,
            error.code,
            error.message,
        )
    elif task.state is TaskState.CANCELLED:
        _log.info("attempt %d on %s cancelled", task.attempt, task.backend)


def _state(task: Task) -> TaskEvent:
    return TaskEvent(EventKind.STATE, task)


def _output(task: Task, text: str) -> TaskEvent:
    return TaskEvent(EventKind.OUTPUT, states.append_output(task, text), text)


async def _pump(source: AsyncIterator[BackendEvent], events: asyncio.Queue[Queued]) -> None:
    try:
        async for event in source:
            events.put_nowait(event)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
        events.put_nowait(exc)
    else:
        events.put_nowait(_End())
