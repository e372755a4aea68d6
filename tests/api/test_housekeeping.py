"""Retention: finished tasks older than TASKRING_RETENTION_S are deleted in batches; tasks
still queued or running, and recently finished ones, are kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.backends.base import BackendEvent, Completed
from server.config import ConfigError, Settings
from server.housekeeping import Housekeeper
from server.model.task import CustomInput, CustomOutput, Task
from tests.api.test_dispatch import custom_spec
from tests.conftest import Running, StartServer, local_backends, submit, wait_terminal


async def finished_tasks(server: Running, n: int) -> list[str]:
    ids = [(await submit(server.stub, custom_spec("quick"))).id for _ in range(n)]
    for task_id in ids:
        assert (await wait_terminal(server.stub, task_id)).state == pb.TASK_STATE_SUCCEEDED
    return ids


async def exists(server: Running, task_id: str) -> bool:
    try:
        await server.stub.Get(pb.GetRequest(task_id=task_id))
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False
    return True


@pytest.fixture
async def server(start_server: StartServer) -> AsyncIterator[Running]:
    release = asyncio.Event()

    async def quick(task: Task) -> AsyncIterator[BackendEvent]:
        yield Completed(CustomOutput({}))

    async def held(task: Task) -> AsyncIterator[BackendEvent]:
        assert isinstance(task.spec.input, CustomInput)
        await release.wait()
        yield Completed(CustomOutput({}))

    # Two slots for held tasks (still running at the sweep, however old), one for the rest.
    backends = local_backends(count=1, max_concurrency=3, extra={"quick": quick, "held": held})
    running = await start_server(backends)
    yield running
    release.set()


def housekeeper(server: Running, retention_s: float, batch: int = 500) -> Housekeeper:
    app = server.app
    return Housekeeper(app.store, app.hub, app.clock, retention_s, batch=batch)


async def test_old_finished_tasks_go_and_everything_else_stays(server: Running) -> None:
    old = await finished_tasks(server, 3)
    unfinished = [(await submit(server.stub, custom_spec("held"))).id for _ in range(2)]
    await asyncio.sleep(0.2)
    recent = await finished_tasks(server, 2)

    deleted = await housekeeper(server, retention_s=0.15).sweep()

    assert deleted == 3
    assert [await exists(server, t) for t in old] == [False] * 3
    assert [await exists(server, t) for t in (*recent, *unfinished)] == [True] * 4
    listed = {t.id for t in (await server.stub.List(pb.ListRequest())).tasks}
    assert listed == {*recent, *unfinished}


async def test_a_backlog_is_deleted_in_batches(server: Running) -> None:
    """25 old tasks, 10 per write: the sweep goes on until a batch comes back short."""
    old = await finished_tasks(server, 25)
    await asyncio.sleep(0.05)
    assert await housekeeper(server, retention_s=0.01, batch=10).sweep() == 25
    assert not any([await exists(server, t) for t in old])


async def test_the_sweep_runs_on_its_own_every_interval(server: Running) -> None:
    app = server.app
    keeper = Housekeeper(app.store, app.hub, app.clock, retention_s=0.01, interval_s=0.05)
    keeper.start()
    try:
        first = await finished_tasks(server, 2)
        later = await finished_tasks(server, 2)
        async with asyncio.timeout(5):
            while keeper.deleted < 4:  # noqa: ASYNC110 - the sweep has no event to wait on
                await asyncio.sleep(0.02)
    finally:
        await keeper.stop()
    assert not any([await exists(server, t) for t in (*first, *later)])


async def test_zero_retention_keeps_every_task(server: Running) -> None:
    keeper = housekeeper(server, retention_s=0)
    keeper.start()  # does nothing: 0 means keep for ever
    await finished_tasks(server, 2)
    await asyncio.sleep(0.1)
    await keeper.stop()
    assert keeper.deleted == 0
    assert len((await server.stub.List(pb.ListRequest())).tasks) == 2


def test_retention_setting() -> None:
    assert Settings.from_env({}).store.retention_s == 7 * 86400
    assert Settings.from_env({"TASKRING_RETENTION_S": "0"}).store.retention_s == 0
    with pytest.raises(ConfigError, match="TASKRING_RETENTION_S"):
        Settings.from_env({"TASKRING_RETENTION_S": "-1"})
