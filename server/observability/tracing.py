"""Traces: OpenTelemetry spans of each RPC, each task's dispatch and each attempt, and the W3C
trace context (`traceparent`) carried to remote executors and providers, so that one task
is one connected trace:

    taskring.v1.TaskService/Submit          SERVER, router (child of the client's traceparent)
    ├── taskring.dispatch                   the queue wait before the attempt (if it waited)
    ├── taskring.attempt                    task id, type, backend, attempt, outcome, error code
    │   ├── taskring.v1.ExecutorService/Execute   SERVER, remote executor (gRPC metadata)
    │   └── the provider's HTTP request     `traceparent` header (Anthropic's SDK adds a span)
    ├── taskring.dispatch                   a retry's backoff and queue wait
    └── taskring.attempt                    the retry, on another member

Off unless the standard OTEL_* variables ask for an exporter (`configure`). Off means no
tracer: no interceptor is installed, and the router's hot path pays an `is None` test per
task and a context lookup per outgoing call.

Sampling is decided once per trace, at the RPC, before any span exists (`HeadSampling`): a
task whose trace is not kept runs with no span and no context at all, as if tracing were
off. (The SDK's own sampler runs after it has built a span's ids and, when dropping, still
makes a non-recording span per RPC and per attempt: ~13 us of the event loop per task,
about 6% of Submit throughput.) The SDK's sampler then only follows (`FollowHeadSampling`):
children of kept spans are kept, any other new root (a library's span outside a task) is
dropped. Executors start no trace of their own: they trace the calls a router traces.

A queued task's parent span lives in memory only (`TaskSpans`), never in the store: a task
recovered after a restart, or claimed after its entry was evicted, starts a new trace.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from server.model.task import Task, TaskState

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

TRACER_NAME = "taskring"
ROUTER_SERVICE = "taskring-router"
EXECUTOR_SERVICE = "taskring-executor"

# Probes call these every few seconds and the router watches each executor's health for as
# long as it runs: spans of them would be noise, and long-lived ones at that.
UNTRACED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Server codes that are the server's failure, not the caller's (OpenTelemetry's gRPC
# conventions): only these mark a SERVER span as an error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


# Head sampling when OTEL_TRACES_SAMPLER is unset (the SDK's own default keeps every trace):
# the share of new traces (those without a sampled parent) kept. A kept task costs the
# router ~90 us more of its event loop (its Submit and attempt spans, created and then
# encoded for OTLP in this process), which on the 2-core VM took 25-30% of Submit
# throughput at 1 in 1 and was within noise at 1 in 10 (bench/submit.py). A caller that
# sends a sampled traceparent is always traced; OTEL_TRACES_SAMPLER=parentbased_always_on
# traces every task.
DEFAULT_SAMPLE_RATIO = 0.1

# OTEL_TRACES_SAMPLER values taskring's head sampling understands: (ratio of new traces
# kept, or None for OTEL_TRACES_SAMPLER_ARG's; whether a caller's sampled flag decides).
_SAMPLERS: dict[str, tuple[float | None, bool]] = {
    "always_on": (1.0, False),
    "always_off": (0.0, False),
    "traceidratio": (None, False),
    "parentbased_always_on": (1.0, True),
    "parentbased_always_off": (0.0, True),
    "parentbased_traceidratio": (None, True),
}
_TRACE_ID_LOW_BITS = (1 << 64) - 1


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something taskring cannot do; names the variable."""


# -- sampling --------------------------------------------------------------------------------

# Set in the context a kept root span starts in: tells `FollowHeadSampling` the head decided.
KEPT = otel_context.create_key("taskring.head-sampling.kept")


