"""Priorities through the real server: aging lets a long-waiting LOW task run before newer
URGENT work (time driven by a manual clock), and a client's priority cap lowers what it
asks for while other clients keep theirs."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from server.backends.base import Backend, BackendEvent, Completed
from server.clock import Clock, ManualClock
from server.config_file import ApiKey, FileConfig, Limits
from server.model.task import CustomInput, CustomOutput, Priority, Task
from tests.api.test_dispatch import Gate, custom_spec
from tests.conftest import (
    FAST_RETRY,
    StoreUrl,
    chat_spec,
    local_backends,
    make_settings,
    submit,
    wait_terminal,
)


async def start_app(
    tmp_path: Path,
    store_url: StoreUrl,
    file: FileConfig,
    backends: Mapping[str, Backend],
    clock: Clock | None = None,
) -> App:
    """A server configured by `file` (as if read from TASKRING_CONFIG), in the test's store."""
    db = tmp_path / "tasks.db"
    settings = replace(make_settings(db, store_url=store_url(db)), file=file)
    started = App(settings, backends=backends, clock=clock, dispatch=FAST_RETRY)
    await started.start()
    return started


def recorded(name: str, priority: pb.Priority.ValueType) -> pb.TaskSpec:
    """A task that notes its name when it runs."""
    return custom_spec("record", name=name, priority=priority)


@pytest.mark.parametrize(
    ("aging_s", "expected"),
    [
        (60.0, ["low-old", "urgent-new", "high-new", "normal-new"]),
        (0.0, ["urgent-new", "high-new", "normal-new", "low-old"]),
    ],
)
async def test_a_low_task_that_waited_three_aging_periods_runs_before_newer_urgent_work(
    tmp_path: Path, store_url: StoreUrl, aging_s: float, expected: list[str]
) -> None:
    """[priorities] aging_s = 60: a LOW task queued 180 s competes as URGENT and, being the
    oldest URGENT, runs first. aging_s = 0: it runs last, as submitted."""
    clock = ManualClock()
    blocker = Gate()
    ran: list[str] = []

    async def record(task: Task) -> AsyncIterator[BackendEvent]:
        assert isinstance(task.spec.input, CustomInput)
        ran.append(str(task.spec.input.data["name"]))
        yield Completed(CustomOutput({}))

    one_slot = local_backends(count=1, max_concurrency=1, extra={"gate": blocker, "record": record})
    app = await start_app(
        tmp_path, store_url, FileConfig(aging_s=aging_s), backends=one_slot, clock=clock
    )
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            await submit(stub, custom_spec("gate"))
            await asyncio.wait_for(blocker.started.wait(), 5)
            queued = [await submit(stub, recorded("low-old", pb.PRIORITY_LOW))]
            clock.advance(180.0)
            for name, priority in [
                ("urgent-new", pb.PRIORITY_URGENT),
                ("high-new", pb.PRIORITY_HIGH),
                ("normal-new", pb.PRIORITY_NORMAL),
            ]:
                queued.append(await submit(stub, recorded(name, priority)))
            blocker.opened.set()
            for task in queued:
                await wait_terminal(stub, task.id)
    finally:
        await app.stop()
    assert ran == expected


ALICE_KEY = "trk_alice-0123456789abcdefghijklmnopqrstuvwxyz"
BOB_KEY = "trk_bob-0123456789abcdefghijklmnopqrstuvwxyz"


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def capped_stub(
    tmp_path: Path, store_url: StoreUrl
) -> AsyncIterator[tasks_pb2_grpc.TaskServiceAsyncStub]:
    """alice is capped at HIGH ([limits.clients."alice"] max_priority); bob is not."""
    keys = tuple(
        ApiKey(client, hashlib.sha256(key.encode()).hexdigest())
        for client, key in (("alice", ALICE_KEY), ("bob", BOB_KEY))
    )
    limits = Limits(client_max_priority={"alice": Priority.HIGH})
    app = await start_app(
        tmp_path, store_url, FileConfig(api_keys=keys, limits=limits), backends=local_backends()
    )
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            yield tasks_pb2_grpc.TaskServiceStub(channel)
    finally:
        await app.stop()


async def test_a_capped_clients_urgent_task_is_lowered_to_its_cap_and_says_so(
    capped_stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """alice's URGENT is stored (and reported by Submit and Get) as HIGH; bob keeps URGENT;
    a priority under the cap is left alone."""
    urgent = pb.SubmitRequest(task=chat_spec(priority=pb.PRIORITY_URGENT))
    alices = (await capped_stub.Submit(urgent, metadata=bearer(ALICE_KEY))).task
    bobs = (await capped_stub.Submit(urgent, metadata=bearer(BOB_KEY))).task
    assert alices.spec.priority == pb.PRIORITY_HIGH
    assert bobs.spec.priority == pb.PRIORITY_URGENT
    got = await capped_stub.Get(pb.GetRequest(task_id=alices.id), metadata=bearer(ALICE_KEY))
    assert got.task.spec.priority == pb.PRIORITY_HIGH
    low = pb.SubmitRequest(task=chat_spec(priority=pb.PRIORITY_LOW))
    alices_low = (await capped_stub.Submit(low, metadata=bearer(ALICE_KEY))).task
    assert alices_low.spec.priority == pb.PRIORITY_LOW


async def test_a_replayed_submit_over_the_cap_still_finds_its_task(
    capped_stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """The same request with the same idempotency key answers the original task
    (created=false), not ALREADY_EXISTS, although the stored priority differs from the
    one asked for."""
    request = pb.SubmitRequest(
        task=chat_spec(priority=pb.PRIORITY_URGENT, idempotency_key="nightly-42")
    )
    first = await capped_stub.Submit(request, metadata=bearer(ALICE_KEY))
    again = await capped_stub.Submit(request, metadata=bearer(ALICE_KEY))
    assert first.created
    assert not again.created
    assert again.task.id == first.task.id
    assert again.task.spec.priority == pb.PRIORITY_HIGH
