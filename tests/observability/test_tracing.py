"""Traces: one task is one connected trace, from the client's traceparent through the
router's Submit, dispatch and attempt spans to a remote executor's Execute span and a
provider's HTTP request; off unless the OTEL_* variables turn it on."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import SpanKind, StatusCode

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from server.backends.base import BackendError, BackendEvent, Completed
from server.backends.local import LocalModelSettings, builtin_handlers
from server.backends.remote import RemoteBackend
from server.config import ExecutorSettings, Settings
from server.config_file import read_file_config
from server.executor.app import ExecutorApp
from server.model.task import CustomOutput, Task
from server.observability import tracing
from server.observability.follow_sampler import FollowHeadSampling
from tests.api.test_dispatch import custom_spec
from tests.conftest import (
    FAST_RETRY,
    ServerProcess,
    chat_spec,
    make_settings,
    spawn_executor,
    spawn_server,
    wait_terminal,
)
from tests.fakes import FakeAnthropic, FakeOpenAI

from .otlp_receiver import OtlpReceiver

SUBMIT = "taskring.v1.TaskService/Submit"
EXECUTE = "taskring.v1.ExecutorService/Execute"
SECRET = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"


def traced(
    service: str, sampler: Sampler | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider of one process (by its service name) that keeps its spans in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({SERVICE_NAME: service}), sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def client_traceparent() -> tuple[str, str, tuple[tuple[str, str]]]:
    """A caller's trace: (trace id, span id, metadata carrying them)."""
    rng = random.Random(6)
    trace_id, span_id = f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(64):016x}"
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def ids(span: ReadableSpan) -> tuple[str, str, str]:
    """(trace id, span id, parent span id or "") in hex."""
    context = span.context
    assert context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", parent


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def by_attempt(spans: Sequence[ReadableSpan]) -> dict[object, ReadableSpan]:
    return {(s.attributes or {}).get("taskring.attempt"): s for s in spans}


async def flaky(task: Task) -> AsyncIterator[BackendEvent]:
    """Fails its first attempt (retryable), succeeds on the next."""
    if task.attempt < 2:
        raise BackendError("BACKEND_UNAVAILABLE", "try again", retryable=True)
    yield Completed(CustomOutput({"attempt": task.attempt}))


