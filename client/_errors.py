"""The client's error tree, and the one place where gRPC errors are translated into it.

    TaskringError                 any failed call: .code, .details, .field_violations,
    │                             .retry_after_s (RetryInfo) and .retryable
    ├── InvalidArgumentError      INVALID_ARGUMENT: .field_violations names each field to fix
    ├── NotFoundError             NOT_FOUND: no such task (for this client)
    ├── AlreadyExistsError        ALREADY_EXISTS
    ├── FailedPreconditionError   FAILED_PRECONDITION: e.g. cancelling a finished task
    ├── ResourceExhaustedError    RESOURCE_EXHAUSTED: retryable, after .retry_after_s if known
    ├── UnavailableError          UNAVAILABLE: server down or shutting down; retryable
    └── UnauthenticatedError      UNAUTHENTICATED

Any other status code (DEADLINE_EXCEEDED, INTERNAL, ...) raises the root class itself, so
`except TaskringError` is always enough to catch every failure of a call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ._proto.taskring.v1 import tasks_pb2


class TaskringError(Exception):
    """A call to the taskring service failed with a gRPC status."""

    # Whether the same call may succeed if repeated later; subclasses opt in.
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        self.code = code
        self.details = details
        # (field path, what is wrong) pairs from google.rpc.BadRequest, in server order.
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        # The server's google.rpc.RetryInfo hint; None when it sent none.
        self.retry_after_s = retry_after_s
        super().__init__(code, details)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.details}"
        if extra := self.unstated_violations():
            text += f" ({'; '.join(extra)})"
        return text

    def unstated_violations(self) -> list[str]:
        """Each field violation as "field: description", less those `details` already says.

        Servers often make the message from the violations themselves; repeating them
        would only make the error twice as long.
        """
        texts = [f"{field}: {description}" for field, description in self.field_violations]
        return [text for text in texts if text not in self.details]


class InvalidArgumentError(TaskringError):
    """The request was rejected; `field_violations` says which fields to fix."""


class NotFoundError(TaskringError):
    """No task with that id exists for this client."""


class AlreadyExistsError(TaskringError):
    """The resource already exists."""


class FailedPreconditionError(TaskringError):
    """The request is valid but not in the task's current state, e.g. cancelling a finished task."""


class ResourceExhaustedError(TaskringError):
    """A limit was hit; retry after `retry_after_s` seconds when the server says how long."""

    retryable = True


class UnavailableError(TaskringError):
    """The server cannot be reached or is shutting down; the call may be retried."""

    retryable = True


class UnauthenticatedError(TaskringError):
    """The call carried no valid credentials."""


_BY_CODE: dict[grpc.StatusCode, type[TaskringError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_from_rpc(err: grpc.RpcError) -> TaskringError:
    """Translate a failed call (sync or grpc.aio) into the matching TaskringError.

    Call sites `raise error_from_rpc(err) from err` so the gRPC error stays in the chain.
    """
    # Every RpcError gRPC raises is also a Call (sync) or an AioRpcError; a bare RpcError
    # carries no status, so it reads as UNKNOWN rather than failing here.
    if not isinstance(err, grpc.Call | grpc.aio.AioRpcError):
        return TaskringError(grpc.StatusCode.UNKNOWN, str(err))
    code, details = err.code(), err.details() or ""
    violations: list[tuple[str, str]] = []
    retry_after_s: float | None = None
    for detail in _rich_details(err):
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry_after_s = retry_info.retry_delay.ToTimedelta().total_seconds()
    return _BY_CODE.get(code, TaskringError)(code, details, violations, retry_after_s)


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_item(error: tasks_pb2.BatchItemError) -> TaskringError:
    """One task's refusal in a SubmitBatch reply, as the error a Submit of that task alone
    would have raised."""
    code = _BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)
    violations = [(v.field, v.description) for v in error.field_violations]
    retry_after_s = None
    if error.HasField("retry_delay"):
        retry_after_s = error.retry_delay.ToTimedelta().total_seconds()
    return _BY_CODE.get(code, TaskringError)(code, error.message, violations, retry_after_s)


def _rich_details(err: grpc.Call | grpc.aio.AioRpcError) -> Sequence[any_pb2.Any]:
    """The google.rpc.Status details packed in the trailers, or none."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        # The packed status disagrees with the call's own code or message: a broken server
        # or proxy. The plain status is still right, so report it without details.
        return ()
    return () if status is None else list(status.details)
