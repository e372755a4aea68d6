"""ExecutorService: runs one attempt of a task for a router and streams its events back.

The same Backend objects as a router's in-process executors do the work, so a task type
behaves alike in both places. Cancelling the call (the router cancelled the task, or gave
up on the attempt) cancels the handler: grpc.aio cancels this coroutine, which closes the
backend's iterator.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from client._proto.taskring.v1 import executor_pb2 as epb
from client._proto.taskring.v1 import executor_pb2_grpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from server.api.convert import error_to_pb, output_to_pb, task_from_pb, usage_to_pb
from server.backends.base import Backend, BackendError, Completed, OutputChunk
from server.model.errors import InvalidArgumentError

_log = logging.getLogger(__name__)


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._running = 0

    @property
    def running(self) -> int:
        return self._running

    async def Execute(  # noqa: N802 - the proto's method name
        self, request: epb.ExecuteRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[epb.ExecuteResponse]:
        try:
            task = task_from_pb(request.task)
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
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
        try:
            async for event in self._backend.execute(task):
                if isinstance(event, OutputChunk):
                    yield epb.ExecuteResponse(output_delta=pb.OutputDelta(text=event.text))
                elif isinstance(event, Completed):
                    yield _result(event)
                    return
        except BackendError as exc:
            yield _error(exc)
        except Exception:  # noqa: BLE001 - a handler's bug fails its task, not the process
            # The traceback stays in this executor's log; the task gets a generic message.
            _log.exception("task %s: the handler failed unexpectedly", task.id)
            message = "the executor failed unexpectedly; see its log"
            yield _error(BackendError("INTERNAL", message, retryable=False))
        finally:
            self._running -= 1


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
