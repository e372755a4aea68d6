"""TaskServicer: translates TaskService calls to TaskManager operations and back."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.events.hub import EventKind, TaskEvent
from server.model.errors import TaskringError
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
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc)

    return wrapper


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, tasks: TaskManager) -> None:
        self._tasks = tasks

    @_unary
    async def Submit(self, request: pb.SubmitRequest, context: Context) -> pb.SubmitResponse:
        spec = convert.spec_from_pb(request.task)
        task, created = await self._tasks.submit(ANONYMOUS, spec)
        return pb.SubmitResponse(task=convert.task_to_pb(task), created=created)

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

    async def Stream(
        self, request: pb.StreamRequest, context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        watch = self._tasks.watch(ANONYMOUS, request.task_id, request.after_sequence)
        try:
            # aclosing: a client that goes away releases its subscription at once, not
            # whenever the collector finds the abandoned generator.
            async with contextlib.aclosing(watch) as events:
                async for event in events:
                    yield stream_response(event)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc)


def stream_response(event: TaskEvent) -> pb.StreamResponse:
    if event.kind is EventKind.OUTPUT:
        return pb.StreamResponse(
            sequence=event.sequence, output_delta=pb.OutputDelta(text=event.text)
        )
    if event.kind is EventKind.SNAPSHOT:
        return pb.StreamResponse(sequence=event.sequence, snapshot=convert.task_to_pb(event.task))
    task = convert.task_to_pb(event.task, with_spec=False)
    return pb.StreamResponse(sequence=event.sequence, state_changed=pb.StateChanged(task=task))
