"""Benchmark per-client admission: a noisy client at 20x its rate limit beside a well-behaved one.

    .venv/bin/python bench/admission.py                 # about 6 minutes
    .venv/bin/python bench/admission.py --no-floor      # taskring only, about 3 minutes
    .venv/bin/python bench/admission.py --quick         # smoke run, about 30 s
    .venv/bin/python bench/admission.py --json-out bench/results/admission.json

Two phases, taken in turns for --rounds (3: baseline, noisy, baseline, noisy, ...), each
against a fresh taskring server (`python -m server`: a fresh SQLite store,
metrics off, no token delay) with the same TASKRING_CONFIG: two API keys, clients "noisy"
and "good"; the default `[limits]` (--noisy-rate-limit 50/s, --noisy-burst 50) is the noisy
client's, and good has its own (--good-rate-limit 200/s, burst as much).

  baseline  the good client alone: one Submit every 1/--good-rate s (50/s, open loop: send
            times computed from the start, whatever the replies do), --warmup s unrecorded,
            then --seconds recorded; each Submit timed from just before the call to its
            reply;
  noisy     the same good client and, from the same instant, the noisy client offering
            --noisy-factor (20) times its limit, open loop too (1000 Submits/s by default)
            over --noisy-channels connections, for the whole of the good client's run and
            TAIL_S more. Its Submits are counted as accepted (OK) or rejected
            (RESOURCE_EXHAUSTED) by send time within the recorded window: the bucket starts
            full (`burst` tokens), so the warm-up skips the burst and the window sees the
            steady state. The same count by reply time is shown as a cross-check.

The floor: each round takes the same two phases once more against bench/floor_server.py
(skipped with --no-floor), a bare grpc.aio server that runs taskring's admission (the same
Gate: key, token bucket, the refusal and its RetryInfo) and answers an admitted Submit with
a reply encoded in advance, storing and running nothing. Its good-client p99 ratio, printed
beside the goals but not one of them, is what the flood does to any grpc.aio server on this
machine: when the floor's own ratio is above 1.2, the goal's figure measures the machine as
much as taskring.

The noisy client runs in a process of its own (this script, --noisy-child): here, its
thousand calls a second would share the event loop that times the good client's Submits,
and the good client's p99 would measure the load generator rather than the server. Both
start at one CLOCK_MONOTONIC instant, which the child announces once it is connected.

Goals (the issue's): the noisy client's accepted rate / its limit within 0.95-1.05; the
good client's p99 Submit latency with the noisy client / without it <= 1.2. Both are
checked on the rounds pooled: the good client's latencies of all baseline phases against
those of all noisy phases, and the noisy client's accepted Submits over all its windows.
One phase's p99 is its 8th-worst Submit of 750: on a VM the ratio of two such single
figures ranged 1.05-1.98 for the same code, and taking the phases in turns spreads the
machine's drift over both. The per-round ratios are shown beside the pooled one. Also checked:
the noisy client really offered >= 95% of its 20x (else the load generator, not the server,
is what was measured), and a rejection carries a google.rpc.RetryInfo of 1/limit (+-10%).
The CPU of the server (all threads, and its event loop's thread), of each client process
and of other programs during the window is shown, and a saturated load client is named.

Every child runs in its own process group on 127.0.0.1 and is stopped by PID (SIGTERM,
then SIGKILL of its group) also on error, Ctrl-C, SIGTERM or when --max-seconds runs out.
Progress and a table go to stderr, one JSON line last on stdout (also to --json-out). Exit
status: 0 when every goal is met, 1 when one is missed, 2 when the run failed: a child did
not start, a Submit failed with anything but the noisy client's RESOURCE_EXHAUSTED, or the
run was interrupted or ran out of --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Run as `python bench/admission.py` from the repo root, Python puts bench/ (not the root)
# on sys.path; put the root first so the generated stubs import, and bench/ too so the
# modules beside this one import by their plain names.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _console import BenchError, log
from _load import Call, chat_request, open_channels, open_loop, raw_unary
from _procs import (
    LOOPBACK,
    CpuSample,
    bounded_run,
    log_tail,
    process_cpu_s,
    server_child,
    spawn,
    stop_child,
    wait_for_quiet,
)
from _report import fmt, jsonable
from _stages import SUBMIT_METHOD
from _stats import Latency
from floor_server import READY_PREFIX as FLOOR_READY
from submit import environment

ACCEPTED_GOAL = (0.95, 1.05)  # noisy accepted rate / its limit, within
P99_RATIO_GOAL = 1.2  # good p99 with the noisy client / without, at most
OFFERED_GOAL = 0.95  # the noisy client's offered rate / its target, at least
RETRY_DELAY_GOAL = (0.9, 1.1)  # RetryInfo delay x limit (one token's time), within
SATURATED_PCT = 90.0  # a client process's event loop above this % of a core is saturated

NOISY, GOOD = "noisy", "good"
NOISY_KEY_ENV = "TASKRING_BENCH_NOISY_KEY"  # the child's API key: kept out of its argv
READY_PREFIX = "noisy client ready, starting at"
START_DELAY_S = 0.5  # from the child's ready line to the common start: time to read it
TAIL_S = 0.5  # the noisy client goes on this long after the good client's last send
SERVER_READY = "taskring listening on"
SCRIPT = Path(__file__).resolve()  # the noisy client runs this script in its own process
FLOOR_SERVER = SCRIPT.with_name("floor_server.py")
TASKRING, FLOOR = "taskring", "floor"  # the servers a phase runs against
OK = grpc.StatusCode.OK
REJECTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Plan:
    """What the run configures and offers (from the command line)."""

    noisy_limit: float  # the noisy client's configured rate, Submits/s
    noisy_burst: int  # and its bucket's size
    noisy_factor: float  # it offers this many times its limit
    noisy_channels: int  # connections it spreads its Submits over
    good_rate: float  # the good client's open-loop rate, Submits/s
    good_limit: float  # its configured rate (and burst), far above good_rate
    warmup_s: float  # unrecorded seconds at the start of a phase
    seconds: float  # the recorded window
    quiet_wait_s: float
    quiet_pct: float
    rounds: int = 1  # baseline and noisy phases, taken in turns
    floor: bool = True  # each round's phases once more against bench/floor_server.py

    @property
    def noisy_rate(self) -> float:
        return self.noisy_limit * self.noisy_factor

    @property
    def good_burst(self) -> int:
        return max(1, round(self.good_limit))

    def child_args(self) -> list[str]:
        """The options that rebuild this plan in the noisy client's process."""
        return [
            f"--noisy-rate-limit={self.noisy_limit!r}",
            f"--noisy-burst={self.noisy_burst}",
            f"--noisy-factor={self.noisy_factor!r}",
            f"--noisy-channels={self.noisy_channels}",
            f"--warmup={self.warmup_s!r}",
            f"--seconds={self.seconds!r}",
        ]


