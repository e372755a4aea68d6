"""Dispatch through the real server: cancellation, priorities, deadlines and retries."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.backends.base import BackendError, BackendEvent, Completed, OutputChunk
from server.backends.local import Handler, LocalBackend, LocalModelSettings, builtin_handlers
from server.dispatch.dispatcher import DispatchSettings
from server.dispatch.retry import RetryPolicies, RetryPolicy
from server.model.task import CustomInput, CustomOutput, Task, TaskState
from tests.conftest import Running, StartServer, chat_spec, local_backends, submit, wait_terminal


def custom_spec(
    task_type: str,
    *,
    priority: pb.Priority.ValueType = pb.PRIORITY_UNSPECIFIED,
    timeout: duration_pb2.Duration | None = None,
    max_attempts: int = 0,
    **data: str,
) -> pb.TaskSpec:
    """A task of a test-only custom type whose input is `data`."""
    spec = pb.TaskSpec(
        type=task_type, priority=priority, max_attempts=max_attempts, timeout=timeout
    )
    spec.custom.SetInParent()  # an empty input is still a custom input
    spec.custom.update(data)
    return spec


class Gate:
    """A handler that starts, streams `tokens` `gap_s` apart (each its own delta), then
    waits for the test to open the gate; records what happened."""

    def __init__(self, tokens: Sequence[str] = ("working",), gap_s: float = 0.01) -> None:
        self.tokens = tokens
        self.gap_s = gap_s
        self.opened = asyncio.Event()
        self.started = asyncio.Event()
        self.said = asyncio.Event()  # every token is out (and had gap_s to be published)
        self.cancelled = asyncio.Event()
        self.finished = False

    async def __call__(self, task: Task) -> AsyncIterator[BackendEvent]:
        self.started.set()
        try:
            for token in self.tokens:
                yield OutputChunk(token)
                await asyncio.sleep(self.gap_s)
            self.said.set()
            await self.opened.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished = True
        yield Completed(CustomOutput({"done": True}))


@dataclass
class BusySlot:
    """A server with one executor slot, taken by a gated task; `record` tasks log their
    input's name (or id) in `ran` when they finally run."""

    server: Running
    blocker: Gate
    ran: list[str]


async def one_busy_slot(start_server: StartServer) -> BusySlot:
    blocker = Gate()
    ran: list[str] = []

    async def record(task: Task) -> AsyncIterator[BackendEvent]:
        assert isinstance(task.spec.input, CustomInput)
        ran.append(str(task.spec.input.data.get("name", task.id)))
        yield Completed(CustomOutput({}))

    server = await start_server(
        local_backends(count=1, max_concurrency=1, extra={"gate": blocker, "record": record})
    )
    await submit(server.stub, custom_spec("gate"))
    await asyncio.wait_for(blocker.started.wait(), 5)
    return BusySlot(server, blocker, ran)


