"""Benchmark the latency taskring adds over calling an OpenAI-compatible server directly.

    .venv/bin/python bench/routing.py                     # about 75 s
    .venv/bin/python bench/routing.py --sync OFF,NORMAL   # + a router per mode, ~25 s each
    .venv/bin/python bench/routing.py --no-gate --json-out bench/results/routing.json

One load generator (this process, uvloop) sends chat requests at a fixed rate (open loop,
--rate 50/s) to one fake provider (tests/fakes' FakeOpenAI in its own process, see
_fake_provider.py: --tokens 16 words, --token-delay-ms 2 before each) by two paths:

  direct  the openai SDK (AsyncOpenAI, max_retries=0, stream=True, include_usage as the
          router asks too) on its aiohttp transport, as the router's members use it (the
          baseline), and on its default httpx transport (info): time to first token
          (TTFT) from the call to the first non-empty content delta; completion at the
          end of the stream;
  routed  taskring (`python -m server`, one `kind = "openai"` member whose base_url is the
          fake, a fresh SQLite store), a chat task asked for in one SubmitAndStream call
          (the API for a client that wants tokens as they come; gated) and, on the same
          router, as Submit then Stream once Submit returns (one more round trip; info).
          TTFT from before the first call to the first event carrying output (an output
          delta, or a snapshot that already holds text: a watch begins with the task as it
          stands, so a delta published before it started is not lost); completion at the
          terminal state. The time until Submit answered (the first message of
          SubmitAndStream, sent once the task is committed) is shown beside it.

The paths take turns in phases of --phase-s seconds (direct, routed..., direct, routed...
for --rounds 2), so drift of the machine over the run falls on both alike; each phase starts
with --warmup-s unrecorded, and the run with one unrecorded warm-up per path. The added
latency is the routed percentile minus the direct (aiohttp) one (the samples are not
paired, so this is a difference of percentiles, not a percentile of differences).

Goals (the issue's; LiteLLM documents 3.25 ms of added latency): added TTFT p50 <= 1 ms and
p99 <= 3 ms for SubmitAndStream with the router's default durable store (SQLite
synchronous=FULL), and no failed request. `--sync OFF,NORMAL` adds a router per mode as
informational rows (not gated, not durable), to show how much of the added time is the
durable commits.

Every child runs in its own process group on 127.0.0.1:0 and is stopped by PID (SIGTERM,
then SIGKILL of its group) also on error, Ctrl-C, SIGTERM or when --max-seconds runs out.
Progress goes to stderr and the table to stdout. Exit status: 0 when every goal is met, 1
when one is missed (0 with --no-gate), 2 when the run failed or stopped early.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam

# Run as `python bench/routing.py` from the repo root, Python puts bench/ (not the root) on
# sys.path; put the root first so the generated stubs import, and bench/ too so the modules
# beside this one import by their plain names.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _console import BenchError, log
from _fake_provider import READY_PREFIX as FAKE_READY_PREFIX
from _load import Call, TaskFailedError, event_state, open_channels, open_loop
from _procs import (
    LOOPBACK,
    Server,
    bounded_run,
    machine_busy_s,
    process_cpu_s,
    server_child,
    wait_for_quiet,
)
from _report import fmt, jsonable
from _stats import Latency
from submit import environment

from client._proto.taskring.v1 import tasks_pb2, tasks_pb2_grpc

ADDED_TTFT_P50_GOAL_MS = 1.0
ADDED_TTFT_P99_GOAL_MS = 3.0
DURABLE_SYNC = "FULL"  # the router's default; the only mode the goals are checked with
INFO_SYNCS = ("OFF", "NORMAL", "EXTRA")
MODEL = "bench-model"  # the fake answers any model name
API_KEY_ENV = "TASKRING_BENCH_FAKE_API_KEY"  # how the router's config names the fake's key
FAKE_PROVIDER = Path(__file__).with_name("_fake_provider.py")
TERMINAL = (
    tasks_pb2.TASK_STATE_SUCCEEDED,
    tasks_pb2.TASK_STATE_FAILED,
    tasks_pb2.TASK_STATE_CANCELLED,
)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Plan:
    """How the run loads both paths (from the command line)."""

    rate: float  # requests per second, open loop, one path at a time
    phase_s: float  # recorded seconds per phase
    warmup_s: float  # unrecorded seconds at the start of each phase
    rounds: int  # phases per path
    tokens: int  # words in the prompt, which the fake echoes one token each
    token_delay_s: float  # the fake's pause before each token
    syncs: tuple[str, ...]  # a router per SQLite synchronous mode; DURABLE_SYNC first
    quiet_wait_s: float
    quiet_pct: float

    @property
    def prompt(self) -> str:
        return " ".join(["word"] * self.tokens)


# --------------------------------------------------------------------------- the two paths


@dataclass(frozen=True, slots=True)
class Sample:
    """One request that succeeded, timed from just before it was sent."""

    ttft_s: float
    done_s: float
    submit_s: float  # routed: the Submit call alone; NaN for the direct path


Samples = dict[int, Sample]  # by send index within one phase


@dataclass(frozen=True, slots=True)
class Target:
    """What a phase sends its load to: a way to make the phase's operation (recording into
    that phase's samples) and, for a router, its PID (for its CPU per request)."""

    label: str
    sync: str | None  # the router's SQLite synchronous mode; None for the direct path
    api: str  # how the client asks: SubmitAndStream, Submit+Stream, or the SDK
    make_call: Callable[[Samples], Call]
    router_pid: int | None