def config_toml(plan: Plan, keys: Mapping[str, str]) -> str:
    """The server's TASKRING_CONFIG: each client's key (as its SHA-256), the default limit
    (which the noisy client gets) and the good client's own."""
    lines: list[str] = []
    for client, key in keys.items():
        digest = hashlib.sha256(key.encode()).hexdigest()
        lines += ["[[api_keys]]", f"client = {json.dumps(client)}", f'sha256 = "{digest}"', ""]
    lines += [
        "[limits]",
        f"rate = {plan.noisy_limit!r}",
        f"burst = {plan.noisy_burst}",
        "",
        f"[limits.clients.{json.dumps(GOOD)}]",
        f"rate = {plan.good_limit!r}",
        f"burst = {plan.good_burst}",
    ]
    return "\n".join(lines) + "\n"


def server_env(workdir: Path, config: Path, phase: str) -> dict[str, str]:
    """A server with the run's configuration and a fresh SQLite file of its own."""
    env = dict(os.environ)
    env.update(
        {
            "TASKRING_LISTEN": f"{LOOPBACK}:0",
            "TASKRING_STORE": f"sqlite:///{workdir / f'taskring-{phase}.db'}",
            "TASKRING_CONFIG": str(config),
            "TASKRING_METRICS_LISTEN": "off",
            "TASKRING_LOCAL_TOKEN_DELAY_S": "0",
        }
    )
    return env


# --------------------------------------------------------------------------- one client


def keyed_submit(channels: Sequence[grpc.aio.Channel], key: str) -> Call:
    """Submit a one-message chat task with the client's API key, raw bytes in and out (as
    bench/submit.py's load calls it), on channel index % count."""
    callables = [raw_unary(channel, SUBMIT_METHOD) for channel in channels]
    request = chat_request().SerializeToString()
    metadata = (("authorization", f"Bearer {key}"),)

    async def call(index: int) -> float:
        await callables[index % len(callables)](request, metadata=metadata)
        return time.perf_counter()

    return call


