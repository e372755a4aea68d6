"""AdminService: members added, drained, resumed and removed while the router runs."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from client._proto.taskring.v1 import admin_pb2 as apb
from client._proto.taskring.v1 import admin_pb2_grpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from tests.api.test_dispatch import Gate, custom_spec
from tests.conftest import (
    Running,
    StartServer,
    chat_spec,
    local_backends,
    submit,
    wait_terminal,
)


def admin(server: Running) -> admin_pb2_grpc.AdminServiceAsyncStub:
    return admin_pb2_grpc.AdminServiceStub(server.channel)


async def backends_of(server: Running, keys: list[str]) -> list[str]:
    """Where each routing key's task ran."""
    ran = []
    for key in keys:
        task = await submit(server.stub, chat_spec("hi", routing_key=key))
        final = await wait_terminal(server.stub, task.id)
        assert final.state == pb.TASK_STATE_SUCCEEDED
        ran.append(final.backend)
    return ran


async def test_list_shows_every_member_with_its_state(start_server: StartServer) -> None:
    server = await start_server()
    listed = (await admin(server).ListBackends(apb.ListBackendsRequest())).backends
    assert [b.config.name for b in listed] == ["local-1", "local-2", "local-3"]
    for status in listed:
        assert status.config.kind == "local"
        assert status.health == apb.HEALTH_STATE_HEALTHY
        assert status.circuit == apb.CIRCUIT_STATE_CLOSED
        assert status.available
        assert not status.draining
        assert sorted(status.config.task_types) == ["chat", "embed"]


async def test_drain_moves_only_that_members_keys_and_resume_brings_them_back(
    start_server: StartServer,
) -> None:
    server = await start_server()
    keys = [f"session-{i}" for i in range(30)]
    before = await backends_of(server, keys)
    drained = (await admin(server).DrainBackend(apb.DrainBackendRequest(name="local-2"))).backend
    assert drained.draining
    assert not drained.available
    during = await backends_of(server, keys)
    assert "local-2" not in during
    for was, now in zip(before, during, strict=True):
        if was != "local-2":
            assert now == was, "a key of a member that stayed must not move"
    await admin(server).ResumeBackend(apb.ResumeBackendRequest(name="local-2"))
    assert await backends_of(server, keys) == before


async def test_add_and_remove_a_member_at_runtime(start_server: StartServer) -> None:
    server = await start_server()
    keys = [f"user-{i}" for i in range(40)]
    before = await backends_of(server, keys)
    added = await admin(server).AddBackend(
        apb.AddBackendRequest(
            backend=apb.BackendConfig(name="local-4", kind="local", max_concurrency=4)
        )
    )
    assert added.backend.available
    after_add = await backends_of(server, keys)
    moved = [(a, b) for a, b in zip(before, after_add, strict=True) if a != b]
    assert moved, "a new member takes some keys"
    assert all(new == "local-4" for _, new in moved), "keys only move to the new member"
    assert len(moved) <= len(keys) // 2
    removed = await admin(server).RemoveBackend(apb.RemoveBackendRequest(name="local-4"))
    assert removed.backend.config.name == "local-4"
    assert await backends_of(server, keys) == before
    listed = (await admin(server).ListBackends(apb.ListBackendsRequest())).backends
    assert "local-4" not in [b.config.name for b in listed]


async def test_bad_membership_changes_say_what_is_wrong(start_server: StartServer) -> None:
    server = await start_server()
    stub = admin(server)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.DrainBackend(apb.DrainBackendRequest(name="nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (missing.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await stub.AddBackend(
            apb.AddBackendRequest(backend=apb.BackendConfig(name="local-1", kind="local"))
        )
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.AddBackend(
            apb.AddBackendRequest(backend=apb.BackendConfig(name="x", kind="remote"))
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "host:port" in (invalid.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as unknown_kind:
        await stub.AddBackend(
            apb.AddBackendRequest(backend=apb.BackendConfig(name="y", kind="mainframe"))
        )
    assert unknown_kind.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kind" in (unknown_kind.value.details() or "")


async def test_removing_a_member_lets_its_running_attempt_finish(
    start_server: StartServer,
) -> None:
    """Its running task still succeeds (output kept); the member is gone from the list."""
    gate = Gate()
    server = await start_server(local_backends(extra={"gate": gate}))
    task = await submit(server.stub, custom_spec("gate"))
    await asyncio.wait_for(gate.started.wait(), 5)
    running = (await server.stub.Get(pb.GetRequest(task_id=task.id))).task
    removed = await admin(server).RemoveBackend(apb.RemoveBackendRequest(name=running.backend))
    assert removed.backend.in_flight == 1
    listed = (await admin(server).ListBackends(apb.ListBackendsRequest())).backends
    assert running.backend not in [b.config.name for b in listed]
    gate.opened.set()
    final = await wait_terminal(server.stub, task.id)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert final.backend == running.backend
    assert final.output.custom["done"] is True


async def test_members_holding_api_keys_are_not_added_over_the_api(
    start_server: StartServer,
) -> None:
    """Unauthenticated, AddBackend must not let a caller point a key at their own host."""
    server = await start_server()
    for kind in ("openai", "anthropic"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin(server).AddBackend(
                apb.AddBackendRequest(
                    backend=apb.BackendConfig(
                        name="evil", kind=kind, base_url="http://127.0.0.1:9/v1"
                    )
                )
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "configuration file" in (refused.value.details() or "")
