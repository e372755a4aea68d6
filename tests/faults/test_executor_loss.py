"""Three executor processes behind one router: keys stay put while membership is stable,
losing an executor mid-load loses no task, and bringing it back returns only its keys."""

from __future__ import annotations

import asyncio

import pytest

from client._proto.taskring.v1 import admin_pb2 as apb
from client._proto.taskring.v1 import admin_pb2_grpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from server.backends.base import Backend
from server.backends.remote import RemoteBackend
from tests.conftest import (
    Running,
    ServerProcess,
    StartServer,
    chat_spec,
    spawn_executor,
    submit,
    wait_terminal,
)

pytestmark = pytest.mark.slow

LOAD = 300
KEYS = [f"conversation-{i}" for i in range(30)]


async def placements(server: Running, keys: list[str]) -> dict[str, str]:
    """The executor each key's task ran on (one at a time, so load never moves a key)."""
    placed = {}
    for key in keys:
        spec = chat_spec("where am I", routing_key=key)
        spec.chat.parameters.max_tokens = 1  # one token: quick
        task = await submit(server.stub, spec)
        final = await wait_terminal(server.stub, task.id)
        assert final.state == pb.TASK_STATE_SUCCEEDED
        placed[key] = final.backend
    return placed


async def wait_in_flight(server: Running, name: str, count: int) -> None:
    """Until `name` is running `count` attempts: killing it then interrupts them."""
    stub = admin_pb2_grpc.AdminServiceStub(server.channel)
    for _ in range(500):
        listed = (await stub.ListBackends(apb.ListBackendsRequest())).backends
        if next(b for b in listed if b.config.name == name).in_flight >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{name} never got work")


async def wait_health(server: Running, name: str, healthy: bool) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(server.channel)
    want = apb.HEALTH_STATE_HEALTHY if healthy else apb.HEALTH_STATE_UNHEALTHY
    for _ in range(200):
        listed = (await stub.ListBackends(apb.ListBackendsRequest())).backends
        if next(b for b in listed if b.config.name == name).health == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never became {'healthy' if healthy else 'unhealthy'}")


async def test_losing_an_executor_mid_load_loses_nothing_and_its_keys_come_back(
    start_server: StartServer, server_processes: list[ServerProcess]
) -> None:
    # Time per token, so that tasks are mid-reply on every executor when one dies: at 5 ms
    # (0.13 s a task) a loaded CI machine once had executor-2's last attempts all but done
    # when it was killed, and none was retried.
    executors = [spawn_executor(TASKRING_LOCAL_TOKEN_DELAY_S="0.02") for _ in range(3)]
    server_processes.extend(executors)
    backends: dict[str, Backend] = {
        f"executor-{i}": RemoteBackend(
            f"executor-{i}",
            address=process.address,
            max_concurrency=16,
            task_types=frozenset({"chat", "embed"}),
        )
        for i, process in enumerate(executors, start=1)
    }
    server = await start_server(backends)

    stable = await placements(server, KEYS)
    assert set(stable.values()) == set(backends), "the ring spreads keys over all three"
    assert await placements(server, KEYS) == stable, "same key, same executor"

    # Load, then SIGKILL executor-2 while its share of the load is running.
    text = "a reply long enough to take a few tokens " * 3
    tasks = await asyncio.gather(
        *(submit(server.stub, chat_spec(text, routing_key=f"load-{i}")) for i in range(LOAD))
    )
    await wait_in_flight(server, "executor-2", 8)  # half its slots: a wave mid-reply
    executors[1].kill()
    finals = await asyncio.gather(*(wait_terminal(server.stub, t.id) for t in tasks))
    states = [f.state for f in finals]
    assert states.count(pb.TASK_STATE_SUCCEEDED) == LOAD, [
        (f.backend, f.error.code) for f in finals if f.state != pb.TASK_STATE_SUCCEEDED
    ]
    retried = [f for f in finals if f.attempt > 1]
    assert retried, "some tasks were running on the executor that died"
    assert all(f.backend != "executor-2" for f in retried)

    await wait_health(server, "executor-2", healthy=False)
    during = await placements(server, KEYS)
    for key, owner in stable.items():
        if owner == "executor-2":
            assert during[key] != "executor-2"
        else:
            assert during[key] == owner, f"{key} moved though its executor stayed"

    # The same executor comes back on the same address: it gets its own keys back.
    server_processes.append(spawn_executor(listen=executors[1].address))
    await wait_health(server, "executor-2", healthy=True)
    assert await placements(server, KEYS) == stable
