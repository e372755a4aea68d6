"""The load client (grpc.aio): closed-loop and fixed-rate (open-loop) loads, and the
operations they run: a raw unary call (echo, Submit) or a Submit then a Stream until
SUCCEEDED.

The generated stubs import from the repository root, which submit.py puts on sys.path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from client._proto.taskring.v1 import tasks_pb2, tasks_pb2_grpc

SUCCEEDED = tasks_pb2.TASK_STATE_SUCCEEDED
UNFINISHED = (tasks_pb2.TASK_STATE_QUEUED, tasks_pb2.TASK_STATE_RUNNING)
FAILED_STATES = (tasks_pb2.TASK_STATE_FAILED, tasks_pb2.TASK_STATE_CANCELLED)

# One operation of a load; the argument is the worker (or send) index, which picks the
# channel; it returns the perf_counter() instant at which the operation completed.
Call = Callable[[int], Awaitable[float]]
RawUnary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


class TaskFailedError(Exception):
    """A task ended in a state other than SUCCEEDED, or its stream ended early."""


@contextlib.asynccontextmanager
async def open_channels(address: str, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """`count` channels, each with its own TCP connection (a local subchannel pool: by
    default channels to one target share one connection)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10.0)
        yield channels
    finally:
        for channel in channels:
            await channel.close()


@dataclass(slots=True)
class Outcomes:
    """What a load produced: latencies of the operations that succeeded, the instants
    they completed, and the errors (by kind) of those that did not."""

    latencies_s: list[float] = field(default_factory=list)
    completed_at: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    async def record(self, call: Call, index: int) -> None:
        """Run one operation, timed from just before it starts."""
        started = time.perf_counter()
        try:
            done = await call(index)
        except grpc.aio.AioRpcError as exc:
            self.errors[f"{exc.code().name}: {exc.details()}"] += 1
        except TaskFailedError as exc:
            self.errors[str(exc)] += 1
        else:
            self.latencies_s.append(done - started)
            self.completed_at.append(done)


async def closed_loop(call: Call, n: int, concurrency: int) -> tuple[Outcomes, float]:
    """n operations, `concurrency` in flight (one worker each, taking the next operation
    when its last one completes). Returns the outcomes and the instant the first started."""
    outcomes = Outcomes()
    remaining = iter(range(n))  # shared: each operation is taken by exactly one worker

    async def worker(index: int) -> None:
        for _ in remaining:
            await outcomes.record(call, index)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(min(concurrency, n))))
    return outcomes, started


@dataclass(frozen=True, slots=True)
class OpenLoopRun:
    outcomes: Outcomes
    achieved_rate: float  # sends per second over the measured part
    max_lag_ms: float  # how late the worst send was against its schedule


async def open_loop(call: Call, rate: float, n_warmup: int, n_measured: int) -> OpenLoopRun:
    """Start one operation every 1/rate s whatever the others do; each send time is
    computed from the start (start + i/rate), so a late send does not shift later ones.
    The first n_warmup operations are not recorded."""
    interval = 1.0 / rate
    warmup, outcomes = Outcomes(), Outcomes()
    running: set[asyncio.Task[None]] = set()
    max_lag = 0.0
    start = time.perf_counter()
    for i in range(n_warmup + n_measured):
        send_at = start + i * interval
        delay = send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if i >= n_warmup:  # late by the loop's timer resolution (1 ms on uvloop) or load
            max_lag = max(max_lag, time.perf_counter() - send_at)
        target = outcomes if i >= n_warmup else warmup
        task = asyncio.create_task(target.record(call, i))
        running.add(task)
        task.add_done_callback(running.discard)
    sent_span = time.perf_counter() - (start + n_warmup * interval)
    await asyncio.gather(*running)
    return OpenLoopRun(outcomes, n_measured / max(sent_span, 1e-9), max_lag * 1e3)


def raw_unary(channel: grpc.aio.Channel, method: str) -> RawUnary:
    """A unary method with bytes in and out: no (de)serializer on either side."""
    callable_: RawUnary = channel.unary_unary(method)
    return callable_


