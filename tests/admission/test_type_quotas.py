"""Quotas per task type ([quotas.types."<type>"]), across all clients: max_running caps the
type's attempts running at once, and a rate limit refuses its Submits over the bucket with
RESOURCE_EXHAUSTED and RetryInfo; other types are not held up by either."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from server.backends.base import BackendEvent, Completed
from server.config_file import (
    FileConfig,
    Limits,
    RateLimit,
    TaskQuota,
    TypeQuota,
    TypeQuotas,
)
from server.model.task import CustomOutput, Task
from tests.admission.test_limits import retry_delay_s
from tests.api.test_dispatch import custom_spec
from tests.conftest import FAST_RETRY, chat_spec, local_backends, make_settings, wait_terminal

MAX_RUNNING = 2
CHAT_BURST = 2

# Starts an App whose file sets these quotas; the stub to call it.
StartApp = Callable[..., Awaitable["tasks_pb2_grpc.TaskServiceAsyncStub"]]


class CountingGate:
    """A handler whose attempts wait until the test opens the gate; counts how many run at
    once, and the most that ever did."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.active = 0
        self.peak = 0
        self.changed = asyncio.Condition()

    async def __call__(self, task: Task) -> AsyncIterator[BackendEvent]:
        async with self.changed:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.changed.notify_all()
        try:
            await self.opened.wait()
        finally:
            self.active -= 1
        yield Completed(CustomOutput({}))

    async def until_active(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.active >= count), 5)


@pytest.fixture
def gate() -> CountingGate:
    return CountingGate()


@pytest.fixture
async def start_app(tmp_path: Path, gate: CountingGate) -> AsyncIterator[StartApp]:
    """Starts an App whose file sets `quotas` (and `limits`), on three local members of 8
    slots each: room for every task of these tests at once, were it not for the quotas.
    `gate` runs the custom type "gated"."""
    apps: list[tuple[App, grpc.aio.Channel]] = []

    async def start(
        quotas: TypeQuotas, limits: Limits | None = None
    ) -> tasks_pb2_grpc.TaskServiceAsyncStub:
        settings = make_settings(tmp_path / "tasks.db")
        app = App(
            replace(settings, file=FileConfig(quotas=quotas, limits=limits or Limits())),
            backends=local_backends(count=3, max_concurrency=8, extra={"gated": gate}),
            dispatch=FAST_RETRY,
        )
        await app.start()
        channel = grpc.aio.insecure_channel(app.address)
        apps.append((app, channel))
        return tasks_pb2_grpc.TaskServiceStub(channel)

    yield start
    gate.opened.set()
    for app, channel in reversed(apps):
        await channel.close()
        await app.stop()


async def test_a_type_never_runs_more_than_its_max_running(
    start_app: StartApp, gate: CountingGate
) -> None:
    """Six tasks of a type capped at 2: two run, four wait QUEUED until one ends, while a
    task of another type runs at once; all six finish, never more than two at once."""
    stub = await start_app(TypeQuotas({"gated": TypeQuota(max_running=MAX_RUNNING)}))
    request = pb.SubmitRequest(task=custom_spec("gated"))
    tasks = [(await stub.Submit(request)).task for _ in range(6)]
    await gate.until_active(MAX_RUNNING)
    # Another type is not held up behind the capped one's queued tasks.
    chat = (await stub.Submit(pb.SubmitRequest(task=chat_spec()))).task
    assert (await wait_terminal(stub, chat.id)).state == pb.TASK_STATE_SUCCEEDED
    states = [(await stub.Get(pb.GetRequest(task_id=t.id))).task.state for t in tasks]
    assert states.count(pb.TASK_STATE_RUNNING) == MAX_RUNNING, states
    assert states.count(pb.TASK_STATE_QUEUED) == len(tasks) - MAX_RUNNING, states
    gate.opened.set()
    finals = await asyncio.gather(*(wait_terminal(stub, t.id) for t in tasks))
    assert [f.state for f in finals] == [pb.TASK_STATE_SUCCEEDED] * len(tasks)
    assert gate.peak == MAX_RUNNING


async def test_submits_of_a_type_over_its_rate_are_refused_with_retry_info(
    start_app: StartApp,
) -> None:
    """A burst of chat Submits beyond the type's burst: the first pass, the next is
    RESOURCE_EXHAUSTED at once with a RetryInfo; embed Submits still pass, and in a batch
    each task is refused or stored on its own."""
    # One token per 1,000 s: nothing refills while the test runs.
    stub = await start_app(TypeQuotas({"chat": TypeQuota(RateLimit(0.001, CHAT_BURST))}))
    for _ in range(CHAT_BURST):
        await stub.Submit(pb.SubmitRequest(task=chat_spec()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Submit(pb.SubmitRequest(task=chat_spec()))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "task type 'chat'" in (caught.value.details() or "")
    assert 0 < retry_delay_s(caught.value) <= 1000
    embed = pb.TaskSpec(embed=pb.EmbedInput(model="local-hash", texts=["x"]))
    assert (await stub.Submit(pb.SubmitRequest(task=embed))).created
    batch = await stub.SubmitBatch(pb.SubmitBatchRequest(tasks=[chat_spec(), embed]))
    refused, stored = batch.results
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert refused.error.retry_delay.ToNanoseconds() > 0
    assert stored.created


async def test_a_submit_refused_by_another_quota_takes_none_of_its_types_rate(
    start_app: StartApp, gate: CountingGate
) -> None:
    """A type allowing 2 Submits (no refill while the test runs) and a client allowed 1
    unfinished task: Submits refused for max_queued while the first task holds it leave
    the type's second token alone, so the next Submit after the first task ends passes."""
    quotas = TypeQuotas({"gated": TypeQuota(RateLimit(0.001, 2))})
    stub = await start_app(quotas, Limits(quota=TaskQuota(max_queued=1)))
    request = pb.SubmitRequest(task=custom_spec("gated"))
    first = (await stub.Submit(request)).task
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Submit(request)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued" in (caught.value.details() or "")
    gate.opened.set()
    assert (await wait_terminal(stub, first.id)).state == pb.TASK_STATE_SUCCEEDED
    second = (await stub.Submit(request)).task
    assert (await wait_terminal(stub, second.id)).state == pb.TASK_STATE_SUCCEEDED
