"""Stats through a real server: a known mix of outcomes gives exactly the expected figures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace

import grpc
import pytest
from google.protobuf import duration_pb2

from client import AsyncTaskringClient, TaskringClient
from client._errors import InvalidArgumentError, error_from_rpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from server.backends.base import BackendError, BackendEvent, Completed
from server.backends.local import LocalBackend
from server.model.task import CustomInput, CustomOutput, Priority, Task, TaskSpec, TaskState, Usage
from tests.api.test_dispatch import Gate, custom_spec
from tests.conftest import Running, StartServer, submit, wait_terminal

# Each successful "work" task sleeps this long on its backend, then reports this usage.
WORK_S = 0.05
WORK_USAGE = Usage(input_tokens=10, output_tokens=5, cost_usd=0.25)


async def work(task: Task) -> AsyncIterator[BackendEvent]:
    await asyncio.sleep(WORK_S)
    yield Completed(CustomOutput({"ok": True}), WORK_USAGE)


async def fail(task: Task) -> AsyncIterator[BackendEvent]:
    if task.attempt:  # always; the yield below makes this an async generator
        raise BackendError("INVALID_INPUT", "rejected", retryable=False)
    yield Completed(CustomOutput({}))


async def flaky(task: Task) -> AsyncIterator[BackendEvent]:
    """Fails its first attempt retryably, succeeds on the second."""
    if task.attempt == 1:
        raise BackendError("BACKEND_ERROR", "overloaded", retryable=True)
    yield Completed(CustomOutput({}), Usage(1, 2, 0.5))


@dataclass
class Mix:
    """A server after: on `alpha` 3 work tasks succeeded, 2 fail tasks failed, 1 flaky
    task succeeded on its second attempt; on `beta` (one slot) a gated task RUNNING, one
    QUEUED at HIGH, and one cancelled while QUEUED at LOW (so it never ran)."""

    server: Running
    gate: Gate
    running: pb.Task
    queued: pb.Task


@pytest.fixture
async def mix(start_server: StartServer) -> Mix:
    gate = Gate()
    server = await start_server(
        {
            "alpha": LocalBackend("alpha", {"work": work, "fail": fail, "flaky": flaky}, 4),
            "beta": LocalBackend("beta", {"gated": gate}, 1),
        }
    )
    stub = server.stub
    finished = [await submit(stub, custom_spec("work")) for _ in range(3)]
    finished += [await submit(stub, custom_spec("fail")) for _ in range(2)]
    finished.append(await submit(stub, custom_spec("flaky", max_attempts=3)))
    for task in finished:
        await wait_terminal(stub, task.id)
    running = await submit(stub, custom_spec("gated"))
    await asyncio.wait_for(gate.started.wait(), 5)
    queued = await submit(stub, custom_spec("gated", priority=pb.PRIORITY_HIGH))
    doomed = await submit(stub, custom_spec("gated", priority=pb.PRIORITY_LOW))
    await stub.Cancel(pb.CancelRequest(task_id=doomed.id))
    return Mix(server, gate, running, queued)


def counts(values: Iterable[pb.StateCount]) -> dict[tuple[str, str], int]:
    """StateCount entries as {(state, priority): count} with readable names, in order."""
    return {(pb.TaskState.Name(c.state), pb.Priority.Name(c.priority)): c.count for c in values}


def seconds(value: duration_pb2.Duration) -> float:
    return value.ToTimedelta().total_seconds()


async def test_stats_count_outcomes_tokens_and_queue_exactly(mix: Mix) -> None:
    """After a known mix of successes, failures, a retry, queued, running and cancelled
    tasks, Stats reports each count, rate, mean attempts, token and cost sum exactly."""
    stats = await mix.server.stub.Stats(pb.StatsRequest())

    assert stats.client_id == "anonymous"
    assert seconds(stats.window) == 3600, "the default window is an hour"
    assert stats.duration_sample_limit == 10_000
    assert counts(stats.queue_depth) == {
        ("TASK_STATE_QUEUED", "PRIORITY_HIGH"): 1,
        ("TASK_STATE_RUNNING", "PRIORITY_NORMAL"): 1,
    }
    assert list(counts(stats.queue_depth)) == [
        ("TASK_STATE_QUEUED", "PRIORITY_HIGH"),
        ("TASK_STATE_RUNNING", "PRIORITY_NORMAL"),
    ], "ordered by state, then priority"
    assert counts(stats.window_counts) == {
        ("TASK_STATE_QUEUED", "PRIORITY_HIGH"): 1,
        ("TASK_STATE_RUNNING", "PRIORITY_NORMAL"): 1,
        ("TASK_STATE_SUCCEEDED", "PRIORITY_NORMAL"): 4,
        ("TASK_STATE_FAILED", "PRIORITY_NORMAL"): 2,
        ("TASK_STATE_CANCELLED", "PRIORITY_LOW"): 1,
    }

    groups = {(g.task_type, g.backend): g for g in stats.groups}
    assert list(groups) == [
        ("fail", "alpha"),
        ("flaky", "alpha"),
        ("gated", ""),
        ("work", "alpha"),
    ], "ordered by type, then backend; the unfinished gated tasks are not in a group"

    done = groups["work", "alpha"]
    assert (done.finished, done.succeeded, done.failed, done.cancelled) == (3, 3, 0, 0)
    assert done.success_rate == 1.0
    assert done.mean_attempts == 1.0
    assert (done.input_tokens, done.output_tokens) == (30, 15)
    assert done.cost_usd == pytest.approx(0.75)
    assert done.duration_samples == 3
    p50, p90, p99 = (seconds(d) for d in (done.duration_p50, done.duration_p90, done.duration_p99))
    # 0.9: a timer may fire a hair early by the wall clock the run times are taken from.
    assert 0.9 * WORK_S <= p50 <= p90 <= p99 < 5, (p50, p90, p99)

    failed = groups["fail", "alpha"]
    assert (failed.finished, failed.succeeded, failed.failed) == (2, 0, 2)
    assert failed.success_rate == 0.0
    assert (failed.input_tokens, failed.output_tokens, failed.cost_usd) == (0, 0, 0.0)
    assert failed.duration_samples == 2
    assert 0 <= seconds(failed.duration_p99) < 5

    retried = groups["flaky", "alpha"]
    assert (retried.finished, retried.succeeded, retried.mean_attempts) == (1, 1, 2.0)
    assert (retried.input_tokens, retried.output_tokens, retried.cost_usd) == (1, 2, 0.5)

    never_ran = groups["gated", ""]
    assert (never_ran.finished, never_ran.cancelled, never_ran.success_rate) == (1, 1, 0.0)
    assert never_ran.mean_attempts == 0.0
    assert never_ran.duration_samples == 0
    assert not never_ran.HasField("duration_p50"), "no run, no run time"

    mix.gate.opened.set()
    await wait_terminal(mix.server.stub, mix.queued.id)
    after = await mix.server.stub.Stats(pb.StatsRequest())
    assert list(after.queue_depth) == [], "the queue drained"
    gated = {(g.task_type, g.backend): g for g in after.groups}["gated", "beta"]
    assert (gated.finished, gated.succeeded) == (2, 2)


async def test_stats_type_filter_counts_only_those_types(mix: Mix) -> None:
    """`types` narrows every figure, the queue depth included."""
    stats = await mix.server.stub.Stats(pb.StatsRequest(types=["work", "flaky"]))
    assert [(g.task_type, g.backend) for g in stats.groups] == [
        ("flaky", "alpha"),
        ("work", "alpha"),
    ]
    assert counts(stats.window_counts) == {("TASK_STATE_SUCCEEDED", "PRIORITY_NORMAL"): 4}
    assert list(stats.queue_depth) == []
    gated = await mix.server.stub.Stats(pb.StatsRequest(types=["gated"]))
    assert sum(c.count for c in gated.queue_depth) == 2
    nothing = await mix.server.stub.Stats(pb.StatsRequest(types=["no-such-type"]))
    assert (list(nothing.groups), list(nothing.window_counts)) == ([], [])


def seeded(task_id: str, *, age_s: float, client_id: str = "anonymous", **changes: object) -> Task:
    """A task written straight to the server's store, created `age_s` seconds ago."""
    now = time.time()
    task = Task(
        id=task_id,
        client_id=client_id,
        spec=TaskSpec(type="work", input=CustomInput({})),
        state=TaskState.SUCCEEDED,
        created_at=now - age_s,
        deadline=now + 600,
        attempt=1,
        backend="alpha",
        usage=Usage(100, 100, 1.0),
        started_at=now - age_s,
        ended_at=now - age_s + 1,
    )
    return replace(task, **changes)  # type: ignore[arg-type]


