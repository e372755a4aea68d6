"""Token budgets and caps on queued tasks, through a real server: a budget holds under
concurrent Submits (charged at admission, not after the reply), the charge is corrected
when a task ends, a task cancelled while queued gets it back, an estimate bigger than the
whole budget is refused as invalid; a client at its cap is refused while others are not,
and the cap remembers the backlog across a restart."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from server.backends.base import Backend, BackendEvent, Completed
from server.backends.local import LocalBackend, LocalModelSettings, builtin_handlers
from server.clock import Clock, ManualClock
from server.config_file import ApiKey, FileConfig, Limits, TaskQuota
from server.model.task import ChatOutput, Task, Usage
from tests.admission.test_limits import retry_delay_s
from tests.conftest import FAST_RETRY, StoreUrl, local_backends, make_settings
from tests.observability.test_metrics import labels, samples, scrape

KEYS = {client: f"trk_{client}-0123456789abcdefghijklmnopqrstuvwxyz" for client in ("alice", "bob")}
# A large request: (3,996 bytes / 4 + 4) prompt tokens + 997 out = 2,000 tokens exactly.
LARGE_TOKENS = 2000
# What the gated chat handler reports having used: a small part of the estimate.
USED = Usage(input_tokens=10, output_tokens=5)


def bearer(client: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {KEYS[client]}"),)


def large_chat(max_tokens: int = 997) -> pb.TaskSpec:
    return pb.TaskSpec(
        chat=pb.ChatInput(
            model="local-echo",
            messages=[pb.ChatMessage(role="user", content="x" * 3996)],
            parameters=pb.ChatParameters(max_tokens=max_tokens),
        )
    )


class ChatGate:
    """A chat handler whose tasks wait until the test opens the gate, then succeed having
    used USED; `close` makes the tasks that start from then on wait again."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    def close(self) -> None:
        self.opened = asyncio.Event()

    async def __call__(self, task: Task) -> AsyncIterator[BackendEvent]:
        await self.opened.wait()
        yield Completed(ChatOutput("ok", "stop"), USED)


class Servers:
    """Starts Apps with API keys for alice and bob and the given limits; stops them all."""

    def __init__(self, tmp_path: Path, stack: AsyncExitStack, store_url: StoreUrl) -> None:
        self._db = tmp_path / "tasks.db"
        self._stack = stack
        self._store_url = store_url
        self.apps: list[App] = []

    async def start(
        self,
        limits: Limits,
        backends: Mapping[str, Backend],
        clock: Clock | None = None,
    ) -> tasks_pb2_grpc.TaskServiceAsyncStub:
        keys = tuple(
            ApiKey(client, hashlib.sha256(key.encode()).hexdigest()) for client, key in KEYS.items()
        )
        settings = make_settings(self._db, store_url=self._store_url(self._db))
        app = App(
            replace(settings, file=FileConfig(api_keys=keys, limits=limits)),
            backends=backends,
            clock=clock,
            dispatch=FAST_RETRY,
        )
        await app.start()
        self._stack.push_async_callback(app.stop)
        self.apps.append(app)
        channel = grpc.aio.insecure_channel(app.address)
        self._stack.push_async_callback(channel.close)
        return tasks_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture
async def servers(tmp_path: Path, store_url: StoreUrl) -> AsyncIterator[Servers]:
    async with AsyncExitStack() as stack:
        yield Servers(tmp_path, stack, store_url)


def budget(tokens_per_minute: int, **clients: int) -> Limits:
    return Limits(
        quota=TaskQuota(tokens_per_minute=tokens_per_minute),
        client_quotas={c: TaskQuota(tokens_per_minute=n) for c, n in clients.items()},
    )