def direct_target(client: openai.AsyncOpenAI, prompt: str, label: str) -> Target:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]

    def make_call(into: Samples) -> Call:
        async def call(index: int) -> float:
            start = time.perf_counter()
            first = math.nan
            try:
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    stream=True,
                    # The router asks for usage too: both paths get the same bytes.
                    stream_options={"include_usage": True},
                )
                async with stream:
                    async for chunk in stream:
                        if math.isnan(first) and any(c.delta.content for c in chunk.choices):
                            first = time.perf_counter()
            except (openai.APIError, httpx2.HTTPError) as exc:
                # open_loop counts these; anything else is a bug of the bench and stops it.
                raise TaskFailedError(f"direct: {type(exc).__name__}: {exc}") from exc
            done = time.perf_counter()
            if math.isnan(first):
                raise TaskFailedError("direct: the stream carried no content")
            into[index] = Sample(first - start, done - start, math.nan)
            return done

        return call

    return Target(label, None, "SDK", make_call, None)


def carries_output(event: tasks_pb2.StreamResponse) -> bool:
    """Whether a Stream event is the first sight of output: a delta, or a task (snapshot or
    state change) that already holds text because the Stream started after it was written."""
    kind = event.WhichOneof("event")
    if kind == "output_delta":
        return bool(event.output_delta.text)
    task = event.snapshot if kind == "snapshot" else event.state_changed.task
    return bool(task.output.chat.text)


DIRECT_LABEL = "direct (SDK, aiohttp)"
ONE_CALL = "SubmitAndStream"
TWO_CALLS = "Submit+Stream"


