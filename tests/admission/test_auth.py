"""API keys and tenant isolation, through a real server: a key names the client; no key
or a wrong one is UNAUTHENTICATED; a client sees and touches only its own tasks; health
and reflection stay open; AdminService needs an admin's key."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AsyncTaskringClient
from client._proto.taskring.v1 import admin_pb2 as apb
from client._proto.taskring.v1 import admin_pb2_grpc, tasks_pb2_grpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from server.app import App
from server.config import ConfigError, Settings
from server.config_file import ApiKey, FileConfig
from tests.conftest import FAST_RETRY, ROOT, chat_spec, local_backends, make_settings

ALICE_KEY = "trk_alice-0123456789abcdefghijklmnopqrstuvwxyz"
BOB_KEY = "trk_bob-0123456789abcdefghijklmnopqrstuvwxyz"
ADMIN_KEY = "trk_admin-0123456789abcdefghijklmnopqrstuvwxyz"
KEYS = (
    ApiKey("alice", hashlib.sha256(ALICE_KEY.encode()).hexdigest()),
    ApiKey("bob", hashlib.sha256(BOB_KEY.encode()).hexdigest()),
    ApiKey("ops", hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), admin=True),
)


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    settings = make_settings(tmp_path / "tasks.db")
    app = App(
        replace(settings, file=FileConfig(api_keys=KEYS)),
        backends=local_backends(),
        dispatch=FAST_RETRY,
    )
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def stub(app: App) -> AsyncIterator[tasks_pb2_grpc.TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield tasks_pb2_grpc.TaskServiceStub(channel)


def calls(task_id: str) -> list[tuple[str, object]]:
    """One request of every TaskService method, about `task_id` where it takes one."""
    return [
        ("Submit", pb.SubmitRequest(task=chat_spec())),
        ("SubmitAndStream", pb.SubmitAndStreamRequest(task=chat_spec())),
        ("SubmitBatch", pb.SubmitBatchRequest(tasks=[chat_spec()])),
        ("Get", pb.GetRequest(task_id=task_id)),
        ("Cancel", pb.CancelRequest(task_id=task_id)),
        ("List", pb.ListRequest()),
        ("Stats", pb.StatsRequest()),
        ("Stream", pb.StreamRequest(task_id=task_id)),
    ]


async def call(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
    method: str,
    request: object,
    metadata: tuple[tuple[str, str], ...] | None,
) -> object:
    rpc = getattr(stub, method)
    if method in ("Stream", "SubmitAndStream"):
        return [event async for event in rpc(request, metadata=metadata)]
    return await rpc(request, metadata=metadata)


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        (None, "an API key is required"),
        (bearer("trk_not-a-key-anyone-configured"), "not valid"),
        ((("authorization", ALICE_KEY),), "Bearer"),  # the key without its scheme
    ],
)
async def test_every_method_refuses_a_missing_or_wrong_key(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...] | None,
    says: str,
) -> None:
    """UNAUTHENTICATED with what to send, never the key that was sent; nothing stored."""
    for method, request in calls("t-0123456789abcdef"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(stub, method, request, metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        assert says in (caught.value.details() or ""), method
        for _, sent in metadata or ():  # the key that was sent is never echoed
            assert sent.split()[-1] not in (caught.value.details() or ""), method
    listed = await stub.List(pb.ListRequest(), metadata=bearer(ADMIN_KEY))
    assert list(listed.tasks) == []


async def test_another_clients_task_is_not_found_on_every_method(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """Bob cannot get, watch, cancel or list Alice's task: to him it does not exist."""
    alice = (await stub.Submit(pb.SubmitRequest(task=chat_spec()), metadata=bearer(ALICE_KEY))).task
    assert alice.client_id == "alice"
    for method in ("Get", "Cancel", "Stream"):
        request = dict(calls(alice.id))[method]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(stub, method, request, bearer(BOB_KEY))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, method
    bobs = await stub.List(pb.ListRequest(), metadata=bearer(BOB_KEY))
    assert list(bobs.tasks) == []
    bob = (await stub.Submit(pb.SubmitRequest(task=chat_spec()), metadata=bearer(BOB_KEY))).task
    assert bob.client_id == "bob"
    alices = await stub.List(pb.ListRequest(), metadata=bearer(ALICE_KEY))
    assert [t.id for t in alices.tasks] == [alice.id]
    mine = await stub.Get(pb.GetRequest(task_id=alice.id), metadata=bearer(ALICE_KEY))
    assert mine.task.id == alice.id