async def submit_all(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub, client: str, count: int, spec: pb.TaskSpec
) -> tuple[list[pb.Task], list[grpc.aio.AioRpcError]]:
    """`count` Submits at once: the tasks stored, and the refusals."""
    outcomes = await asyncio.gather(
        *(stub.Submit(pb.SubmitRequest(task=spec), metadata=bearer(client)) for _ in range(count)),
        return_exceptions=True,
    )
    accepted = [o.task for o in outcomes if isinstance(o, pb.SubmitResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(accepted) + len(refused) == count, outcomes
    return accepted, refused


async def stored(stub: tasks_pb2_grpc.TaskServiceAsyncStub, client: str) -> int:
    listed = await stub.List(pb.ListRequest(page_size=1000), metadata=bearer(client))
    return len(listed.tasks)


async def finish(stub: tasks_pb2_grpc.TaskServiceAsyncStub, tasks: list[pb.Task]) -> None:
    for task in tasks:
        ended = await wait_terminal_as(stub, task.id, "alice")
        assert ended.state == pb.TASK_STATE_SUCCEEDED


async def wait_terminal_as(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub, task_id: str, client: str
) -> pb.Task:
    """The task's final state, seen on its client's Stream."""
    call = stub.Stream(pb.StreamRequest(task_id=task_id), metadata=bearer(client))
    events = [event async for event in call]
    last = events[-1]
    return last.snapshot if last.HasField("snapshot") else last.state_changed.task


async def test_a_token_budget_holds_under_50_concurrent_large_requests(servers: Servers) -> None:
    """A budget of 10,000 tokens a minute fits 5 requests of 2,000: of 50 sent at once,
    exactly 5 are stored and 45 refused with the time after which one fits. Once the 5
    finish having used 15 tokens each, the rest comes back and 4 more fit; the RetryInfo
    of the refusal after them is exact."""
    clock = ManualClock()  # no refill unless the test says so
    gate = ChatGate()
    stub = await servers.start(
        budget(10_000), local_backends(max_concurrency=50, extra={"chat": gate}), clock
    )
    accepted, refused = await submit_all(stub, "alice", 50, large_chat())
    assert len(accepted) == 5
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "token budget of 10000" in (refused[0].details() or "")
    # 2,000 missing at 10,000 / 60 a second.
    assert all(retry_delay_s(r) == pytest.approx(12.0) for r in refused)
    assert await stored(stub, "alice") == 5, "refused Submits store nothing"

    gate.opened.set()
    await finish(stub, accepted)
    gate.close()
    # 5 x (2,000 - 15) given back: 9,925 left, room for 4 of 2,000.
    again, refused = await submit_all(stub, "alice", 50, large_chat())
    assert len(again) == 4
    delay = retry_delay_s(refused[0])
    assert delay == pytest.approx((2000 - 1925) * 60 / 10_000)
    clock.advance(delay + 0.001)
    last, _ = await submit_all(stub, "alice", 1, large_chat())
    assert len(last) == 1, "after the RetryInfo delay one more fits"
    gate.opened.set()


async def test_a_task_cancelled_while_queued_gets_its_charge_back(servers: Servers) -> None:
    """With one executor slot busy, the second task waits QUEUED; cancelling it gives its
    whole charge back (it never ran), so a third fits where it was refused."""
    gate = ChatGate()
    backends = local_backends(count=1, max_concurrency=1, extra={"chat": gate})
    stub = await servers.start(budget(2 * LARGE_TOKENS), backends, ManualClock())
    running, queued = await submit_in_order(stub, 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    cancel = pb.CancelRequest(task_id=queued.id)
    cancelled = (await stub.Cancel(cancel, metadata=bearer("alice"))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    assert cancelled.attempt == 0, "it never ran"
    third = await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))
    assert third.task.state == pb.TASK_STATE_QUEUED
    gate.opened.set()
    await finish(stub, [running, third.task])


async def submit_in_order(stub: tasks_pb2_grpc.TaskServiceAsyncStub, count: int) -> list[pb.Task]:
    """`count` large tasks of alice's, one after the other."""
    tasks = []
    for _ in range(count):
        response = await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))
        tasks.append(response.task)
    return tasks


async def test_a_clients_own_budget_overrides_the_default(servers: Servers) -> None:
    """Bob's [limits.clients] budget of 40,000 admits 20 large requests where alice, on the
    default 10,000, gets 5; each is refused on its own budget."""
    gate = ChatGate()
    stub = await servers.start(
        budget(10_000, bob=40_000),
        local_backends(max_concurrency=50, extra={"chat": gate}),
        ManualClock(),
    )
    alices, _ = await submit_all(stub, "alice", 25, large_chat())
    bobs, refused = await submit_all(stub, "bob", 25, large_chat())
    assert (len(alices), len(bobs)) == (5, 20)
    assert "'bob' is over its token budget of 40000" in (refused[0].details() or "")
    gate.opened.set()


async def test_an_estimate_bigger_than_the_whole_budget_is_invalid(servers: Servers) -> None:
    """It could never fit: INVALID_ARGUMENT naming the field to shrink (not a RetryInfo
    to wait on), in Submit and in each task of a SubmitBatch, and nothing is charged."""
    stub = await servers.start(budget(10_000), local_backends(), ManualClock())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Submit(
            pb.SubmitRequest(task=large_chat(max_tokens=20_000)), metadata=bearer("alice")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "task.chat.parameters.max_tokens" in details
    assert "whole budget of 10000 per minute" in details
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)

    huge_prompt = pb.TaskSpec(
        chat=pb.ChatInput(
            model="local-echo", messages=[pb.ChatMessage(role="user", content="x" * 50_000)]
        )
    )
    response = await stub.SubmitBatch(
        pb.SubmitBatchRequest(tasks=[large_chat(), huge_prompt]), metadata=bearer("alice")
    )
    ok, too_big = response.results
    assert ok.created
    assert too_big.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v.field for v in too_big.error.field_violations] == ["tasks[1].chat.messages"]
    # Nothing was charged for the refused ones: 8,000 of 10,000 are left, 4 more fit.
    more, _ = await submit_all(stub, "alice", 5, large_chat())
    assert len(more) == 4


