"""Health (liveness and readiness) and graceful shutdown of an in-process server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.app import open_store
from server.config import StoreSettings
from server.events.recorder import MAX_UNSTORED_DELTAS
from server.model import states
from server.model.task import ChatInput, ChatMessage, Task, TaskSpec, TaskState
from server.store.base import TaskStore
from tests.conftest import StartServer, StoreUrl, chat_spec, submit, wait_terminal, watch_all

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = "taskring.v1.TaskService"


async def check(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_readiness_follows_the_store_and_liveness_stays_up(
    start_server: StartServer,
) -> None:
    """When the store stops answering, readiness turns NOT_SERVING; liveness does not."""
    server = await start_server(store_check_interval_s=0.02)
    assert await check(server.channel, READINESS) == SERVING
    await server.app.store.close()  # the store becomes unusable
    watch = health_pb2_grpc.HealthStub(server.channel).Watch(
        health_pb2.HealthCheckRequest(service=READINESS)
    )
    async for response in watch:
        if response.status == NOT_SERVING:
            break
    watch.cancel()
    assert await check(server.channel, "") == SERVING


async def test_shutdown_requeues_running_work_and_ends_open_streams(
    start_server: StartServer,
) -> None:
    """Stopping the server ends watchers cleanly and hands unfinished work back."""
    server = await start_server(token_delay_s=0.2)
    task = await submit(server.stub, chat_spec("a b c d e f g h i j"))
    events = []
    stopping: asyncio.Task[None] | None = None
    async for event in server.stub.Stream(pb.StreamRequest(task_id=task.id)):
        events.append(event)
        if event.HasField("output_delta") and stopping is None:  # running: shut down now
            stopping = asyncio.create_task(server.app.stop())
    assert stopping is not None
    await asyncio.wait_for(stopping, 5)
    # The stream ended cleanly, before the task could finish.
    assert not any(
        e.HasField("state_changed") and e.state_changed.task.state == pb.TASK_STATE_SUCCEEDED
        for e in events
    )
    stored = await reopen_and_get(server.app.store, task.id)
    assert stored is not None
    assert stored.state is TaskState.QUEUED
    assert stored.error is not None
    assert stored.error.code == "INTERRUPTED"
    # The cut-short attempt is in the history; the next one will be number 2.
    assert [(a.number, a.outcome, a.error) for a in stored.attempts] == [
        (1, TaskState.QUEUED, stored.error)
    ]


async def reopen_and_get(store: TaskStore, task_id: str) -> Task | None:
    await store.start()
    try:
        return await store.get(task_id)
    finally:
        await store.close()


async def test_restart_requeues_running_tasks_until_attempts_run_out(
    start_server: StartServer, store_url: StoreUrl, tmp_path: Path
) -> None:
    """Tasks left RUNNING by a dead process run again, unless that was their last attempt
    (a task that kills its process must not do so forever)."""
    db = tmp_path / "recover.db"
    store = open_store(StoreSettings(url=store_url(db)))  # a process that then dies
    await store.start()
    spec = TaskSpec(
        type="chat", input=ChatInput("local-echo", (ChatMessage("user", "hi"),)), max_attempts=2
    )
    left: list[Task] = []
    for n, attempts_used in [(1, 0), (2, 1)]:
        queued = Task(f"t{n}", "anonymous", spec, TaskState.QUEUED, 1.0, 9e9, attempt=attempts_used)
        await store.create(queued)
        running = states.start(queued, "local-1", 2.0)
        assert await store.update(running, queued.sequence)
        left.append(running)
    await store.close()

    server = await start_server(db=db)
    retried = await wait_terminal(server.stub, "t1")
    assert retried.state == pb.TASK_STATE_SUCCEEDED
    assert retried.attempt == 2
    exhausted = await wait_terminal(server.stub, "t2")
    assert exhausted.state == pb.TASK_STATE_FAILED
    assert exhausted.error.code == "INTERRUPTED"
    assert exhausted.attempt == 2
    assert [(a.number, a.outcome, a.error.code) for a in retried.attempts] == [
        (1, pb.TASK_STATE_QUEUED, "INTERRUPTED"),
        (2, pb.TASK_STATE_SUCCEEDED, ""),
    ]
    assert [(a.number, a.outcome, a.backend) for a in exhausted.attempts] == [
        (2, pb.TASK_STATE_FAILED, "local-1")
    ]


async def test_recovery_never_reuses_a_sequence_number_a_watcher_may_have_seen(
    start_server: StartServer, store_url: StoreUrl, tmp_path: Path
) -> None:
    """Output deltas go to watchers before their commit, so some may have been seen but not
    stored when the process died: the recovered task skips their numbers, and a watcher
    resuming after the last of them still sees the requeue."""
    db = tmp_path / "seen.db"
    store = open_store(StoreSettings(url=store_url(db)))
    await store.start()
    spec = TaskSpec(type="chat", input=ChatInput("local-echo", (ChatMessage("user", "hi"),)))
    queued = Task("t1", "anonymous", spec, TaskState.QUEUED, 1.0, 9e9)
    await store.create(queued)
    running = states.start(queued, "local-1", 2.0)
    assert await store.update(running, queued.sequence)
    await store.close()
    # The last delta the attempt may have published, unstored, before the crash.
    seen_but_lost = running.sequence + MAX_UNSTORED_DELTAS

    server = await start_server(db=db)
    events = await watch_all(server.stub, "t1", after_sequence=seen_but_lost)
    states_seen = [e.state_changed.task.state for e in events if e.HasField("state_changed")]
    first = events[0]
    if first.HasField("snapshot"):  # history gone: a snapshot stands in for what was missed
        assert first.snapshot.sequence > seen_but_lost
    else:
        assert states_seen[0] == pb.TASK_STATE_QUEUED
        assert first.sequence == seen_but_lost + 1
    assert events[-1].state_changed.task.state == pb.TASK_STATE_SUCCEEDED
