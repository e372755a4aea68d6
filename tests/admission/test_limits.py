"""Per-client token buckets: over the limit is RESOURCE_EXHAUSTED at once, with a
google.rpc.RetryInfo that a retry can trust; other clients are not touched; buckets of
idle clients are dropped."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.admission.limits import ClientLimiter, Grant
from server.app import App
from server.config_file import ApiKey, FileConfig, Limits, RateLimit
from server.model.errors import RateLimitedError
from tests.conftest import FAST_RETRY, chat_spec, local_backends, make_settings

NOISY_KEY = "trk_noisy-0123456789abcdefghijklmnopqrstuvwxyz"
CALM_KEY = "trk_calm-0123456789abcdefghijklmnopqrstuvwxyz"
FLOOD_KEY = "trk_flood-0123456789abcdefghijklmnopqrstuvwxyz"
RATE, BURST = 5.0, 3


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[tasks_pb2_grpc.TaskServiceAsyncStub]:
    keys = tuple(
        ApiKey(client, hashlib.sha256(key.encode()).hexdigest())
        for client, key in (("noisy", NOISY_KEY), ("calm", CALM_KEY), ("flood", FLOOD_KEY))
    )
    limits = Limits(
        RateLimit(RATE, BURST),
        # One call, then none for 1,000 s: every later call is refused.
        {"calm": RateLimit(1000, 100), "flood": RateLimit(0.001, 1)},
    )
    settings = make_settings(tmp_path / "tasks.db")
    app = App(
        replace(settings, file=FileConfig(api_keys=keys, limits=limits)),
        backends=local_backends(),
        dispatch=FAST_RETRY,
    )
    await app.start()
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield tasks_pb2_grpc.TaskServiceStub(channel)
    await app.stop()


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None, "the rejection carries a google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo in the rejection")


async def test_a_burst_over_the_limit_is_refused_at_once_with_when_to_retry(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """The bucket's burst passes; the next call fails at once (not queued) with a delay of
    one token's time, after which a retry passes."""
    request = pb.SubmitRequest(task=chat_spec())
    for _ in range(BURST):
        await stub.Submit(request, metadata=bearer(NOISY_KEY))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Submit(request, metadata=bearer(NOISY_KEY))
    assert time.monotonic() - started < 0.5, "rejected at once, not made to wait"
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "noisy" in (caught.value.details() or "")
    delay = retry_delay_s(caught.value)
    assert 0 < delay <= 1 / RATE
    await asyncio.sleep(delay)
    await stub.Submit(request, metadata=bearer(NOISY_KEY))
    await asyncio.sleep(1 / RATE)  # List takes a token too
    listed = await stub.List(pb.ListRequest(), metadata=bearer(NOISY_KEY))
    assert len(listed.tasks) == BURST + 1, "the refused Submit stored nothing"


async def test_one_clients_limit_leaves_the_others_alone(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """While the noisy client is refused, the calm one (its own, larger bucket) is not."""
    request = pb.SubmitRequest(task=chat_spec())
    outcomes = await asyncio.gather(
        *(stub.Submit(request, metadata=bearer(NOISY_KEY)) for _ in range(20)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(refused) == 20 - BURST
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    for _ in range(50):
        await stub.Submit(request, metadata=bearer(CALM_KEY))


async def test_idle_buckets_are_dropped_so_memory_stays_bounded() -> None:
    """100,000 distinct clients, each calling once: the limiter holds only those whose
    bucket has not drained yet (10 ms here), not all of them."""
    limiter = ClientLimiter(Limits(RateLimit(1000, 10)))
    tracemalloc.start()
    try:
        for i in range(100_000):
            await limiter.admit(f"client-{i}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limiter) < 10_000
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    await asyncio.sleep(0.02)  # every bucket has drained
    await limiter.admit("one-more")
    assert len(limiter) < 10_000


async def test_a_client_without_a_limit_is_never_refused() -> None:
    limiter = ClientLimiter(Limits(None, {"metered": RateLimit(1, 1)}))
    for _ in range(1000):
        await limiter.admit("free")
    await limiter.admit("metered")
    with pytest.raises(RateLimitedError):
        await limiter.admit("metered")
    assert len(limiter) == 1


async def test_refusing_a_flood_leaves_no_work_for_the_garbage_collector(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """A refused call must not leave reference cycles (an aborted grpc.aio call leaves
    ~30 objects): at a thousand refusals a second the collector's pauses reached the
    latency of every other client (bench/admission.py)."""
    request = pb.SubmitRequest(task=chat_spec())
    await stub.Submit(request, metadata=bearer(FLOOD_KEY))
    gc.collect()
    gc.disable()
    try:
        for _ in range(500):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Submit(request, metadata=bearer(FLOOD_KEY))
        freed = gc.collect()
    finally:
        gc.enable()
    # Client and server share this process: both sides' cycles count.
    assert freed / 500 < 12, f"{freed / 500:.1f} objects in cycles per refused call"


async def test_a_batch_over_the_limit_stores_the_tasks_that_fit(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """Each task of a SubmitBatch takes a token: with a burst of 3, a batch of 5 stores its
    first 3 and refuses the other 2 one by one, saying when they would pass, and they do."""
    specs = [chat_spec(f"task {i}") for i in range(5)]
    response = await stub.SubmitBatch(
        pb.SubmitBatchRequest(tasks=specs), metadata=bearer(NOISY_KEY)
    )
    results = list(response.results)
    assert [r.created for r in results] == [True] * BURST + [False] * (5 - BURST)
    refused = results[BURST:]
    assert {r.error.code for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert "noisy" in refused[0].error.message
    delay = refused[0].error.retry_delay.ToNanoseconds() / 1e9
    assert 0 < delay <= len(refused) / RATE
    await asyncio.sleep(delay)
    again = await stub.SubmitBatch(
        pb.SubmitBatchRequest(tasks=specs[BURST:]), metadata=bearer(NOISY_KEY)
    )
    assert [r.created for r in again.results] == [True] * len(refused)


async def test_a_batch_with_no_token_left_is_refused_whole(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    """The call's own token pays for its first task; with none left, the call is refused
    as a whole with RetryInfo, like any other call."""
    request = pb.SubmitBatchRequest(tasks=[chat_spec("a"), chat_spec("b")])
    first = await stub.SubmitBatch(request, metadata=bearer(FLOOD_KEY))
    assert [r.created for r in first.results] == [True, False]
    assert first.results[1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitBatch(request, metadata=bearer(FLOOD_KEY))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay_s(caught.value) > 0


async def test_admit_up_to_takes_what_the_bucket_holds() -> None:
    """A full bucket of 3 gives 3 of 5 tokens and refuses 2 with the time they take to
    leak; an empty one gives none; a client without a limit gets all it asks for."""
    limiter = ClientLimiter(Limits(RateLimit(0.01, 3)))
    grant = await limiter.admit_up_to("metered", 5)
    assert grant.taken == 3
    assert grant.refusal is not None
    assert grant.refusal.retry_after_s == pytest.approx(2 / 0.01)
    assert (await limiter.admit_up_to("metered", 1)).taken == 0
    with pytest.raises(RateLimitedError):
        await limiter.admit("metered")
    unlimited = ClientLimiter(Limits(None))
    assert await unlimited.admit_up_to("free", 1000) == Grant(1000)
    assert await limiter.admit_up_to("other", 0) == Grant(0)
