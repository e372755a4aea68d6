"""Benchmark Submit and end-to-end task processing against a bare gRPC echo and Celery + Redis.

    .venv/bin/python bench/submit.py [--quick] [--channels 1,2] [--json-out FILE] ...

In one run, on loopback, with the same load client (grpc.aio on uvloop, one process):

  echo    a bare grpc.aio unary echo server (bench/echo_server.py, uvloop like taskring):
          N calls with C in flight; what a gRPC call costs here, nothing else;
  submit  taskring's Submit, called exactly like the echo (raw bytes in and out, so the
          client side is identical); each reply follows a durable commit;
  e2e     submit N tasks and Stream each until SUCCEEDED with K tasks in flight, for each K
          of a sweep; tasks/s from the first Submit to the last SUCCEEDED seen;
  rate    one Submit every 1/rate s (open loop: send times computed from the start), each
          followed by a Stream until SUCCEEDED; latency from just before Submit to SUCCEEDED;
  celery  ../shared/bench/celery_baseline.py (Celery + Redis, no-op task) run by a Python
          that has celery and redis, on the same machine after taskring has stopped.

Ratios are printed beside their goals (Submit/echo calls/s >= 0.6; taskring e2e tasks/s >=
2x Celery's best pool; taskring e2e p99 at 200/s <= 0.5x Celery's best pool).

Every server is a child in its own process group on 127.0.0.1:0, taskring with a fresh
store in a temporary directory; each is stopped by PID (SIGTERM, then SIGKILL of its group)
also on error, Ctrl-C, SIGTERM or when --max-seconds runs out. A table goes to stderr and
one JSON line is printed last on stdout. Exit status: 0 when every goal is met, 1 when a
goal is missed or the run stopped early, 2 when it failed before measuring taskring.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import IO, Any

import grpc

# Run as `python bench/submit.py` from the repo root, Python puts bench/ (not the root) on
# sys.path; put the root first so the generated stubs import.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client._proto.taskring.v1 import tasks_pb2, tasks_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = "127.0.0.1"
ECHO_SERVER = Path(__file__).with_name("echo_server.py")
ECHO_METHOD = "/bench.Echo/Echo"
SUBMIT_METHOD = "/taskring.v1.TaskService/Submit"
DEFAULT_CELERY_SCRIPT = ROOT.parent / "shared" / "bench" / "celery_baseline.py"
CELERY_VENV = Path("/tmp/taskring-celery-venv")
CELERY_PACKAGES = ("celery", "redis", "packaging")

GOAL_SUBMIT_VS_ECHO = 0.6  # Submit calls/s over echo calls/s, at least
GOAL_E2E_VS_CELERY = 2.0  # taskring e2e tasks/s over Celery's best pool, at least
GOAL_P99_VS_CELERY = 0.5  # taskring e2e p99 at the fixed rate over Celery's best, at most

SUCCEEDED = tasks_pb2.TASK_STATE_SUCCEEDED
UNFINISHED = (tasks_pb2.TASK_STATE_QUEUED, tasks_pb2.TASK_STATE_RUNNING)
FAILED_STATES = (tasks_pb2.TASK_STATE_FAILED, tasks_pb2.TASK_STATE_CANCELLED)

# One operation of a load; the argument is the worker (or send) index, which picks the
# channel; it returns the perf_counter() instant at which the operation completed.
Call = Callable[[int], Awaitable[float]]
RawUnary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


class TaskFailedError(Exception):
    """A task ended in a state other than SUCCEEDED, or its stream ended early."""


class BenchError(Exception):
    """The benchmark cannot go on (a server did not start, a stage cannot be set up)."""


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds the JSON line alone."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), as celery_baseline.py computes it."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass(frozen=True, slots=True)
class Latency:
    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, latencies_s: Sequence[float]) -> Latency:
        lat = sorted(latencies_s)
        return cls(
            n=len(lat),
            p50_ms=percentile(lat, 50) * 1e3,
            p90_ms=percentile(lat, 90) * 1e3,
            p99_ms=percentile(lat, 99) * 1e3,
            max_ms=(lat[-1] if lat else math.nan) * 1e3,
            mean_ms=(statistics.fmean(lat) if lat else math.nan) * 1e3,
        )


# --------------------------------------------------------------------------- CPU use


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """User+system CPU seconds of one process (all its threads) or of one of its threads,
    from /proc; NaN if gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path, encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU over a measured span, in % of one core and in microseconds per operation;
    other_pct is what the rest of the machine used meanwhile (noise when well above ~5)."""

    server_pct: float
    # The server's main thread: its event loop, where all its Python code but the SQLite
    # writer and readers runs. Near 100 it, not the machine, is the bottleneck.
    server_loop_pct: float
    client_pct: float
    other_pct: float
    server_us_per_op: float
    client_us_per_op: float


@dataclass(frozen=True, slots=True)
class CpuSample:
    at_s: float
    server_s: float
    server_loop_s: float
    client_s: float
    machine_s: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSample:
        return cls(
            at_s=time.perf_counter(),
            server_s=process_cpu_s(server_pid),
            server_loop_s=process_cpu_s(server_pid, thread=server_pid),
            client_s=time.process_time(),
            machine_s=machine_busy_s(),
        )

    def use_since(self, before: CpuSample, ops: int) -> CpuUse:
        wall = max(self.at_s - before.at_s, 1e-9)
        server = self.server_s - before.server_s
        client = self.client_s - before.client_s
        other = self.machine_s - before.machine_s - server - client
        per_op = 1e6 / max(ops, 1)
        return CpuUse(
            server_pct=100.0 * server / wall,
            server_loop_pct=100.0 * (self.server_loop_s - before.server_loop_s) / wall,
            client_pct=100.0 * client / wall,
            other_pct=100.0 * other / wall,
            server_us_per_op=server * per_op,
            client_us_per_op=client * per_op,
        )


async def wait_for_quiet(max_wait_s: float, busy_pct: float) -> float:
    """Wait (at most max_wait_s) until the machine's busy CPU over half a second is below
    busy_pct % of one core: on 2 cores any other program skews the figures. Returns the
    last busy percentage seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        await asyncio.sleep(0.5)
        used = 100.0 * (machine_busy_s() - before) / 0.5
        if used < busy_pct or time.monotonic() >= deadline:
            if used >= busy_pct:
                log(f"  machine still busy ({used:.0f}% of a core); measuring anyway")
            return used


