"""RemoteBackend: a ring member that runs tasks in a separate executor process over gRPC.

The executor serves ExecutorService (see server/executor); this side turns an attempt into
one server-streaming Execute call. Closing the iterator (the task was cancelled, or its
deadline struck) cancels the call, and the executor cancels the handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from client._proto.taskring.v1 import executor_pb2 as epb
from client._proto.taskring.v1 import executor_pb2_grpc
from server.api.convert import output_from_pb, task_to_pb, usage_from_pb
from server.clock import Clock, SystemClock
from server.model.task import Task
from server.observability.tracing import outgoing_metadata

from .base import BackendBase, BackendError, BackendEvent, Completed, OutputChunk

# How long an executor that answered RESOURCE_EXHAUSTED gets no new work: it is full, not
# failing, and a slot frees when any of its attempts ends.
BUSY_PAUSE_S = 0.05

# Status codes after which the same attempt may succeed on another member, and that say
# the executor itself is in trouble (they count towards its circuit breaker).
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
    }
)


_CHANNEL_OPTIONS = [
    # Reconnect within ~2 s of an executor coming back (gRPC's default backoff grows to
    # 120 s), so a restarted member gets its keys back promptly.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a silently vanished peer (a VM gone, a cable cut) without waiting for TCP.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


class RemoteBackend(BackendBase):
    def __init__(
        self,
        name: str,
        *,
        address: str,
        max_concurrency: int,
        task_types: frozenset[str],
        clock: Clock | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`credentials` dial the executor over TLS; without, in plaintext."""
        super().__init__(name, max_concurrency, task_types)
        self.address = address
        self._clock = clock or SystemClock()
        # One HTTP/2 connection multiplexes every attempt; gRPC reconnects it with backoff.
        # The member's health checks (Members' HealthWatcher) use it too: the same TLS.
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
        self._stub = executor_pb2_grpc.ExecutorServiceStub(self.channel)

    def __repr__(self) -> str:
        return f"RemoteBackend({self._name!r}, address={self.address!r})"

    async def aclose(self) -> None:
        await self.channel.close()

    async def execute(self, task: Task) -> AsyncIterator[BackendEvent]:
        # The executor learns the deadline twice: in the task, and as the call's deadline,
        # so a lost router cannot leave work running past it.
        timeout = max(task.deadline - self._clock.now(), 0.001)
        # The attempt's trace context (`traceparent`), so the executor's spans join the trace.
        call = self._stub.Execute(
            epb.ExecuteRequest(task=task_to_pb(task)),
            timeout=timeout,
            metadata=outgoing_metadata(),
        )
        try:
            async for response in call:
                which = response.WhichOneof("event")
                if which == "output_delta":
                    yield OutputChunk(response.output_delta.text)
                elif which == "result":
                    result = response.result
                    usage = usage_from_pb(result.usage) if result.HasField("usage") else None
                    yield Completed(output_from_pb(result.output), usage)
                    return
                elif which == "error":
                    raise _error_from_pb(response.error)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"executor {self._name} passed the task's deadline") from None
            raise _error_from_status(self._name, exc) from None
        finally:
            call.cancel()  # a no-op once the call has ended
        raise BackendError(
            "BACKEND_ERROR",
            f"executor {self._name} ended the attempt without a result",
            retryable=True,
            backend_fault=True,
        )


def _error_from_pb(message: epb.ExecuteError) -> BackendError:
    retry_after = message.retry_after
    return BackendError(
        message.error.code,
        message.error.message,
        retryable=message.error.retryable,
        backend_fault=message.backend_fault,
        retry_after_s=(
            retry_after.seconds + retry_after.nanos / 1e9
            if message.HasField("retry_after")
            else None
        ),
    )


def _error_from_status(name: str, exc: grpc.aio.AioRpcError) -> BackendError:
    code, details = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return BackendError(
            "BACKEND_BUSY",
            f"executor {name} is full: {details}",
            retryable=True,
            retry_after_s=BUSY_PAUSE_S,
        )
    if code in _UNAVAILABLE:
        return BackendError(
            "BACKEND_UNAVAILABLE",
            f"executor {name} failed: {code.name}: {details}",
            retryable=True,
            backend_fault=True,
        )
    if code is grpc.StatusCode.CANCELLED:
        # Not ours (we cancel by closing the iterator, which never gets here): the executor
        # or a proxy in front of it gave up on the call.
        return BackendError(
            "BACKEND_UNAVAILABLE",
            f"executor {name} cancelled the attempt: {details}",
            retryable=True,
            backend_fault=True,
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return BackendError(
            "BACKEND_AUTH_FAILED",
            f"executor {name} refused the router's credentials: {code.name}: {details}",
            retryable=False,
            backend_fault=True,
        )
    if code is grpc.StatusCode.UNIMPLEMENTED:
        # The router's configuration says it serves this type and it does not: the
        # member is misconfigured, another one may run the task.
        return BackendError(
            "BACKEND_MISCONFIGURED",
            f"executor {name} cannot run this task: {details}",
            retryable=True,
            backend_fault=True,
        )
    # INVALID_ARGUMENT and the like: the request, not the executor.
    return BackendError(
        "INVALID_REQUEST",
        f"executor {name} refused the task: {code.name}: {details}",
        retryable=False,
    )
