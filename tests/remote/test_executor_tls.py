"""A router dialling its remote executors over (mutual) TLS: `taskring-executor` serves
TASKRING_TLS_*, the router dials with TASKRING_REMOTE_TLS_*, both as separate processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client._proto.taskring.v1 import admin_pb2 as apb
from client._proto.taskring.v1 import admin_pb2_grpc, tasks_pb2_grpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from tests.conftest import ServerProcess, chat_spec, spawn_executor, spawn_server, wait_terminal
from tests.tls import remote_env, server_env
from tests.tls_certs import Pki

pytestmark = pytest.mark.slow


def ring_of(tmp_path: Path, executor: ServerProcess) -> str:
    path = tmp_path / "taskring.toml"
    path.write_text(
        f"""
[[backends]]
name = "executor-1"
kind = "remote"
address = "{executor.address}"
task_types = ["chat"]
"""
    )
    return str(path)


async def health_of(address: str, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_a_router_runs_tasks_on_an_executor_serving_mutual_tls(
    tmp_path: Path, pki: Pki, server_processes: list[ServerProcess]
) -> None:
    executor = spawn_executor(**server_env(pki, mutual=True))
    server_processes.append(executor)
    router = spawn_server(
        tmp_path / "tasks.db", TASKRING_CONFIG=ring_of(tmp_path, executor), **remote_env(pki)
    )
    server_processes.append(router)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        task = (await stub.Submit(pb.SubmitRequest(task=chat_spec("over tls")))).task
        final = await wait_terminal(stub, task.id)
    assert final.state == pb.TASK_STATE_SUCCEEDED, final.error
    assert final.backend == "executor-1"
    assert final.output.chat.text == "[local-echo] over tls"


async def test_a_router_without_a_client_certificate_sees_the_member_unhealthy(
    tmp_path: Path, pki: Pki, server_processes: list[ServerProcess]
) -> None:
    """A TLS mistake between router and executor is an operator's to see: the member is
    down in ListBackends (and routed around), not a task failing somewhere."""
    executor = spawn_executor(**server_env(pki, mutual=True))
    server_processes.append(executor)
    router = spawn_server(
        tmp_path / "tasks.db",
        TASKRING_CONFIG=ring_of(tmp_path, executor),
        **remote_env(pki, client_cert=False),
    )
    server_processes.append(router)
    async with grpc.aio.insecure_channel(router.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            (member,) = (await admin.ListBackends(apb.ListBackendsRequest())).backends
            if member.health == apb.HEALTH_STATE_UNHEALTHY:
                break
            assert asyncio.get_running_loop().time() < deadline, member
            await asyncio.sleep(0.1)
        assert not member.available


async def test_an_executor_serving_mutual_tls_refuses_callers_without_its_cas_certificate(
    pki: Pki, server_processes: list[ServerProcess]
) -> None:
    """Anyone who can reach an executor could otherwise run tasks on it (and on its
    providers' API keys): with a client CA, only routers holding a certificate it signed
    get an answer."""
    executor = spawn_executor(**server_env(pki, mutual=True))
    server_processes.append(executor)
    ca = pki.ca.read_bytes()
    router = grpc.ssl_channel_credentials(
        ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    assert await health_of(executor.address, router) == health_pb2.HealthCheckResponse.SERVING
    intruder = grpc.ssl_channel_credentials(
        ca, pki.other_client_key.read_bytes(), pki.other_client_cert.read_bytes()
    )
    for credentials in (grpc.ssl_channel_credentials(ca), intruder):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_of(executor.address, credentials)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(executor.address) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(plaintext).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
