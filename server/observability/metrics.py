"""Prometheus metrics: what a router (and each executor) exports on its own port.

Two kinds, so that the request path stays cheap:

- counters and the duration histogram change where things happen (an attempt's stored end
  in the dispatcher, a Submit's answer in the servicer), through label children bound once
  and kept in dicts: no label formatting per event;
- gauges are read at scrape time from the parts that already know them (the dispatcher's
  running attempts, the members' health and circuits, the hub's watchers, the store's
  queue), so keeping them costs the request path nothing.

    metric                            type       labels
    task_execution_duration_seconds   histogram  task_type, backend
    task_executions_success_total     counter    task_type, backend
    task_executions_failure_total     counter    task_type, backend, error
    task_executions_active            gauge      task_type, backend
    taskring_queue_depth              gauge      priority (low, normal, high, urgent)
    taskring_submit_requests_total    counter    task_type
    taskring_submit_rejections_total  counter    reason (a gRPC status code name; a limit's
                                                 RESOURCE_EXHAUSTED/rate, /type_rate,
                                                 /max_queued or /token_budget)
    taskring_stream_watchers          gauge      -
    taskring_backend_healthy          gauge      backend (1 healthy, 0 not)
    taskring_backend_circuit_state    gauge      backend (0 closed, 1 half-open, 2 open)
    taskring_ring_members             gauge      task_type
    taskring_provider_tokens_total    counter    model, direction (input, output)
    taskring_provider_cost_total      counter    model (USD)

An execution is one attempt: a task retried on another member counts a failure (its
error, e.g. BACKEND_UNAVAILABLE) and then a success. A cancelled attempt is a failure with
error CANCELLED. Every label has a bounded set of values: the task types the router runs,
ring member names, priorities, status code names; error codes and model names are chosen
by handlers and clients, so the first MAX_LABEL_VALUES of each are kept and the rest are
counted as "other". Never a task id or a client id.

The endpoint (MetricsEndpoint) is a minimal HTTP server on the event loop rather than
prometheus_client's threaded one: the gauges read structures that only the event loop's
thread may touch, and the queue depth is a store read that must be awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from server.dispatch.circuit import CircuitState
from server.model.errors import StoreError
from server.model.task import ChatInput, EmbedInput, Priority, Task, TaskInput, TaskState, Usage

if TYPE_CHECKING:
    from server.dispatch.members import MemberView

_log = logging.getLogger(__name__)

# 10 ms (a cached embedding) to 10 min (the default task deadline), about 2.5x apart.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
# Distinct error codes, and distinct model names, that get a label value of their own.
MAX_LABEL_VALUES = 50
OTHER = "other"
# The task type label of a Submit asking for a type the router does not run.
UNKNOWN_TYPE = "unknown"
# A scrape gives up on the store's queue count after this long (the gauge is then absent).
QUEUE_READ_TIMEOUT_S = 2.0


class Metrics:
    """What the router and the executor report as they work. This base records nothing:
    it is the default of parts built without metrics (unit tests, metrics turned off)."""

    def attempt_ended(self, task: Task, duration_s: float) -> None:
        """An attempt's end was stored: `task` as it ended (SUCCEEDED, FAILED, CANCELLED,
        or QUEUED again for a retry), `duration_s` since the attempt started."""

    def execution_ended(
        self, task_type: str, backend: str, duration_s: float, error: str | None
    ) -> None:
        """An execution ended: `error` is its TaskError code, None for a success."""

    def submit_accepted(self, task_type: str) -> None:
        """A Submit (or a task of a SubmitBatch) was answered OK: a new task, or the
        replay of an idempotency key."""

    def submit_rejected(self, task_type: str, reason: str) -> None:
        """A Submit (or a task of a SubmitBatch) was refused: `task_type` as asked,
        `reason` the status code's name, RESOURCE_EXHAUSTED/<limit> for a limit (see
        RateLimitedError)."""


NO_METRICS = Metrics()


@dataclass(frozen=True, slots=True)
class Sources:
    """What a scrape reads from the running process; None for a part it does not have
    (an executor has no members, hub or store)."""

    # Attempts running now, by (task type, backend).
    active: Callable[[], Mapping[tuple[str, str], int]]
    members: Callable[[], Sequence[MemberView]] | None = None
    watchers: Callable[[], int] | None = None
    # QUEUED tasks by priority: a store read, awaited before each scrape.
    queue_depth: Callable[[], Awaitable[Mapping[Priority, int]]] | None = None


class _Capped:
    """Label values chosen by others (error codes, model names): the first `limit` distinct
    well-formed values are kept, the rest become OTHER, so a buggy handler or a client
    inventing model names cannot grow the number of series without bound."""

    _WELL_FORMED = re.compile(r"[\w.:/@+-]{1,100}")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._kept: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._kept:
            return value
        if len(self._kept) >= self._limit or not self._WELL_FORMED.fullmatch(value):
            return OTHER
        self._kept.add(value)
        return value


@dataclass(slots=True)
class _Execution:
    """The children of one (task type, backend), bound on its first execution."""

    duration: Histogram
    success: Counter
    # By the (capped) error label.
    failures: dict[str, Counter] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Usage:
    input_tokens: Counter
    output_tokens: Counter
    cost: Counter


class PrometheusMetrics(Metrics):
    """The metrics of one process in a registry of its own (several Apps in one test
    process do not clash). `known_types` bounds the task type label of Submit requests."""

    def __init__(
        self,
        known_types: Callable[[], Set[str]] = frozenset,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._known_types = known_types
        by_execution = ("task_type", "backend")
        self._duration = Histogram(
            "task_execution_duration_seconds",
            "Duration of one execution (attempt) of a task, from its start to its stored end.",
            by_execution,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._success = Counter(
            "task_executions_success_total",
            "Executions (attempts) that succeeded.",
            by_execution,
            registry=self.registry,
        )
        self._failure = Counter(
            "task_executions_failure_total",
            "Executions (attempts) that failed, by TaskError code; a retried attempt counts"
            " here, a cancelled one has error CANCELLED.",
            (*by_execution, "error"),
            registry=self.registry,
        )
        self._submits = Counter(
            "taskring_submit_requests_total",
            f"Submit calls answered, and tasks of SubmitBatch calls, by the task type asked"
            f" for ({UNKNOWN_TYPE!r} when the router runs no such type).",
            ("task_type",),
            registry=self.registry,
        )
        self._rejections = Counter(
            "taskring_submit_rejections_total",
            "Submit calls refused, and tasks of SubmitBatch calls, by gRPC status code name.",
            ("reason",),
            registry=self.registry,
        )
        self._tokens = Counter(
            "taskring_provider_tokens_total",
            "Tokens of succeeded tasks, by model and direction (input, output).",
            ("model", "direction"),
            registry=self.registry,
        )
        self._cost = Counter(
            "taskring_provider_cost_total",
            "Cost in USD of succeeded tasks at the configured prices, by model.",
            ("model",),
            registry=self.registry,
        )
        self._executions: dict[tuple[str, str], _Execution] = {}
        self._submit_children: dict[str, Counter] = {}
        self._rejection_children: dict[str, Counter] = {}
        self._usage_children: dict[str, _Usage] = {}
        self._error_label = _Capped(MAX_LABEL_VALUES)
        self._model_label = _Capped(MAX_LABEL_VALUES)
        self._sources: Sources | None = None
        # The last queue count read from the store; None when the last read failed.
        self._queue_depth: Mapping[Priority, int] | None = None
        self.registry.register(_Gauges(self))

    def read_from(self, sources: Sources) -> None:
        """Where scrapes read the gauges (set once the process's parts exist)."""
        self._sources = sources

    # -- the request path ------------------------------------------------------------------

    def attempt_ended(self, task: Task, duration_s: float) -> None:
        succeeded = task.state is TaskState.SUCCEEDED
        error = None if succeeded else (task.error.code if task.error else "UNKNOWN")
        self.execution_ended(task.spec.type, task.backend, duration_s, error)
        if succeeded and task.usage is not None:
            self._count_usage(task.spec.input, task.usage)

    def execution_ended(
        self, task_type: str, backend: str, duration_s: float, error: str | None
    ) -> None:
        execution = self._executions.get((task_type, backend))
        if execution is None:
            execution = self._executions[task_type, backend] = _Execution(
                self._duration.labels(task_type, backend),
                self._success.labels(task_type, backend),
            )
        # A wall clock stepped back mid-attempt must not make a negative duration.
        execution.duration.observe(max(0.0, duration_s))
        if error is None:
            execution.success.inc()
            return
        label = self._error_label(error)
        failure = execution.failures.get(label)
        if failure is None:
            failure = execution.failures[label] = self._failure.labels(task_type, backend, label)
        failure.inc()

    def _count_usage(self, spec: TaskInput, used: Usage) -> None:
        if not isinstance(spec, ChatInput | EmbedInput):
            return  # custom types name no model
        model = self._model_label(spec.model)
        usage = self._usage_children.get(model)
        if usage is None:
            usage = self._usage_children[model] = _Usage(
                self._tokens.labels(model, "input"),
                self._tokens.labels(model, "output"),
                self._cost.labels(model),
            )
        # Counters refuse negative amounts; a remote executor's usage is not to be trusted
        # so far as to fail the attempt that reported it.
        usage.input_tokens.inc(max(0, used.input_tokens))
        usage.output_tokens.inc(max(0, used.output_tokens))
        usage.cost.inc(max(0.0, used.cost_usd))

    def submit_accepted(self, task_type: str) -> None:
        self._submit_child(task_type).inc()

    def submit_rejected(self, task_type: str, reason: str) -> None:
        self._submit_child(task_type).inc()
        child = self._rejection_children.get(reason)
        if child is None:
            child = self._rejection_children[reason] = self._rejections.labels(reason)
        child.inc()

    def _submit_child(self, task_type: str) -> Counter:
        child = self._submit_children.get(task_type)
        if child is None:
            # Only types the router runs get a label of their own (and a cache entry): a
            # client may ask for any string.
            if task_type not in self._known_types():
                task_type = UNKNOWN_TYPE
            child = self._submit_children.get(task_type)
            if child is None:
                child = self._submit_children[task_type] = self._submits.labels(task_type)
        return child

    # -- scrapes ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Reads what must be awaited (the queue depth); the endpoint calls it before each
        scrape, so the store is read per scrape, never per task."""
        sources = self._sources
        if sources is None or sources.queue_depth is None:
            return
        try:
            async with asyncio.timeout(QUEUE_READ_TIMEOUT_S):
                self._queue_depth = await sources.queue_depth()
        except (StoreError, TimeoutError) as exc:
            # Absent rather than stale: a flat line would say the queue is not moving.
            self._queue_depth = None
            _log.warning("metrics: could not read the queue depth: %s", exc)

    def _gauges(self) -> Iterator[Metric]:
        sources = self._sources
        if sources is None:
            return
        views = sources.members() if sources.members is not None else ()
        active = GaugeMetricFamily(
            "task_executions_active",
            "Executions (attempts) running now.",
            labels=("task_type", "backend"),
        )
        running = dict(sources.active())
        for view in views:  # every member's types, at 0 when idle: the series stay
            for task_type in view.status.task_types:
                running.setdefault((task_type, view.status.name), 0)
        for (task_type, backend), count in sorted(running.items()):
            active.add_metric((task_type, backend), count)
        yield active
        if sources.members is not None:
            yield from _member_gauges(views)
        if sources.watchers is not None:
            yield GaugeMetricFamily(
                "taskring_stream_watchers",
                "Open Stream calls (clients watching a task).",
                value=sources.watchers(),
            )
        if sources.queue_depth is not None:
            queue = GaugeMetricFamily(
                "taskring_queue_depth",
                "Tasks QUEUED (waiting to run, or for a retry's backoff), by priority.",
                labels=("priority",),
            )
            if self._queue_depth is not None:
                for priority in Priority:
                    queue.add_metric((priority.name.lower(),), self._queue_depth.get(priority, 0))
            yield queue


def _member_gauges(views: Sequence[MemberView]) -> Iterator[Metric]:
    healthy = GaugeMetricFamily(
        "taskring_backend_healthy",
        "1 while the backend's health check passes, else 0.",
        labels=("backend",),
    )
    circuit = GaugeMetricFamily(
        "taskring_backend_circuit_state",
        "The backend's circuit breaker: 0 closed, 1 half-open, 2 open.",
        labels=("backend",),
    )
    members: dict[str, int] = {}
    for view in views:
        healthy.add_metric((view.status.name,), 1 if view.health_ok else 0)
        circuit.add_metric((view.status.name,), CIRCUIT_VALUES[view.circuit])
        for task_type in view.status.task_types:
            members[task_type] = members.get(task_type, 0) + 1
    ring = GaugeMetricFamily(
        "taskring_ring_members",
        "Members on the ring of each task type (whether or not they take work now).",
        labels=("task_type",),
    )
    for task_type, count in sorted(members.items()):
        ring.add_metric((task_type,), count)
    yield from (healthy, circuit, ring)


class _Gauges:
    """The registry's view of the scrape-time gauges."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._gauges()


class MetricsEndpoint:
    """GET /metrics (or /) on `listen` (host:port; port 0 picks a free one, see `port`).

    One request per connection, answered on the event loop: a scrape every few seconds
    needs no keep-alive, and anything that is not a short GET is dropped."""

    # A request's head must arrive within this long and fit in this many bytes.
    REQUEST_TIMEOUT_S = 10.0
    MAX_REQUEST_BYTES = 16 * 1024

    def __init__(self, metrics: PrometheusMetrics, listen: str) -> None:
        self._metrics = metrics
        self._listen = listen
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        """Binds the port; RuntimeError (as gRPC gives for its own port) when it cannot."""
        host, _, port = self._listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        try:
            self._server = await asyncio.start_server(
                self._serve, host, int(port), limit=self.MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve metrics on {self._listen}: {exc.strerror or exc};"
                " set TASKRING_METRICS_LISTEN to a free host:port, or to off"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        _log.info("serving metrics on %s, port %d, at /metrics", host or "every address", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if head.startswith(b"HEAD ") else body)
            )
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the scraper went away, or it did not speak HTTP: nobody to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        if path not in ("/metrics", "/"):
            return "404 Not Found", "text/plain", b"metrics are at /metrics\n"
        accept = ""
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        try:
            await self._metrics.refresh()
            # Prometheus asks for OpenMetrics; curl gets the classic text format.
            encode, content_type = choose_encoder(accept)
            return "200 OK", content_type, encode(self._metrics.registry)
        except Exception:  # noqa: BLE001 - a bug in a collector must not end the endpoint
            _log.exception("metrics: a scrape failed")
            return "500 Internal Server Error", "text/plain", b"scrape failed; see the log\n"