def retry_delay_s(error: grpc.aio.AioRpcError) -> float | None:
    """The delay of the google.rpc.RetryInfo a rejection carries; None without one."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


@dataclass(frozen=True, slots=True)
class ClientFigures:
    """One client's Submits whose send time fell within the recorded window (rates per
    second of that window); errors and rejected_total over its whole run."""

    client: str
    target_rate: float  # what it was to send
    window_s: float
    sent: int
    accepted: int
    rejected: int  # RESOURCE_EXHAUSTED
    offered_rate: float
    accepted_rate: float
    rejected_rate: float
    # OK replies that arrived within the window: equal to accepted_rate in a steady state;
    # above it if the server's queue grew over the window (it admits on arrival, not send).
    accepted_by_reply_rate: float
    accepted_before: int  # OK sent before the window: the burst and the warm-up's share
    rejected_total: int
    errors: dict[str, int]  # anything but OK and an expected rejection, whole run
    retry_delay_s: float | None  # the first rejection's RetryInfo; None: no rejection or none
    max_lag_ms: float  # the worst send behind its schedule, in the window
    latency: Latency  # of the accepted Submits
    rejected_latency: Latency

    @classmethod
    def from_json(cls, text: str) -> ClientFigures:
        data = json.loads(text)  # as the child wrote it, NaN included
        data["latency"] = Latency(**data["latency"])
        data["rejected_latency"] = Latency(**data["rejected_latency"])
        return cls(**data)


@dataclass(slots=True)
class Tally:
    """Every Submit of one client: when it was sent and answered, and how."""

    rejection_expected: bool  # RESOURCE_EXHAUSTED is the noisy client's lot, an error for good
    sent_s: list[float] = field(default_factory=list)
    done_s: list[float] = field(default_factory=list)
    codes: list[grpc.StatusCode] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retry_delay_s: float | None = None
    rejections: int = 0

    def watch(self, call: Call) -> Call:
        """`call`, with each Submit recorded here; errors still raise, for open_loop."""

        async def watched(index: int) -> float:
            sent = time.perf_counter()
            try:
                done = await call(index)
            except grpc.aio.AioRpcError as exc:
                self.sent_s.append(sent)
                self.done_s.append(time.perf_counter())
                self.codes.append(exc.code())
                if exc.code() == REJECTED and self.rejection_expected:
                    if not self.rejections:
                        self.retry_delay_s = retry_delay_s(exc)
                    self.rejections += 1
                else:
                    self.errors[f"{exc.code().name}: {exc.details()}"] += 1
                raise
            self.sent_s.append(sent)
            self.done_s.append(done)
            self.codes.append(OK)
            return done

        return watched

    def accepted_s(self, target_rate: float, start: float, plan: Plan) -> list[float]:
        """The latencies (s) of the accepted Submits sent within the window, as `figures`
        summarises them: what rounds pool."""
        lo, hi = _window(start, target_rate, plan)
        rows = zip(self.sent_s, self.done_s, self.codes, strict=True)
        return [done - sent for sent, done, code in rows if code == OK and lo <= sent < hi]

    def figures(
        self, client: str, target_rate: float, start: float, plan: Plan, max_lag_ms: float
    ) -> ClientFigures:
        """The figures of the window [start + warm-up, + seconds) (perf_counter times)."""
        # Sends leave on their schedule (one each 1/rate s) give or take the loop's timer
        # resolution, early as well as late: the window's edges lie half an interval before
        # the scheduled ones, so that no send slips to the wrong side of an edge.
        lo, hi = _window(start, target_rate, plan)
        rows = list(zip(self.sent_s, self.done_s, self.codes, strict=True))
        window = [(sent, done, code) for sent, done, code in rows if lo <= sent < hi]
        accepted = self.accepted_s(target_rate, start, plan)
        rejected = [done - sent for sent, done, code in window if code == REJECTED]
        by_reply = sum(1 for _, done, code in rows if code == OK and lo <= done < hi)
        return ClientFigures(
            client=client,
            target_rate=target_rate,
            window_s=plan.seconds,
            sent=len(window),
            accepted=len(accepted),
            rejected=len(rejected),
            offered_rate=len(window) / plan.seconds,
            accepted_rate=len(accepted) / plan.seconds,
            rejected_rate=len(rejected) / plan.seconds,
            accepted_by_reply_rate=by_reply / plan.seconds,
            accepted_before=sum(1 for sent, _, code in rows if code == OK and sent < lo),
            rejected_total=self.rejections,
            errors=dict(self.errors),
            retry_delay_s=self.retry_delay_s,
            max_lag_ms=max_lag_ms,
            latency=Latency.of(accepted),
            rejected_latency=Latency.of(rejected),
        )


def _window(start: float, target_rate: float, plan: Plan) -> tuple[float, float]:
    """The recorded window [lo, hi) of a client that started at `start` (perf_counter)."""
    lo = start + plan.warmup_s - 0.5 / target_rate
    return lo, lo + plan.seconds


async def run_client(
    call: Call, tally: Tally, rate: float, plan: Plan, extra_s: float = 0.0
) -> tuple[float, float]:
    """Open loop at `rate` from now: the warm-up's sends unrecorded by open_loop (the tally
    keeps them all), then the window and extra_s more. Returns the start (perf_counter)
    and the worst send lag of the recorded part, in ms."""
    n_warmup = round(plan.warmup_s * rate)
    n = max(1, round((plan.seconds + extra_s) * rate))
    start = time.perf_counter()
    run = await open_loop(tally.watch(call), rate, n_warmup, n)
    return start, run.max_lag_ms


# --------------------------------------------------------------------------- the noisy child


async def noisy_child_main(address: str, plan: Plan, key: str) -> ClientFigures:
    """The noisy client's process: connect, announce the start, offer its factor x its
    limit for the phase and TAIL_S more."""
    async with open_channels(address, plan.noisy_channels) as channels:
        call = keyed_submit(channels, key)
        await call(0)  # the key works: a failure here is "did not start", not a figure
        start_at = time.monotonic() + START_DELAY_S
        print(f"{READY_PREFIX} {start_at!r}", flush=True)
        await asyncio.sleep(start_at - time.monotonic())
        tally = Tally(rejection_expected=True)
        start, lag_ms = await run_client(call, tally, plan.noisy_rate, plan, TAIL_S)
        return tally.figures(NOISY, plan.noisy_rate, start, plan, lag_ms)


async def child_line(
    proc: asyncio.subprocess.Process, log_path: Path, timeout_s: float, what: str
) -> str:
    """A child's next line on stdout; BenchError, with its log, if none comes in time."""
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    except TimeoutError:
        line = b""
    if not line:
        raise BenchError(f"the noisy client {what}; its log:\n{log_tail(log_path)}")
    return line.decode(errors="replace").strip()