def routed_target(
    channel: grpc.aio.Channel, router: Server, sync: str, prompt: str, api: str
) -> Target:
    """A chat task through the router, asked for in one call (SubmitAndStream: the way a
    client that wants tokens as they come is meant to) or in two (Submit, then Stream once
    Submit returns: one more round trip, shown for comparison)."""
    stub: tasks_pb2_grpc.TaskServiceAsyncStub = tasks_pb2_grpc.TaskServiceStub(channel)
    chat = tasks_pb2.ChatInput(
        model=MODEL, messages=[tasks_pb2.ChatMessage(role="user", content=prompt)]
    )
    # One attempt: a failure shows as an error here rather than as a slow retried success.
    spec = tasks_pb2.TaskSpec(chat=chat, max_attempts=1)
    submit = tasks_pb2.SubmitRequest(task=spec)
    submit_and_stream = tasks_pb2.SubmitAndStreamRequest(task=spec)

    async def events(stamps: list[float]) -> AsyncIterator[tasks_pb2.StreamResponse]:
        """The task's events; appends when Submit answered (the first message, for one
        call) to `stamps`."""
        if api == ONE_CALL:
            async for response in stub.SubmitAndStream(submit_and_stream):
                if not stamps:
                    stamps.append(time.perf_counter())
                yield response.event
            return
        reply = await stub.Submit(submit)
        stamps.append(time.perf_counter())
        async for event in stub.Stream(tasks_pb2.StreamRequest(task_id=reply.task.id)):
            yield event

    def make_call(into: Samples) -> Call:
        async def call(index: int) -> float:
            start = time.perf_counter()
            submitted: list[float] = []
            first, done = math.nan, math.nan
            final: tasks_pb2.TaskState.ValueType | None = None
            # Read to the end rather than break: the server ends the stream after the
            # terminal state, and a break would cancel the RPC instead.
            async for event in events(submitted):
                if math.isnan(first) and carries_output(event):
                    first = time.perf_counter()
                if (state := event_state(event)) in TERMINAL:
                    done, final = time.perf_counter(), state
            if final is None:
                raise TaskFailedError(f"{sync}: the stream ended before the task finished")
            if final != tasks_pb2.TASK_STATE_SUCCEEDED:
                raise TaskFailedError(f"{sync}: task ended {tasks_pb2.TaskState.Name(final)}")
            if math.isnan(first):
                raise TaskFailedError(f"{sync}: the task succeeded without output")
            into[index] = Sample(first - start, done - start, submitted[0] - start)
            return done

        return call

    info = sync != DURABLE_SYNC or api != ONE_CALL
    label = f"taskring {sync} {api}" + (" (info)" if info else "")
    return Target(label, sync, api, make_call, router.pid)


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True)
class CpuMark:
    """CPU seconds used so far, read at one instant."""

    at_s: float
    router_s: float  # all its threads: the loop, the SQLite writer, gRPC's own
    # Its main thread: the event loop, where all its Python runs but the SQLite writer. Near
    # 100% it queues work, and every hop of a request (Submit, commit wake-up, delta) waits.
    router_loop_s: float
    bench_s: float
    fake_s: float
    machine_s: float

    @classmethod
    def take(cls, router_pid: int | None, fake_pid: int) -> CpuMark:
        return cls(
            at_s=time.perf_counter(),
            router_s=process_cpu_s(router_pid) if router_pid else 0.0,
            router_loop_s=process_cpu_s(router_pid, thread=router_pid) if router_pid else 0.0,
            bench_s=time.process_time(),
            fake_s=process_cpu_s(fake_pid),
            machine_s=machine_busy_s(),
        )


@dataclass(slots=True)
class Measured:
    """A target's phases pooled."""

    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    sends: int = 0  # warm-ups included, as the CPU figures are
    sent_s: float = 0.0  # recorded sends over their span, summed as sends/rate
    max_lag_ms: float = 0.0
    wall_s: float = 0.0
    router_s: float = 0.0
    router_loop_s: float = 0.0
    bench_s: float = 0.0
    # Programs outside the benchmark (idle routers of other phases included): noise when
    # well above a few %.
    other_s: float = 0.0

    def add_cpu(self, before: CpuMark, after: CpuMark) -> None:
        router = after.router_s - before.router_s
        bench = after.bench_s - before.bench_s
        fake = after.fake_s - before.fake_s
        self.wall_s += after.at_s - before.at_s
        self.router_s += router
        self.router_loop_s += after.router_loop_s - before.router_loop_s
        self.bench_s += bench
        self.other_s += after.machine_s - before.machine_s - router - bench - fake


