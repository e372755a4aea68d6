"""1,000 concurrent watchers, 100 of which never read: each stalled watcher's buffer in the
server stays bounded, the readers and the load are not held up, and every subscription is
released when its client goes. The 10% throughput figure is measured by bench/watchers.py:
on a 2-core machine two identical runs of this load differ by up to ~20%, so the test keeps
only a bound that a watcher blocking dispatch would break (see SANITY_RATIO)."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.events.hub import EventHub, Watch
from server.model.task import ChatOutput
from tests.conftest import Running, StartServer, local_backends
from tests.faults._watchers import (
    BAIT_TASKS,
    READERS_PER_TICKER,
    STALLED_PER_BAIT,
    TICKER_TASKS,
    WATCHERS,
    Crowd,
    crowd_chat,
    run_load,
    start_background,
    until,
)

pytestmark = pytest.mark.slow

LOAD, IN_FLIGHT = 500, 64
COALESCE_AFTER = 16  # EventHub's default, which App uses
# A stalled watcher that blocked publishing would stop dispatch (throughput → 0); one that
# cost a lot per event would show as a large drop. Half is far outside the run-to-run noise.
SANITY_RATIO = 0.5


def watches(hub: EventHub, task_ids: list[str]) -> list[Watch]:
    # The hub has no public list of its watches; the test reads its table to see each
    # stalled watcher's buffer, which is the thing whose size is at stake.
    return [watch for task_id in task_ids for watch in hub._watches.get(task_id, ())]


def backed_up(stalled: list[Watch]) -> bool:
    return all(watch.pending >= COALESCE_AFTER for watch in stalled)


async def sample_pending(stalled: list[Watch], seen: list[int]) -> None:
    """Appends the largest buffer among `stalled` every 20 ms, until cancelled."""
    while True:
        seen.append(max(watch.pending for watch in stalled))
        await asyncio.sleep(0.02)


def buffered_text(watch: Watch) -> int:
    return sum(len(event.text) for event in watch._buffer)


@pytest.mark.timeout(90)
async def test_stalled_watchers_stay_bounded_and_hold_up_nothing(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With 900 reading and 100 stalled watchers, a stalled watcher's buffer holds at most
    16 events plus a state change, all 500 tasks of a load still finish at a comparable
    rate, and every subscription is gone once the watchers disconnect."""
    backends = local_backends(count=3, max_concurrency=64, extra={"chat": crowd_chat()})
    server: Running = await start_server(backends=backends)
    hub = server.app.hub
    bait, tickers = await start_background(server.stub)
    rates: dict[str, list[float]] = {"without": [], "with": []}
    pending_seen: list[int] = []
    crowd: Crowd | None = None
    try:
        for _ in range(2):  # A B A B: the background's drift falls on both alike
            rates["without"].append(await run_load(server.stub, LOAD, IN_FLIGHT))
            crowd = Crowd.start(server.app.address, bait, tickers)
            await until(lambda: hub.statistics()["watchers"] >= WATCHERS, "1,000 watchers")
            stalled = watches(hub, bait)
            assert len(stalled) == BAIT_TASKS * STALLED_PER_BAIT
            # The server really is backed up: every stalled watcher's HTTP/2 window is
            # full, its Stream handler waits in a write, and its buffer has begun to
            # coalesce. (Without this the rest would prove nothing.)
            await until(functools.partial(backed_up, stalled), "stalled buffers")
            sampler = asyncio.create_task(sample_pending(stalled, pending_seen))
            rates["with"].append(await run_load(server.stub, LOAD, IN_FLIGHT))
            sampler.cancel()
            # Coalescing loses no text and invents none: what a stalled watcher holds is
            # at most the output its task produced.
            for watch in stalled:
                latest = hub.latest(watch.task_id)
                assert latest is not None
                assert isinstance(latest.output, ChatOutput)
                assert buffered_text(watch) <= len(latest.output.text)
            stalled_counts, reader_counts = await crowd.stop()
            assert stalled_counts == {"streams": 100, "events": 0, "finished": 0, "errors": 0}
            # Each reader saw at least its snapshot and then ticks, with no error.
            assert reader_counts["errors"] == 0
            assert reader_counts["events"] > 2 * TICKER_TASKS * READERS_PER_TICKER
            # A client that goes away releases its subscription, stalled or not.
            await until(lambda: hub.statistics()["watchers"] == 0, "watchers released")
    finally:
        if crowd is not None:
            crowd.kill()
    for task_id in bait + tickers:
        await server.stub.Cancel(pb.CancelRequest(task_id=task_id))
    # A thousand watchers leaving, a hundred of them mid-write, are no error of the server.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    max_pending = max(pending_seen)
    ratios = [w / wo for w, wo in zip(rates["with"], rates["without"], strict=True)]
    print(
        f"\ntasks/s without watchers {[round(r) for r in rates['without']]},"
        f" with {[round(r) for r in rates['with']]}: ratios {[round(r, 2) for r in ratios]};"
        f" most events a stalled watcher held: {max_pending}"
    )
    # At most COALESCE_AFTER events, then output merges into the last one; only a state
    # change could add one more (RUNNING went out before the window filled).
    assert max_pending <= COALESCE_AFTER + 1
    assert max(ratios) >= SANITY_RATIO
