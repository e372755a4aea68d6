"""TaskServicer: translates TaskService calls to TaskManager operations and back."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.events.hub import EventKind, TaskEvent
from server.model.errors import TaskringError
from server.model.task import Task
from server.observability import logs, tracing
from server.observability.metrics import NO_METRICS, Metrics
from server.tasks import TaskManager

from . import convert
from .status import to_status

_log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]

# Until authentication lands every caller is the same client.
ANONYMOUS = "anonymous"


async def _abort(context: Context, error: BaseException) -> NoReturn:
    if isinstance(error, TaskringError):
        await context.abort_with_status(to_status(error))
    # A bug: the client learns nothing of our internals; the log keeps the traceback.
    _log.error("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _unary(
    handler: Callable[[Any, Req, Context], Awaitable[Resp]],
) -> Callable[[Any, Req, Context], Awaitable[Resp]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        # Each RPC runs in its own asyncio task: its log lines name the caller and task.
        logs.bind_task(getattr(request, "task_id", ""), ANONYMOUS)
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc)

    return wrapper


def _streaming(
    handler: Callable[[Any, Req, Context], AsyncGenerator[Resp, None]],
) -> Callable[[Any, Req, Context], AsyncGenerator[Resp, None]]:
    """As `_unary`, for server-streaming handlers: an error raised before or between the
    messages ends the call with its status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: Context) -> AsyncGenerator[Resp, None]:
        logs.bind_task(getattr(request, "task_id", ""), ANONYMOUS)
        try:
            # aclosing: a client that goes away releases the handler's subscription at
            # once, not whenever the collector finds the abandoned generator.
            async with contextlib.aclosing(handler(self, request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc)

    return wrapper


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, tasks: TaskManager, metrics: Metrics = NO_METRICS) -> None:
        self._tasks = tasks
        self._metrics = metrics

    async def _submit(self, spec_pb: pb.TaskSpec) -> tuple[Task, bool]:
        """Submit's work, shared with SubmitAndStream: counted as accepted or rejected."""
        try:
            spec = convert.spec_from_pb(spec_pb)
            task, created = await self._tasks.submit(ANONYMOUS, spec)
        except Exception as exc:
            asked = spec_pb.type or spec_pb.WhichOneof("input") or ""
            code = to_status(exc).code if isinstance(exc, TaskringError) else None
            self._metrics.submit_rejected(asked, code.name if code else "INTERNAL")
            raise  # answered by the caller's status mapping
        self._metrics.submit_accepted(task.spec.type)
        tracing.annotate_current(task)  # the RPC's span names its task
        return task, created

    @_unary
    async def Submit(self, request: pb.SubmitRequest, context: Context) -> pb.SubmitResponse:
        task, created = await self._submit(request.task)
        return pb.SubmitResponse(task=convert.task_to_pb(task), created=created)

    @_streaming
    async def SubmitAndStream(
        self, request: pb.SubmitAndStreamRequest, context: Context
    ) -> AsyncGenerator[pb.SubmitAndStreamResponse, None]:
        task, created = await self._submit(request.task)
        logs.bind_task(task.id, ANONYMOUS)
        # From sequence 0: the snapshot comes first and holds any output produced between
        # the commit and this subscription (see TaskManager.watch).
        async with contextlib.aclosing(self._tasks.watch(ANONYMOUS, task.id, 0)) as events:
            async for event in events:
                yield pb.SubmitAndStreamResponse(created=created, event=stream_response(event))

    @_unary
    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        task = await self._tasks.get(ANONYMOUS, request.task_id)
        return pb.GetResponse(task=convert.task_to_pb(task))

    @_unary
    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.CancelResponse:
        task = await self._tasks.cancel(ANONYMOUS, request.task_id)
        return pb.CancelResponse(task=convert.task_to_pb(task))

    @_unary
    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        states = convert.states_from_pb(request.states, "states")
        tasks, token = await self._tasks.list(
            ANONYMOUS, states, set(request.types), request.page_size, request.page_token
        )
        return pb.ListResponse(tasks=[convert.task_to_pb(t) for t in tasks], next_page_token=token)

    @_unary
    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        window_s = None
        if request.HasField("window"):
            window_s = convert.duration_from_pb(request.window, "window")
        # The caller's own tasks only. The seam for admins: once API keys exist, a caller
        # whose key is an admin's passes client_id=None here and sees every client's tasks
        # (TaskManager.stats and the store already take None); until then every caller is
        # ANONYMOUS and none is an admin.
        report = await self._tasks.stats(ANONYMOUS, list(request.types), window_s)
        return convert.stats_to_pb(report)

    @_streaming
    async def Stream(
        self, request: pb.StreamRequest, context: Context
    ) -> AsyncGenerator[pb.StreamResponse, None]:
        watch = self._tasks.watch(ANONYMOUS, request.task_id, request.after_sequence)
        async with contextlib.aclosing(watch) as events:
            async for event in events:
                yield stream_response(event)


def stream_response(event: TaskEvent) -> pb.StreamResponse:
    if event.kind is EventKind.OUTPUT:
        return pb.StreamResponse(
            sequence=event.sequence, output_delta=pb.OutputDelta(text=event.text)
        )
    if event.kind is EventKind.SNAPSHOT:
        return pb.StreamResponse(sequence=event.sequence, snapshot=convert.task_to_pb(event.task))
    task = convert.task_to_pb(event.task, with_spec=False)
    return pb.StreamResponse(sequence=event.sequence, state_changed=pb.StateChanged(task=task))
