"""A crowd of Stream watchers in processes of their own, the background tasks they watch,
and the measured load: shared by tests/faults/test_many_watchers.py and bench/watchers.py.

    python -m tests.faults._watchers ADDRESS (read|stall) PER_TASK TASK_ID...

opens PER_TASK Streams on each task. `read` consumes every event; `stall` opens its calls
and never reads a message, like a client that hung. The crowd lives outside the measuring
process so that its work neither slows the load client nor hides in it.

A stalled call still has its bytes taken off the socket by the client's transport until the
stream's HTTP/2 window is full; then the server's writes for it block. `stall` turns off
BDP probing (`grpc.http2.bdp_probe`), so that window stays at the 64 KiB default instead of
growing to megabytes: far less output then backs the server up, and what happens after that
is the same whatever the window size.

The process runs until its stdin closes, then cancels its calls and prints one JSON line:
{"streams": N, "events": total events read, "finished": streams the server ended, "errors":
streams that failed}.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.backends.base import BackendEvent, OutputChunk
from server.backends.local import LocalModelSettings, echo_chat
from server.model.task import ChatInput, Task

ROOT = Path(__file__).resolve().parent.parent.parent
STREAMS_PER_CHANNEL = 100  # several connections, as many separate clients would have

# Background tasks, alike in every run: only the watchers differ. "stall-bait" bursts
# 96 KiB (more than the 64 KiB window of a stalled client) in 4 KiB deltas and then ticks
# every BAIT_TICK_S, so its stalled watchers back up and then keep being pushed deltas to
# coalesce; "ticker" ticks every TICK_S, a small cost per reading watcher.
BAIT_TASKS, STALLED_PER_BAIT = 10, 10  # 100 watchers that never read
TICKER_TASKS, READERS_PER_TICKER = 10, 90  # 900 that read
WATCHERS = BAIT_TASKS * STALLED_PER_BAIT + TICKER_TASKS * READERS_PER_TICKER
BURST_CHUNK = "x" * 4095 + " "
BURST_CHUNKS = 24
BAIT_TICK_S = 0.1
TICK_S = 0.25


def crowd_chat() -> Callable[[Task], AsyncIterator[BackendEvent]]:
    """A chat handler for local executors: the zero-delay local-echo, plus the two
    background models, which run until cancelled."""
    echo = echo_chat(LocalModelSettings(token_delay_s=0.0))

    async def run(task: Task) -> AsyncIterator[BackendEvent]:
        assert isinstance(task.spec.input, ChatInput)
        model = task.spec.input.model
        if model not in {"stall-bait", "ticker"}:
            async for event in echo(task):
                yield event
            return
        if model == "stall-bait":
            for _ in range(BURST_CHUNKS):
                await asyncio.sleep(0.005)  # one delta each, not one merged write
                yield OutputChunk(BURST_CHUNK)
        interval_s = BAIT_TICK_S if model == "stall-bait" else TICK_S
        while True:
            await asyncio.sleep(interval_s)
            yield OutputChunk("tick ")

    return run


async def start_background(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub,
) -> tuple[list[str], list[str]]:
    """Submits the stall-bait and ticker tasks; returns their ids."""

    async def submit(model: str) -> str:
        message = pb.ChatMessage(role="user", content=model)
        spec = pb.TaskSpec(chat=pb.ChatInput(model=model, messages=[message]))
        return (await stub.Submit(pb.SubmitRequest(task=spec))).task.id

    bait = [await submit("stall-bait") for _ in range(BAIT_TASKS)]
    tickers = [await submit("ticker") for _ in range(TICKER_TASKS)]
    return bait, tickers


async def run_load(stub: tasks_pb2_grpc.TaskServiceAsyncStub, tasks: int, in_flight: int) -> float:
    """Tasks per second: `tasks` local-echo tasks, `in_flight` at a time, each Submit then
    Stream until it SUCCEEDED; from the first Submit to the last SUCCEEDED."""
    numbers = iter(range(tasks))

    async def caller() -> None:
        for i in numbers:  # one shared iterator: each task once
            message = pb.ChatMessage(role="user", content=f"load {i} a b c")
            spec = pb.TaskSpec(chat=pb.ChatInput(model="local-echo", messages=[message]))
            task = (await stub.Submit(pb.SubmitRequest(task=spec))).task
            events = [e async for e in stub.Stream(pb.StreamRequest(task_id=task.id))]
            last = events[-1]
            final = last.snapshot if last.HasField("snapshot") else last.state_changed.task
            assert final.state == pb.TASK_STATE_SUCCEEDED, final

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return tasks / (time.perf_counter() - start)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Waits for a state of the in-process server that no event announces (the hub's
    watcher count, a watcher's buffer)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Crowd:
    """The two watcher processes of one run: 100 stalled, 900 reading."""

    processes: list[subprocess.Popen[str]]

    @classmethod
    def start(cls, address: str, bait: list[str], tickers: list[str]) -> Crowd:
        stalled = _spawn(address, "stall", STALLED_PER_BAIT, bait)
        return cls([stalled, _spawn(address, "read", READERS_PER_TICKER, tickers)])

    @classmethod
    def readers(cls, address: str, tickers: list[str]) -> Crowd:
        """Only the reading process (bench/stream_cost.py)."""
        return cls([_spawn(address, "read", READERS_PER_TICKER, tickers)])

    async def stop(self) -> tuple[dict[str, int], dict[str, int]]:
        """Closes their stdin (they cancel their calls); what the stalled and the reading
        process counted."""
        stalled, read = await self.finish()
        return stalled, read

    async def finish(self) -> list[dict[str, int]]:
        """Closes each process's stdin (it cancels its calls); what each counted."""
        results = []
        for process in self.processes:
            out, _ = await asyncio.to_thread(process.communicate, "", 30)
            assert process.returncode == 0, f"watcher process failed: {out!r}"
            results.append(json.loads(out))
        return results

    def kill(self) -> None:
        """Whatever is still running (after a failure): safe to call after stop."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()


def _spawn(address: str, mode: str, per_task: int, task_ids: list[str]) -> subprocess.Popen[str]:
    argv = [address, mode, str(per_task), *task_ids]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults._watchers", *argv],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


# ----------------------------------------------------------------- the watcher process


async def crowd(address: str, mode: str, per_task: int, task_ids: list[str]) -> dict[str, int]:
    options: list[tuple[str, int]] = [("grpc.use_local_subchannel_pool", 1)]  # own connection
    if mode == "stall":
        options.append(("grpc.http2.bdp_probe", 0))
    requests = [pb.StreamRequest(task_id=task_id) for task_id in task_ids for _ in range(per_task)]
    channels = [
        grpc.aio.insecure_channel(address, options=options)
        for _ in range(0, len(requests), STREAMS_PER_CHANNEL)
    ]
    counts = {"streams": len(requests), "events": 0, "finished": 0, "errors": 0}

    async def read(call: grpc.aio.UnaryStreamCall[pb.StreamRequest, pb.StreamResponse]) -> None:
        try:
            async for _ in call:
                counts["events"] += 1
            counts["finished"] += 1
        except grpc.aio.AioRpcError:
            counts["errors"] += 1
        except asyncio.CancelledError:
            # grpc.aio raises this from a call we cancelled ourselves, at the end; only a
            # cancellation of this task itself goes on.
            if not call.cancelled():
                raise

    calls = [
        tasks_pb2_grpc.TaskServiceStub(channels[i // STREAMS_PER_CHANNEL]).Stream(request)
        for i, request in enumerate(requests)
    ]
    readers = [asyncio.create_task(read(call)) for call in calls] if mode == "read" else []
    await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin
    for call in calls:
        call.cancel()
    await asyncio.gather(*readers)
    for channel in channels:
        await channel.close()
    return counts


def main(argv: list[str]) -> None:
    address, mode, per_task, *task_ids = argv
    if mode not in {"read", "stall"}:
        raise SystemExit(f"mode must be read or stall, not {mode!r}")
    print(json.dumps(asyncio.run(crowd(address, mode, int(per_task), task_ids))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