async def test_a_batchs_tasks_are_its_clients_alone(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """Tasks Alice submits in a batch are hers: Bob cannot get or list them, and her
    idempotency keys are not his (the same key makes him a task of his own)."""
    batch = pb.SubmitBatchRequest(tasks=[chat_spec("one"), chat_spec("two", idempotency_key="k")])
    alices = await stub.SubmitBatch(batch, metadata=bearer(ALICE_KEY))
    ids = [result.task.id for result in alices.results]
    assert all(result.created for result in alices.results)
    assert {result.task.client_id for result in alices.results} == {"alice"}
    for task_id in ids:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(task_id=task_id), metadata=bearer(BOB_KEY))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert list((await stub.List(pb.ListRequest(), metadata=bearer(BOB_KEY))).tasks) == []
    bobs = await stub.SubmitBatch(batch, metadata=bearer(BOB_KEY))
    assert all(result.created for result in bobs.results)
    assert not {result.task.id for result in bobs.results} & set(ids)
    listed = await stub.List(pb.ListRequest(), metadata=bearer(ALICE_KEY))
    assert sorted(task.id for task in listed.tasks) == sorted(ids)


async def test_stats_are_the_callers_own_and_an_admins_are_everyones(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    for key in (ALICE_KEY, ALICE_KEY, BOB_KEY):
        await stub.Submit(pb.SubmitRequest(task=chat_spec()), metadata=bearer(key))

    def submitted(stats: pb.StatsResponse) -> int:
        return sum(counted.count for counted in stats.window_counts)

    alice = await stub.Stats(pb.StatsRequest(), metadata=bearer(ALICE_KEY))
    everyone = await stub.Stats(pb.StatsRequest(), metadata=bearer(ADMIN_KEY))
    assert alice.client_id == "alice"
    assert submitted(alice) == 2
    assert everyone.client_id == ""
    assert submitted(everyone) == 3


async def test_admin_service_needs_an_admins_key(app: App) -> None:
    async with grpc.aio.insecure_channel(app.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for metadata, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (bearer(ALICE_KEY), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin.ListBackends(apb.ListBackendsRequest(), metadata=metadata)
            assert caught.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.DrainBackend(
                apb.DrainBackendRequest(name="local-1"), metadata=bearer(ALICE_KEY)
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        members = await admin.ListBackends(apb.ListBackendsRequest(), metadata=bearer(ADMIN_KEY))
        assert {m.config.name for m in members.backends} == {"local-1", "local-2", "local-3"}
        assert all(not m.draining for m in members.backends)


async def test_health_and_reflection_need_no_key(app: App) -> None:
    """Kubernetes probes and `grpcurl list` carry no key."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(app.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [response] = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in response.list_services_response.service}
        assert "taskring.v1.TaskService" in names


async def test_the_client_sends_its_api_key(app: App) -> None:
    async with AsyncTaskringClient(app.address, api_key=BOB_KEY) as client:
        task = await client.submit_chat("hello")
        assert task.client_id == "bob"
        assert (await client.wait(task.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_a_key_from_keygen_lets_its_client_in(tmp_path: Path) -> None:
    """`taskring keygen` prints a key (stdout) and the entry (stderr) that admits it."""
    made = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "client", "keygen", "carol"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    key = made.stdout.strip()
    assert key.startswith("trk_")
    assert key not in made.stderr, "the server's entry holds the key's hash, not the key"
    config = tmp_path / "taskring.toml"
    config.write_text(made.stderr)
    settings = Settings.from_env(
        {"TASKRING_CONFIG": str(config), "TASKRING_STORE": f"sqlite:///{tmp_path}/t.db"}
    )
    app = App(replace(settings, server=make_settings(tmp_path / "t.db").server))
    await app.start()
    try:
        async with AsyncTaskringClient(app.address, api_key=key) as client:
            assert (await client.submit_chat("hi")).client_id == "carol"
    finally:
        await app.stop()


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"])
def test_without_keys_only_loopback_is_served_unless_insecure(listen: str) -> None:
    """Secure by default: an address others can reach needs keys or TASKRING_INSECURE."""
    with pytest.raises(ConfigError, match="TASKRING_INSECURE=true"):
        Settings.from_env({"TASKRING_LISTEN": listen})
    insecure = Settings.from_env({"TASKRING_LISTEN": listen, "TASKRING_INSECURE": "true"})
    assert insecure.server.insecure
    for loopback in ("127.0.0.1:50051", "[::1]:50051", "localhost:50051"):
        assert Settings.from_env({"TASKRING_LISTEN": loopback}).server.listen == loopback