@dataclass(frozen=True, slots=True)
class HeadSampling:
    """Whether an RPC's trace is kept, decided before any span is made. `ratio`: the share
    of new traces kept (and of callers' traces when `follow_parent` is false); with
    `follow_parent`, a caller's traceparent decides by its sampled flag."""

    ratio: float = 1.0
    follow_parent: bool = True

    def keeps(self, parent: Context | None) -> bool:
        if parent is not None:
            caller = trace.get_current_span(parent).get_span_context()
            if caller.is_valid:
                if self.follow_parent:
                    return caller.trace_flags.sampled
                # The SDK's TraceIdRatioBased rule: the same answer for the whole trace.
                return (caller.trace_id & _TRACE_ID_LOW_BITS) < self.ratio * (1 << 64)
        return self.ratio >= 1.0 or random.random() < self.ratio

    def starts_no_trace(self) -> HeadSampling:
        """The same, but new traces are never kept: an executor's, which traces only the
        calls a router traced (its Execute spans would otherwise be orphan roots)."""
        return HeadSampling(0.0, self.follow_parent)


def head_sampling_from_env(environ: Mapping[str, str]) -> HeadSampling:
    """OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG as taskring's head sampling; 1 new
    trace in 10, following callers, when unset."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return HeadSampling(DEFAULT_SAMPLE_RATIO)
    if name not in _SAMPLERS:
        raise TracingConfigError(
            f"OTEL_TRACES_SAMPLER={name!r}: taskring samples with one of {', '.join(_SAMPLERS)}"
        )
    ratio, follow_parent = _SAMPLERS[name]
    if ratio is None:
        raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={raw!r}: the share of traces kept, from 0 to 1"
            )
    return HeadSampling(ratio, follow_parent)


@dataclass(frozen=True, slots=True)
class Tracing:
    """What a process traces with: its tracer and its head sampling."""

    tracer: Tracer
    head: HeadSampling


# -- set-up --------------------------------------------------------------------------------


def provider_from_env(environ: Mapping[str, str], service_name: str) -> SdkTracerProvider | None:
    """The tracer provider the OTEL_* variables ask for, or None when tracing is off.

    On when OTEL_TRACES_EXPORTER names `otlp` or `console`, or (unset) when an OTLP endpoint
    is (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); off for `none`
    and OTEL_SDK_DISABLED=true. Sampling is `head_sampling_from_env`'s; the SDK reads the
    rest itself: endpoint, headers, timeout, OTEL_BSP_*, OTEL_SERVICE_NAME (else
    `service_name`) and OTEL_RESOURCE_ATTRIBUTES."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        raw = "otlp" if any(environ.get(name, "").strip() for name in endpoints) else "none"
    names = {name.strip() for name in raw.split(",") if name.strip()} - {"none"}
    if not names:
        return None
    if unknown := names - {"otlp", "console"}:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={raw!r}: taskring exports to otlp, console or none,"
            f" not {', '.join(sorted(unknown))}"
        )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if "otlp" in names and protocol != "http/protobuf":
        raise TracingConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: taskring sends OTLP over HTTP"
            " (http/protobuf, a collector's port 4318), not gRPC"
        )
    # Imported only when tracing is on: the SDK and the exporter cost start-up time that
    # processes without an exporter need not pay.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    from .follow_sampler import FollowHeadSampling

    # Resource.create lets its argument override OTEL_SERVICE_NAME: ours only fills a gap.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    head_sampling_from_env(environ)  # refuses a sampler taskring cannot follow, by name
    provider = SdkTracerProvider(resource=resource, sampler=FollowHeadSampling())
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in names:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


# The head sampling `configure` read with the global provider (one per process, as it is).
_configured_head = HeadSampling()


def configure(environ: Mapping[str, str], service_name: str) -> SdkTracerProvider | None:
    """Installs the OTEL_* provider as the process's global one (which `tracing_for` and
    the Anthropic SDK pick up); the caller shuts it down at exit, which sends what is left."""
    global _configured_head  # noqa: PLW0603 - set once at start-up, beside the global provider
    provider = provider_from_env(environ, service_name)
    if provider is not None:
        _configured_head = head_sampling_from_env(environ)
        trace.set_tracer_provider(provider)
    return provider


def tracing_for(
    provider: TracerProvider | None = None, head: HeadSampling | None = None
) -> Tracing | None:
    """How taskring traces: with `provider` (tests pass their own; every trace kept unless
    `head` says otherwise), else with the global provider and sampling `configure`
    installed; None when tracing is off."""
    if provider is None:
        provider = trace.get_tracer_provider()
        # The API's stand-ins until a real provider is installed: tracing is off.
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        head = head or _configured_head
    return Tracing(provider.get_tracer(TRACER_NAME), head or HeadSampling())