# --------------------------------------------------------------------------- child processes


def die_with_parent() -> None:
    """preexec_fn: the kernel sends the child SIGTERM if this process dies (Linux)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def spawn(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    stdout: int = subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start a child in its own process group (so its own children can be killed with it),
    stderr to log_path."""
    with open_log(log_path) as log_file:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdout=stdout,
            stderr=log_file,
            env=dict(env) if env is not None else None,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


async def stop_child(
    proc: asyncio.subprocess.Process, first: int = signal.SIGTERM, grace_s: float = 15.0
) -> None:
    """Send `first` to the child by PID; if it has not exited within grace_s, SIGKILL its
    whole process group (it is still the group's leader, so the group id is still its)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            log(f"  pid {proc.pid} did not stop within {grace_s:.0f} s: SIGKILL to its group")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@dataclass(frozen=True, slots=True)
class Server:
    """A started server child: its process, the address it printed and its log."""

    name: str
    proc: asyncio.subprocess.Process
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.asynccontextmanager
async def server_child(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    log_path: Path,
    ready_prefix: str,
    ready_timeout_s: float = 30.0,
) -> AsyncIterator[Server]:
    """Start a server that prints `<ready_prefix> HOST:PORT` on stdout once serving; stop it
    (SIGTERM, graceful) on leaving, whatever happened."""
    proc = await spawn(argv, log_path, env)
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ready_timeout_s)
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith(ready_prefix):
            raise BenchError(
                f"{name} did not start (stdout {text!r}); its log:\n{log_tail(log_path)}"
            )
        address = text.removeprefix(ready_prefix).strip()
        log(f"{name} pid {proc.pid} listening on {address}")
        yield Server(name, proc, address, log_path)
    finally:
        await stop_child(proc)
        if proc.returncode not in (0, None):
            log(f"  {name} exited with {proc.returncode}; its log:\n{log_tail(log_path)}")


# --------------------------------------------------------------------------- load client


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


async def wait_succeeded(stub: tasks_pb2_grpc.TaskServiceAsyncStub, task_id: str) -> float:
    """Stream a task until its stream ends; returns the instant SUCCEEDED arrived."""
    succeeded_at: float | None = None
    async for event in stub.Stream(tasks_pb2.StreamRequest(task_id=task_id)):
        state = event_state(event)
        if state == SUCCEEDED:
            succeeded_at = time.perf_counter()
        elif state in FAILED_STATES:
            raise TaskFailedError(f"task ended {tasks_pb2.TaskState.Name(state)}")
    if succeeded_at is None:
        raise TaskFailedError("stream ended before SUCCEEDED")
    return succeeded_at


def submit_and_wait_call(
    channels: Sequence[grpc.aio.Channel], request: tasks_pb2.SubmitRequest
) -> Call:
    """Submit a task, then Stream it until SUCCEEDED; completes at the SUCCEEDED event."""
    stubs: list[tasks_pb2_grpc.TaskServiceAsyncStub] = [
        tasks_pb2_grpc.TaskServiceStub(channel) for channel in channels
    ]

    async def call(index: int) -> float:
        stub = stubs[index % len(stubs)]
        reply = await stub.Submit(request)
        return await wait_succeeded(stub, reply.task.id)

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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One closed-loop load: operations per second and their latency."""

    stage: str
    setting: str
    n_ok: int
    errors: dict[str, int]
    wall_s: float  # first start to last completion
    per_s: float
    latency: Latency
    cpu: CpuUse

    @classmethod
    def of(
        cls, stage: str, setting: str, outcomes: Outcomes, started: float, cpu: CpuUse
    ) -> LoadResult:
        end = max(outcomes.completed_at, default=started)
        wall = max(end - started, 1e-9)
        return cls(
            stage,
            setting,
            len(outcomes.latencies_s),
            dict(outcomes.errors),
            wall,
            len(outcomes.latencies_s) / wall,
            Latency.of(outcomes.latencies_s),
            cpu,
        )


@dataclass(frozen=True, slots=True)
class RateResult:
    """The open-loop load at a fixed rate."""

    stage: str
    setting: str
    target_rate: float
    achieved_rate: float
    n_ok: int
    errors: dict[str, int]
    max_schedule_lag_ms: float
    latency: Latency
    cpu: CpuUse


@dataclass(frozen=True, slots=True)
class CeleryPool:
    label: str
    tasks_per_s: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    submit_p50_ms: float


