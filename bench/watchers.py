"""End-to-end throughput with and without 1,000 watchers (100 of them stalled).

    .venv/bin/python bench/watchers.py [--rounds 3] [--tasks 500] [--in-flight 64]

An in-process server (three local executors, 64 slots each) runs ten stall-bait and ten
ticker tasks throughout (tests/faults/_watchers.py). Each round measures the load (Submit,
then Stream until SUCCEEDED, --in-flight at a time) without watchers, then with 900
reading and 100 stalled watchers in two processes of their own. Prints each figure, the
ratio of each pair and their median, the server process's RSS, and the watcher processes'
CPU; exits 1 when the median ratio is below 0.9 (the issue's "within 10%").

The crowd's own CPU competes with the server on a small machine: its figure says how much
of a drop is the machine rather than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

# Run as `python bench/watchers.py` from the repo root, Python puts bench/ (not the root)
# on sys.path; put the root first so `server` and `tests` import.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from tests.conftest import FAST_RETRY, local_backends, make_settings
from tests.faults._watchers import (
    WATCHERS,
    Crowd,
    crowd_chat,
    run_load,
    start_background,
    until,
)

GOAL = 0.9


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(rounds: int, tasks: int, in_flight: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp) / "bench.db", max_concurrency=64)
        backends = local_backends(count=3, max_concurrency=64, extra={"chat": crowd_chat()})
        app = App(settings, backends=backends, dispatch=FAST_RETRY)
        await app.start()
        channel = grpc.aio.insecure_channel(app.address)
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        ratios: list[float] = []
        try:
            bait, tickers = await start_background(stub)
            for n in range(rounds):
                without = await run_load(stub, tasks, in_flight)
                crowd = Crowd.start(app.address, bait, tickers)
                try:
                    await until(lambda: app.hub.statistics()["watchers"] >= WATCHERS, "watchers")
                    await asyncio.sleep(2)  # the stalled windows fill (see the test)
                    before = [cpu_s(p.pid) for p in crowd.processes]
                    with_ = await run_load(stub, tasks, in_flight)
                    crowd_cpu = sum(cpu_s(p.pid) for p in crowd.processes) - sum(before)
                    await crowd.stop()
                finally:
                    crowd.kill()
                ratios.append(with_ / without)
                print(
                    f"round {n}: {without:6.0f} tasks/s without, {with_:6.0f} with"
                    f" (ratio {with_ / without:.3f}); watcher processes used"
                    f" {crowd_cpu:.2f} CPU-s during the load; server RSS {rss_mib():.0f} MiB",
                    flush=True,
                )
            for task_id in bait + tickers:
                await stub.Cancel(pb.CancelRequest(task_id=task_id))
        finally:
            await channel.close()
            await app.stop()
        return statistics.median(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    median = asyncio.run(bench(args.rounds, args.tasks, args.in_flight))
    verdict = "ok" if median >= GOAL else "BELOW GOAL"
    print(f"median ratio with/without watchers: {median:.3f} (goal >= {GOAL}): {verdict}")
    return 0 if median >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