@dataclass(frozen=True, slots=True)
class NoisyChild:
    """The noisy client's process, connected: it starts at start_at."""

    proc: asyncio.subprocess.Process
    start_at: float  # time.monotonic() at which both clients start
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def figures(self, timeout_s: float) -> ClientFigures:
        """What it measured: the one line it prints when done."""
        line = await child_line(self.proc, self.log_path, timeout_s, "gave no figures")
        try:
            return ClientFigures.from_json(line)
        except (ValueError, TypeError, KeyError) as exc:
            raise BenchError(f"the noisy client's figures {line[:200]!r}: {exc}") from exc


@contextlib.asynccontextmanager
async def noisy_child(
    address: str, plan: Plan, key: str, log_path: Path
) -> AsyncIterator[NoisyChild]:
    """Start the noisy client's process (its stderr to log_path); yields once it is
    connected. Stopped on leaving."""
    argv = [sys.executable, str(SCRIPT), "--noisy-child", address]
    env = {**os.environ, NOISY_KEY_ENV: key}
    proc = await spawn([*argv, *plan.child_args()], log_path, env)
    try:
        ready = await child_line(proc, log_path, 30.0, "did not start")
        if not ready.startswith(READY_PREFIX):
            raise BenchError(f"the noisy client said {ready!r}; its log:\n{log_tail(log_path)}")
        log(f"noisy client pid {proc.pid}: {plan.noisy_rate:g} Submits/s")
        yield NoisyChild(proc, float(ready.removeprefix(READY_PREFIX)), log_path)
    finally:
        await stop_child(proc)


# --------------------------------------------------------------------------- a phase


@dataclass(frozen=True, slots=True)
class CpuFigures:
    """CPU during the recorded window, in % of one core."""

    server_pct: float  # all its threads
    server_loop_pct: float  # its event loop's thread: near 100, the server is the bottleneck
    good_client_pct: float  # this process, which runs the good client
    noisy_client_pct: float  # the noisy client's process (NaN in the baseline)
    noisy_client_loop_pct: float  # its event loop's thread
    other_pct: float  # programs outside the benchmark: noise when well above a few %


async def cpu_in_window(
    server_pid: int, child_pid: int | None, start: float, plan: Plan
) -> CpuFigures:
    """Read the CPU counters at the window's start and end (start: perf_counter)."""

    def child_s(thread: bool) -> float:
        if child_pid is None:
            return math.nan
        return process_cpu_s(child_pid, thread=child_pid if thread else None)

    await asyncio.sleep(max(0.0, start + plan.warmup_s - time.perf_counter()))
    before, child0, child_loop0 = CpuSample.take(server_pid), child_s(False), child_s(True)
    await asyncio.sleep(max(0.0, start + plan.warmup_s + plan.seconds - time.perf_counter()))
    after, child1, child_loop1 = CpuSample.take(server_pid), child_s(False), child_s(True)
    use = after.use_since(before, 1)
    pct = 100.0 / max(after.at_s - before.at_s, 1e-9)
    child_pct = (child1 - child0) * pct
    return CpuFigures(
        server_pct=use.server_pct,
        server_loop_pct=use.server_loop_pct,
        good_client_pct=use.client_pct,
        noisy_client_pct=child_pct,
        noisy_client_loop_pct=(child_loop1 - child_loop0) * pct,
        # On a VM, time the hypervisor stole is charged to the running process but not
        # counted busy in /proc/stat: below zero means nothing else ran.
        other_pct=max(0.0, use.other_pct - (child_pct if child_pid is not None else 0.0)),
    )


@dataclass(frozen=True, slots=True)
class Phase:
    name: str  # baseline | noisy
    round: int  # from 1
    server: str  # TASKRING | FLOOR
    good: ClientFigures
    noisy: ClientFigures | None
    cpu: CpuFigures
    # The good client's accepted latencies in the window (s), pooled across rounds by the
    # checks; left out of the JSON (its summary is good.latency).
    good_accepted_s: tuple[float, ...] = field(default=(), repr=False)

    @property
    def label(self) -> str:
        prefix = "floor " if self.server == FLOOR else ""
        return f"{prefix}{self.name} #{self.round}"