async def test_a_task_on_a_remote_executor_is_one_trace_across_router_and_executor(
    tmp_path: Path,
) -> None:
    """Router and executor each export their own spans (two providers, as two processes
    would have): both sides of a retried task share the client's trace id, every dispatch
    and attempt span is a child of Submit's, and each Execute span is the child of its own
    attempt's span, received over the wire (a remote parent), not through shared memory."""
    router_provider, router_exporter = traced(tracing.ROUTER_SERVICE)
    executor_provider, executor_exporter = traced(tracing.EXECUTOR_SERVICE)
    executor = ExecutorApp(
        ExecutorSettings(listen="127.0.0.1:0", shutdown_grace_s=0.1, metrics_listen=""),
        handlers={**builtin_handlers(LocalModelSettings(token_delay_s=0)), "flaky": flaky},
        tracer_provider=executor_provider,
    )
    await executor.start()
    member = RemoteBackend(
        "remote-1", address=executor.address, max_concurrency=8, task_types=frozenset({"flaky"})
    )
    app = App(
        make_settings(tmp_path / "tasks.db"),
        backends={"remote-1": member},
        dispatch=FAST_RETRY,
        tracer_provider=router_provider,
    )
    await app.start()
    trace_id, client_span, metadata = client_traceparent()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            submitted = await stub.Submit(
                pb.SubmitRequest(task=custom_spec("flaky")), metadata=metadata
            )
            final = await wait_terminal(stub, submitted.task.id)
    finally:
        # Stopped before reading: every span (the last Execute's too) has ended then.
        await app.stop()
        await executor.stop()
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert final.attempt == 2
    router_spans = router_exporter.get_finished_spans()
    executor_spans = executor_exporter.get_finished_spans()

    [submit] = named(router_spans, SUBMIT)
    assert submit.kind is SpanKind.SERVER
    assert ids(submit)[0] == trace_id
    assert ids(submit)[2] == client_span, "a child of the client's span"
    assert submit.parent is not None
    assert submit.parent.is_remote
    assert (submit.attributes or {})["taskring.task.id"] == final.id

    dispatches = by_attempt(named(router_spans, "taskring.dispatch"))
    attempts = by_attempt(named(router_spans, "taskring.attempt"))
    assert set(attempts) == {1, 2}
    # The retry waited in the queue for its backoff; the first attempt may have started
    # at Submit, without a wait (and then without a dispatch span).
    assert 2 in dispatches
    assert set(dispatches) <= {1, 2}
    for span in [*dispatches.values(), *attempts.values()]:
        assert ids(span)[0] == trace_id
        assert ids(span)[2] == ids(submit)[1], f"{span.name} is a child of Submit"
        attributes = span.attributes or {}
        assert attributes["taskring.task.id"] == final.id
        assert attributes["taskring.task.type"] == "flaky"
        assert attributes["taskring.backend"] == "remote-1"
    first, second = (attempts[1].attributes or {}), (attempts[2].attributes or {})
    assert first["taskring.outcome"] == "requeued"
    assert first["taskring.error.code"] == "BACKEND_UNAVAILABLE"
    assert attempts[1].status.status_code is StatusCode.ERROR
    assert second["taskring.outcome"] == "succeeded"
    assert "taskring.error.code" not in second
    assert dispatches[2].start_time is not None
    assert dispatches[2].end_time is not None
    assert attempts[1].end_time is not None
    assert dispatches[2].start_time >= attempts[1].end_time - 1_000_000, "the wait after it"

    assert not named(router_spans, EXECUTE), "the executor's spans are its own"
    assert not named(executor_spans, "taskring.attempt")
    executes = by_attempt(named(executor_spans, EXECUTE))
    assert set(executes) == {1, 2}
    for number, execute in executes.items():
        assert execute.kind is SpanKind.SERVER
        assert execute.resource.attributes[SERVICE_NAME] == tracing.EXECUTOR_SERVICE
        assert execute.parent is not None
        assert execute.parent.is_remote, "extracted from the call's metadata"
        assert ids(execute)[0] == trace_id
        assert ids(execute)[2] == ids(attempts[number])[1], "a child of its attempt's span"
    assert (executes[1].attributes or {})["taskring.error.code"] == "BACKEND_UNAVAILABLE"


@pytest.mark.slow
async def test_router_and_executor_processes_export_one_trace_over_otlp(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """The real commands, configured only by OTEL_EXPORTER_OTLP_ENDPOINT, send their spans
    over OTLP/HTTP; the router's and the executor's spans of one task form one trace."""
    async with OtlpReceiver() as receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        # Started in threads: the receiver answers on this loop meanwhile.
        executor = await asyncio.to_thread(lambda: spawn_executor(**otel))
        server_processes.append(executor)
        config = tmp_path / "taskring.toml"
        config.write_text(f"""
[[backends]]
name = "executor-1"
kind = "remote"
address = "{executor.address}"
task_types = ["chat"]
""")
        router = await asyncio.to_thread(
            lambda: spawn_server(tmp_path / "tasks.db", TASKRING_CONFIG=str(config), **otel)
        )
        server_processes.append(router)
        trace_id, client_span, metadata = client_traceparent()
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            request = pb.SubmitRequest(task=chat_spec("hello"))
            task = (await stub.Submit(request, metadata=metadata)).task
            final = await wait_terminal(stub, task.id)
        assert final.state == pb.TASK_STATE_SUCCEEDED
        # Stopped before reading, in threads: each sends its last spans as it exits.
        assert await asyncio.to_thread(router.terminate) == 0
        assert await asyncio.to_thread(executor.terminate) == 0
    [submit] = receiver.named(SUBMIT, tracing.ROUTER_SERVICE)
    [attempt] = receiver.named("taskring.attempt", tracing.ROUTER_SERVICE)
    [execute] = receiver.named(EXECUTE, tracing.EXECUTOR_SERVICE)
    assert submit.trace_id == attempt.trace_id == execute.trace_id == trace_id
    assert submit.parent_span_id == client_span
    assert attempt.parent_span_id == submit.span_id
    assert execute.parent_span_id == attempt.span_id
    assert execute.attributes["taskring.task.id"] == attempt.attributes["taskring.task.id"]
    assert attempt.attributes["taskring.outcome"] == "succeeded"


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic]]:
    async with FakeOpenAI() as openai, FakeAnthropic() as anthropic:
        yield openai, anthropic


