"""TaskServicer: translates TaskService calls to TaskManager operations and back."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.admission.auth import Caller
from server.admission.gate import Gate
from server.events.hub import EventKind, TaskEvent
from server.model.errors import InvalidArgumentError, RateLimitedError, TaskringError
from server.model.task import Task, TaskSpec
from server.observability import logs, tracing
from server.observability.metrics import NO_METRICS, Metrics
from server.tasks import BatchOutcome, TaskManager, check_batch_size

from . import batch, convert
from .status import code_of, to_status

_log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
# A List reply holds fewer tasks than asked rather than grow past what a gRPC client
# receives by default (4 MiB): a page of large tasks would otherwise fail, every time.
# (A single task larger than that still comes alone.)
MAX_LIST_REPLY_BYTES = 4 * 1024 * 1024 - 64 * 1024


def _refuse(context: Context, error: TaskringError) -> None:
    """Ends the call with `error`'s status once the handler returns (nothing else sent).

    Not context.abort: that raises through grpc's own frames, and each refused call then
    leaves ~30 objects in reference cycles that only the garbage collector frees; at a
    flood of rate-limited calls its pauses (tens of ms) reached every other caller."""
    status = to_status(error)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


async def _abort(context: Context, error: BaseException) -> NoReturn:
    # A bug: the client learns nothing of our internals; the log keeps the traceback.
    _log.error("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _unary(
    handler: Callable[[TaskServicer, Req, Context, Caller], Awaitable[Resp]],
) -> Callable[[TaskServicer, Req, Context], Awaitable[Resp]]:
    """An RPC handler of the admitted caller, its errors mapped to statuses."""

    @functools.wraps(handler)
    async def wrapper(self: TaskServicer, request: Req, context: Context) -> Resp:
        try:
            caller = await self._gate.admit(context)
            # Each RPC runs in its own asyncio task: its log lines name the caller and task.
            logs.bind_task(getattr(request, "task_id", ""), caller.client_id)
            return await handler(self, request, context, caller)
        except TaskringError as exc:
            _refuse(context, exc)
            return None  # type: ignore[return-value] # grpc sends only the status
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc)

    return wrapper


def _streaming(
    handler: Callable[[TaskServicer, Req, Context, Caller], AsyncGenerator[Resp, None]],
) -> Callable[[TaskServicer, Req, Context], AsyncGenerator[Resp, None]]:
    """As `_unary`, for server-streaming handlers: an error raised before or between the
    messages ends the call with its status."""

    @functools.wraps(handler)
    async def wrapper(
        self: TaskServicer, request: Req, context: Context
    ) -> AsyncGenerator[Resp, None]:
        try:
            caller = await self._gate.admit(context)
            logs.bind_task(getattr(request, "task_id", ""), caller.client_id)
            # aclosing: a client that goes away releases the handler's subscription at
            # once, not whenever the collector finds the abandoned generator.
            responses = handler(self, request, context, caller)
            async with contextlib.aclosing(responses) as responses:
                async for response in responses:
                    yield response
        except TaskringError as exc:
            _refuse(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _abort
            await _abort(context, exc)

    return wrapper


# The methods whose handlers yield their replies as bytes, encoded already: the server
# sends them as they are (see server.api.server.add_service).
ENCODED_REPLIES = frozenset({"Stream"})


class TaskServicer:
    """One method per TaskService RPC (server.api.server registers each by its name)."""

    def __init__(self, tasks: TaskManager, gate: Gate, metrics: Metrics = NO_METRICS) -> None:
        self._tasks = tasks
        self._gate = gate
        self._metrics = metrics

    async def _submit(self, spec_pb: pb.TaskSpec, caller: Caller) -> tuple[Task, bool]:
        """Submit's work, shared with SubmitAndStream: counted as accepted or rejected."""
        try:
            spec = convert.spec_from_pb(spec_pb)
            task, created = await self._tasks.submit(caller.client_id, spec)
        except Exception as exc:
            self._metrics.submit_rejected(_asked_type(spec_pb), _reason(exc))
            raise  # answered by the caller's status mapping
        self._metrics.submit_accepted(task.spec.type)
        tracing.annotate_current(task)  # the RPC's span names its task
        return task, created

    @_unary
    async def Submit(
        self, request: pb.SubmitRequest, context: Context, caller: Caller
    ) -> pb.SubmitResponse:
        task, created = await self._submit(request.task, caller)
        return pb.SubmitResponse(task=convert.task_to_pb(task), created=created)

    @_streaming
    async def SubmitAndStream(
        self, request: pb.SubmitAndStreamRequest, context: Context, caller: Caller
    ) -> AsyncGenerator[pb.SubmitAndStreamResponse, None]:
        task, created = await self._submit(request.task, caller)
        logs.bind_task(task.id, caller.client_id)
        # From sequence 0: the snapshot comes first and holds any output produced between
        # the commit and this subscription (see TaskManager.watch).
        async with contextlib.aclosing(self._tasks.watch(caller.client_id, task.id, 0)) as events:
            async for event in events:
                yield pb.SubmitAndStreamResponse(created=created, event=stream_response(event))

    @_unary
    async def SubmitBatch(
        self, request: pb.SubmitBatchRequest, context: Context, caller: Caller
    ) -> pb.SubmitBatchResponse:
        asked = request.tasks
        check_batch_size(len(asked))
        # The gate took the call's token, which pays for the first task; each further task
        # takes one more, and those the client's bucket has none for are refused.
        grant = await self._gate.admit_more(caller, len(asked) - 1)
        outcomes: list[BatchOutcome | None] = []
        specs: list[TaskSpec] = []
        for index, spec_pb in enumerate(asked):
            if grant.refusal is not None and index > grant.taken:
                outcomes.append(grant.refusal)
                continue
            try:
                specs.append(convert.spec_from_pb(spec_pb))
                outcomes.append(None)  # to be submitted
            except InvalidArgumentError as exc:
                outcomes.append(exc)
        try:
            submitted = iter(await self._tasks.submit_batch(caller.client_id, specs))
        except Exception as exc:
            for spec_pb in asked:
                self._metrics.submit_rejected(_asked_type(spec_pb), _reason(exc))
            raise  # answered by _unary's status mapping
        results: list[pb.SubmitBatchResult] = []
        for index, (spec_pb, refused) in enumerate(zip(asked, outcomes, strict=True)):
            outcome = next(submitted) if refused is None else refused
            if isinstance(outcome, TaskringError):
                self._metrics.submit_rejected(_asked_type(spec_pb), _reason(outcome))
            else:
                self._metrics.submit_accepted(outcome[0].spec.type)
            results.append(batch.result_to_pb(index, outcome))
        return pb.SubmitBatchResponse(results=results)

    @_unary
    async def Get(self, request: pb.GetRequest, context: Context, caller: Caller) -> pb.GetResponse:
        task = await self._tasks.get(caller.client_id, request.task_id)
        return pb.GetResponse(task=convert.task_to_pb(task))

    @_unary
    async def Cancel(
        self, request: pb.CancelRequest, context: Context, caller: Caller
    ) -> pb.CancelResponse:
        task = await self._tasks.cancel(caller.client_id, request.task_id)
        return pb.CancelResponse(task=convert.task_to_pb(task))

    @_unary
    async def List(
        self, request: pb.ListRequest, context: Context, caller: Caller
    ) -> pb.ListResponse:
        states = convert.states_from_pb(request.states, "states")
        page = await self._tasks.list(
            caller.client_id, states, set(request.types), request.page_size, request.page_token
        )
        listed: list[pb.Task] = []
        size = 0
        for index, task in enumerate(page.tasks):
            message = convert.task_to_pb(task)
            size += message.ByteSize()
            if listed and size > MAX_LIST_REPLY_BYTES:
                # Fewer tasks than asked, and a token that goes on from the first left out.
                return pb.ListResponse(tasks=listed, next_page_token=page.token_after(index - 1))
            listed.append(message)
        return pb.ListResponse(tasks=listed, next_page_token=page.next_page_token)

    @_unary
    async def Stats(
        self, request: pb.StatsRequest, context: Context, caller: Caller
    ) -> pb.StatsResponse:
        window_s = None
        if request.HasField("window"):
            window_s = convert.duration_from_pb(request.window, "window")
        # The caller's own tasks; an admin's key sees every client's. (Without keys every
        # task is ANONYMOUS's: the report names that client.)
        client_id = None if caller.admin and not self._gate.auth.open else caller.client_id
        report = await self._tasks.stats(client_id, list(request.types), window_s)
        return convert.stats_to_pb(report)

    @_streaming
    async def Stream(
        self, request: pb.StreamRequest, context: Context, caller: Caller
    ) -> AsyncGenerator[bytes, None]:
        """Yields each StreamResponse encoded (see ENCODED_REPLIES): an event's watchers
        share one encoding of it."""
        watch = self._tasks.watch(caller.client_id, request.task_id, request.after_sequence)
        async with contextlib.aclosing(watch) as events:
            async for event in events:
                yield encoded_stream_response(event)