@dataclass(frozen=True, slots=True)
class Figures:
    """What the table and the JSON show for one target (latencies in ms)."""

    label: str
    sync: str | None
    api: str
    ok: int
    errors: dict[str, int]
    achieved_rate: float
    max_lag_ms: float
    ttft: Latency
    done: Latency
    submit: Latency | None
    router_us_per_req: float  # NaN for the direct path
    router_loop_pct: float  # % of one core; NaN for the direct path
    bench_us_per_req: float  # this process: the SDK, or the gRPC client
    other_pct: float

    @classmethod
    def of(cls, target: Target, m: Measured) -> Figures:
        per_req = 1e6 / max(m.sends, 1)
        pct = 100.0 / max(m.wall_s, 1e-9)
        routed = target.sync is not None
        return cls(
            label=target.label,
            sync=target.sync,
            api=target.api,
            ok=len(m.samples),
            errors=dict(m.errors),
            achieved_rate=(len(m.samples) + m.errors.total()) / max(m.sent_s, 1e-9),
            max_lag_ms=m.max_lag_ms,
            ttft=Latency.of([s.ttft_s for s in m.samples]),
            done=Latency.of([s.done_s for s in m.samples]),
            submit=Latency.of([s.submit_s for s in m.samples]) if routed else None,
            router_us_per_req=m.router_s * per_req if routed else math.nan,
            router_loop_pct=m.router_loop_s * pct if routed else math.nan,
            bench_us_per_req=m.bench_s * per_req,
            # On a VM the kernel charges time the hypervisor stole to the running process,
            # but to `steal` in /proc/stat (which machine_busy_s leaves out): the
            # difference can dip below zero, which means nothing else ran.
            other_pct=max(0.0, m.other_s * pct),
        )


async def run_phase(
    target: Target, plan: Plan, fake_pid: int, measured: Measured, *, record: bool
) -> None:
    """One phase at the plan's rate; only its part after the warm-up is recorded."""
    n_warmup = round(plan.warmup_s * plan.rate)
    n = round(plan.phase_s * plan.rate) if record else 0
    samples: Samples = {}
    if record:
        await wait_for_quiet(plan.quiet_wait_s, plan.quiet_pct)
    before = CpuMark.take(target.router_pid, fake_pid)
    run = await open_loop(target.make_call(samples), plan.rate, n_warmup, n)
    if not record:
        if run.outcomes.errors:
            raise BenchError(f"{target.label} failed while warming up: {dict(run.outcomes.errors)}")
        return
    measured.add_cpu(before, CpuMark.take(target.router_pid, fake_pid))
    measured.sends += n_warmup + n
    measured.sent_s += n / run.achieved_rate if run.achieved_rate > 0 else 0.0
    measured.max_lag_ms = max(measured.max_lag_ms, run.max_lag_ms)
    measured.errors.update(run.outcomes.errors)
    kept = [samples[i] for i in sorted(samples) if i >= n_warmup]
    measured.samples.extend(kept)
    ttft = Latency.of([s.ttft_s for s in kept])
    log(
        f"  {target.label}: {len(kept)} ok, {sum(run.outcomes.errors.values())} errors, "
        f"TTFT p50 {ttft.p50_ms:.2f} ms p99 {ttft.p99_ms:.2f} ms, "
        f"worst send lag {run.max_lag_ms:.2f} ms"
    )


def router_env(sync: str, fake_base_url: str, workdir: Path) -> dict[str, str]:
    """A router with one OpenAI member, the fake, and a fresh SQLite file of its own."""
    config = workdir / f"taskring-{sync}.toml"
    config.write_text(
        "[[backends]]\n"
        'name = "fake-openai"\n'
        'kind = "openai"\n'
        f"base_url = {json.dumps(fake_base_url)}\n"
        f'api_key_env = "{API_KEY_ENV}"\n'
        'task_types = ["chat"]\n'
        # Far above what --rate keeps in flight: the member's bound never queues a task.
        "max_concurrency = 256\n"
    )
    env = dict(os.environ)
    env.update(
        {
            "TASKRING_LISTEN": f"{LOOPBACK}:0",
            "TASKRING_METRICS_LISTEN": f"{LOOPBACK}:0",  # routers run side by side
            "TASKRING_STORE": f"sqlite:///{workdir / f'taskring-{sync}.db'}",
            "TASKRING_SQLITE_SYNCHRONOUS": sync,
            "TASKRING_CONFIG": str(config),
            API_KEY_ENV: "x",  # the fake takes any key
        }
    )
    return env