def provider_settings(
    tmp_path: Path, openai: FakeOpenAI, anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """An OpenAI and an Anthropic member against the fakes (their keys from the env)."""
    monkeypatch.setenv("TEST_PROVIDER_KEY", SECRET)
    path = tmp_path / "taskring.toml"
    path.write_text(f"""
[[backends]]
name = "vllm"
kind = "openai"
base_url = "{openai.base_url}"
api_key_env = "TEST_PROVIDER_KEY"
task_types = ["chat"]

[[backends]]
name = "claude"
kind = "anthropic"
base_url = "{anthropic.base_url}"
api_key_env = "TEST_PROVIDER_KEY"
""")
    file, problems = read_file_config(path)
    assert problems == []
    base = make_settings(tmp_path / "tasks.db")
    return Settings(base.server, base.store, base.local, base.tasks, file)


def chat(i: int) -> pb.SubmitRequest:
    message = pb.ChatMessage(role="user", content=f"question {i}")
    return pb.SubmitRequest(
        task=pb.TaskSpec(
            chat=pb.ChatInput(model="fake-model", messages=[message]), routing_key=f"k{i}"
        )
    )


async def test_provider_requests_carry_the_attempts_traceparent(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    """Each HTTP request to OpenAI and to Anthropic carries a `traceparent` naming the
    task's trace and its attempt's span as the parent."""
    openai, anthropic = fakes
    provider, exporter = traced(tracing.ROUTER_SERVICE)
    app = App(
        provider_settings(tmp_path, openai, anthropic, monkeypatch),
        dispatch=FAST_RETRY,
        tracer_provider=provider,
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            i = 0
            # Routing keys spread tasks over both members; enough to reach each.
            while not (openai.requests and anthropic.requests) and i < 40:
                task = (await stub.Submit(chat(i))).task
                final = await wait_terminal(stub, task.id)
                assert final.state == pb.TASK_STATE_SUCCEEDED, final.error
                i += 1
    finally:
        await app.stop()
    attempts = {ids(s)[1]: s for s in named(exporter.get_finished_spans(), "taskring.attempt")}
    for fake, member in ((openai, "vllm"), (anthropic, "claude")):
        assert fake.requests, f"{member} got no task"
        for request in fake.requests:
            version, trace_id, parent_id, flags = request.headers["traceparent"].split("-")
            assert version == "00"
            assert int(flags, 16) & 1, "sampled"
            attempt = attempts[parent_id]  # the attempt's span is the request's parent
            assert ids(attempt)[0] == trace_id
            assert (attempt.attributes or {})["taskring.backend"] == member


async def test_tracing_is_off_by_default(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    """Without a tracer provider (none installed, none passed) there is no tracer, and no
    request carries a trace context, even when the client sent one."""
    assert tracing.tracing_for(None) is None
    openai, anthropic = fakes
    app = App(provider_settings(tmp_path, openai, anthropic, monkeypatch), dispatch=FAST_RETRY)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            _, _, metadata = client_traceparent()
            task = (await stub.Submit(chat(0), metadata=metadata)).task
            await wait_terminal(stub, task.id)
    finally:
        await app.stop()
    requests = openai.requests + anthropic.requests
    assert len(requests) == 1
    assert "traceparent" not in requests[0].headers


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["OTLPSpanExporter"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["OTLPSpanExporter"]),
        (
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
            None,
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["OTLPSpanExporter", "ConsoleSpanExporter"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_the_otel_variables_choose_the_exporters(
    environ: dict[str, str], exporters: list[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off unless asked; OTLP when an endpoint is set; OTEL_TRACES_EXPORTER decides."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = tracing.provider_from_env(environ, tracing.EXECUTOR_SERVICE)
    if exporters is None:
        assert provider is None
        return
    assert provider is not None
    try:
        processors = provider._active_span_processor._span_processors
        assert [type(p.span_exporter).__name__ for p in processors] == exporters  # type: ignore[attr-defined]
        assert provider.resource.attributes[SERVICE_NAME] == tracing.EXECUTOR_SERVICE
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, tracing.HeadSampling(0.1, follow_parent=True)),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, tracing.HeadSampling(1.0, True)),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, tracing.HeadSampling(0.0, False)),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": ".25"},
            tracing.HeadSampling(0.25, True),
        ),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, tracing.HeadSampling(1.0, False)),
    ],
)
def test_otel_traces_sampler_sets_the_head_sampling(
    environ: dict[str, str], expected: tracing.HeadSampling
) -> None:
    """Unset: 1 new trace in 10 kept (Submit's cost), callers' sampled traces followed."""
    assert tracing.head_sampling_from_env(environ) == expected


def test_the_head_keeps_new_traces_at_its_ratio_and_follows_callers() -> None:
    head = tracing.HeadSampling(0.1)
    kept = sum(head.keeps(None) for _ in range(10_000))
    assert 850 <= kept <= 1150  # 1,000 expected; 5 standard deviations either side
    _, _, sampled = client_traceparent()
    not_sampled = ((sampled[0][0], sampled[0][1][:-2] + "00"),)
    assert head.keeps(tracing.incoming_context(sampled))
    assert not head.keeps(tracing.incoming_context(not_sampled))
    assert not tracing.HeadSampling(0.0, follow_parent=False).keeps(
        tracing.incoming_context(sampled)
    )


def test_the_sdk_keeps_only_spans_of_kept_traces() -> None:
    """A library's span outside any task (the Anthropic SDK makes one per call) starts no
    trace of its own; under a kept RPC's span it joins that trace."""
    provider, exporter = traced(tracing.ROUTER_SERVICE, FollowHeadSampling())
    tracer = provider.get_tracer("some.library")
    tracer.start_span("outside a task").end()
    kept = otel_context.set_value(tracing.KEPT, True)
    with tracer.start_as_current_span("a kept RPC", context=kept):
        tracer.start_span("inside it").end()
    assert [span.name for span in exporter.get_finished_spans()] == ["inside it", "a kept RPC"]


@pytest.mark.parametrize(
    ("environ", "named_variable"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ],
)
def test_unsupported_samplers_are_refused_by_name(
    environ: dict[str, str], named_variable: str
) -> None:
    with pytest.raises(tracing.TracingConfigError, match=named_variable):
        tracing.provider_from_env({"OTEL_TRACES_EXPORTER": "console", **environ}, "r")


async def test_a_task_whose_trace_is_not_kept_has_no_spans_and_sends_no_traceparent(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    """With no new trace kept, a task runs as if untraced: no span in the router, no
    traceparent to the provider; a caller's sampled trace is still followed."""
    openai, anthropic = fakes
    provider, exporter = traced(tracing.ROUTER_SERVICE)
    app = App(
        provider_settings(tmp_path, openai, anthropic, monkeypatch),
        dispatch=FAST_RETRY,
        tracer_provider=provider,
        sampling=tracing.HeadSampling(0.0),
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            untraced = (await stub.Submit(chat(0))).task
            await wait_terminal(stub, untraced.id)
            assert exporter.get_finished_spans() == ()
            trace_id, _, metadata = client_traceparent()
            followed = (await stub.Submit(chat(0), metadata=metadata)).task
            await wait_terminal(stub, followed.id)
    finally:
        await app.stop()
    requests = openai.requests + anthropic.requests
    assert len(requests) == 2
    assert "traceparent" not in requests[0].headers
    assert requests[1].headers["traceparent"].split("-")[1] == trace_id
    [submit] = named(exporter.get_finished_spans(), SUBMIT)
    assert ids(submit)[0] == trace_id


def test_otel_service_name_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-eu-1")
    provider = tracing.provider_from_env({"OTEL_TRACES_EXPORTER": "console"}, "taskring-router")
    assert provider is not None
    try:
        assert provider.resource.attributes[SERVICE_NAME] == "router-eu-1"
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("environ", "named_variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_unsupported_otel_settings_are_refused_by_name(
    environ: dict[str, str], named_variable: str
) -> None:
    with pytest.raises(tracing.TracingConfigError, match=named_variable):
        tracing.provider_from_env(environ, "taskring-router")


async def test_health_checks_are_not_traced(tmp_path: Path) -> None:
    """Probes every few seconds would bury the traces that matter."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    provider, exporter = traced(tracing.ROUTER_SERVICE)
    app = App(make_settings(tmp_path / "tasks.db"), tracer_provider=provider)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(service=""))
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Get(pb.GetRequest(task_id="missing"))
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await app.stop()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["taskring.v1.TaskService/Get"]
    [get] = spans
    attributes = get.attributes or {}
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert get.status.status_code is StatusCode.UNSET, "NOT_FOUND is the caller's error"
