"""The taskring clients: AsyncTaskringClient over grpc.aio and TaskringClient that blocks.

Both stay thin: requests are built by the module functions below and a broken stream is
resumed by the same bookkeeping (`_Resumer`); the classes differ only in how they call and
wait. Every gRPC failure leaves them as a `TaskringError` (see `_errors`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Generator, Iterable, Mapping, Sequence
from contextlib import aclosing, closing
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypedDict, TypeVar, Unpack

import grpc
from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import Message

from ._batch import BatchResult, batch_results
from ._errors import UnavailableError, error_from_rpc
from ._proto.taskring.v1 import admin_pb2, admin_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from ._tls import Tls

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_CHAT_MODEL = "local-echo"
DEFAULT_EMBED_MODEL = "local-hash"
# Pause before each reconnect of a broken stream, one entry per consecutive try: together
# they ride out a server restart of about five seconds, then the UNAVAILABLE is raised.
DEFAULT_RESUME_DELAYS_S: tuple[float, ...] = (0.25, 1.0, 4.0)

TERMINAL_STATES = frozenset(
    {
        tasks_pb2.TASK_STATE_SUCCEEDED,
        tasks_pb2.TASK_STATE_FAILED,
        tasks_pb2.TASK_STATE_CANCELLED,
    }
)

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)


class SpecOptions(TypedDict, total=False):
    """The TaskSpec fields every `submit_*` helper accepts as keywords; all optional."""

    priority: tasks_pb2.Priority.ValueType
    routing_key: str
    # The task's own deadline, counted from submission (TaskSpec.timeout); not the RPC's.
    timeout_s: float | None
    max_attempts: int
    idempotency_key: str
    labels: Mapping[str, str]


# --- requests, shared by both clients and the CLI ---------------------------------------


def conversation(*prompts: str, system: str | None = None) -> list[tasks_pb2.ChatMessage]:
    """An optional system message followed by one user message per prompt."""
    messages = [] if system is None else [tasks_pb2.ChatMessage(role="system", content=system)]
    messages += [tasks_pb2.ChatMessage(role="user", content=p) for p in prompts]
    return messages


def chat_spec(
    messages: Iterable[tasks_pb2.ChatMessage],
    *,
    model: str = DEFAULT_CHAT_MODEL,
    parameters: tasks_pb2.ChatParameters | None = None,
    **options: Unpack[SpecOptions],
) -> tasks_pb2.TaskSpec:
    chat = tasks_pb2.ChatInput(model=model, messages=messages, parameters=parameters)
    return _spec(options, chat=chat)


def embed_spec(
    texts: str | Iterable[str],
    *,
    model: str = DEFAULT_EMBED_MODEL,
    **options: Unpack[SpecOptions],
) -> tasks_pb2.TaskSpec:
    # A lone str is itself an Iterable[str]: without this it would embed each character.
    texts = [texts] if isinstance(texts, str) else list(texts)
    return _spec(options, embed=tasks_pb2.EmbedInput(model=model, texts=texts))


def custom_spec(
    task_type: str, fields: Mapping[str, Any], **options: Unpack[SpecOptions]
) -> tasks_pb2.TaskSpec:
    """A task of a custom type; `fields` must be JSON-like (it becomes a Struct)."""
    custom = struct_pb2.Struct()
    custom.update(fields)
    return _spec(options, task_type=task_type, custom=custom)


def _spec(
    options: SpecOptions,
    *,
    task_type: str = "",
    chat: tasks_pb2.ChatInput | None = None,
    embed: tasks_pb2.EmbedInput | None = None,
    custom: struct_pb2.Struct | None = None,
) -> tasks_pb2.TaskSpec:
    timeout_s = options.get("timeout_s")
    timeout = None
    if timeout_s is not None:
        timeout = duration_pb2.Duration()
        timeout.FromTimedelta(timedelta(seconds=timeout_s))
    return tasks_pb2.TaskSpec(
        # Empty for chat and embed: the server names the type after the input.
        type=task_type,
        chat=chat,
        embed=embed,
        custom=custom,
        routing_key=options.get("routing_key", ""),
        priority=options.get("priority", tasks_pb2.PRIORITY_UNSPECIFIED),
        timeout=timeout,
        max_attempts=options.get("max_attempts", 0),
        idempotency_key=options.get("idempotency_key", ""),
        labels=options.get("labels", {}),
    )


def _list_request(
    states: Iterable[tasks_pb2.TaskState.ValueType],
    types: Iterable[str],
    page_size: int,
    page_token: str,
) -> tasks_pb2.ListRequest:
    return tasks_pb2.ListRequest(
        states=states, types=types, page_size=page_size, page_token=page_token
    )


def _stats_request(types: Iterable[str], window_s: float | None) -> tasks_pb2.StatsRequest:
    window = None
    if window_s is not None:
        if not math.isfinite(window_s):
            raise ValueError(f"window_s must be a finite number of seconds, not {window_s}")
        # Otherwise passed on as is: the server names the field when it is out of range.
        window = duration_pb2.Duration()
        window.FromNanoseconds(round(window_s * 1e9))
    return tasks_pb2.StatsRequest(types=types, window=window)


# --- streams -----------------------------------------------------------------------------


def task_of(event: tasks_pb2.StreamResponse) -> tasks_pb2.Task | None:
    """The task an event carries (snapshot or state change); None for an output delta."""
    kind = event.WhichOneof("event")
    if kind == "snapshot":
        return event.snapshot
    if kind == "state_changed":
        return event.state_changed.task
    return None


def latest_task(
    current: tasks_pb2.Task | None, event: tasks_pb2.StreamResponse
) -> tasks_pb2.Task | None:
    """The task as of `event`. State changes leave out the spec (it never changes), so it
    is carried over from the snapshot that started the watch."""
    task = task_of(event)
    if task is None:
        return current
    if not task.HasField("spec") and current is not None and current.HasField("spec"):
        task.spec.CopyFrom(current.spec)
    return task


def is_terminal(state: tasks_pb2.TaskState.ValueType) -> bool:
    return state in TERMINAL_STATES


class _Resumer:
    """Follows one task's events across broken streams, for `watch` in both clients.

    It keeps the last sequence seen, so each new Stream call asks for `after_sequence` and
    the server sends only what was missed (or a fresh snapshot when it cannot), and it
    budgets consecutive reconnects. With delays (0.25, 1.0, 4.0): events 1..5 arrive, then
    the server restarts and the stream fails UNAVAILABLE; sleep 0.25 s and Stream(after=5)
    fails too; sleep 1.0 s and it works: event 6 arrives and the budget is whole again. Had
    a fourth reconnect in a row failed, the UNAVAILABLE would have been raised.
    """

    def __init__(self, after_sequence: int, delays_s: Sequence[float]) -> None:
        self.after_sequence = after_sequence
        # True once a terminal task was seen: the watch is over.
        self.finished = False
        self._delays_s = tuple(delays_s)
        # Reconnects tried since the last event arrived; indexes _delays_s.
        self._failures = 0

    def accept(self, event: tasks_pb2.StreamResponse) -> bool:
        """Record `event`; False if it repeats one already seen and should be skipped."""
        # A replay overlapping what we saw would print chat text twice. A snapshot is never
        # a repeat: it restates the whole task.
        if event.WhichOneof("event") != "snapshot" and event.sequence <= self.after_sequence:
            return False
        self.after_sequence = max(self.after_sequence, event.sequence)
        task = task_of(event)
        self.finished = task is not None and is_terminal(task.state)
        self._failures = 0
        return True

    def next_delay_s(self) -> float | None:
        """The pause before the next reconnect, or None once the budget is spent."""
        if self._failures >= len(self._delays_s):
            return None
        self._failures += 1
        return self._delays_s[self._failures - 1]

    @staticmethod
    def ended_early() -> UnavailableError:
        # The contract ends a stream only after the terminal state, so an early clean end
        # means the server went away mid-watch: resume it like any other break.
        return UnavailableError(grpc.StatusCode.UNAVAILABLE, "stream ended before the task did")


# --- clients -----------------------------------------------------------------------------


def _refuse_tls_with_channel(channel: object, tls: Tls | None) -> None:
    """`tls` describes the channel a client opens; a channel passed in has its own already,
    and ignoring `tls` would leave the caller believing the calls are encrypted."""
    if channel is not None and tls is not None:
        raise ValueError("tls applies to the channel the client opens: pass channel or tls")


def _call_metadata(
    api_key: str | None, metadata: Sequence[tuple[str, str]]
) -> tuple[tuple[str, str], ...] | None:
    """What every call sends: the API key as `authorization: Bearer`, then `metadata`."""
    key = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return (*key, *metadata) or None


class AsyncTaskringClient:
    """A grpc.aio client; use as `async with AsyncTaskringClient() as client:`.

    `timeout_s` is the deadline of each unary call (None: none); streams have none unless
    asked. `api_key` (a server with keys needs one) and `metadata` are sent with every call.
    A `channel` passed in stays the caller's to close; otherwise the client opens a channel
    to `target` and closes it: over TLS with `tls` (`Tls.from_files("ca.pem")`, plus
    `cert_file` and `key_file` for mutual TLS), else plaintext.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout_s: float | None = 30.0,
        api_key: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        tls: Tls | None = None,
    ) -> None:
        _refuse_tls_with_channel(channel, tls)
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.aio.insecure_channel(target)
                if tls is None
                else grpc.aio.secure_channel(target, tls.channel_credentials())
            )
        self._channel = channel
        self._stub: tasks_pb2_grpc.TaskServiceAsyncStub = tasks_pb2_grpc.TaskServiceStub(
            self._channel
        )
        self._admin: admin_pb2_grpc.AdminServiceAsyncStub = admin_pb2_grpc.AdminServiceStub(
            self._channel
        )
        self._timeout_s = timeout_s
        self._metadata = _call_metadata(api_key, metadata)
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if this client opened it; safe to call twice."""
        if self._owns_channel and not self._closed:
            await self._channel.close()
        self._closed = True

    async def submit(self, spec: tasks_pb2.TaskSpec) -> tasks_pb2.SubmitResponse:
        request = tasks_pb2.SubmitRequest(task=spec)
        return await self._call(self._stub.Submit, request)

    async def submit_batch(self, specs: Iterable[tasks_pb2.TaskSpec]) -> list[BatchResult]:
        """Submits up to 1,000 tasks in one call, stored in one transaction (SubmitBatch):
        one BatchResult per spec, in order. A refused task does not raise: its result
        holds the error. The call raises only as a whole: InvalidArgumentError for no spec
        or more than 1,000, UnavailableError (nothing stored), ResourceExhaustedError
        when the client's limit has no token left (each task takes one; tasks past the
        limit are refused one by one)."""
        request = tasks_pb2.SubmitBatchRequest(tasks=specs)
        return batch_results(await self._call(self._stub.SubmitBatch, request))

    async def submit_chat(
        self,
        prompt: str,
        *,
        model: str = DEFAULT_CHAT_MODEL,
        system: str | None = None,
        parameters: tasks_pb2.ChatParameters | None = None,
        **options: Unpack[SpecOptions],
    ) -> tasks_pb2.Task:
        spec = chat_spec(
            conversation(prompt, system=system), model=model, parameters=parameters, **options
        )
        return (await self.submit(spec)).task

    async def submit_embed(
        self,
        texts: str | Iterable[str],
        *,
        model: str = DEFAULT_EMBED_MODEL,
        **options: Unpack[SpecOptions],
    ) -> tasks_pb2.Task:
        return (await self.submit(embed_spec(texts, model=model, **options))).task

    async def get(self, task_id: str) -> tasks_pb2.Task:
        response = await self._call(self._stub.Get, tasks_pb2.GetRequest(task_id=task_id))
        return response.task

    async def cancel(self, task_id: str) -> tasks_pb2.Task:
        response = await self._call(self._stub.Cancel, tasks_pb2.CancelRequest(task_id=task_id))
        return response.task

    async def list(
        self,
        states: Iterable[tasks_pb2.TaskState.ValueType] = (),
        types: Iterable[str] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> tasks_pb2.ListResponse:
        """One page of the caller's tasks, newest first."""
        request = _list_request(states, types, page_size, page_token)
        return await self._call(self._stub.List, request)

    async def stats(
        self, types: Iterable[str] = (), window_s: float | None = None
    ) -> tasks_pb2.StatsResponse:
        """The caller's queue depth now and, for its tasks created within the last
        `window_s` seconds (None: the server's default, an hour), counts, success rates,
        run-time percentiles, attempts, tokens and cost per task type and backend."""
        return await self._call(self._stub.Stats, _stats_request(types, window_s))

    async def list_backends(self) -> tuple[admin_pb2.BackendStatus, ...]:
        """The ring's members with load, health and circuit state (AdminService)."""
        response = await self._call(self._admin.ListBackends, admin_pb2.ListBackendsRequest())
        return tuple(response.backends)

    async def list_all(
        self,
        states: Iterable[tasks_pb2.TaskState.ValueType] = (),
        types: Iterable[str] = (),
        page_size: int = 0,
    ) -> AsyncGenerator[tasks_pb2.Task]:
        """Every matching task, newest first, fetching page after page as needed."""
        states, types, token = tuple(states), tuple(types), ""
        while True:
            page = await self.list(states, types, page_size, token)
            for task in page.tasks:
                yield task
            token = page.next_page_token
            if not token:
                return

    async def stream(
        self, task_id: str, after_sequence: int = 0, *, timeout_s: float | None = None
    ) -> AsyncGenerator[tasks_pb2.StreamResponse]:
        """The raw Stream RPC: ends after the terminal state, or raises when it breaks."""
        request = tasks_pb2.StreamRequest(task_id=task_id, after_sequence=after_sequence)
        call = self._stub.Stream(request, timeout=timeout_s, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            # The consumer may stop early: end the RPC rather than leave it open.
            call.cancel()

    async def submit_and_watch(
        self,
        spec: tasks_pb2.TaskSpec,
        *,
        resume_delays_s: Sequence[float] = DEFAULT_RESUME_DELAYS_S,
    ) -> AsyncGenerator[tasks_pb2.SubmitAndStreamResponse]:
        """Submits `spec` and follows the task to its end in one call (SubmitAndStream): the
        first event is the stored task's snapshot. A break after it resumes with Stream as
        `watch` does; a break before it raises, as the task may or may not exist (submit
        with an idempotency key to retry safely)."""
        request = tasks_pb2.SubmitAndStreamRequest(task=spec)
        call = self._stub.SubmitAndStream(request, metadata=self._metadata)
        first: tasks_pb2.SubmitAndStreamResponse | None = None
        resumer = _Resumer(0, resume_delays_s)
        try:
            async for response in call:
                first = first or response
                if resumer.accept(response.event):
                    yield response
                if resumer.finished:
                    return
        except grpc.RpcError as err:
            error = error_from_rpc(err)
            if first is None or not isinstance(error, UnavailableError):
                raise error from err
        finally:
            call.cancel()
        if first is None:
            raise resumer.ended_early()
        task_id, created = first.event.snapshot.id, first.created
        async with aclosing(
            self.watch(task_id, resumer.after_sequence, resume_delays_s=resume_delays_s)
        ) as events:
            async for event in events:
                yield tasks_pb2.SubmitAndStreamResponse(created=created, event=event)

    async def watch(
        self,
        task_id: str,
        after_sequence: int = 0,
        *,
        resume_delays_s: Sequence[float] = DEFAULT_RESUME_DELAYS_S,
    ) -> AsyncGenerator[tasks_pb2.StreamResponse]:
        """Like `stream`, but reconnects where it broke off on UNAVAILABLE (see _Resumer)."""
        resumer = _Resumer(after_sequence, resume_delays_s)
        while True:
            try:
                async with aclosing(self.stream(task_id, resumer.after_sequence)) as events:
                    async for event in events:
                        if resumer.accept(event):
                            yield event
                        if resumer.finished:
                            return
                raise resumer.ended_early()
            except UnavailableError:
                delay_s = resumer.next_delay_s()
                if delay_s is None:
                    raise
                await asyncio.sleep(delay_s)

    async def wait(
        self, task_id: str, *, resume_delays_s: Sequence[float] = DEFAULT_RESUME_DELAYS_S
    ) -> tasks_pb2.Task:
        """Watch the task until it finishes and return it in its terminal state."""
        final: tasks_pb2.Task | None = None
        async with aclosing(self.watch(task_id, resume_delays_s=resume_delays_s)) as events:
            async for event in events:
                final = latest_task(final, event)
        assert final is not None, "watch ends only after an event carrying the terminal task"
        return final

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            return await method(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err


class TaskringClient:
    """The blocking twin of AsyncTaskringClient over a sync channel; use as `with`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.Channel | None = None,
        timeout_s: float | None = 30.0,
        api_key: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        tls: Tls | None = None,
    ) -> None:
        _refuse_tls_with_channel(channel, tls)
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.insecure_channel(target)
                if tls is None
                else grpc.secure_channel(target, tls.channel_credentials())
            )
        self._channel = channel
        self._stub = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = _call_metadata(api_key, metadata)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel if this client opened it; safe to call twice."""
        if self._owns_channel:
            self._channel.close()

    def submit(self, spec: tasks_pb2.TaskSpec) -> tasks_pb2.SubmitResponse:
        return self._call(self._stub.Submit, tasks_pb2.SubmitRequest(task=spec))

    def submit_batch(self, specs: Iterable[tasks_pb2.TaskSpec]) -> list[BatchResult]:
        """As AsyncTaskringClient.submit_batch."""
        request = tasks_pb2.SubmitBatchRequest(tasks=specs)
        return batch_results(self._call(self._stub.SubmitBatch, request))

    def submit_chat(
        self,
        prompt: str,
        *,
        model: str = DEFAULT_CHAT_MODEL,
        system: str | None = None,
        parameters: tasks_pb2.ChatParameters | None = None,
        **options: Unpack[SpecOptions],
    ) -> tasks_pb2.Task:
        spec = chat_spec(
            conversation(prompt, system=system), model=model, parameters=parameters, **options
        )
        return self.submit(spec).task

    def submit_embed(
        self,
        texts: str | Iterable[str],
        *,
        model: str = DEFAULT_EMBED_MODEL,
        **options: Unpack[SpecOptions],
    ) -> tasks_pb2.Task:
        return self.submit(embed_spec(texts, model=model, **options)).task

    def get(self, task_id: str) -> tasks_pb2.Task:
        return self._call(self._stub.Get, tasks_pb2.GetRequest(task_id=task_id)).task

    def cancel(self, task_id: str) -> tasks_pb2.Task:
        return self._call(self._stub.Cancel, tasks_pb2.CancelRequest(task_id=task_id)).task

    def list(
        self,
        states: Iterable[tasks_pb2.TaskState.ValueType] = (),
        types: Iterable[str] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> tasks_pb2.ListResponse:
        """One page of the caller's tasks, newest first."""
        return self._call(self._stub.List, _list_request(states, types, page_size, page_token))

    def stats(
        self, types: Iterable[str] = (), window_s: float | None = None
    ) -> tasks_pb2.StatsResponse:
        """The caller's queue depth and per type and backend figures (see the async client)."""
        return self._call(self._stub.Stats, _stats_request(types, window_s))

    def list_backends(self) -> tuple[admin_pb2.BackendStatus, ...]:
        """The ring's members with load, health and circuit state (AdminService)."""
        return tuple(self._call(self._admin.ListBackends, admin_pb2.ListBackendsRequest()).backends)

    def list_all(
        self,
        states: Iterable[tasks_pb2.TaskState.ValueType] = (),
        types: Iterable[str] = (),
        page_size: int = 0,
    ) -> Generator[tasks_pb2.Task]:
        """Every matching task, newest first, fetching page after page as needed."""
        states, types, token = tuple(states), tuple(types), ""
        while True:
            page = self.list(states, types, page_size, token)
            yield from page.tasks
            token = page.next_page_token
            if not token:
                return

    def stream(
        self, task_id: str, after_sequence: int = 0, *, timeout_s: float | None = None
    ) -> Generator[tasks_pb2.StreamResponse]:
        """The raw Stream RPC: ends after the terminal state, or raises when it breaks."""
        request = tasks_pb2.StreamRequest(task_id=task_id, after_sequence=after_sequence)
        call = self._stub.Stream(request, timeout=timeout_s, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            # The consumer may stop early: end the RPC rather than leave it open.
            call.cancel()

    def submit_and_watch(
        self,
        spec: tasks_pb2.TaskSpec,
        *,
        resume_delays_s: Sequence[float] = DEFAULT_RESUME_DELAYS_S,
    ) -> Generator[tasks_pb2.SubmitAndStreamResponse]:
        """As AsyncTaskringClient.submit_and_watch."""
        request = tasks_pb2.SubmitAndStreamRequest(task=spec)
        call = self._stub.SubmitAndStream(request, metadata=self._metadata)
        first: tasks_pb2.SubmitAndStreamResponse | None = None
        resumer = _Resumer(0, resume_delays_s)
        try:
            for response in call:
                first = first or response
                if resumer.accept(response.event):
                    yield response
                if resumer.finished:
                    return
        except grpc.RpcError as err:
            error = error_from_rpc(err)
            if first is None or not isinstance(error, UnavailableError):
                raise error from err
        finally:
            call.cancel()
        if first is None:
            raise resumer.ended_early()
        task_id, created = first.event.snapshot.id, first.created
        with closing(
            self.watch(task_id, resumer.after_sequence, resume_delays_s=resume_delays_s)
        ) as events:
            for event in events:
                yield tasks_pb2.SubmitAndStreamResponse(created=created, event=event)

    def watch(
        self,
        task_id: str,
        after_sequence: int = 0,
        *,
        resume_delays_s: Sequence[float] = DEFAULT_RESUME_DELAYS_S,
    ) -> Generator[tasks_pb2.StreamResponse]:
        """Like `stream`, but reconnects where it broke off on UNAVAILABLE (see _Resumer)."""
        resumer = _Resumer(after_sequence, resume_delays_s)
        while True:
            try:
                with closing(self.stream(task_id, resumer.after_sequence)) as events:
                    for event in events:
                        if resumer.accept(event):
                            yield event
                        if resumer.finished:
                            return
                raise resumer.ended_early()
            except UnavailableError:
                delay_s = resumer.next_delay_s()
                if delay_s is None:
                    raise
                time.sleep(delay_s)

    def wait(
        self, task_id: str, *, resume_delays_s: Sequence[float] = DEFAULT_RESUME_DELAYS_S
    ) -> tasks_pb2.Task:
        """Watch the task until it finishes and return it in its terminal state."""
        final: tasks_pb2.Task | None = None
        with closing(self.watch(task_id, resume_delays_s=resume_delays_s)) as events:
            for event in events:
                final = latest_task(final, event)
        assert final is not None, "watch ends only after an event carrying the terminal task"
        return final

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            return method(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
