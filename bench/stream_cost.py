"""Server CPU per Stream message: taskring beside a bare grpc.aio server, same watchers.

    .venv/bin/python bench/stream_cost.py [--seconds 10]

900 watchers (tests/faults/_watchers.py, `read`, in a process of their own) read 10 tasks
that each output "tick " every TICK_S: 3,600 messages a second. Measured twice, each in
a fresh server process:

  bare      bench/_bare_stream_server.py: a Stream handler that yields the tick, and no
            more (no store, no hub, no conversion): what grpc.aio costs for one message;
  taskring  bench/_watch_server.py with 10 "ticker" tasks: its CPU with the watchers,
            less its CPU over as long a span before they came (the tasks' own work).

Prints each server's CPU per message and their ratio. bench/watchers.py's throughput
ratio is bounded by this cost: 3,600 messages a second at the bare cost is CPU the load
does not get, whatever taskring does on top.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop

# Run as `python bench/stream_cost.py` from the repo root, Python puts bench/ (not the root)
# on sys.path; put the root first so `server` and `tests` import.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _console import log
from _procs import process_cpu_s, server_child, wait_for_quiet
from watchers import until_watched

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from tests.faults._watchers import READERS_PER_TICKER, TICK_S, TICKER_TASKS, Crowd

BENCH = Path(__file__).resolve().parent
WATCHERS = TICKER_TASKS * READERS_PER_TICKER
SETTLE_S = 3.0  # after the watchers are in: their first messages, the server's warm-up


def messages_per_s() -> float:
    return WATCHERS / TICK_S


async def cpu_over(pid: int, seconds: float) -> float:
    """The process's CPU seconds per second over the next `seconds`."""
    before, start = process_cpu_s(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (process_cpu_s(pid) - before) / (time.monotonic() - start)


async def read_for(crowd: Crowd, pid: int, seconds: float) -> float:
    """CPU per second of `pid` while the crowd reads; checks that every watcher did."""
    try:
        await asyncio.sleep(SETTLE_S)
        cpu = await cpu_over(pid, seconds)
        (counts,) = await crowd.finish()
    finally:
        crowd.kill()
    if counts["streams"] != WATCHERS or counts["errors"]:
        raise SystemExit(f"the watchers did not all read: {counts}")
    return cpu


async def bare(seconds: float, workdir: Path) -> float:
    argv = [sys.executable, str(BENCH / "_bare_stream_server.py")]
    async with server_child("bare", argv, None, workdir / "bare.log", "listening") as server:
        ids = [f"tick-{n}" for n in range(TICKER_TASKS)]
        crowd = Crowd.readers(server.address, ids)
        return await read_for(crowd, server.pid, seconds)


async def taskring(seconds: float, workdir: Path) -> tuple[float, float]:
    """CPU per second with the watchers, and before them (the ticker tasks alone)."""
    argv = [sys.executable, str(BENCH / "_watch_server.py"), str(workdir / "bench.db")]
    async with server_child("taskring", argv, None, workdir / "taskring.log", "listening") as (
        server
    ):
        address, metrics_port = server.address.split()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            message = pb.ChatMessage(role="user", content="ticker")
            spec = pb.TaskSpec(chat=pb.ChatInput(model="ticker", messages=[message]))
            ids = [
                (await stub.Submit(pb.SubmitRequest(task=spec))).task.id
                for _ in range(TICKER_TASKS)
            ]
            await asyncio.sleep(SETTLE_S)
            alone = await cpu_over(server.pid, seconds)
            crowd = Crowd.readers(address, ids)
            await until_watched(int(metrics_port), WATCHERS)
            with_watchers = await read_for(crowd, server.pid, seconds)
            for task_id in ids:
                await stub.Cancel(pb.CancelRequest(task_id=task_id))
    return with_watchers, alone


async def bench(seconds: float) -> None:
    rate = messages_per_s()
    with tempfile.TemporaryDirectory() as tmp:
        await wait_for_quiet(20.0, 15.0)
        bare_cpu = await bare(seconds, Path(tmp))
        await wait_for_quiet(20.0, 15.0)
        with_watchers, alone = await taskring(seconds, Path(tmp))
    bare_us = 1e6 * bare_cpu / rate
    taskring_us = 1e6 * (with_watchers - alone) / rate
    log(f"{WATCHERS} watchers, {rate:.0f} messages/s, {seconds:g} s each")
    log(f"  bare grpc.aio: {bare_cpu:.3f} CPU-s/s = {bare_us:.1f} us per message")
    log(
        f"  taskring: {with_watchers:.3f} CPU-s/s with the watchers, {alone:.3f} without ="
        f" {taskring_us:.1f} us per message"
    )
    print(f"taskring / bare grpc.aio CPU per message: {taskring_us / bare_us:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    uvloop.run(bench(args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
