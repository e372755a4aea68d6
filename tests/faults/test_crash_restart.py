"""kill -9 the server while tasks are queued and running; restart on the same SQLite file:
every acknowledged task reaches a terminal state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.model.task import TaskState
from server.store.sqlite import SqliteTaskStore
from tests.conftest import ServerProcess, chat_spec, spawn_server, wait_terminal

pytestmark = pytest.mark.slow

TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}


@pytest.mark.timeout(120)
async def test_every_acknowledged_task_finishes_after_kill_and_restart(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """SIGKILL with tasks queued and running loses none of the acknowledged ones."""
    db = tmp_path / "crash.db"
    # Slow tokens and few slots: at the kill some tasks run and most are still queued.
    env = {"TASKRING_LOCAL_TOKEN_DELAY_S": "0.02", "TASKRING_LOCAL_MAX_CONCURRENCY": "4"}
    first = spawn_server(db, **env)
    server_processes.append(first)
    acknowledged: list[str] = []
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        for i in range(200):
            response = await stub.Submit(pb.SubmitRequest(task=chat_spec(f"task {i} a b c")))
            acknowledged.append(response.task.id)
        running = await stub.List(pb.ListRequest(states=[pb.TASK_STATE_RUNNING]))
        queued = await stub.List(pb.ListRequest(states=[pb.TASK_STATE_QUEUED], page_size=1))
        assert running.tasks, "some tasks must be running at the kill"
        assert queued.tasks, "some tasks must still be queued at the kill"
    first.kill()

    second = spawn_server(db, TASKRING_LOCAL_TOKEN_DELAY_S="0")
    server_processes.append(second)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        finals = await asyncio.gather(*(wait_terminal(stub, task_id) for task_id in acknowledged))
    assert len(finals) == len(acknowledged)
    assert {f.state for f in finals} <= TERMINAL
    assert all(f.state == pb.TASK_STATE_SUCCEEDED for f in finals)
    interrupted = [f for f in finals if f.attempt > 1]
    assert interrupted, "the tasks running at the kill ran again after the restart"
    assert second.terminate() == 0, "SIGTERM shuts down cleanly with exit code 0"


# The version: 2,000 tasks submitted by 32 concurrent callers, the server killed
# with three quarters acknowledged, so that at the kill Submits are in flight, the slots
# of all three executors are busy and a thousand-odd tasks wait in the queue.
LOAD = 2000
IN_FLIGHT = 32
KILL_AFTER_ACKNOWLEDGED = 1500
# 3 executors x 8 slots; each task ("load i a b c" echoed) is ~7 tokens x 100 ms ≈ 0.7 s,
# so the first server finishes ~35 tasks/s while Submit takes ~1,000/s: the queue grows.
# Long tasks keep every slot busy at the kill even when a loaded machine starves the claim
# loop for a moment (with 0.15 s tasks, CI once caught all 24 slots between tasks).
SLOTS = 3 * 8
SLOW_ENV = {"TASKRING_LOCAL_TOKEN_DELAY_S": "0.1", "TASKRING_LOCAL_MAX_CONCURRENCY": "8"}


async def list_ids(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub, *states: pb.TaskState.ValueType
) -> list[str]:
    """The ids of every task in `states` (all states if none), through every page."""
    ids: list[str] = []
    token = ""
    while True:
        request = pb.ListRequest(states=states, page_size=1000, page_token=token)
        page = await stub.List(request)
        ids += [task.id for task in page.tasks]
        if not (token := page.next_page_token):
            return ids


async def stored_running(db: Path) -> set[str]:
    """The tasks the SQLite file holds as RUNNING: after a SIGKILL, exactly the ones that
    were running at the kill (as far as any commit got). Taking the store's lock also
    proves the killed server left the file usable."""
    store = SqliteTaskStore(db)
    await store.start()
    try:
        return {task.id for task in await store.in_states([TaskState.RUNNING], LOAD)}
    finally:
        await store.close()


@pytest.mark.timeout(60)
async def test_kill_during_2000_task_load_loses_no_acknowledged_task(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """SIGKILL in the middle of a 2,000-task concurrent load: after a restart every
    acknowledged task SUCCEEDS, and only those that were running at the kill ran twice."""
    db = tmp_path / "crash-2000.db"
    first = spawn_server(db, **SLOW_ENV)
    server_processes.append(first)
    acknowledged: list[str] = []
    unacknowledged = 0  # Submits cut off by the kill: they may or may not exist
    enough = asyncio.Event()
    numbers = iter(range(LOAD))

    async def submitter(stub: tasks_pb2_grpc.TaskServiceAsyncStub) -> None:
        nonlocal unacknowledged
        for i in numbers:  # one shared iterator: IN_FLIGHT callers, each task once
            try:
                response = await stub.Submit(pb.SubmitRequest(task=chat_spec(f"load {i} a b c")))
            except grpc.aio.AioRpcError as exc:
                failure = exc
            else:
                acknowledged.append(response.task.id)
                if len(acknowledged) >= KILL_AFTER_ACKNOWLEDGED:
                    enough.set()
                continue
            # Only the kill may fail a Submit, and then as UNAVAILABLE.
            assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure
            assert first.process.poll() is not None, f"Submit failed before the kill: {failure}"
            unacknowledged += 1
            return

    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        submitters = [asyncio.create_task(submitter(stub)) for _ in range(IN_FLIGHT)]
        await enough.wait()
        # Racy by nature (tasks start and finish while we page): a picture of the moment.
        listed_running = await list_ids(stub, pb.TASK_STATE_RUNNING)
        queued = await stub.List(pb.ListRequest(states=[pb.TASK_STATE_QUEUED], page_size=1))
        first.kill()  # while the submitters keep going
        await asyncio.gather(*submitters)
    assert listed_running, "some tasks must be running at the kill"
    assert len(listed_running) <= SLOTS
    assert queued.tasks, "some tasks must still be queued at the kill"
    assert len(acknowledged) < LOAD, "the kill must come during the load"
    running_at_kill = await stored_running(db)

    second = spawn_server(db, TASKRING_LOCAL_TOKEN_DELAY_S="0")
    server_processes.append(second)
    async with grpc.aio.insecure_channel(second.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        # Every task that exists, acknowledged or not (a Submit cut off after its commit).
        existing = await list_ids(stub)
        assert set(acknowledged) <= set(existing), "an acknowledged task was lost"
        assert len(existing) <= len(acknowledged) + unacknowledged
        limit = asyncio.Semaphore(64)  # bounded: 2,000 Streams at once only add noise

        async def final(task_id: str) -> pb.Task:
            async with limit:
                return await wait_terminal(stub, task_id)

        finals = await asyncio.gather(*(final(task_id) for task_id in existing))
    assert all(f.state == pb.TASK_STATE_SUCCEEDED for f in finals), {
        pb.TaskState.Name(f.state) for f in finals
    }
    ran_twice = {f.id for f in finals if f.attempt > 1}
    print(
        f"\nkill during a {LOAD}-task load: {len(acknowledged)} acknowledged,"
        f" {unacknowledged} Submits cut off ({len(existing) - len(acknowledged)} of them"
        f" stored), {len(listed_running)} listed RUNNING just before the kill,"
        f" {len(running_at_kill)} stored RUNNING at it; {len(ran_twice)} of {len(finals)}"
        " ran twice"
    )
    assert ran_twice, "the tasks running at the kill ran again after the restart"
    # Exactly the interrupted ones re-ran (recovery re-queues each RUNNING task once) ...
    assert ran_twice == running_at_kill
    # ... and never more than could run at once.
    assert len(ran_twice) <= SLOTS
    assert second.terminate() == 0, "SIGTERM shuts down cleanly with exit code 0"
