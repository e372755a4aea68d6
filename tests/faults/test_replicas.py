"""Two router processes and three executor processes on loopback sharing one PostgreSQL:
tasks submitted through A are watched through B, A is killed (SIGKILL) in the middle of a
2,000-task load, and every acknowledged task still reaches a terminal state through B."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from tests.conftest import ServerProcess, chat_spec, spawn_executor, spawn_server, watch_all
from tests.pg import RunDatabase

pytestmark = pytest.mark.slow

LOAD = 2000
IN_FLIGHT = 32
KILL_AFTER_ACKNOWLEDGED = 1500
# Each task ("load i a b c", echoed) is ~7 tokens x 50 ms ≈ 0.35 s on an executor; the
# routers take 16 at a time per executor each, while Submit takes ~1,000/s through A: at the
# kill A's slots are busy and most acknowledged tasks are still queued.
EXECUTOR_ENV = {"TASKRING_LOCAL_TOKEN_DELAY_S": "0.05"}
PER_EXECUTOR = 16
# A dead replica's tasks wait this long (plus one orphan check, 2 s) before B re-queues them.
LEASE_S = "2"
TERMINAL = {pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED}


def ring_config(tmp_path: Path, executors: list[ServerProcess]) -> Path:
    """The same three executors in both routers' rings."""
    path = tmp_path / "ring.toml"
    path.write_text(
        "".join(
            f'[[backends]]\nname = "executor-{i}"\nkind = "remote"\n'
            f'address = "{e.address}"\nmax_concurrency = {PER_EXECUTOR}\n'
            'task_types = ["chat"]\n\n'
            for i, e in enumerate(executors, start=1)
        )
    )
    return path


@pytest.mark.timeout(150)
async def test_kill_a_replica_during_2000_task_load_and_the_other_finishes_every_task(
    tmp_path: Path, postgres: RunDatabase, server_processes: list[ServerProcess]
) -> None:
    executors = await asyncio.gather(
        *(asyncio.to_thread(spawn_executor, **EXECUTOR_ENV) for _ in range(3))
    )
    server_processes.extend(executors)
    env = {
        "TASKRING_STORE": postgres.url_for(tmp_path / "replicas.db"),
        "TASKRING_CONFIG": str(ring_config(tmp_path, executors)),
        "TASKRING_LEASE_S": LEASE_S,
    }
    a, b = await asyncio.gather(
        asyncio.to_thread(spawn_server, tmp_path / "unused-a.db", **env),
        asyncio.to_thread(spawn_server, tmp_path / "unused-b.db", **env),
    )
    server_processes.extend([a, b])

    acknowledged: list[str] = []
    watches: list[asyncio.Task[list[pb.StreamResponse]]] = []
    enough = asyncio.Event()
    numbers = iter(range(LOAD))

    async with (
        grpc.aio.insecure_channel(a.address) as to_a,
        grpc.aio.insecure_channel(b.address) as to_b,
    ):
        stub_a, stub_b = tasks_pb2_grpc.TaskServiceStub(to_a), tasks_pb2_grpc.TaskServiceStub(to_b)

        async def submitter() -> None:
            for i in numbers:  # one shared iterator: IN_FLIGHT callers, each task once
                failure: grpc.aio.AioRpcError | None = None
                try:
                    response = await stub_a.Submit(
                        pb.SubmitRequest(task=chat_spec(f"load {i} a b c"))
                    )
                except grpc.aio.AioRpcError as exc:
                    failure = exc
                if failure is not None:
                    # Only the kill may fail a Submit, and then as UNAVAILABLE.
                    assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure
                    assert a.process.poll() is not None, f"failed before the kill: {failure}"
                    return
                acknowledged.append(response.task.id)
                # Watched through B from the moment A acknowledged it.
                watches.append(asyncio.create_task(watch_all(stub_b, response.task.id)))
                if len(acknowledged) >= KILL_AFTER_ACKNOWLEDGED:
                    enough.set()

        submitters = [asyncio.create_task(submitter()) for _ in range(IN_FLIGHT)]
        await enough.wait()
        a.kill()  # while the submitters keep going
        await asyncio.gather(*submitters)
        streams = await asyncio.gather(*watches)

        finals = []
        for events in streams:
            last = events[-1]
            finals.append(last.snapshot if last.HasField("snapshot") else last.state_changed.task)
            sequences = [e.sequence for e in events]
            assert sequences == sorted(set(sequences)), "in order, none twice"
        # B answers Get for every task too, whichever replica ran it.
        gets = await asyncio.gather(
            *(stub_b.Get(pb.GetRequest(task_id=task_id)) for task_id in acknowledged[::50])
        )

    assert len(acknowledged) >= KILL_AFTER_ACKNOWLEDGED
    assert [f.id for f in finals] == acknowledged
    assert all(f.state == pb.TASK_STATE_SUCCEEDED for f in finals), {f.state for f in finals}
    assert {g.task.state for g in gets} == {pb.TASK_STATE_SUCCEEDED}
    rerun = [f for f in finals if f.attempt > 1]
    assert rerun, "the tasks A was running at the kill ran again, on B"
    assert len(rerun) <= 3 * PER_EXECUTOR, "only those A was running"
    assert b.terminate() == 0, "B shuts down cleanly"