async def good_client(
    call: Call, plan: Plan, start_at: float, server_pid: int, child_pid: int | None
) -> tuple[ClientFigures, list[float], CpuFigures]:
    """The good client's run from start_at (time.monotonic()): its figures, its accepted
    latencies (s), and the CPU read meanwhile."""
    late_s = time.monotonic() - start_at
    if late_s > 0.05:
        log(f"  the good client starts {late_s * 1e3:.0f} ms after the noisy one")
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu = asyncio.create_task(cpu_in_window(server_pid, child_pid, time.perf_counter(), plan))
    try:
        tally = Tally(rejection_expected=False)
        start, lag_ms = await run_client(call, tally, plan.good_rate, plan)
        figures = tally.figures(GOOD, plan.good_rate, start, plan, lag_ms)
        return figures, tally.accepted_s(plan.good_rate, start, plan), await cpu
    finally:
        cpu.cancel()


def server_command(
    server_kind: str, name: str, round_: int, workdir: Path
) -> tuple[list[str], dict[str, str] | None, str]:
    """How to start a phase's server: its argv, environment and ready line's prefix."""
    config = workdir / "taskring.toml"
    if server_kind == FLOOR:
        argv = [sys.executable, str(FLOOR_SERVER), f"--config={config}", f"--listen={LOOPBACK}:0"]
        return argv, None, FLOOR_READY
    env = server_env(workdir, config, f"{name}-{round_}")
    return [sys.executable, "-m", "server"], env, SERVER_READY


async def run_phase(
    server_kind: str, name: str, round_: int, plan: Plan, keys: Mapping[str, str], workdir: Path
) -> Phase:
    """A fresh server with the run's configuration; the good client, and in the noisy phase
    the noisy one beside it."""
    argv, env, ready = server_command(server_kind, name, round_, workdir)
    log_path = workdir / f"{server_kind}-{name}-{round_}.log"
    async with (
        server_child(f"{server_kind} ({name})", argv, env, log_path, ready) as server,
        open_channels(server.address, 1) as channels,
    ):
        call = keyed_submit(channels, keys[GOOD])
        await call(0)  # the connection is up and the key works before anything is timed
        await wait_for_quiet(plan.quiet_wait_s, plan.quiet_pct)
        noisy: ClientFigures | None = None
        if name == "baseline":
            good, good_s, cpu = await good_client(call, plan, time.monotonic(), server.pid, None)
        else:
            child_log = workdir / f"noisy-client-{round_}.log"
            async with noisy_child(server.address, plan, keys[NOISY], child_log) as child:
                good, good_s, cpu = await good_client(
                    call, plan, child.start_at, server.pid, child.pid
                )
                noisy = await child.figures(TAIL_S + 60.0)
    phase = Phase(name, round_, server_kind, good, noisy, cpu, tuple(good_s))
    log_phase(phase)
    return phase


def log_phase(phase: Phase) -> None:
    name, good, noisy, cpu = phase.label, phase.good, phase.noisy, phase.cpu
    log(
        f"  {name}: good p50 {good.latency.p50_ms:.2f} ms p99 {good.latency.p99_ms:.2f} ms "
        f"({good.accepted} ok, {sum(good.errors.values())} errors); server CPU "
        f"{cpu.server_pct:.0f}% (loop {cpu.server_loop_pct:.0f}%)"
    )
    if noisy is not None:
        log(
            f"  {name}: noisy offered {noisy.offered_rate:.0f}/s, accepted "
            f"{noisy.accepted_rate:.1f}/s, rejected {noisy.rejected_rate:.0f}/s; its CPU "
            f"{cpu.noisy_client_pct:.0f}% (loop {cpu.noisy_client_loop_pct:.0f}%)"
        )


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Check:
    """A figure and its goal; passed is None when it was not measured."""

    name: str
    value: float
    goal: str
    passed: bool | None
    detail: str


def within(value: float, bounds: tuple[float, float]) -> bool | None:
    return bounds[0] <= value <= bounds[1] if math.isfinite(value) else None


def at_most(value: float, goal: float) -> bool | None:
    return value <= goal if math.isfinite(value) else None