@dataclass(frozen=True, slots=True)
class CeleryResult:
    pools: list[CeleryPool]
    failures: list[str]
    versions: dict[str, str]

    def best_throughput(self) -> CeleryPool | None:
        usable = [p for p in self.pools if math.isfinite(p.tasks_per_s)]
        return max(usable, key=lambda p: p.tasks_per_s, default=None)

    def best_p99(self) -> CeleryPool | None:
        usable = [p for p in self.pools if math.isfinite(p.e2e_p99_ms)]
        return min(usable, key=lambda p: p.e2e_p99_ms, default=None)


@dataclass(frozen=True, slots=True)
class Check:
    """A ratio and its goal; passed is None when it could not be measured."""

    name: str
    value: float
    goal: float
    at_least: bool  # True: value >= goal passes; False: value <= goal passes
    detail: str

    @property
    def passed(self) -> bool | None:
        if not math.isfinite(self.value):
            return None
        return self.value >= self.goal if self.at_least else self.value <= self.goal


@dataclass(slots=True)
class Report:
    """Everything the run measured so far; printed even when the run stops early."""

    config: dict[str, Any]
    environment: dict[str, Any]
    echo: list[LoadResult] = field(default_factory=list)
    submit: list[LoadResult] = field(default_factory=list)
    e2e: list[LoadResult] = field(default_factory=list)
    rate: RateResult | None = None
    celery: CeleryResult | None = None
    celery_note: str = ""
    profiles: dict[str, HotSpots] = field(default_factory=dict)
    failure: str = ""

    def best_e2e(self) -> LoadResult | None:
        return max(self.e2e, key=lambda r: r.per_s, default=None)

    def checks(self) -> list[Check]:
        return [*self._submit_checks(), *self._celery_checks()]

    def _submit_checks(self) -> list[Check]:
        echo_by_setting = {r.setting: r for r in self.echo}
        out = []
        for sub in self.submit:
            echo = echo_by_setting.get(sub.setting)
            value = sub.per_s / echo.per_s if echo and echo.per_s else math.nan
            detail = f"{sub.per_s:.0f} / {echo.per_s:.0f} calls/s" if echo else "no echo"
            out.append(
                Check(
                    f"Submit/echo calls/s ({sub.setting})", value, GOAL_SUBMIT_VS_ECHO, True, detail
                )
            )
        return out

    def _celery_checks(self) -> list[Check]:
        best_pool = self.celery.best_throughput() if self.celery else None
        p99_pool = self.celery.best_p99() if self.celery else None
        e2e, rate = self.best_e2e(), self.rate
        tput = e2e.per_s / best_pool.tasks_per_s if e2e and best_pool else math.nan
        p99 = rate.latency.p99_ms / p99_pool.e2e_p99_ms if rate and p99_pool else math.nan
        tput_detail = (
            f"{e2e.per_s:.0f} ({e2e.setting}) / {best_pool.tasks_per_s:.0f} "
            f"({best_pool.label}) tasks/s"
            if e2e and best_pool
            else "not measured"
        )
        p99_detail = (
            f"{rate.latency.p99_ms:.2f} / {p99_pool.e2e_p99_ms:.2f} ms ({p99_pool.label})"
            if rate and p99_pool
            else "not measured"
        )
        return [
            Check(
                "e2e tasks/s: taskring / Celery best", tput, GOAL_E2E_VS_CELERY, True, tput_detail
            ),
            Check(
                "e2e p99 @rate: taskring / Celery best", p99, GOAL_P99_VS_CELERY, False, p99_detail
            ),
        ]


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """How hard and how long each stage pushes (from the command line)."""

    unary_n: int
    unary_concurrency: int
    warmup_n: int
    channel_counts: tuple[int, ...]
    e2e_n: int
    e2e_concurrency: tuple[int, ...]
    rate: float
    rate_duration_s: float
    rate_warmup_s: float
    echo_bytes: int
    quiet_wait_s: float
    quiet_pct: float


@dataclass(frozen=True, slots=True)
class Load:
    """A closed-loop load: n calls, `concurrency` in flight, after warmup_n unrecorded."""

    call: Call
    n: int
    concurrency: int
    warmup_n: int


async def nothing() -> None:
    """The default settle step: nothing to wait for."""


async def measure_closed(
    stage: str,
    setting: str,
    server: Server,
    load: Load,
    quiet: tuple[float, float],
    settle: Callable[[], Awaitable[None]] = nothing,
) -> LoadResult:
    """Warm up, let the server settle, wait for a quiet machine, then run and measure."""
    if load.warmup_n:
        await closed_loop(load.call, load.warmup_n, load.concurrency)
    await settle()
    await wait_for_quiet(*quiet)
    before = CpuSample.take(server.pid)
    outcomes, started = await closed_loop(load.call, load.n, load.concurrency)
    cpu = CpuSample.take(server.pid).use_since(before, len(outcomes.latencies_s))
    result = LoadResult.of(stage, setting, outcomes, started, cpu)
    log(
        f"  {stage} {setting}: {result.per_s:.0f}/s, p50 {result.latency.p50_ms:.2f} ms, "
        f"p99 {result.latency.p99_ms:.2f} ms, errors {sum(result.errors.values())}, "
        f"server CPU {cpu.server_pct:.0f}% (loop {cpu.server_loop_pct:.0f}%), "
        f"client CPU {cpu.client_pct:.0f}%"
    )
    return result


