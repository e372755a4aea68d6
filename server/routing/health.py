"""Active health checks of remote executors through grpc.health.v1 Watch.

One long-lived Watch call per executor: the executor pushes every change of its serving
status (NOT_SERVING at once when it starts draining), and the call breaking is itself the
news that the process died. While it is down, the watch is retried with capped backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client._proto.taskring.v1 import executor_pb2

_log = logging.getLogger(__name__)

EXECUTOR_SERVICE = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING

OnChange = Callable[[str, bool], None]


class HealthWatcher:
    """Watches one executor and reports (name, healthy) on every change."""

    def __init__(
        self,
        name: str,
        channel: grpc.aio.Channel,
        on_change: OnChange,
        *,
        min_backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ) -> None:
        self._name = name
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._on_change = on_change
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._healthy: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool | None:
        """None until the first answer."""
        return self._healthy

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"health:{self._name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _report(self, healthy: bool) -> None:
        if healthy != self._healthy:
            if self._healthy is not None or not healthy:
                _log.warning("executor %s is %s", self._name, "up" if healthy else "down")
            self._healthy = healthy
            self._on_change(self._name, healthy)

    async def _run(self) -> None:
        backoff = self._min_backoff_s
        request = health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE)
        while True:
            try:
                async for response in self._stub.Watch(request):
                    self._report(response.status == SERVING)
                    backoff = self._min_backoff_s
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    # An executor without the health service: trust it, passive failure
                    # counting (the circuit breaker) still guards the ring.
                    self._report(True)
                    return
                self._report(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