def checks(plan: Plan, phases: Sequence[Phase]) -> list[Check]:
    """The goals against what the phases measured, all rounds pooled (passed None: not
    measured)."""
    quiet = [p for p in phases if p.server == TASKRING and p.name == "baseline"]
    loud = [p for p in phases if p.server == TASKRING and p.name == "noisy"]
    noisy = [p.noisy for p in loud if p.noisy is not None]
    found: list[Check] = []
    window_s = plan.seconds * len(noisy)
    offered_rate = sum(n.sent for n in noisy) / window_s if noisy else math.nan
    least = OFFERED_GOAL * plan.noisy_factor
    found.append(
        Check(
            "noisy offered / limit",
            offered_rate / plan.noisy_limit,
            f">= {least:g}",
            offered_rate / plan.noisy_limit >= least if noisy else None,
            f"{offered_rate:.0f}/s of {plan.noisy_rate:g}/s" if noisy else "",
        )
    )
    accepted = sum(n.accepted for n in noisy)
    by_reply = sum(n.accepted_by_reply_rate for n in noisy) / len(noisy) if noisy else math.nan
    found.append(
        Check(
            "noisy accepted / limit",
            accepted / window_s / plan.noisy_limit if noisy else math.nan,
            f"{ACCEPTED_GOAL[0]:g}-{ACCEPTED_GOAL[1]:g}",
            within(accepted / window_s / plan.noisy_limit, ACCEPTED_GOAL) if noisy else None,
            f"{accepted} in {window_s:g} s; by reply time {fmt(by_reply / plan.noisy_limit, 3)}"
            f"; by round {_each(n.accepted_rate / plan.noisy_limit for n in noisy)}"
            if noisy
            else "",
        )
    )
    ratio, detail = p99_ratio(quiet, loud)
    found.append(
        Check(
            "good p99 with noisy / without",
            ratio,
            f"<= {P99_RATIO_GOAL:g}",
            at_most(ratio, P99_RATIO_GOAL),
            detail,
        )
    )
    first = next((n for n in noisy if n.rejected_total), None)
    delay = first.retry_delay_s if first else None
    retry = delay * plan.noisy_limit if delay is not None else math.nan
    if not noisy:
        retry_passed, detail = None, ""
    elif first is None:
        retry_passed, detail = False, "no rejection seen"
    elif delay is None:
        retry_passed, detail = False, "the first rejection had no RetryInfo"
    else:
        retry_passed = within(retry, RETRY_DELAY_GOAL)
        detail = f"{delay * 1e3:.1f} ms; 1/limit is {1e3 / plan.noisy_limit:.1f} ms"
    found.append(
        Check(
            "RetryInfo delay x limit",
            retry,
            f"{RETRY_DELAY_GOAL[0]:g}-{RETRY_DELAY_GOAL[1]:g}",
            retry_passed,
            detail,
        )
    )
    return found


def p99_ratio(quiet: Sequence[Phase], loud: Sequence[Phase]) -> tuple[float, str]:
    """The good client's p99 with the noisy client / without it, each phase kind's rounds
    pooled, and its detail (the two p99s, the ratio of each round); NaN if either is missing."""
    if not quiet or not loud:
        return math.nan, ""
    quiet_p99 = Latency.of([s for p in quiet for s in p.good_accepted_s]).p99_ms
    loud_p99 = Latency.of([s for p in loud for s in p.good_accepted_s]).p99_ms
    rounds = _each(
        n.good.latency.p99_ms / q.good.latency.p99_ms for q, n in zip(quiet, loud, strict=False)
    )
    return loud_p99 / quiet_p99, f"{loud_p99:.2f} ms vs {quiet_p99:.2f} ms; by round {rounds}"


def floor_ratio(phases: Sequence[Phase]) -> tuple[float, str]:
    """p99_ratio of the floor server's phases: what the flood does to a bare grpc.aio server."""
    quiet = [p for p in phases if p.server == FLOOR and p.name == "baseline"]
    loud = [p for p in phases if p.server == FLOOR and p.name == "noisy"]
    return p99_ratio(quiet, loud)


def _each(values: Iterable[float]) -> str:
    return " ".join(fmt(v, 2) for v in values)


def notes(plan: Plan, phases: Sequence[Phase]) -> list[str]:
    """What makes figures doubtful: a saturated load client, late sends, a busy machine."""
    found: list[str] = []
    for p in phases:
        if p.cpu.good_client_pct > SATURATED_PCT:
            found.append(f"{p.label}: the good client's process was saturated")
        if p.cpu.noisy_client_loop_pct > SATURATED_PCT:
            found.append(f"{p.label}: the noisy client's event loop was saturated")
        if p.noisy and p.noisy.offered_rate < OFFERED_GOAL * plan.noisy_rate:
            found.append(f"{p.label}: the noisy client offered less than it was to")
        if p.good.max_lag_ms > 5.0:
            found.append(
                f"{p.label}: a good Submit was sent {p.good.max_lag_ms:.1f} ms late "
                "(this process stalled: its latencies include the stall)"
            )
        if p.cpu.other_pct > 10.0:
            found.append(f"{p.label}: other programs used {p.cpu.other_pct:.0f}% of a core")
    return found