async def echo_stage(settings: LoadSettings, workdir: Path, report: Report) -> None:
    """The bare gRPC yardstick, for each channel count."""
    argv = [sys.executable, str(ECHO_SERVER), "--listen", f"{LOOPBACK}:0"]
    payload = b"x" * settings.echo_bytes
    quiet = (settings.quiet_wait_s, settings.quiet_pct)
    async with server_child("echo", argv, None, workdir / "echo.log", "echo listening on") as srv:
        for count in settings.channel_counts:
            async with open_channels(srv.address, count) as channels:
                if await raw_unary(channels[0], ECHO_METHOD)(payload) != payload:
                    raise BenchError("the echo server did not echo")
                call = unary_bytes_call(channels, ECHO_METHOD, payload)
                setting = f"C={settings.unary_concurrency} ch={count}"
                load = Load(call, settings.unary_n, settings.unary_concurrency, settings.warmup_n)
                report.echo.append(await measure_closed("echo", setting, srv, load, quiet))


async def taskring_stages(
    settings: LoadSettings,
    env: Mapping[str, str],
    workdir: Path,
    profiler: Profiler,
    report: Report,
) -> None:
    """Submit, e2e sweep and fixed-rate stages against one taskring server."""
    argv = [sys.executable, "-m", "server"]
    async with server_child(
        "taskring", argv, env, workdir / "taskring.log", "taskring listening on"
    ) as srv:
        await submit_stage(settings, srv, profiler, report)
        await e2e_stage(settings, srv, profiler, report)
        await rate_stage(settings, srv, profiler, report)


async def submit_stage(
    settings: LoadSettings, srv: Server, profiler: Profiler, report: Report
) -> None:
    """Submit exactly as the echo is called: same client code, bytes in and out."""
    request = chat_request()
    quiet = (settings.quiet_wait_s, settings.quiet_pct)
    for count in settings.channel_counts:
        async with open_channels(srv.address, count) as channels:
            raw_reply = await raw_unary(channels[0], SUBMIT_METHOD)(request.SerializeToString())
            reply = tasks_pb2.SubmitResponse.FromString(raw_reply)
            if not reply.task.id or not reply.created:
                raise BenchError(f"unexpected Submit reply: {reply}")
            call = unary_bytes_call(channels, SUBMIT_METHOD, request.SerializeToString())
            setting = f"C={settings.unary_concurrency} ch={count}"
            load = Load(call, settings.unary_n, settings.unary_concurrency, settings.warmup_n)
            settle = functools.partial(wait_until_idle, channels[0])
            async with profiler.record(srv.pid, f"submit-ch{count}"):
                result = await measure_closed("Submit", setting, srv, load, quiet, settle)
            report.submit.append(result)
            # The submitted tasks still run after the load: not on the next stage's time.
            await wait_until_idle(channels[0])


async def e2e_stage(
    settings: LoadSettings, srv: Server, profiler: Profiler, report: Report
) -> None:
    """Submit + Stream until SUCCEEDED, closed loop, for each concurrency of the sweep."""
    quiet = (settings.quiet_wait_s, settings.quiet_pct)
    async with open_channels(srv.address, settings.channel_counts[0]) as channels:
        call = submit_and_wait_call(channels, chat_request())
        for i, k in enumerate(settings.e2e_concurrency):
            await wait_until_idle(channels[0])
            warmup_n = min(settings.warmup_n, settings.e2e_n) if i == 0 else 0
            load = Load(call, settings.e2e_n, k, warmup_n)
            async with profiler.record(srv.pid, f"e2e-k{k}"):
                result = await measure_closed("e2e", f"K={k} ch={len(channels)}", srv, load, quiet)
            report.e2e.append(result)


async def rate_stage(
    settings: LoadSettings, srv: Server, profiler: Profiler, report: Report
) -> None:
    """Submit + Stream until SUCCEEDED at a fixed rate (open loop)."""
    n_warmup = int(settings.rate_warmup_s * settings.rate)
    n_measured = max(1, int(settings.rate_duration_s * settings.rate))
    async with open_channels(srv.address, settings.channel_counts[0]) as channels:
        await wait_until_idle(channels[0])
        await wait_for_quiet(settings.quiet_wait_s, settings.quiet_pct)
        call = submit_and_wait_call(channels, chat_request())
        async with profiler.record(srv.pid, f"rate-{settings.rate:g}"):
            before = CpuSample.take(srv.pid)
            run = await open_loop(call, settings.rate, n_warmup, n_measured)
            cpu = CpuSample.take(srv.pid).use_since(before, n_warmup + n_measured)
    lat = Latency.of(run.outcomes.latencies_s)
    report.rate = RateResult(
        "e2e @rate",
        f"{settings.rate:g}/s {settings.rate_duration_s:g}s ch={len(channels)}",
        settings.rate,
        run.achieved_rate,
        lat.n,
        dict(run.outcomes.errors),
        run.max_lag_ms,
        lat,
        cpu,
    )
    log(
        f"  e2e at {settings.rate:g}/s: p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms, "
        f"max {lat.max_ms:.2f} ms, achieved {run.achieved_rate:.1f}/s, "
        f"worst send lag {run.max_lag_ms:.2f} ms"
    )


# --------------------------------------------------------------------------- profiling