# -- propagation ---------------------------------------------------------------------------


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current trace context as gRPC metadata for an outgoing call; None without one."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None  # tracing off: no dict, no propagator
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def outgoing_headers() -> dict[str, str] | None:
    """The current trace context as HTTP headers (`traceparent`); None without one."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


class _MetadataGetter(Getter[Collection[tuple[str, Any]]]):
    """Reads propagation fields from gRPC metadata (a sequence of key, value pairs)."""

    def get(self, carrier: Collection[tuple[str, Any]], key: str) -> list[str] | None:
        values = [str(v) for k, v in carrier if k == key]
        return values or None

    def keys(self, carrier: Collection[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_METADATA = _MetadataGetter()


def incoming_context(metadata: Collection[tuple[str, Any]] | None) -> Context | None:
    """The caller's trace context from an RPC's metadata; None when it sent none."""
    if not metadata or not any(key == "traceparent" for key, _ in metadata):
        return None  # a root span; skips the propagators for the common case
    return propagate.extract(metadata, getter=_METADATA)


# -- RPC spans -----------------------------------------------------------------------------

_RpcContext = grpc.aio.ServicerContext[Any, Any]
# A string: grpc.RpcMethodHandler is generic in its stubs only.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class ServerTracing(grpc.aio.ServerInterceptor):
    """A SERVER span around each unary and server-streaming RPC whose trace the head
    sampling keeps, child of the caller's `traceparent`, current while the handler runs (so
    the handler's own spans, and the contexts it passes on, are children). An RPC not kept
    runs as it would untraced. Health checks and reflection are not traced."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracer = tracing.tracer
        self._head = tracing.head
        # Wrapped handlers by method: the wrapping is done once per method, not per call.
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNTRACED_SERVICES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        name = method.lstrip("/")
        service, _, rpc = name.rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        unary, stream = handler.unary_unary, handler.unary_stream
        if unary is not None and inspect.iscoroutinefunction(unary):
            behaviour = cast("Callable[[Any, _RpcContext], Awaitable[Any]]", unary)

            async def traced_unary(request: Any, context: _RpcContext) -> Any:
                parent = self._kept(context)
                if parent is None:
                    return await behaviour(request, context)
                with self._span(name, attributes, parent, context) as span:
                    result = await behaviour(request, context)
                    _set_code(span, context, None)
                    return result

            return grpc.unary_unary_rpc_method_handler(
                traced_unary, handler.request_deserializer, handler.response_serializer
            )
        if stream is not None and inspect.isasyncgenfunction(stream):
            generator = cast("Callable[[Any, _RpcContext], AsyncIterator[Any]]", stream)

            async def traced_stream(request: Any, context: _RpcContext) -> AsyncIterator[Any]:
                parent = self._kept(context)
                if parent is None:
                    async for response in generator(request, context):
                        yield response
                    return
                with self._span(name, attributes, parent, context) as span:
                    async for response in generator(request, context):
                        yield response
                    _set_code(span, context, None)

            return grpc.unary_stream_rpc_method_handler(
                traced_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # client streaming, or a handler written another way: as it is

    def _kept(self, context: _RpcContext) -> Context | None:
        """The context the RPC's span starts in (the caller's, marked kept), or None when
        the head sampling does not keep this trace."""
        caller = incoming_context(context.invocation_metadata())
        if not self._head.keeps(caller):
            return None
        return otel_context.set_value(KEPT, True, caller)

    @contextlib.contextmanager
    def _span(
        self, name: str, attributes: dict[str, str], parent: Context, context: _RpcContext
    ) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                _set_code(span, context, exc)
                raise


def _set_code(span: Span, context: _RpcContext, exc: BaseException | None) -> None:
    """The RPC's status code on its span: an abort's code, UNKNOWN for a bug's exception,
    CANCELLED when the caller went away."""
    if not span.is_recording():
        return
    code: Any  # grpc.aio gives a StatusCode, its int at times, or None before any is set
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        if code is None:
            code = grpc.StatusCode.OK
    elif not isinstance(exc, Exception):
        code = grpc.StatusCode.CANCELLED  # CancelledError, GeneratorExit: the call ended
    else:
        code = grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):  # grpc.aio gives the code's int at times
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code.name))


