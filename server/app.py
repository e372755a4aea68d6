"""The composition root: builds every part from Settings, starts them in order and stops
them in reverse (readiness off, dispatcher drain, streams end, server stop, store close)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType

from grpc_health.v1 import health
from opentelemetry.trace import TracerProvider

from .admission.auth import Authenticator
from .admission.gate import Gate
from .admission.limits import ClientLimiter, TypeLimiter
from .admission.priorities import PriorityCaps
from .admission.quotas import TaskQuotas
from .api.admin import AdminServicer
from .api.server import LIVENESS_SERVICE, NOT_SERVING, READINESS_SERVICE, SERVING, build_server
from .api.servicer import TaskServicer
from .backends.base import Backend
from .backends.factory import build_backend, default_backends, local_handlers
from .backends.local import Handler
from .clock import Clock, SystemClock
from .config import Settings, StoreSettings
from .dispatch.circuit import CircuitSettings
from .dispatch.dispatcher import Dispatcher, DispatchSettings
from .dispatch.members import Members
from .events.feed import ChangeFeed
from .events.hub import EventHub
from .events.recorder import ChangeRecorder
from .housekeeping import Housekeeper
from .model.errors import StoreError
from .observability.metrics import NO_METRICS, Metrics, MetricsEndpoint, PrometheusMetrics, Sources
from .observability.tracing import HeadSampling, TaskSpans, tracing_for
from .store.base import TaskStore
from .store.postgres import PostgresTaskStore
from .store.sqlite import SqliteTaskStore
from .tasks import TaskManager
from .tasktypes import TaskTypes
from .tls import add_port

_log = logging.getLogger(__name__)


def configured_backends(
    settings: Settings, handlers: Mapping[str, Handler], environ: Mapping[str, str]
) -> dict[str, Backend]:
    """The ring members of the configuration file, or the default local executors."""
    if not settings.file.backends:
        return default_backends(settings.local, handlers)
    return {
        spec.name: build_backend(spec, handlers, environ, settings.file, settings.remote_tls)
        for spec in settings.file.backends
    }


def open_store(settings: StoreSettings) -> TaskStore:
    """SQLite by default; PostgreSQL when several replicas share the tasks."""
    if settings.is_postgresql:
        return PostgresTaskStore(settings.url, settings.pool_size, settings.lease_s)
    return SqliteTaskStore(settings.sqlite_path, settings.sqlite_synchronous)


class App:
    """One taskring router process. `async with App(settings) as app:` serves until closed."""

    def __init__(
        self,
        settings: Settings,
        backends: Mapping[str, Backend] | None = None,
        clock: Clock | None = None,
        dispatch: DispatchSettings | None = None,
        circuit: CircuitSettings | None = None,
        tracer_provider: TracerProvider | None = None,
        sampling: HeadSampling | None = None,
    ) -> None:
        """`tracer_provider` replaces the global one process.run installs (tests pass their
        own; `sampling` then says which traces it keeps, all by default); tracing is off
        when neither exists."""
        self.settings = settings
        self.clock = clock or SystemClock()
        # Raises TaskTypeConfigError naming each problem: a bad handler fails the start.
        self.task_types = TaskTypes.from_tables(
            settings.file.task_types, settings.file.base_dir, self.clock
        )
        handlers = {**local_handlers(settings.local), **self.task_types.handlers()}
        self.backends = (
            dict(backends)
            if backends is not None
            else configured_backends(settings, handlers, os.environ)
        )
        self.store = open_store(settings.store)
        tracing = tracing_for(tracer_provider, sampling)
        self.hub = EventHub()
        # Metrics turned off record nothing, rather than count what nobody can read.
        prometheus = (
            PrometheusMetrics(known_types=lambda: self.dispatcher.task_types)
            if settings.server.metrics_listen
            else None
        )
        self.metrics: Metrics = prometheus or NO_METRICS
        # Token budgets and queued caps, held from admission until each task ends.
        self.quotas = TaskQuotas(settings.file.limits, self.clock)
        recorder = ChangeRecorder(self.store, self.hub, on_end=self.quotas.ended)
        weights = {spec.name: spec.weight for spec in settings.file.backends}
        members = Members(
            [(backend, weights.get(name, 1)) for name, backend in self.backends.items()],
            load_factor=settings.file.load_factor,
            clock=self.clock,
            circuit=circuit or CircuitSettings(),
        )
        self.dispatcher = Dispatcher(
            self.store,
            recorder,
            members,
            self.clock,
            # Aging and the types' concurrency caps are the file's, whoever sets the rest.
            replace(
                dispatch
                or DispatchSettings(
                    retry=settings.file.retry,
                    output_store_interval_s=settings.store.output_store_interval_s,
                ),
                aging_s=settings.file.aging_s,
                max_running_by_type=settings.file.quotas.max_running(),
            ),
            metrics=self.metrics,
            spans=None if tracing is None else TaskSpans(tracing.tracer),
        )
        self.feed = ChangeFeed(self.store, self.hub, self.dispatcher, self.quotas)
        self.tasks = TaskManager(
            self.store,
            self.hub,
            recorder,
            self.dispatcher,
            self.clock,
            settings.tasks,
            self.dispatcher.retry,
            lambda: self.dispatcher.task_types,
            self.task_types,
            priority_caps=PriorityCaps(settings.file.limits),
            quotas=self.quotas,
            type_limiter=TypeLimiter(settings.file.quotas.rates()),
        )
        self.health = health.aio.HealthServicer()
        self.gate = Gate(Authenticator(settings.file.api_keys), ClientLimiter(settings.file.limits))
        self.admin = AdminServicer(
            members,
            lambda spec: build_backend(
                spec, handlers, os.environ, settings.file, settings.remote_tls
            ),
            self.gate,
        )
        self.admin.specs.update({spec.name: spec for spec in settings.file.backends})
        self.server = build_server(
            TaskServicer(self.tasks, self.gate, self.metrics), self.health, self.admin, tracing
        )
        self.port = 0
        self.metrics_endpoint: MetricsEndpoint | None = None
        if prometheus is not None:
            prometheus.read_from(
                Sources(
                    active=self.dispatcher.active,
                    members=members.views,
                    watchers=lambda: self.hub.statistics()["watchers"],
                    queue_depth=self.store.queue_depth,
                )
            )
            self.metrics_endpoint = MetricsEndpoint(prometheus, settings.server.metrics_listen)
        self.metrics_port = 0  # the bound metrics port (TASKRING_METRICS_LISTEN=...:0)
        self.housekeeper = Housekeeper(self.store, self.hub, self.clock, settings.store.retention_s)
        self._store_check: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        # The port first: a second server started by mistake fails here, before it touches
        # the store.
        self.port = add_port(self.server, self.settings.server.listen, self.settings.server.tls)
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.start()
            self.metrics_port = self.metrics_endpoint.port
        await self.store.start()
        if self.quotas.counts_tasks:
            # Before the dispatcher ends any of them (orphans on their last attempt).
            self.quotas.seed(await self.store.unfinished())
        self.feed.start()
        await self.dispatcher.start()
        self.dispatcher.members.start()
        await self.server.start()
        await self.health.set(LIVENESS_SERVICE, SERVING)
        await self.health.set(READINESS_SERVICE, SERVING)
        self._store_check = asyncio.create_task(self._watch_store(), name="store-check")
        self.housekeeper.start()

    @property
    def address(self) -> str:
        host = self.settings.server.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def _watch_store(self) -> None:
        """Readiness follows the store: NOT_SERVING while it cannot answer."""
        ready = True
        while True:
            await asyncio.sleep(self.settings.server.store_check_interval_s)
            try:
                await self.store.ping()
                now_ready = True
            except StoreError:
                now_ready = False
            if now_ready != ready:
                ready = now_ready
                _log.warning("store %s: readiness %s", "back" if ready else "failing", ready)
                await self.health.set(READINESS_SERVICE, SERVING if ready else NOT_SERVING)

    async def stop(self) -> None:
        """Graceful: readiness off at once (liveness stays up until the process exits), no new
        Submits, open Streams end, running work gets the grace period, the rest is re-queued."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.server.shutdown_grace_s
        if self._store_check is not None:
            self._store_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._store_check
        await self.health.set(READINESS_SERVICE, NOT_SERVING)
        await self.housekeeper.stop()
        self.tasks.stop_accepting()
        await self.dispatcher.shutdown(grace)
        self.hub.close()
        await self.server.stop(grace)
        if self.metrics_endpoint is not None:  # scrapes read the store: stopped before it
            await self.metrics_endpoint.stop()
        await self.feed.close()
        await self.store.close()
        await self.dispatcher.members.close()
        await self.task_types.aclose()

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