async def test_stats_window_covers_only_tasks_created_within_it(mix: Mix) -> None:
    """A task created two hours ago counts in a 3 h window, not in the default hour; an
    unfinished one that old is still in the queue depth, whatever the window."""
    store = mix.server.app.store
    await store.create(seeded("old-done", age_s=7200))
    # A type no member runs: it stays QUEUED, and its deadline is far off.
    await store.create(seeded("old-queued", age_s=7200, state=TaskState.QUEUED,
                              spec=TaskSpec(type="orphan", input=CustomInput({}),
                                            priority=Priority.URGENT),
                              backend="", attempt=0, usage=None, started_at=None,
                              ended_at=None))  # fmt: skip

    hour = await mix.server.stub.Stats(pb.StatsRequest())
    work_hour = {(g.task_type, g.backend): g for g in hour.groups}["work", "alpha"]
    assert work_hour.finished == 3
    assert ("TASK_STATE_QUEUED", "PRIORITY_URGENT") in counts(hour.queue_depth)
    assert ("TASK_STATE_QUEUED", "PRIORITY_URGENT") not in counts(hour.window_counts)

    window = duration_pb2.Duration(seconds=3 * 3600)
    wide = await mix.server.stub.Stats(pb.StatsRequest(window=window))
    assert seconds(wide.window) == 3 * 3600
    work_wide = {(g.task_type, g.backend): g for g in wide.groups}["work", "alpha"]
    assert (work_wide.finished, work_wide.input_tokens) == (4, 130)
    assert work_wide.cost_usd == pytest.approx(1.75)
    assert work_wide.duration_samples == 4
    assert seconds(work_wide.duration_p99) == pytest.approx(1.0), "the old task ran 1 s"
    assert counts(wide.window_counts)[("TASK_STATE_QUEUED", "PRIORITY_URGENT")] == 1

    short = await mix.server.stub.Stats(pb.StatsRequest(window=duration_pb2.Duration(nanos=1)))
    assert list(short.groups) == [], "nothing was created in the last nanosecond"


