"""PostgreSQL out of reach (every connection cut, new ones refused) and back: the server
stays up, readiness follows the database, requests fail clearly meanwhile, and work goes
on once it is back."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from tests.conftest import StoreUrl, chat_spec, local_backends, make_settings, wait_terminal
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = pytest.mark.postgresql_only

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = "taskring.v1.TaskService"


@pytest.fixture
async def proxy(store_url: StoreUrl, tmp_path: Path) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A proxy to the test's PostgreSQL, and the store URL that goes through it."""
    direct = urllib.parse.urlsplit(store_url(tmp_path / "outage.db"))
    proxy = TcpProxy(direct.hostname or "127.0.0.1", direct.port or 5432)
    await proxy.start()
    yield proxy, direct._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    await proxy.cut()


async def readiness_becomes(channel: grpc.aio.Channel, status: int) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=READINESS)
    )
    async for response in watch:
        if response.status == status:
            break
    watch.cancel()


@pytest.mark.timeout(60)
async def test_readiness_follows_a_lost_database_and_work_resumes_when_it_is_back(
    proxy: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    tcp, url = proxy
    settings = make_settings(tmp_path / "unused.db", 0.05, store_url=url)
    async with (
        App(settings, backends=local_backends()) as app,
        grpc.aio.insecure_channel(app.address) as channel,
    ):
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        before = (await stub.Submit(pb.SubmitRequest(task=chat_spec("before")))).task
        assert (await wait_terminal(stub, before.id)).state == pb.TASK_STATE_SUCCEEDED

        await tcp.cut()
        await asyncio.wait_for(readiness_becomes(channel, NOT_SERVING), 10)
        health = health_pb2_grpc.HealthStub(channel)
        liveness = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert liveness.status == SERVING, "the process is alive: no restart wanted"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Submit(pb.SubmitRequest(task=chat_spec("during")), timeout=40)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "store" in (refused.value.details() or "")
        batch = pb.SubmitBatchRequest(tasks=[chat_spec("during 1"), chat_spec("during 2")])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitBatch(batch, timeout=40)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        await tcp.restore()
        await asyncio.wait_for(readiness_becomes(channel, SERVING), 10)
        after = (await stub.Submit(pb.SubmitRequest(task=chat_spec("after")))).task
        assert (await wait_terminal(stub, after.id)).state == pb.TASK_STATE_SUCCEEDED
        listed = await stub.List(pb.ListRequest())
        assert {task.id for task in listed.tasks} == {before.id, after.id}, "none of the batch"