Row = tuple[str, ClientFigures]
# The table's columns: header, width, cell. The first two are left-aligned.
COLUMNS: list[tuple[str, int, Callable[[Row], str]]] = [
    ("phase", 19, lambda r: r[0]),
    ("client", 8, lambda r: r[1].client),
    ("target/s", 10, lambda r: fmt(r[1].target_rate, 1)),
    ("sent/s", 9, lambda r: fmt(r[1].offered_rate, 1)),
    ("ok/s", 8, lambda r: fmt(r[1].accepted_rate, 1)),
    ("rejected/s", 12, lambda r: fmt(r[1].rejected_rate, 1)),
    ("err", 5, lambda r: str(sum(r[1].errors.values()))),
    ("ok p50", 9, lambda r: fmt(r[1].latency.p50_ms, 2)),
    ("ok p99", 9, lambda r: fmt(r[1].latency.p99_ms, 2)),
    ("ok max", 9, lambda r: fmt(r[1].latency.max_ms, 2)),
    ("rej p50", 9, lambda r: fmt(r[1].rejected_latency.p50_ms, 2)),
    ("rej p99", 9, lambda r: fmt(r[1].rejected_latency.p99_ms, 2)),
    ("lag", 7, lambda r: fmt(r[1].max_lag_ms, 1)),
]
LEGEND = """\
  per second of the window, by send time; ok: accepted Submits and their latency (ms, from
  just before the call to the reply); rej: rejected (RESOURCE_EXHAUSTED) ones; lag: the
  worst send behind its schedule (ms)"""


def print_table(plan: Plan, env: Mapping[str, Any], phases: Sequence[Phase], failure: str) -> None:
    out = sys.stderr
    print(
        f"\ntaskring admission: a noisy client at {plan.noisy_factor:g}x its limit beside a "
        f"well-behaved one\n{env['cpus']} CPUs, Python {env['python']}, grpcio "
        f"{env['grpcio']}, uvloop {env['uvloop']}, tree {env['git']}\nlimits: noisy "
        f"{plan.noisy_limit:g}/s (burst {plan.noisy_burst}), good {plan.good_limit:g}/s "
        f"(burst {plan.good_burst}); good sends {plan.good_rate:g}/s; window "
        f"{plan.seconds:g} s after {plan.warmup_s:g} s of warm-up",
        file=out,
    )
    rows = [(p.label, c) for p in phases for c in (p.good, p.noisy) if c is not None]
    print(
        "".join(f"{h:{'<' if i < 2 else '>'}{w}}" for i, (h, w, _) in enumerate(COLUMNS)), file=out
    )
    for row in rows:
        cells = (f"{c(row):{'<' if i < 2 else '>'}{w}}" for i, (_, w, c) in enumerate(COLUMNS))
        print("".join(cells), file=out)
    print(LEGEND, file=out)
    for name, c in rows:
        for error, count in c.errors.items():
            print(f"  {name} {c.client}: {count} x {error}", file=out)
        if c.client == NOISY:
            print(
                f"  {name} noisy: {c.accepted_before} accepted before the window (burst "
                f"{plan.noisy_burst} + warm-up), {c.rejected_total} rejected in all",
                file=out,
            )
    print("CPU in the window, % of one core:", file=out)
    for p in phases:
        noisy = (
            f", noisy client {fmt(p.cpu.noisy_client_pct)} (loop "
            f"{fmt(p.cpu.noisy_client_loop_pct)})"
            if p.noisy
            else ""
        )
        print(
            f"  {p.label}: server {fmt(p.cpu.server_pct)} (loop {fmt(p.cpu.server_loop_pct)}), "
            f"good client {fmt(p.cpu.good_client_pct)}{noisy}, other {fmt(p.cpu.other_pct)}",
            file=out,
        )
    print(f"\n{'check':<32}{'value':>8}  {'goal':<11}{'result':<8}detail", file=out)
    for check in checks(plan, phases):
        mark = {True: "PASS", False: "MISS", None: "N/A"}[check.passed]
        value = fmt(check.value, 3)
        print(f"{check.name:<32}{value:>8}  {check.goal:<11}{mark:<8}{check.detail}", file=out)
    floor, detail = floor_ratio(phases)
    if math.isfinite(floor):
        print(
            f"{'floor: good p99 ratio':<32}{fmt(floor, 3):>8}  {'(none)':<11}{'':<8}{detail}\n"
            "  (taskring's admission alone on a bare grpc.aio server, under the same flood)",
            file=out,
        )
    for note in notes(plan, phases):
        print(f"note: {note}", file=out)
    if failure:
        print(f"\nRUN FAILED: {failure}", file=out)
    print(file=out, flush=True)


def summary_json(plan: Plan, env: Mapping[str, Any], phases: Sequence[Phase], failure: str) -> str:
    found = checks(plan, phases)
    data = {
        "bench": "taskring_admission",
        "plan": {**asdict(plan), "noisy_rate": plan.noisy_rate, "good_burst": plan.good_burst},
        "environment": env,
        # Each phase without its raw latencies (its summary is good.latency).
        "phases": [{k: v for k, v in asdict(p).items() if k != "good_accepted_s"} for p in phases],
        "checks": found,
        "floor_p99_ratio": floor_ratio(phases)[0],
        "notes": notes(plan, phases),
        "passed": not failure and all(c.passed for c in found),
        "failure": failure or None,
    }
    return json.dumps(jsonable(data), allow_nan=False)


def unexpected_errors(phases: Sequence[Phase]) -> int:
    return sum(sum(c.errors.values()) for p in phases for c in (p.good, p.noisy) if c)


def exit_status(plan: Plan, phases: Sequence[Phase], failure: str) -> int:
    if failure:
        return 2
    return 0 if all(c.passed for c in checks(plan, phases)) else 1