async def test_a_batch_is_charged_task_by_task(servers: Servers) -> None:
    """A SubmitBatch of 5 large tasks against a budget for 3 stores the first 3 and refuses
    the other 2 each with RESOURCE_EXHAUSTED and a retry delay."""
    gate = ChatGate()
    stub = await servers.start(
        budget(3 * LARGE_TOKENS), local_backends(extra={"chat": gate}), ManualClock()
    )
    response = await stub.SubmitBatch(
        pb.SubmitBatchRequest(tasks=[large_chat()] * 5), metadata=bearer("alice")
    )
    results = list(response.results)
    assert [r.created for r in results] == [True] * 3 + [False] * 2
    for refused in results[3:]:
        assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "token budget" in refused.error.message
        # 2,000 missing at 6,000 / 60 a second.
        assert refused.error.retry_delay.ToNanoseconds() / 1e9 == pytest.approx(20.0)
    assert await stored(stub, "alice") == 3
    gate.opened.set()


def capped(max_queued: int) -> Limits:
    return Limits(quota=TaskQuota(max_queued=max_queued))


async def test_a_client_at_its_queued_cap_is_refused_until_its_tasks_finish(
    servers: Servers,
) -> None:
    """With max_queued 3 and its tasks held (one running, two queued), alice's fourth Submit
    and a batch's tasks are refused with RetryInfo; bob is not; once alice's tasks finish,
    she is accepted again."""
    gate = ChatGate()
    backends = local_backends(count=1, max_concurrency=1, extra={"chat": gate})
    stub = await servers.start(capped(3), backends)
    held = await submit_in_order(stub, 3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued is 3" in (caught.value.details() or "")
    assert retry_delay_s(caught.value) == pytest.approx(1.0)
    batch = await stub.SubmitBatch(
        pb.SubmitBatchRequest(tasks=[large_chat()] * 2), metadata=bearer("alice")
    )
    assert [r.error.code for r in batch.results] == [
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    ] * 2
    assert all(r.error.retry_delay.ToNanoseconds() == 10**9 for r in batch.results)
    bobs = await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("bob"))
    assert bobs.created, "another client's cap is its own"
    # Operators see which limit refused them.
    text = await scrape(servers.apps[0].metrics_port)
    assert samples(text, "taskring_submit_rejections_total") == {
        labels(reason="RESOURCE_EXHAUSTED/max_queued"): 3.0
    }

    gate.opened.set()
    await finish(stub, held)
    again = await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))
    assert again.created


async def test_a_batch_fills_the_cap_and_refuses_the_rest(servers: Servers) -> None:
    gate = ChatGate()
    stub = await servers.start(capped(3), local_backends(extra={"chat": gate}))
    response = await stub.SubmitBatch(
        pb.SubmitBatchRequest(tasks=[large_chat()] * 5), metadata=bearer("alice")
    )
    assert [r.created for r in response.results] == [True] * 3 + [False] * 2
    assert await stored(stub, "alice") == 3
    gate.opened.set()


async def test_the_cap_remembers_the_backlog_after_a_restart(servers: Servers) -> None:
    """Alice's 2 unfinished tasks (max_queued 2) are still hers after the server restarts:
    the new one counts them from the store and refuses a third until they finish."""
    first = ChatGate()
    stub = await servers.start(capped(2), local_backends(extra={"chat": first}))
    held = await submit_in_order(stub, 2)
    await servers.apps[0].stop()  # graceful: the running tasks go back to the queue

    second = ChatGate()
    stub = await servers.start(capped(2), local_backends(extra={"chat": second}))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has 2 unfinished tasks" in (caught.value.details() or "")
    second.opened.set()
    await finish(stub, held)
    again = await stub.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))
    assert again.created


def drained_chat() -> dict[str, Backend]:
    """A replica's one chat member, to be drained: the replica accepts chat tasks, and
    another replica runs them."""
    handlers = builtin_handlers(LocalModelSettings(token_delay_s=0.0))
    return {"drained": LocalBackend("drained", handlers, 1)}


@pytest.mark.postgresql_only
async def test_a_replica_gets_its_quotas_back_when_another_ends_the_task(
    servers: Servers,
) -> None:
    """Alice may hold one task on replica A (max_queued 1, and a budget with room for one
    large task); A runs no chat, so B runs it. A hears of each end through the store and
    takes her next task: both the cap and the budget were given back."""
    limits = Limits(quota=TaskQuota(tokens_per_minute=LARGE_TOKENS + 100, max_queued=1))
    # A's clock stands still (no refill), at the time B's deadlines are read by.
    a = await servers.start(limits, drained_chat(), ManualClock(time.time()))
    servers.apps[0].dispatcher.members.drain("drained")
    await servers.start(limits, local_backends())
    for _ in range(3):
        task = (await a.Submit(pb.SubmitRequest(task=large_chat()), metadata=bearer("alice"))).task
        ended = await wait_terminal_as(a, task.id, "alice")
        assert ended.state == pb.TASK_STATE_SUCCEEDED
        assert ended.backend != "drained", "B ran it"