async def test_stats_count_only_the_callers_own_tasks(mix: Mix) -> None:
    """Another client's tasks are in no figure (every caller is the anonymous client until
    API keys exist)."""
    store = mix.server.app.store
    await store.create(seeded("theirs", age_s=1, client_id="someone-else"))
    stats = await mix.server.stub.Stats(pb.StatsRequest())
    work_group = {(g.task_type, g.backend): g for g in stats.groups}["work", "alpha"]
    assert (work_group.finished, work_group.input_tokens) == (3, 30)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.StatsRequest(window=duration_pb2.Duration(seconds=-60)), "window"),
        (pb.StatsRequest(window=duration_pb2.Duration()), "window"),
        (pb.StatsRequest(window=duration_pb2.Duration(seconds=8 * 86400)), "window"),
        (pb.StatsRequest(window=duration_pb2.Duration(seconds=5, nanos=-1)), "window"),
        (pb.StatsRequest(types=["work", ""]), "types[1]"),
        (pb.StatsRequest(types=[f"t{i}" for i in range(101)]), "types"),
    ],
)
async def test_bad_stats_request_is_invalid_argument_naming_the_field(
    server: Running, request_: pb.StatsRequest, field: str
) -> None:
    """A window out of range or malformed, an empty type or too many: INVALID_ARGUMENT
    with a BadRequest violation naming the field."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Stats(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_from_rpc(caught.value)
    assert [f for f, _ in error.field_violations] == [field]
    assert field in (caught.value.details() or "")


async def test_clients_stats_return_the_same_figures(mix: Mix) -> None:
    """AsyncTaskringClient.stats and the blocking client's send types and window."""
    async with AsyncTaskringClient(mix.server.app.address) as client:
        stats = await client.stats(types=["work"], window_s=1800)
        assert seconds(stats.window) == 1800
        assert [(g.task_type, g.finished) for g in stats.groups] == [("work", 3)]
        with pytest.raises(InvalidArgumentError) as caught:
            await client.stats(window_s=-1)
        assert caught.value.field_violations[0][0] == "window"

    def blocking() -> pb.StatsResponse:
        with TaskringClient(mix.server.app.address) as sync_client:
            return sync_client.stats(["fail"])

    sync_stats = await asyncio.to_thread(blocking)
    assert [(g.task_type, g.failed) for g in sync_stats.groups] == [("fail", 2)]