async def measure(plan: Plan, workdir: Path, figures: list[Figures]) -> None:
    """Start the fake and the routers, warm every path up, run the phases in turns."""
    async with contextlib.AsyncExitStack() as stack:
        fake_argv = [
            sys.executable,
            str(FAKE_PROVIDER),
            f"--token-delay-s={plan.token_delay_s}",
        ]
        fake = await stack.enter_async_context(
            server_child("fake-openai", fake_argv, None, workdir / "fake.log", FAKE_READY_PREFIX)
        )
        # The direct path the added latency is measured against uses the SDK as the
        # router's members do (its aiohttp transport); the SDK's default (httpx) is shown
        # beside it for information.
        targets: list[Target] = []
        for label, http_client in (
            (DIRECT_LABEL, openai.DefaultAioHttpClient()),
            ("direct (SDK, httpx) (info)", openai.DefaultAsyncHttpxClient()),
        ):
            client = openai.AsyncOpenAI(
                base_url=fake.address, api_key="x", max_retries=0, http_client=http_client
            )
            stack.push_async_callback(client.close)
            targets.append(direct_target(client, plan.prompt, label))
        for sync in plan.syncs:
            router = await stack.enter_async_context(
                server_child(
                    f"taskring {sync}",
                    [sys.executable, "-m", "server"],
                    router_env(sync, fake.address, workdir),
                    workdir / f"taskring-{sync}.log",
                    "taskring listening on",
                )
            )
            (channel,) = await stack.enter_async_context(open_channels(router.address, 1))
            targets.append(routed_target(channel, router, sync, plan.prompt, ONE_CALL))
            if sync == DURABLE_SYNC:
                targets.append(routed_target(channel, router, sync, plan.prompt, TWO_CALLS))
        measured = {t.label: Measured() for t in targets}
        log("warming up every path ...")
        for target in targets:
            await run_phase(target, plan, fake.pid, measured[target.label], record=False)
        try:
            for round_ in range(plan.rounds):
                log(f"round {round_ + 1} of {plan.rounds}")
                for target in targets:
                    await run_phase(target, plan, fake.pid, measured[target.label], record=True)
        finally:
            # What was measured before an interruption is still reported.
            figures.extend(
                Figures.of(t, measured[t.label]) for t in targets if measured[t.label].sends
            )


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Added:
    """Routed minus direct, for one router."""

    label: str
    sync: str
    api: str
    ttft_p50_ms: float
    ttft_p99_ms: float
    done_p50_ms: float
    done_p99_ms: float

    @property
    def gated(self) -> bool:
        return self.sync == DURABLE_SYNC and self.api == ONE_CALL

    @property
    def passed(self) -> bool | None:
        if not self.gated:
            return None
        return (
            self.ttft_p50_ms <= ADDED_TTFT_P50_GOAL_MS
            and self.ttft_p99_ms <= ADDED_TTFT_P99_GOAL_MS
        )


def added(figures: Sequence[Figures]) -> list[Added]:
    direct = next((f for f in figures if f.label == DIRECT_LABEL), None)
    if direct is None:
        return []
    return [
        Added(
            f.label,
            f.sync,
            f.api,
            f.ttft.p50_ms - direct.ttft.p50_ms,
            f.ttft.p99_ms - direct.ttft.p99_ms,
            f.done.p50_ms - direct.done.p50_ms,
            f.done.p99_ms - direct.done.p99_ms,
        )
        for f in figures
        if f.sync is not None
    ]


def error_count(figures: Sequence[Figures]) -> int:
    return sum(sum(f.errors.values()) for f in figures)


def passed(figures: Sequence[Figures], failure: str) -> bool:
    """Every goal met: the durable router measured and within both goals, no error."""
    gated = [a for a in added(figures) if a.gated]
    return not failure and bool(gated) and all(a.passed for a in gated) and not error_count(figures)