class Profiler:
    """Records the server with `py-spy record --format raw` during chosen stages (when a
    py-spy binary is given) and summarises each recording into hot spots."""

    def __init__(self, binary: str | None, out_dir: Path, extra_args: Sequence[str]) -> None:
        self._binary = binary
        self._out_dir = out_dir  # raw collapsed stacks, one file per stage
        self._extra_args = list(extra_args)
        self.files: dict[str, Path] = {}

    @contextlib.asynccontextmanager
    async def record(self, pid: int, label: str) -> AsyncIterator[None]:
        if self._binary is None:
            yield
            return
        out = self._out_dir / f"{label}.txt"
        argv = [
            self._binary,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(out),
            *self._extra_args,
        ]
        proc = await spawn(argv, self._out_dir / f"{label}.py-spy.log", stdout=subprocess.DEVNULL)
        await asyncio.sleep(1.0)  # attached before the load starts
        try:
            yield
        finally:
            # SIGINT makes py-spy stop sampling and write its output.
            await stop_child(proc, signal.SIGINT, grace_s=30.0)
            if out.exists():
                self.files[label] = out
                log(f"  py-spy: {label} recorded to {out}")


def frame_name(frame: str) -> str:
    """`handler (server/api/servicer.py:57)` -> `handler (server/api/servicer.py)`, with
    the path cut to its last three parts, so samples add up per function."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if match is None:
        return frame.strip()
    name, path = match.groups()
    return f"{name} ({'/'.join(Path(path).parts[-3:])})"


@dataclass(frozen=True, slots=True)
class HotSpots:
    """The functions with the largest share of samples (in %) on top of the stack (self)
    and anywhere in it (total)."""

    samples: int
    self_pct: list[tuple[str, float]]
    total_pct: list[tuple[str, float]]


def hot_spots(collapsed: str, top: int) -> HotSpots:
    """Hot spots from py-spy's raw output: one `root;...;leaf count` line per stack."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # With --threads or --subprocesses py-spy puts the thread or process first.
        parts = [p for p in stack.split(";") if not p.startswith(("thread (", "process "))]
        frames = [frame_name(p) for p in parts]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * c / samples) for name, c in counter.most_common(top)]

    return HotSpots(samples, share(own), share(total))


def read_text(path: Path) -> str:
    return path.read_text(errors="replace")


# --------------------------------------------------------------------------- Celery baseline


def has_celery(python: Path) -> bool:
    """Whether `python` can import celery and redis."""
    check = subprocess.run(
        [str(python), "-c", "import celery, redis"], capture_output=True, check=False, timeout=60
    )
    return check.returncode == 0


def ensure_celery_python(explicit: str | None, timeout_s: float) -> Path:
    """The Python to run the Celery baseline with: --celery-python, or a venv created once
    at /tmp/taskring-celery-venv (outside the project; Celery is a yardstick, not a
    dependency)."""
    if explicit:
        python = Path(explicit)
        if not has_celery(python):
            raise BenchError(f"{python} cannot import celery and redis")
        return python
    python = CELERY_VENV / "bin" / "python"
    if python.exists() and has_celery(python):
        return python
    log(f"creating {CELERY_VENV} with {', '.join(CELERY_PACKAGES)} (once)")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(CELERY_VENV)], check=True, timeout=120)
    left = max(timeout_s - (time.monotonic() - started), 10.0)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *CELERY_PACKAGES],
        check=True,
        timeout=left,
        stdout=sys.stderr,
    )
    return python


def celery_argv(
    python: Path, script: Path, settings: LoadSettings, args: argparse.Namespace, max_seconds: float
) -> list[str]:
    """The baseline run with the same task count and rate settings as taskring's stages."""
    argv = [
        str(python),
        str(script),
        "--pools",
        args.celery_pools,
        "--repeat",
        str(args.celery_repeat),
        "--throughput-n",
        str(settings.e2e_n),
        "--rate",
        f"{settings.rate:g}",
        "--rate-duration",
        f"{settings.rate_duration_s:g}",
        "--rate-warmup",
        f"{settings.rate_warmup_s:g}",
        "--quiet-wait",
        f"{settings.quiet_wait_s:g}",
        "--max-seconds",
        f"{max_seconds:.0f}",
    ]
    if args.quick:
        argv += ["--submit-n", "200", "--warmup-n", "50"]
    return argv


def parse_celery(stdout: bytes) -> CeleryResult:
    """Figures from the last JSON line celery_baseline.py prints (medians per pool)."""
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise BenchError("the Celery baseline printed nothing on stdout")
    data = json.loads(lines[-1])

    def median(pool: Mapping[str, Any], key: str) -> float:
        figure = pool.get(key, {})
        return float(figure["median"]) if figure.get("n") else math.nan

    pools = [
        CeleryPool(
            label,
            median(fig, "throughput_tasks_per_s"),
            median(fig, "e2e_p50_ms"),
            median(fig, "e2e_p99_ms"),
            median(fig, "submit_p50_ms"),
        )
        for label, fig in data["summary"].items()
    ]
    return CeleryResult(pools, list(data.get("failures", [])), dict(data.get("versions", {})))


async def celery_stage(argv: Sequence[str], workdir: Path, timeout_s: float) -> CeleryResult:
    """Run the baseline as a child; its table and progress go to its log, its JSON line is
    parsed. On timeout or Ctrl-C it gets SIGINT (it stops its redis and workers in its
    finally blocks), then SIGKILL of its group."""
    log_path = workdir / "celery.log"
    proc = await spawn(argv, log_path)
    try:
        assert proc.stdout is not None
        stdout = await asyncio.wait_for(proc.stdout.read(), timeout_s)
        await proc.wait()
    finally:
        await stop_child(proc, signal.SIGINT, grace_s=30.0)
    log(log_tail(log_path, 16))
    if proc.returncode != 0:
        raise BenchError(f"Celery baseline exited with {proc.returncode}")
    return parse_celery(stdout)


