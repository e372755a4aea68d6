"""ExecutorApp: one executor process. Serves ExecutorService, grpc.health.v1 (for the
router's health checks and Kubernetes probes) and reflection."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType

from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from client._proto.taskring.v1 import executor_pb2
from server.api.server import HEALTH_SERVICE, add_service, new_server
from server.backends.local import Handler, LocalBackend, LocalModelSettings, builtin_handlers
from server.config import ExecutorSettings
from server.observability.metrics import (
    NO_METRICS,
    Metrics,
    MetricsEndpoint,
    PrometheusMetrics,
    Sources,
)
from server.observability.tracing import tracing_for
from server.tasktypes import TaskTypes
from server.tls import add_port

from .service import ExecutorServicer

EXECUTOR = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"]
EXECUTOR_SERVICE = EXECUTOR.full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ExecutorApp:
    """`async with ExecutorApp(settings) as app:` serves until closed."""

    def __init__(
        self,
        settings: ExecutorSettings,
        handlers: Mapping[str, Handler] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """`handlers` replaces the task types from the settings (tests run their own), and
        `tracer_provider` the global one process.run installs (tracing is off without)."""
        self.settings = settings
        # The same [task_types] as the router's in-process executors, loaded the same way.
        self.task_types = TaskTypes.from_tables(settings.file.task_types, settings.file.base_dir)
        if handlers is None:
            handlers = {
                **builtin_handlers(LocalModelSettings(token_delay_s=settings.token_delay_s)),
                **self.task_types.handlers(),
            }
        self.backend = LocalBackend("executor", handlers, settings.max_concurrency)
        # Executions only: members, queue, watchers and provider usage are the router's.
        prometheus = (
            PrometheusMetrics(known_types=lambda: self.backend.task_types)
            if settings.metrics_listen
            else None
        )
        self.metrics: Metrics = prometheus or NO_METRICS
        self.servicer = ExecutorServicer(self.backend, self.metrics)
        self.metrics_endpoint: MetricsEndpoint | None = None
        if prometheus is not None:
            prometheus.read_from(Sources(active=self.servicer.active))
            self.metrics_endpoint = MetricsEndpoint(prometheus, settings.metrics_listen)
        self.metrics_port = 0  # the bound metrics port (TASKRING_METRICS_LISTEN=...:0)
        self.health = health.aio.HealthServicer()
        tracing = tracing_for(tracer_provider)
        # Traces only the calls its router traced: an Execute span without its router's
        # spans would be an orphan, and a router sends no traceparent for traces it drops.
        self.server = new_server(
            None if tracing is None else replace(tracing, head=tracing.head.starts_no_trace())
        )
        add_service(self.server, EXECUTOR, self.servicer)
        add_service(self.server, HEALTH_SERVICE, self.health)
        reflection.enable_server_reflection(
            (
                EXECUTOR_SERVICE,
                HEALTH_SERVICE.full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = 0
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    async def start(self) -> None:
        self.port = add_port(self.server, self.settings.listen, self.settings.tls)
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.start()
            self.metrics_port = self.metrics_endpoint.port
        await self.server.start()
        await self.health.set("", SERVING)
        await self.health.set(EXECUTOR_SERVICE, SERVING)

    async def stop(self) -> None:
        """Routers see NOT_SERVING at once and send no more work; attempts running get the
        grace period, then their calls end with UNAVAILABLE and the router retries them."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.set(EXECUTOR_SERVICE, NOT_SERVING)
        await self.server.stop(self.settings.shutdown_grace_s)
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.stop()
        await self.task_types.aclose()

    async def __aenter__(self) -> ExecutorApp:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