# The figures table's columns: header, width, cell. The first is left-aligned.
COLUMNS: list[tuple[str, int, Callable[[Figures], str]]] = [
    ("path", 38, lambda f: f.label),
    ("ok", 6, lambda f: str(f.ok)),
    ("err", 5, lambda f: str(sum(f.errors.values()))),
    ("per s", 7, lambda f: fmt(f.achieved_rate, 1)),
    ("TTFT p50", 10, lambda f: fmt(f.ttft.p50_ms, 2)),
    ("TTFT p99", 10, lambda f: fmt(f.ttft.p99_ms, 2)),
    ("done p50", 10, lambda f: fmt(f.done.p50_ms, 2)),
    ("done p99", 10, lambda f: fmt(f.done.p99_ms, 2)),
    ("Submit p50", 12, lambda f: "-" if f.submit is None else fmt(f.submit.p50_ms, 2)),
    ("Submit p99", 12, lambda f: "-" if f.submit is None else fmt(f.submit.p99_ms, 2)),
    ("router us/req", 15, lambda f: fmt(f.router_us_per_req)),
    ("loop%", 7, lambda f: fmt(f.router_loop_pct)),
    ("bench us/req", 14, lambda f: fmt(f.bench_us_per_req)),
    ("other%", 8, lambda f: fmt(f.other_pct)),
]

LABEL = 56  # width of the added-latency rows' labels
LEGEND = """\
  TTFT: to the first output token; done: to the end of the stream (direct) or the terminal
  state (routed); Submit: until Submit answered (the first message of SubmitAndStream);
  router us/req: the router's CPU (all
  threads) per request; loop%: its event loop's thread, in % of one core; bench us/req: this
  process (the SDK, or the gRPC client); other%: programs outside the benchmark"""


def print_table(plan: Plan, env: dict[str, Any], figures: Sequence[Figures], failure: str) -> None:
    print(
        f"\ntaskring routing latency: {plan.rate:g} req/s open loop, {plan.rounds} x "
        f"{plan.phase_s:g} s per path (+{plan.warmup_s:g} s warm-up each), reply "
        f"{plan.tokens} tokens x {plan.token_delay_s * 1e3:g} ms from FakeOpenAI in its own "
        f"process\n{env['cpus']} CPUs, Python {env['python']}, grpcio {env['grpcio']}, "
        f"uvloop {env['uvloop']}, tree {env['git']}; latencies in ms"
    )
    print("".join(f"{h:{'<' if i == 0 else '>'}{w}}" for i, (h, w, _) in enumerate(COLUMNS)))
    for f in figures:
        print("".join(f"{c(f):{'<' if i == 0 else '>'}{w}}" for i, (_, w, c) in enumerate(COLUMNS)))
    print(LEGEND)
    for f in figures:
        for error, count in f.errors.items():
            print(f"  {f.label}: {count} x {error}")
    goal = f"p50 <= {ADDED_TTFT_P50_GOAL_MS:g}, p99 <= {ADDED_TTFT_P99_GOAL_MS:g}"
    lags = ", ".join(f"{f.label} {fmt(f.max_lag_ms, 1)}" for f in figures)
    # A send far behind its schedule means this process stalled: its figures then include
    # the stall, whichever path was being measured.
    print(f"worst send lag (ms): {lags}")
    header = "added by taskring (routed - direct)"
    print(f"\n{header:<{LABEL}}{'p50':>8}{'p99':>8}  {'goal':<22}result")
    for a in added(figures):
        how = f"{a.api}, synchronous={a.sync}" + (
            "" if a.sync == DURABLE_SYNC else " (not durable)"
        )
        mark = {True: "PASS", False: "MISS", None: "info"}[a.passed]
        print(
            f"{'TTFT, ' + how:<{LABEL}}{fmt(a.ttft_p50_ms, 2):>8}"
            f"{fmt(a.ttft_p99_ms, 2):>8}  {goal if a.gated else '-':<22}{mark}"
        )
        print(
            f"{'completion, ' + how:<{LABEL}}{fmt(a.done_p50_ms, 2):>8}"
            f"{fmt(a.done_p99_ms, 2):>8}  {'-':<22}info"
        )
    errors = error_count(figures)
    print(f"{'failed requests, all paths':<{LABEL}}{errors:>8}{'':>8}  {'0':<22}", end="")
    print("PASS" if not errors else "MISS")
    if failure:
        print(f"\nRUN INCOMPLETE: {failure}")
    print(flush=True)