# --------------------------------------------------------------------------- report


def fmt(value: float, digits: int = 0) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _per_s(r: LoadResult | RateResult) -> float:
    return r.per_s if isinstance(r, LoadResult) else r.achieved_rate


# The table's columns: header, width, cell. The first two are left-aligned.
COLUMNS: list[tuple[str, int, Callable[[LoadResult | RateResult], str]]] = [
    ("stage", 11, lambda r: r.stage),
    ("setting", 22, lambda r: r.setting),
    ("ok", 7, lambda r: str(r.n_ok)),
    ("err", 5, lambda r: str(sum(r.errors.values()))),
    ("per s", 8, lambda r: fmt(_per_s(r))),
    ("p50 ms", 9, lambda r: fmt(r.latency.p50_ms, 2)),
    ("p99 ms", 9, lambda r: fmt(r.latency.p99_ms, 2)),
    ("max ms", 9, lambda r: fmt(r.latency.max_ms, 2)),
    ("srv CPU%", 9, lambda r: fmt(r.cpu.server_pct)),
    ("loop%", 6, lambda r: fmt(r.cpu.server_loop_pct)),
    ("srv us/op", 10, lambda r: fmt(r.cpu.server_us_per_op)),
    ("cli CPU%", 9, lambda r: fmt(r.cpu.client_pct)),
    ("cli us/op", 10, lambda r: fmt(r.cpu.client_us_per_op)),
    ("other%", 7, lambda r: fmt(r.cpu.other_pct)),
]


def print_table(report: Report) -> None:
    """The figures as a table on stderr."""
    env = report.environment
    out = sys.stderr
    print(
        f"\ntaskring Submit benchmark: {env['cpus']} CPUs, Python {env['python']}, grpcio "
        f"{env['grpcio']}, uvloop {env['uvloop']}, tree {env['git']}",
        file=out,
    )
    print(f"store: {report.config['store_url']}  {report.config['durability']}", file=out)
    rows: list[LoadResult | RateResult] = [*report.echo, *report.submit, *report.e2e]
    if report.rate:
        rows.append(report.rate)
    print(
        "".join(
            f"{name:{'<' if i < 2 else '>'}{width}}" for i, (name, width, _) in enumerate(COLUMNS)
        ),
        file=out,
    )
    for r in rows:
        print(
            "".join(
                f"{cell(r):{'<' if i < 2 else '>'}{width}}"
                for i, (_, width, cell) in enumerate(COLUMNS)
            ),
            file=out,
        )
    for r in rows:
        for error, count in r.errors.items():
            print(f"  {r.stage} {r.setting}: {count} x {error}", file=out)
    if report.rate:
        print(
            f"rate: target {report.rate.target_rate:g}/s, worst send lag "
            f"{report.rate.max_schedule_lag_ms:.2f} ms",
            file=out,
        )
    print_celery(report, out)
    print_checks(report.checks(), out)
    print_profiles(report.profiles, out)
    if report.failure:
        print(f"\nRUN INCOMPLETE: {report.failure}", file=out)
    print(file=out, flush=True)


def print_celery(report: Report, out: IO[str]) -> None:
    if report.celery is None:
        print(f"\nCelery + Redis: not measured ({report.celery_note or 'skipped'})", file=out)
        return
    print(
        "\nCelery + Redis (no-op task; Redis without persistence, early acks: not durable)",
        file=out,
    )
    print(
        f"{'pool':<14}{'e2e tasks/s':>12}{'p50 @rate ms':>14}{'p99 @rate ms':>14}"
        f"{'apply_async p50 ms':>20}",
        file=out,
    )
    for p in report.celery.pools:
        print(
            f"{p.label:<14}{fmt(p.tasks_per_s):>12}{fmt(p.e2e_p50_ms, 2):>14}"
            f"{fmt(p.e2e_p99_ms, 2):>14}{fmt(p.submit_p50_ms, 3):>20}",
            file=out,
        )
    best = report.best_e2e()
    if best and report.rate:
        print(
            f"{'taskring':<14}{fmt(best.per_s):>12}{fmt(report.rate.latency.p50_ms, 2):>14}"
            f"{fmt(report.rate.latency.p99_ms, 2):>14}{'-':>20}",
            file=out,
        )
    for failure in report.celery.failures:
        print(f"  celery failure: {failure}", file=out)


def print_checks(checks: Sequence[Check], out: IO[str]) -> None:
    print(f"\n{'ratio':<42}{'value':>7}  {'goal':<7} result  detail", file=out)
    for c in checks:
        mark = {True: "PASS", False: "MISS", None: "N/A"}[c.passed]
        goal = f"{'>=' if c.at_least else '<='} {c.goal:g}"
        print(f"{c.name:<42}{fmt(c.value, 2):>7}  {goal:<7} {mark:<6}  {c.detail}", file=out)


def print_profiles(profiles: Mapping[str, HotSpots], out: IO[str]) -> None:
    for label, spots in profiles.items():
        print(f"\nserver hot spots during {label} (py-spy, {spots.samples} samples)", file=out)
        for kind, rows in (("self", spots.self_pct), ("total", spots.total_pct)):
            print(f"  {kind}:", file=out)
            for name, pct in rows:
                print(f"    {pct:5.1f}%  {name}", file=out)