async def test_cancel_running_task_stops_its_execution(start_server: StartServer) -> None:
    """Cancel of a RUNNING task cancels the work on its executor and ends CANCELLED."""
    gate = Gate()
    server = await start_server(local_backends(extra={"gate": gate}))
    task = await submit(server.stub, custom_spec("gate"))
    await asyncio.wait_for(gate.started.wait(), 5)
    cancelled = (await server.stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    assert gate.cancelled.is_set(), "the running execution must really be cancelled"
    assert not gate.finished
    final = await wait_terminal(server.stub, task.id)
    assert final.state == pb.TASK_STATE_CANCELLED
    assert final.error.code == "CANCELLED"


async def test_cancel_queued_task_never_runs(start_server: StartServer) -> None:
    """A task cancelled while QUEUED (its backend busy) is never started."""
    busy = await one_busy_slot(start_server)
    queued = await submit(busy.server.stub, custom_spec("record"))
    cancelled = (await busy.server.stub.Cancel(pb.CancelRequest(task_id=queued.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    assert cancelled.attempt == 0
    busy.blocker.opened.set()
    after = await submit(busy.server.stub, custom_spec("record"))
    await wait_terminal(busy.server.stub, after.id)
    assert busy.ran == [after.id]


async def test_priority_order_urgent_high_normal_low(start_server: StartServer) -> None:
    """Queued tasks start in priority order, then oldest first within one priority."""
    busy = await one_busy_slot(start_server)
    submitted = []
    for name, priority in [
        ("low", pb.PRIORITY_LOW),
        ("normal-1", pb.PRIORITY_UNSPECIFIED),
        ("urgent", pb.PRIORITY_URGENT),
        ("normal-2", pb.PRIORITY_NORMAL),
        ("high", pb.PRIORITY_HIGH),
    ]:
        spec = custom_spec("record", name=name, priority=priority)
        submitted.append(await submit(busy.server.stub, spec))
    busy.blocker.opened.set()
    for task in submitted:
        await wait_terminal(busy.server.stub, task.id)
    assert busy.ran == ["urgent", "high", "normal-1", "normal-2", "low"]


async def test_running_task_past_its_deadline_fails_with_deadline_error(
    start_server: StartServer,
) -> None:
    """A task that runs longer than its timeout is stopped and FAILED with DEADLINE_EXCEEDED."""
    gate = Gate()
    server = await start_server(local_backends(extra={"gate": gate}))
    spec = custom_spec("gate", timeout=duration_pb2.Duration(nanos=200_000_000))
    task = await submit(server.stub, spec)
    final = await asyncio.wait_for(wait_terminal(server.stub, task.id), 10)
    assert final.state == pb.TASK_STATE_FAILED
    assert final.error.code == "DEADLINE_EXCEEDED"
    assert gate.cancelled.is_set()


async def test_queued_task_past_its_deadline_fails_without_running(
    start_server: StartServer,
) -> None:
    """A task still waiting for a backend when its deadline passes fails and never runs."""
    busy = await one_busy_slot(start_server)
    timeout = duration_pb2.Duration(nanos=100_000_000)
    doomed = await submit(busy.server.stub, custom_spec("record", timeout=timeout))
    final = await asyncio.wait_for(wait_terminal(busy.server.stub, doomed.id), 10)
    assert final.state == pb.TASK_STATE_FAILED
    assert final.error.code == "DEADLINE_EXCEEDED"
    assert final.attempt == 0
    busy.blocker.opened.set()
    after = await submit(busy.server.stub, custom_spec("record"))
    await wait_terminal(busy.server.stub, after.id)
    assert busy.ran == [after.id], "the expired task never ran"


async def test_retryable_failure_retries_on_next_member_until_success(
    start_server: StartServer,
) -> None:
    """A retryable failure re-queues the task; the next attempt runs on another member."""
    seen: list[tuple[int, str]] = []

    def flaky(backend: str) -> Handler:
        async def run(task: Task) -> AsyncIterator[BackendEvent]:
            seen.append((task.attempt, backend))
            if task.attempt < 3:
                raise BackendError("BACKEND_ERROR", "overloaded", retryable=True)
            yield Completed(CustomOutput({"attempt": task.attempt}))

        return run

    backends = {
        f"local-{i}": LocalBackend(f"local-{i}", {"flaky": flaky(f"local-{i}")}, 4)
        for i in (1, 2, 3)
    }
    server = await start_server(backends)
    task = await submit(server.stub, custom_spec("flaky", max_attempts=3))
    final = await wait_terminal(server.stub, task.id)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert final.attempt == 3
    assert [attempt for attempt, _ in seen] == [1, 2, 3]
    # Attempt n starts at the n-th member clockwise: three attempts, three members.
    assert len({backend for _, backend in seen}) == 3, seen
    # Each attempt is on the task: where it ran, how it ended, and why.
    history = [(a.number, a.backend, a.outcome, a.error.code) for a in final.attempts]
    assert history == [
        (1, seen[0][1], pb.TASK_STATE_QUEUED, "BACKEND_ERROR"),
        (2, seen[1][1], pb.TASK_STATE_QUEUED, "BACKEND_ERROR"),
        (3, seen[2][1], pb.TASK_STATE_SUCCEEDED, ""),
    ]
    assert all(a.error.retryable for a in final.attempts[:2])
    assert not final.attempts[2].HasField("error")
    ends = [(a.start_time.ToNanoseconds(), a.end_time.ToNanoseconds()) for a in final.attempts]
    assert all(start <= end for start, end in ends)
    assert all(ends[i][1] <= ends[i + 1][0] for i in range(2)), "attempts in order, apart"
    assert final.attempts[2].start_time == final.start_time


async def test_each_task_type_retries_by_its_own_policy(start_server: StartServer) -> None:
    """A type's configured policy sets the attempts of tasks that ask for none and the
    wait between them; other types keep the default policy; a task's own max_attempts
    wins over its type's."""

    async def failing(task: Task) -> AsyncIterator[BackendEvent]:
        if task.attempt:  # always; the yield below makes this an async generator
            raise BackendError("BACKEND_ERROR", f"attempt {task.attempt} failed", retryable=True)
        yield OutputChunk("")

    # The default waits up to an hour before a retry; "eager" retries at once, 4 times.
    retry = RetryPolicies(
        default=RetryPolicy(3600.0, 3600.0, max_attempts=2),
        by_type={"eager": RetryPolicy(0.0, 0.0, max_attempts=4)},
    )
    server = await start_server(
        local_backends(extra={"eager": failing, "patient": failing}),
        dispatch=DispatchSettings(poll_interval_s=0.05, retry=retry),
    )
    eager = await submit(server.stub, custom_spec("eager"))
    assert eager.spec.max_attempts == 4, "the type's attempts, filled in at Submit"
    final = await wait_terminal(server.stub, eager.id)
    assert final.state == pb.TASK_STATE_FAILED
    assert [a.number for a in final.attempts] == [1, 2, 3, 4]
    assert [a.outcome for a in final.attempts] == [pb.TASK_STATE_QUEUED] * 3 + [
        pb.TASK_STATE_FAILED
    ]
    assert final.attempts[3].error.message == "attempt 4 failed"

    mine = await submit(server.stub, custom_spec("eager", max_attempts=2))
    final = await wait_terminal(server.stub, mine.id)
    assert (final.state, len(final.attempts)) == (pb.TASK_STATE_FAILED, 2)

    # The default policy: 2 attempts, the retry waiting a random time of up to an hour
    # (below a second once in 3,600 runs). Its deadline is far enough for the wait.
    patient = await submit(
        server.stub, custom_spec("patient", timeout=duration_pb2.Duration(seconds=86400))
    )
    assert patient.spec.max_attempts == 2
    for _ in range(100):
        task = (await server.stub.Get(pb.GetRequest(task_id=patient.id))).task
        if task.attempts:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # several claim rounds: the retry must not have started
    task = (await server.stub.Get(pb.GetRequest(task_id=patient.id))).task
    assert (task.state, task.attempt, len(task.attempts)) == (pb.TASK_STATE_QUEUED, 1, 1)
    assert task.error.message == "attempt 1 failed"


async def test_non_retryable_failure_fails_at_once(start_server: StartServer) -> None:
    """An error that retrying cannot fix ends the task FAILED after one attempt."""

    async def broken(task: Task) -> AsyncIterator[BackendEvent]:
        if task.attempt:  # always; the yield below makes this an async generator
            raise BackendError("INVALID_INPUT", "the model rejected the prompt", retryable=False)
        yield OutputChunk("")

    server = await start_server(local_backends(extra={"broken": broken}))
    task = await submit(server.stub, custom_spec("broken", max_attempts=5))
    final = await wait_terminal(server.stub, task.id)
    assert final.state == pb.TASK_STATE_FAILED
    assert final.attempt == 1
    assert final.error.code == "INVALID_INPUT"
    assert "rejected" in final.error.message
    assert not final.error.retryable


async def test_handler_bug_fails_task_and_server_keeps_serving(start_server: StartServer) -> None:
    """An exception a handler did not mean to raise fails its task as INTERNAL only."""

    async def buggy(task: Task) -> AsyncIterator[BackendEvent]:
        if task.attempt:  # always; the yield below makes this an async generator
            raise ZeroDivisionError("oops")
        yield OutputChunk("")

    server = await start_server(local_backends(extra={"buggy": buggy}))
    final = await wait_terminal(server.stub, (await submit(server.stub, custom_spec("buggy"))).id)
    assert final.state == pb.TASK_STATE_FAILED
    assert final.error.code == "INTERNAL"
    assert "oops" not in final.error.message
    ok = await wait_terminal(server.stub, (await submit(server.stub, chat_spec())).id)
    assert ok.state == pb.TASK_STATE_SUCCEEDED


async def test_attempts_run_within_each_backends_concurrency(start_server: StartServer) -> None:
    """No backend ever runs more attempts at once than its max concurrency."""
    active: dict[str, int] = {}
    peak: dict[str, int] = {}

    def counting(backend: str) -> Handler:
        async def run(task: Task) -> AsyncIterator[BackendEvent]:
            active[backend] = active.get(backend, 0) + 1
            peak[backend] = max(peak.get(backend, 0), active[backend])
            await asyncio.sleep(0.01)
            active[backend] -= 1
            yield Completed(CustomOutput({}))

        return run

    backends = {
        f"local-{i}": LocalBackend(f"local-{i}", {"count": counting(f"local-{i}")}, 2)
        for i in (1, 2, 3)
    }
    server = await start_server(backends)
    tasks = [await submit(server.stub, custom_spec("count")) for _ in range(30)]
    finals = await asyncio.gather(*(wait_terminal(server.stub, t.id) for t in tasks))
    assert all(f.state == pb.TASK_STATE_SUCCEEDED for f in finals)
    assert max(peak.values()) <= 2
    assert sum(peak.values()) >= 4, "work should spread over several members under load"


async def test_submit_during_shutdown_is_unavailable(start_server: StartServer) -> None:
    """Once shutdown began, Submit answers UNAVAILABLE instead of accepting work."""
    server = await start_server()
    server.app.tasks.stop_accepting()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(server.stub, chat_spec())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_task_waiting_for_its_busy_backend_does_not_block_other_types(
    start_server: StartServer,
) -> None:
    """A queued task whose only backend is full waits; other types keep running meanwhile."""
    gate = Gate()
    backends = {
        "gpu": LocalBackend("gpu", {"gate": gate}, 1),
        "cpu": LocalBackend("cpu", builtin_handlers(LocalModelSettings(token_delay_s=0)), 4),
    }
    server = await start_server(backends)
    first = await submit(server.stub, custom_spec("gate"))
    await asyncio.wait_for(gate.started.wait(), 5)
    # More waiting gpu tasks than the cpu backend has free slots, all ahead of the chat.
    waiting = [await submit(server.stub, custom_spec("gate")) for _ in range(6)]
    chat = await wait_terminal(server.stub, (await submit(server.stub, chat_spec())).id)
    assert chat.state == pb.TASK_STATE_SUCCEEDED
    assert chat.backend == "cpu"
    still = (await server.stub.Get(pb.GetRequest(task_id=waiting[0].id))).task
    assert still.state == pb.TASK_STATE_QUEUED
    gate.opened.set()
    for task in (first, *waiting):
        assert (await wait_terminal(server.stub, task.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_backend_timeout_is_retried_not_taken_for_the_deadline(
    start_server: StartServer,
) -> None:
    """A TimeoutError raised inside a backend (its HTTP client's, say) is a retryable
    failure of that attempt, not the task's own deadline."""

    async def slow_provider(task: Task) -> AsyncIterator[BackendEvent]:
        if task.attempt == 1:
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
        yield Completed(CustomOutput({"attempt": task.attempt}))

    server = await start_server(local_backends(extra={"slow": slow_provider}))
    final = await wait_terminal(server.stub, (await submit(server.stub, custom_spec("slow"))).id)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert final.attempt == 2


@pytest.mark.sqlite_only  # writes the SQLite file behind the server's back
async def test_submit_whose_write_fails_leaves_no_work_running(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A task starts on its member while Submit's write commits (the work overlaps the
    commit); when that write fails, the client gets UNAVAILABLE, the work is stopped even
    if it has said nothing yet, the member's slot comes back, and no trace of the task is
    left."""
    db = tmp_path / "refusing.db"
    started, stopped = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def silent(task: Task) -> AsyncIterator[BackendEvent]:
        started.set()
        try:
            await asyncio.sleep(30)  # thinks long before its first word
        except asyncio.CancelledError:
            stopped.set()
            raise
        yield Completed(CustomOutput({}))

    async def record(task: Task) -> AsyncIterator[BackendEvent]:
        ran.append(task.id)
        yield Completed(CustomOutput({}))

    server = await start_server(
        local_backends(count=1, max_concurrency=1, extra={"silent": silent, "record": record}),
        db=db,
    )
    with sqlite3.connect(db) as conn:  # a real failing write: the disk's answer, in SQL
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON tasks BEGIN SELECT RAISE(FAIL, 'no'); END"
        )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(server.stub, custom_spec("silent"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    if started.is_set():
        await asyncio.wait_for(stopped.wait(), 5)

    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER refuse")
    after = await submit(server.stub, custom_spec("record"))  # the only slot is free again
    final = await asyncio.wait_for(wait_terminal(server.stub, after.id), 5)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    listed = await server.stub.List(pb.ListRequest())
    assert [t.id for t in listed.tasks] == [after.id] == ran


async def test_cancel_while_an_output_write_commits_still_ends_every_watch(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output delta reaches watchers before its write commits. A Cancel that lands in
    that window must end the task after the delta (a later sequence, committed after it):
    watchers have seen the delta's number, and would otherwise never see the end."""
    gate = Gate()
    server = await start_server(local_backends(extra={"gate": gate}))
    store = server.app.store
    real_update = store.update

    async def slow_output_write(task: Task, expected_sequence: int) -> bool:
        if task.state is TaskState.RUNNING and task.output is not None:
            await asyncio.sleep(0.3)  # the delta's commit is slow; the Cancel's is not
        return await real_update(task, expected_sequence)

    monkeypatch.setattr(store, "update", slow_output_write)
    task = await submit(server.stub, custom_spec("gate"))
    watch = server.stub.Stream(pb.StreamRequest(task_id=task.id))
    seen = 0  # the sequence of the delta: its own event, or a snapshot that holds it
    async for event in watch:
        if event.HasField("output_delta") or event.snapshot.output.chat.text:
            seen = event.sequence
            break
    assert seen
    cancelled = (await server.stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    assert cancelled.sequence > seen
    rest = await asyncio.wait_for(_drain(watch), 5)
    assert rest[-1].state_changed.task.state == pb.TASK_STATE_CANCELLED
    assert rest[-1].sequence == cancelled.sequence
    stored = (await server.stub.Get(pb.GetRequest(task_id=task.id))).task
    assert (stored.state, stored.sequence) == (pb.TASK_STATE_CANCELLED, cancelled.sequence)


async def _drain(
    call: grpc.aio.UnaryStreamCall[pb.StreamRequest, pb.StreamResponse],
) -> list[pb.StreamResponse]:
    return [event async for event in call]