def _asked_type(spec_pb: pb.TaskSpec) -> str:
    """The task type a spec asks for, as the metrics count it (before validation)."""
    return spec_pb.type or spec_pb.WhichOneof("input") or ""


def _reason(error: Exception) -> str:
    """A refusal's reason, as the metrics count it: its status code's name, and for a limit
    which one (RESOURCE_EXHAUSTED/max_queued): an operator sees who is held back by what."""
    if isinstance(error, RateLimitedError):
        return f"{code_of(error).name}/{error.limit}"
    return code_of(error).name if isinstance(error, TaskringError) else "INTERNAL"


def encoded_stream_response(event: TaskEvent) -> bytes:
    """`event` as a StreamResponse on the wire, encoded by its first watcher only."""
    encoded = event.memo.get("Stream")
    if encoded is None:
        encoded = event.memo["Stream"] = stream_response(event).SerializeToString()
    return encoded


def stream_response(event: TaskEvent) -> pb.StreamResponse:
    if event.kind is EventKind.OUTPUT:
        return pb.StreamResponse(
            sequence=event.sequence, output_delta=pb.OutputDelta(text=event.text)
        )
    if event.kind is EventKind.SNAPSHOT:
        return pb.StreamResponse(sequence=event.sequence, snapshot=convert.task_to_pb(event.task))
    task = convert.task_to_pb(event.task, with_spec=False)
    return pb.StreamResponse(sequence=event.sequence, state_changed=pb.StateChanged(task=task))
