"""ExecutorService: runs one attempt of a task for a router and streams its events back.

The same Backend objects as a router's in-process executors do the work, so a task type
behaves alike in both places. Cancelling the call (the router cancelled the task, or gave
up on the attempt) cancels the handler: grpc.aio cancels this coroutine, which closes the
backend's iterator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from client._proto.taskring.v1 import executor_pb2 as epb
from client._proto.taskring.v1 import executor_pb2_grpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from server.api.convert import error_to_pb, output_to_pb, task_from_pb, usage_to_pb
from server.backends.base import Backend, BackendError, Completed, OutputChunk
from server.model.errors import InvalidArgumentError
from server.observability import logs, tracing
from server.observability.metrics import NO_METRICS, Metrics

_log = logging.getLogger(__name__)


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, backend: Backend, metrics: Metrics = NO_METRICS) -> None:
        self._backend = backend
        self._running = 0
        self._metrics = metrics
        # Attempts running now, by task type (the metrics' active gauge reads it).
        self._active: dict[str, int] = {}

    @property
    def running(self) -> int:
        return self._running

    def active(self) -> dict[tuple[str, str], int]:
        """Attempts running now by (task type, backend), every type listed."""
        name = self._backend.name
        return {(t, name): self._active.get(t, 0) for t in self._backend.task_types}

    async def Execute(  # noqa: N802 - the proto's method name
        self, request: epb.ExecuteRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[epb.ExecuteResponse]:
        try:
            task = task_from_pb(request.task)
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # This call's log lines and its span (tracing.ServerTracing's) name the task.
        logs.bind_task(task.id, task.client_id)
        tracing.annotate_current(task)
        if task.spec.type not in self._backend.task_types:
            served = ", ".join(sorted(self._backend.task_types))
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"this executor does not run tasks of type {task.spec.type!r} (it runs {served})",
            )
        if self._running >= self._backend.max_concurrency:
            # At once, not queued here: the router holds the task and tries another member.
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"executor is running its maximum of {self._backend.max_concurrency} attempts",
            )
        self._running += 1
        task_type = task.spec.type
        self._active[task_type] = self._active.get(task_type, 0) + 1
        started = asyncio.get_running_loop().time()
        # The execution's outcome for metrics: the router's code for a handler that ends
        # without a result, until the execution says otherwise.
        error: str | None = "BACKEND_ERROR"
        try:
            async for event in self._backend.execute(task):
                if isinstance(event, OutputChunk):
                    yield epb.ExecuteResponse(output_delta=pb.OutputDelta(text=event.text))
                elif isinstance(event, Completed):
                    error = None
                    yield _result(event)
                    return
        except BackendError as exc:
            tracing.annotate_error(exc.error.code)
            error = exc.error.code
            yield _error(exc)
        except (asyncio.CancelledError, GeneratorExit):
            error = "CANCELLED"  # the router cancelled the call, or its deadline passed
            raise
        except Exception:  # noqa: BLE001 - a handler's bug fails its task, not the process
            # The traceback stays in this executor's log; the task gets a generic message.
            _log.exception("task %s: the handler failed unexpectedly", task.id)
            error = "INTERNAL"
            message = "the executor failed unexpectedly; see its log"
            yield _error(BackendError("INTERNAL", message, retryable=False))
        finally:
            self._running -= 1
            self._active[task_type] -= 1
            duration_s = asyncio.get_running_loop().time() - started
            self._metrics.execution_ended(task_type, self._backend.name, duration_s, error)


def _result(event: Completed) -> epb.ExecuteResponse:
    return epb.ExecuteResponse(
        result=epb.ExecuteResult(
            output=output_to_pb(event.output),
            usage=None if event.usage is None else usage_to_pb(event.usage),
        )
    )


def _error(exc: BackendError) -> epb.ExecuteResponse:
    error = epb.ExecuteError(error=error_to_pb(exc.error), backend_fault=exc.backend_fault)
    if exc.retry_after_s is not None:
        error.retry_after.FromNanoseconds(round(exc.retry_after_s * 1e9))
    return epb.ExecuteResponse(error=error)