def jsonable(value: Any) -> Any:
    """Dataclasses to dicts and NaN/inf to null, so the JSON line is strict JSON."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_json(report: Report) -> str:
    best = report.best_e2e()
    checks = [{**asdict(c), "passed": c.passed} for c in report.checks()]
    data = {
        "bench": "taskring_submit",
        **{k: getattr(report, k) for k in ("config", "environment", "echo", "submit", "e2e")},
        "e2e_best": best,
        "rate": report.rate,
        "celery": report.celery,
        "celery_note": report.celery_note,
        "checks": checks,
        "profiles": report.profiles,
        "failure": report.failure,
    }
    return json.dumps(jsonable(data), allow_nan=False)


# --------------------------------------------------------------------------- orchestration


def store_url(store: str, workdir: Path) -> str:
    """TASKRING_STORE for the run: `sqlite` is a fresh file in the run's temporary
    directory; a URL (e.g. postgresql://... once the server has that store) passes as is."""
    if store == "sqlite":
        return f"sqlite:///{workdir / 'taskring.db'}"
    if "://" in store:
        return store
    raise BenchError(f"--store {store!r}: expected sqlite or a store URL")


def durability(env: Mapping[str, str]) -> str:
    """What a Submit reply promises under this configuration."""
    url = env["TASKRING_STORE"]
    if url.startswith("sqlite:"):
        sync = env.get("TASKRING_SQLITE_SYNCHRONOUS", "FULL").upper()
        if sync in ("FULL", "EXTRA"):
            return (
                f"each Submit reply follows a durable commit (SQLite synchronous={sync}, "
                "WAL, group commit: one fsync per group of concurrent Submits)"
            )
        return f"NOT durable: SQLite synchronous={sync}"
    return "durability as configured by the store"


def server_env(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """The taskring server's environment: this one plus the run's settings."""
    env = dict(os.environ)
    env.update(
        {
            "TASKRING_LISTEN": f"{LOOPBACK}:0",
            "TASKRING_STORE": store_url(args.store, workdir),
            "TASKRING_LOCAL_TOKEN_DELAY_S": "0",
            "TASKRING_LOCAL_EXECUTORS": "3",
            "TASKRING_LOCAL_MAX_CONCURRENCY": "32",
            "TASKRING_SQLITE_SYNCHRONOUS": "FULL",
        }
    )
    for assignment in args.server_env:
        name, sep, value = assignment.partition("=")
        if not sep:
            raise BenchError(f"--server-env {assignment!r}: expected NAME=VALUE")
        env[name] = value
    return env


def environment() -> dict[str, Any]:
    """Versions and the source tree, so figures can be matched to what produced them."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "uvloop": version("uvloop"),
        "git": git.stdout.strip() or "unknown",
    }


@dataclass(frozen=True, slots=True)
class Run:
    """What every stage of one run shares."""

    args: argparse.Namespace
    settings: LoadSettings
    workdir: Path  # the run's temporary directory: store, logs
    server_env: dict[str, str]
    celery_python: Path | None  # None: the baseline is not run, for celery_note's reason
    celery_note: str
    profiler: Profiler
    budget_end: float  # time.monotonic() at which --max-seconds runs out


def find_celery_python(args: argparse.Namespace, budget_end: float) -> tuple[Path | None, str]:
    """The Python for the baseline, found or created before any server starts (so a pip
    install never runs beside a measurement); or None and why."""
    if args.no_celery:
        return None, "--no-celery"
    if not Path(args.celery_script).exists():
        return None, f"{args.celery_script} not found"
    try:
        return ensure_celery_python(args.celery_python, budget_end - time.monotonic()), ""
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        return None, f"no Python with celery: {exc}"


async def run_celery(run: Run, report: Report) -> None:
    """The baseline, last, when taskring has stopped, with what is left of the budget."""
    if run.celery_python is None:
        report.celery_note = run.celery_note
        return
    left = run.budget_end - time.monotonic()
    if left < run.args.celery_min_seconds:
        report.celery_note = f"only {left:.0f} s left of --max-seconds"
        return
    log("Celery + Redis baseline ...")
    argv = celery_argv(
        run.celery_python,
        Path(run.args.celery_script),
        run.settings,
        run.args,
        max_seconds=left - 20,
    )
    try:
        report.celery = await celery_stage(argv, run.workdir, timeout_s=left - 5)
    except (BenchError, ValueError, KeyError) as exc:
        report.celery_note = str(exc)


async def run_all(run: Run, report: Report) -> None:
    """Every stage in order; one server at a time, so they never compete for the CPU."""
    await echo_stage(run.settings, run.workdir, report)
    await taskring_stages(run.settings, run.server_env, run.workdir, run.profiler, report)
    await run_celery(run, report)


async def main_async(run: Run, report: Report) -> None:
    """Runs every stage within the budget. A failure, SIGTERM or Ctrl-C is recorded in the
    report (whose figures so far are still printed) after every child has been stopped."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    # Ours, not asyncio.Runner's: it skips SIGINT when started with SIGINT ignored (`cmd &`).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, current.cancel)
    try:
        async with asyncio.timeout(run.budget_end - time.monotonic()):
            await run_all(run, report)
    except TimeoutError:
        report.failure = f"--max-seconds ({run.args.max_seconds:g}) reached"
    except asyncio.CancelledError:
        report.failure = "interrupted"
    except (BenchError, grpc.aio.AioRpcError, OSError) as exc:
        report.failure = f"{type(exc).__name__}: {exc}"
    for label, path in run.profiler.files.items():
        report.profiles[label] = hot_spots(read_text(path), run.args.profile_top)


def int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2: {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=5000, help="echo and Submit calls per load")
    p.add_argument("--concurrency", type=int, default=16, help="echo/Submit calls in flight")
    p.add_argument(
        "--channels",
        type=int_list,
        default=(1,),
        help="channel counts to measure echo and Submit with, e.g. 1,2; the "
        "first is used for the e2e and rate stages",
    )
    p.add_argument("--warmup-n", type=int, default=500, help="unrecorded calls before a load")
    p.add_argument("--e2e-n", type=int, default=2000, help="tasks per e2e throughput load")
    p.add_argument(
        "--e2e-concurrency",
        type=int_list,
        default=(64, 128, 256),
        help="tasks in flight: each value is measured, the best is reported",
    )
    p.add_argument("--rate", type=float, default=200.0, help="fixed Submit rate, tasks/s")
    p.add_argument("--rate-duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--rate-warmup", type=float, default=1.0, help="unrecorded seconds first")
    p.add_argument(
        "--echo-bytes",
        type=int,
        default=128,
        help="echo request and reply size (a Submit reply is ~130 bytes)",
    )
    p.add_argument(
        "--store", default="sqlite", help="sqlite (a fresh file per run) or a TASKRING_STORE URL"
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the taskring server (repeatable)",
    )
    p.add_argument(
        "--celery-python",
        help=f"a Python with celery and redis (default: a venv created once at {CELERY_VENV})",
    )
    p.add_argument("--celery-script", default=str(DEFAULT_CELERY_SCRIPT))
    p.add_argument("--celery-pools", default="solo:1,prefork:2")
    p.add_argument(
        "--celery-repeat", type=int, default=1, help="baseline runs per pool (medians if > 1)"
    )
    p.add_argument(
        "--celery-min-seconds",
        type=float,
        default=60.0,
        help="skip Celery when less than this is left of --max-seconds",
    )
    p.add_argument("--no-celery", action="store_true", help="skip the Celery baseline")
    p.add_argument("--quick", action="store_true", help="small loads: a smoke run")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each load, wait up to this long for an idle machine",
    )
    p.add_argument(
        "--quiet-pct", type=float, default=15.0, help="idle: busy CPU below this %% of one core"
    )
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run")
    p.add_argument("--json-out", help="also write the JSON summary to this file")
    p.add_argument(
        "--py-spy",
        help="py-spy binary: profile the taskring server during its "
        "loads (figures of such a run are slowed by the sampling)",
    )
    p.add_argument(
        "--py-spy-args", default="--rate 100", help="extra py-spy record arguments, e.g. '--native'"
    )
    p.add_argument("--profile-dir", help="keep the raw py-spy stacks here")
    p.add_argument("--profile-top", type=int, default=15, help="hot spots listed per kind")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.warmup_n, args.e2e_n = 500, 100, 300
        args.e2e_concurrency, args.rate_duration, args.quiet_wait = (64,), 2.0, 2.0
    return args


def load_settings(args: argparse.Namespace) -> LoadSettings:
    return LoadSettings(
        unary_n=args.n,
        unary_concurrency=args.concurrency,
        warmup_n=args.warmup_n,
        channel_counts=args.channels,
        e2e_n=args.e2e_n,
        e2e_concurrency=args.e2e_concurrency,
        rate=args.rate,
        rate_duration_s=args.rate_duration,
        rate_warmup_s=args.rate_warmup,
        echo_bytes=args.echo_bytes,
        quiet_wait_s=args.quiet_wait,
        quiet_pct=args.quiet_pct,
    )


def write_json_out(path: str, line: str) -> None:
    Path(path).write_text(line + "\n")


def exit_status(report: Report) -> int:
    """2: the run failed before measuring taskring; 1: a goal missed or the run stopped
    early; 0 otherwise (a ratio that could not be measured, e.g. --no-celery, is N/A)."""
    if report.failure and not (report.submit or report.e2e):
        return 2
    missed = any(c.passed is False for c in report.checks())
    return 1 if missed or report.failure else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget_end = time.monotonic() + args.max_seconds
    settings = load_settings(args)
    with tempfile.TemporaryDirectory(prefix="taskring-bench-") as tmp:
        workdir = Path(tmp)
        try:
            env = server_env(args, workdir)
        except BenchError as exc:
            log(str(exc))
            return 2
        config = {k: v for k, v in vars(args).items() if k != "func"}
        config.update(store_url=env["TASKRING_STORE"], durability=durability(env))
        report = Report(config=config, environment=environment())
        celery_python, celery_note = find_celery_python(args, budget_end)
        profile_dir = Path(args.profile_dir) if args.profile_dir else workdir
        profile_dir.mkdir(parents=True, exist_ok=True)
        profiler = Profiler(args.py_spy, profile_dir, args.py_spy_args.split())
        run = Run(args, settings, workdir, env, celery_python, celery_note, profiler, budget_end)
        import uvloop

        uvloop.run(main_async(run, report))
    print_table(report)
    line = summary_json(report)
    if args.json_out:
        write_json_out(args.json_out, line)
    print(line, flush=True)
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
