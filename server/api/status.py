"""Domain errors → gRPC status codes with google.rpc details, in one table."""

from __future__ import annotations

import math

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.model import errors

CODES: dict[type[errors.TaskringError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.StoreError: grpc.StatusCode.UNAVAILABLE,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.RateLimitedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def code_of(error: errors.TaskringError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.TaskringError) -> grpc.Status:
    code = code_of(error)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(error))
    if isinstance(error, errors.InvalidArgumentError):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        status.details.add().Pack(detail)
    elif isinstance(error, errors.RateLimitedError):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(math.ceil(error.retry_after_s * 1e9))
        status.details.add().Pack(retry)
    result: grpc.Status = rpc_status.to_status(status)
    return result
