"""kill -9 the server while tasks are queued and running; restart on the same SQLite file:
every acknowledged task reaches a terminal state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
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
