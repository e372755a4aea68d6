"""The measured stages, in the order a run takes them: the bare gRPC echo, then Submit,
the e2e sweep and the fixed rate against one taskring server."""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from _console import BenchError, log
from _load import (
    Call,
    chat_request,
    closed_loop,
    open_channels,
    open_loop,
    raw_unary,
    submit_and_stream_call,
    submit_and_wait_call,
    unary_bytes_call,
    wait_until_idle,
)
from _procs import LOOPBACK, CpuSample, Server, server_child, wait_for_quiet
from _profile import Profiler
from _results import LoadResult, RateResult, Report
from _stats import Latency

from client._proto.taskring.v1 import tasks_pb2

ECHO_SERVER = Path(__file__).with_name("echo_server.py")
OTLP_SINK = Path(__file__).with_name("_otlp_sink.py")
OTLP_SINK_READY = "otlp-sink listening on"
ECHO_METHOD = "/bench.Echo/Echo"
SUBMIT_METHOD = "/taskring.v1.TaskService/Submit"


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
    # How the e2e and rate stages submit and wait: "submit-stream" (a Submit, then a
    # Stream of the task) or "submit-and-stream" (one SubmitAndStream call).
    e2e_call: str = "submit-stream"


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
            setting = f"C={settings.unary_concurrency} ch={count}"
            load = submit_load(settings, channels)
            settle = functools.partial(wait_until_idle, channels[0])
            async with profiler.record(srv.pid, f"submit-ch{count}"):
                result = await measure_closed("Submit", setting, srv, load, quiet, settle)
            report.submit.append(result)
            # The submitted tasks still run after the load: not on the next stage's time.
            await wait_until_idle(channels[0])


def submit_load(settings: LoadSettings, channels: Sequence[grpc.aio.Channel]) -> Load:
    """Submit called exactly as the echo is: the same client code, bytes in and out."""
    call = unary_bytes_call(channels, SUBMIT_METHOD, chat_request().SerializeToString())
    return Load(call, settings.unary_n, settings.unary_concurrency, settings.warmup_n)


def e2e_call(settings: LoadSettings, channels: Sequence[grpc.aio.Channel]) -> Call:
    """One task submitted and waited for to SUCCEEDED, the way settings.e2e_call says."""
    if settings.e2e_call == "submit-and-stream":
        return submit_and_stream_call(channels, chat_request())
    return submit_and_wait_call(channels, chat_request())


async def e2e_stage(
    settings: LoadSettings, srv: Server, profiler: Profiler, report: Report
) -> None:
    """Submit + Stream until SUCCEEDED, closed loop, for each concurrency of the sweep."""
    quiet = (settings.quiet_wait_s, settings.quiet_pct)
    async with open_channels(srv.address, settings.channel_counts[0]) as channels:
        call = e2e_call(settings, channels)
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
        call = e2e_call(settings, channels)
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


# What "observability off" and "on" mean for the Submit comparison: on is as deployed, with
# metrics served and traces exported over OTLP to a collector (the sink) at the default
# sampling; off turns both off.
OBSERVABILITY_OFF = {"TASKRING_METRICS_LISTEN": "off", "OTEL_SDK_DISABLED": "true"}


async def observability_stage(
    settings: LoadSettings, env: Mapping[str, str], workdir: Path, report: Report, rounds: int
) -> None:
    """Submit throughput without, then with, metrics and tracing: a fresh server each time,
    in turns (off, on, off, on...) so the machine's drift falls on both alike."""
    sink_argv = [sys.executable, str(OTLP_SINK)]
    quiet = (settings.quiet_wait_s, settings.quiet_pct)
    async with server_child(
        "otlp-sink", sink_argv, None, workdir / "sink.log", OTLP_SINK_READY
    ) as sink:
        observed = {
            "TASKRING_METRICS_LISTEN": f"{LOOPBACK}:0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.address,
        }
        for round_ in range(rounds):
            for mode, extra in (("off", OBSERVABILITY_OFF), ("on", observed)):
                server_env = {
                    k: v
                    for k, v in env.items()
                    if not k.startswith("OTEL_") and k != "TASKRING_METRICS_LISTEN"
                }
                server_env.update(extra)
                log_path = workdir / f"taskring-observability-{mode}-{round_}.log"
                argv = [sys.executable, "-m", "server"]
                async with (
                    server_child(
                        f"taskring (metrics+tracing {mode})",
                        argv,
                        server_env,
                        log_path,
                        "taskring listening on",
                    ) as srv,
                    open_channels(srv.address, 1) as channels,
                ):
                    load = submit_load(settings, channels)
                    settle = functools.partial(wait_until_idle, channels[0])
                    setting = f"{mode} C={settings.unary_concurrency} #{round_ + 1}"
                    result = await measure_closed("observ", setting, srv, load, quiet, settle)
                    report.observability.append(result)
                    await wait_until_idle(channels[0])