# --------------------------------------------------------------------------- main


async def measure(plan: Plan, workdir: Path, phases: list[Phase]) -> None:
    keys = {client: "trk_" + secrets.token_urlsafe(32) for client in (NOISY, GOOD)}
    config = workdir / "taskring.toml"
    config.write_text(config_toml(plan, keys))
    config.chmod(0o600)
    # In turns, so that the machine's drift over the run falls on both kinds alike.
    servers = (TASKRING, FLOOR) if plan.floor else (TASKRING,)
    for round_ in range(1, plan.rounds + 1):
        for server in servers:
            for name in ("baseline", "noisy"):
                log(f"{server} {name} phase, round {round_} of {plan.rounds} ...")
                phases.append(await run_phase(server, name, round_, plan, keys, workdir))


async def main_async(plan: Plan, workdir: Path, phases: list[Phase], max_seconds: float) -> str:
    """Runs the phases within the budget; returns why the run failed ("" if it did not),
    after every child has been stopped."""
    if failure := await bounded_run(measure(plan, workdir, phases), max_seconds):
        return failure
    if errors := unexpected_errors(phases):
        return f"{errors} Submits failed with an unexpected error (see the table)"
    return ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--noisy-rate-limit", type=float, default=50.0, help="the noisy client's limit, per s"
    )
    p.add_argument(
        "--noisy-burst", type=int, default=0, help="its bucket's size; 0: one second's worth"
    )
    p.add_argument(
        "--noisy-factor", type=float, default=20.0, help="it offers this many times its limit"
    )
    p.add_argument("--noisy-channels", type=int, default=4, help="its connections")
    p.add_argument("--good-rate", type=float, default=50.0, help="the good client's Submits/s")
    p.add_argument(
        "--good-rate-limit", type=float, default=200.0, help="the good client's own limit, per s"
    )
    p.add_argument("--seconds", type=float, default=15.0, help="the recorded window, per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before it")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each phase, wait up to this long for an idle machine",
    )
    p.add_argument(
        "--quiet-pct", type=float, default=15.0, help="idle: busy CPU below this %% of one core"
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="baseline and noisy phases, taken in turns (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the floor server's phases (bench/floor_server.py)",
    )
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound on the whole run")
    p.add_argument("--json-out", help="also write the JSON summary to this file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: --seconds 3 --warmup 1 --quiet-wait 2, one round",
    )
    # The noisy client's own process: the server's address (its key comes in NOISY_KEY_ENV).
    p.add_argument("--noisy-child", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.quiet_wait = 3.0, 1.0, 2.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.noisy_burst == 0:
        args.noisy_burst = max(1, round(args.noisy_rate_limit))
    if min(args.noisy_rate_limit, args.good_rate, args.seconds) <= 0 or args.noisy_burst < 1:
        p.error("the rates, --seconds and --noisy-burst must be positive")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.noisy_factor <= 1 or args.noisy_channels < 1:
        p.error("--noisy-factor must be above 1 and --noisy-channels at least 1")
    if args.good_rate >= args.good_rate_limit:
        p.error("--good-rate must be below --good-rate-limit: the good client keeps its limit")
    # At 20x the limit the burst is gone in burst / (offered - limit) s; half a second
    # more lets the connections and the server settle.
    drain_s = args.noisy_burst / (args.noisy_rate_limit * (args.noisy_factor - 1))
    if args.warmup < drain_s + 0.5:
        p.error(f"--warmup must be at least {drain_s + 0.5:.2f} s: the burst's drain + 0.5 s")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    return Plan(
        noisy_limit=args.noisy_rate_limit,
        noisy_burst=args.noisy_burst,
        noisy_factor=args.noisy_factor,
        noisy_channels=args.noisy_channels,
        good_rate=args.good_rate,
        good_limit=args.good_rate_limit,
        warmup_s=args.warmup,
        seconds=args.seconds,
        quiet_wait_s=args.quiet_wait,
        quiet_pct=args.quiet_pct,
        rounds=args.rounds,
        floor=args.floor,
    )


def child_main(address: str, plan: Plan) -> int:
    """The noisy client's process: its figures as one JSON line on stdout."""
    import uvloop

    key = os.environ.get(NOISY_KEY_ENV)
    if not key:
        log(f"{NOISY_KEY_ENV} is not set")
        return 2
    figures = uvloop.run(noisy_child_main(address, plan, key))
    print(json.dumps(asdict(figures)), flush=True)  # NaN included: read by from_json
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_of(args)
    if args.noisy_child:
        return child_main(args.noisy_child, plan)
    env = environment()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="taskring-admission-") as tmp:
        import uvloop

        failure = uvloop.run(main_async(plan, Path(tmp), phases, args.max_seconds))
    print_table(plan, env, phases, failure)
    line = summary_json(plan, env, phases, failure)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line, flush=True)
    return exit_status(plan, phases, failure)


if __name__ == "__main__":
    sys.exit(main())