def summary(
    plan: Plan, env: dict[str, Any], figures: Sequence[Figures], failure: str
) -> dict[str, Any]:
    return {
        "bench": "taskring_routing",
        "plan": plan,
        "environment": env,
        "goals_ms": {
            "added_ttft_p50": ADDED_TTFT_P50_GOAL_MS,
            "added_ttft_p99": ADDED_TTFT_P99_GOAL_MS,
        },
        "paths": list(figures),
        "added": [{**jsonable(a), "passed": a.passed} for a in added(figures)],
        "errors": error_count(figures),
        "passed": passed(figures, failure),
        "failure": failure or None,
    }


# --------------------------------------------------------------------------- main


async def main_async(plan: Plan, workdir: Path, figures: list[Figures], max_seconds: float) -> str:
    """Runs the measurement within the budget; returns why it stopped early ("" if it did
    not), after every child has been stopped."""
    return await bounded_run(measure(plan, workdir, figures), max_seconds)


def sync_list(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip().upper() for m in text.split(",") if m.strip())
    if bad := [m for m in modes if m not in INFO_SYNCS]:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(INFO_SYNCS)}, not {bad}")
    return modes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rate", type=float, default=50.0, help="requests per second, open loop")
    p.add_argument("--phase-s", type=float, default=10.0, help="recorded seconds per phase")
    p.add_argument("--warmup-s", type=float, default=0.5, help="unrecorded seconds per phase")
    p.add_argument("--rounds", type=int, default=2, help="phases per path, taken in turns")
    p.add_argument("--tokens", type=int, default=16, help="tokens in each reply")
    p.add_argument(
        "--token-delay-ms", type=float, default=2.0, help="the fake's pause before each token"
    )
    p.add_argument(
        "--sync",
        type=sync_list,
        default=(),
        help="also measure routers with these SQLite synchronous modes, e.g. OFF,NORMAL "
        f"(informational: not durable, not gated); {DURABLE_SYNC} is always measured",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=3.0,
        help="before each phase, wait up to this long for an idle machine",
    )
    p.add_argument(
        "--quiet-pct", type=float, default=15.0, help="idle: busy CPU below this %% of one core"
    )
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run")
    p.add_argument("--no-gate", action="store_true", help="exit 0 even if a goal is missed")
    p.add_argument("--json-out", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.phase_s <= 0 or args.warmup_s < 0 or args.rounds < 1:
        p.error("--rate and --phase-s must be > 0, --warmup-s >= 0, --rounds >= 1")
    if args.tokens < 1 or args.token_delay_ms < 0:
        p.error("--tokens must be >= 1 and --token-delay-ms >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        rate=args.rate,
        phase_s=args.phase_s,
        warmup_s=args.warmup_s,
        rounds=args.rounds,
        tokens=args.tokens,
        token_delay_s=args.token_delay_ms / 1e3,
        syncs=(DURABLE_SYNC, *dict.fromkeys(args.sync)),
        quiet_wait_s=args.quiet_wait,
        quiet_pct=args.quiet_pct,
    )
    env = environment()
    env["openai"] = openai.__version__
    figures: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="taskring-routing-") as tmp:
        import uvloop

        failure = uvloop.run(main_async(plan, Path(tmp), figures, args.max_seconds))
    print_table(plan, env, figures, failure)
    if args.json_out:
        data = jsonable(summary(plan, env, figures, failure))
        Path(args.json_out).write_text(json.dumps(data, allow_nan=False) + "\n")
    if failure:
        return 2
    return 0 if args.no_gate or passed(figures, failure) else 1


if __name__ == "__main__":
    sys.exit(main())