def unary_bytes_call(channels: Sequence[grpc.aio.Channel], method: str, request: bytes) -> Call:
    """The same request, raw, on channel index % count: the echo and Submit loads use
    this same client code."""
    callables = [raw_unary(channel, method) for channel in channels]

    async def call(index: int) -> float:
        await callables[index % len(callables)](request)
        return time.perf_counter()

    return call


def event_state(event: tasks_pb2.StreamResponse) -> tasks_pb2.TaskState.ValueType | None:
    """The task state an event reports, or None for an output delta."""
    kind = event.WhichOneof("event")
    if kind == "snapshot":
        return event.snapshot.state
    if kind == "state_changed":
        return event.state_changed.task.state
    return None


async def succeeded_instant(events: AsyncIterable[tasks_pb2.StreamResponse]) -> float:
    """Reads a task's events until they end; returns the instant SUCCEEDED arrived."""
    succeeded_at: float | None = None
    async for event in events:
        state = event_state(event)
        if state == SUCCEEDED:
            succeeded_at = time.perf_counter()
        elif state in FAILED_STATES:
            raise TaskFailedError(f"task ended {tasks_pb2.TaskState.Name(state)}")
    if succeeded_at is None:
        raise TaskFailedError("stream ended before SUCCEEDED")
    return succeeded_at


async def wait_succeeded(stub: tasks_pb2_grpc.TaskServiceAsyncStub, task_id: str) -> float:
    """Stream a task until its stream ends; returns the instant SUCCEEDED arrived."""
    return await succeeded_instant(stub.Stream(tasks_pb2.StreamRequest(task_id=task_id)))


def submit_and_wait_call(
    channels: Sequence[grpc.aio.Channel], request: tasks_pb2.SubmitRequest, stream_offset: int = 0
) -> Call:
    """Submit a task, then Stream it until SUCCEEDED; completes at the SUCCEEDED event.
    The Submit goes on channel index % count, the Stream on the channel stream_offset
    further: with channels to several routers in turn, 1 Streams on another router."""
    stubs: list[tasks_pb2_grpc.TaskServiceAsyncStub] = [
        tasks_pb2_grpc.TaskServiceStub(channel) for channel in channels
    ]

    async def call(index: int) -> float:
        reply = await stubs[index % len(stubs)].Submit(request)
        return await wait_succeeded(stubs[(index + stream_offset) % len(stubs)], reply.task.id)

    return call


def submit_and_stream_call(
    channels: Sequence[grpc.aio.Channel], request: tasks_pb2.SubmitRequest
) -> Call:
    """The same task in one SubmitAndStream call: the submit, then its events on the same
    call, until SUCCEEDED (how a caller that waits for the result submits)."""
    stubs: list[tasks_pb2_grpc.TaskServiceAsyncStub] = [
        tasks_pb2_grpc.TaskServiceStub(channel) for channel in channels
    ]
    combined = tasks_pb2.SubmitAndStreamRequest(task=request.task)

    async def call(index: int) -> float:
        replies = stubs[index % len(stubs)].SubmitAndStream(combined)
        return await succeeded_instant(reply.event async for reply in replies)

    return call


def chat_request() -> tasks_pb2.SubmitRequest:
    """The task every Submit sends: a one-message chat for the built-in local-echo model."""
    message = tasks_pb2.ChatMessage(role="user", content="hi")
    chat = tasks_pb2.ChatInput(model="local-echo", messages=[message])
    return tasks_pb2.SubmitRequest(task=tasks_pb2.TaskSpec(chat=chat))


async def wait_until_idle(channel: grpc.aio.Channel) -> None:
    """Wait until the server has no QUEUED or RUNNING task, so a stage does not pay for
    the work an earlier one left behind."""
    stub: tasks_pb2_grpc.TaskServiceAsyncStub = tasks_pb2_grpc.TaskServiceStub(channel)
    query = tasks_pb2.ListRequest(states=UNFINISHED, page_size=1)
    while True:
        if not (await stub.List(query)).tasks:
            return
        await asyncio.sleep(0.1)