# -- task spans ----------------------------------------------------------------------------


class TaskSpans:
    """The router's spans of its tasks: a dispatch span for each wait (Submit or a requeue
    until the attempt starts) and an attempt span for each attempt, all children of the
    Submit span. Between Submit and the claim, a queued task's parent is held here, in
    memory, by task id; at most `max_waiting` of them (the oldest go first: a task cancelled
    while queued is never claimed, and its entry must not stay for ever)."""

    def __init__(self, tracer: Tracer, max_waiting: int = 100_000) -> None:
        self._tracer = tracer
        self._max_waiting = max_waiting
        # task id -> (the context its spans are children of, when its wait began in ns).
        # Only the event loop thread touches it.
        self._waiting: dict[str, tuple[Context, int]] = {}

    def queued(self, task_id: str, parent: Context | None = None) -> None:
        """`task_id` waits in the queue from now; its spans will be children of `parent`,
        by default the current span (Submit's, when called from Submit). Nothing happens
        when that span is not recorded (its trace was not kept)."""
        if parent is None:
            parent = _recorded_current()
            if parent is None:
                return
        if len(self._waiting) >= self._max_waiting:
            del self._waiting[next(iter(self._waiting))]
        self._waiting[task_id] = (parent, time.time_ns())

    def forget(self, task_id: str) -> None:
        """The task will not be claimed (it expired in the queue)."""
        self._waiting.pop(task_id, None)

    def dispatched(self, task: Task) -> Context | None:
        """Records the dispatch span of `task`, now started on `task.backend`, and returns
        the context its attempt span belongs in; None when its trace was not kept.

        A task started at Submit (it never waited: Submit's span is the current one) gets
        no dispatch span: it would last no time and tell nothing, and a span costs the
        router ~40 us of its event loop (creating it, then encoding it for export), 5% of
        a Submit's CPU."""
        waiting = self._waiting.pop(task.id, None)
        if waiting is None:
            return _recorded_current()
        parent, since = waiting
        span = self._tracer.start_span(
            "taskring.dispatch",
            context=parent,
            start_time=since,
            attributes=_task_attributes(task),
        )
        span.end()
        return parent

    @contextlib.contextmanager
    def attempt(self, task: Task, parent: Context) -> Iterator[Span]:
        """The attempt's span, current inside the block (the backend's outgoing calls carry
        it); `finished` adds how the attempt ended."""
        with self._tracer.start_as_current_span(
            "taskring.attempt", context=parent, attributes=_task_attributes(task)
        ) as span:
            yield span

    @staticmethod
    def finished(span: Span, task: Task) -> None:
        """How the attempt ended, from the task as the attempt last stored it."""
        outcome = _OUTCOMES.get(task.state, "unknown")
        span.set_attribute("taskring.outcome", outcome)
        if task.error is not None and task.state is not TaskState.SUCCEEDED:
            span.set_attribute("taskring.error.code", task.error.code)
            if task.state is not TaskState.CANCELLED:
                span.set_status(Status(StatusCode.ERROR, task.error.code))


def _recorded_current() -> Context | None:
    """The current context when its span is recorded (a kept trace's), else None."""
    if not trace.get_current_span().is_recording():
        return None
    return otel_context.get_current()


_OUTCOMES = {
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.CANCELLED: "cancelled",
    TaskState.QUEUED: "requeued",
    # Another writer (a Cancel, the deadline sweep) decided, or the final write failed.
    TaskState.RUNNING: "superseded",
}


def _task_attributes(task: Task) -> dict[str, str | int]:
    return {
        "taskring.task.id": task.id,
        "taskring.task.type": task.spec.type,
        "taskring.backend": task.backend,
        "taskring.attempt": task.attempt,
    }


def annotate_current(task: Task) -> None:
    """Adds the task to the current span (the executor's Execute span), if it records."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(_task_attributes(task))


def annotate_error(code: str) -> None:
    """Marks the current span (the executor's Execute span) failed with a task error code."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("taskring.error.code", code)
        span.set_status(Status(StatusCode.ERROR, code))
