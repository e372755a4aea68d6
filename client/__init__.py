"""The Python client of taskring: async and blocking clients, TLS, errors and message types."""

from __future__ import annotations

from ._batch import BatchResult
from ._client import AsyncTaskringClient, SpecOptions, TaskringClient
from ._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TaskringError,
    UnauthenticatedError,
    UnavailableError,
)
from ._proto.taskring.v1.tasks_pb2 import (
    ChatInput,
    ChatMessage,
    ChatParameters,
    EmbedInput,
    ListResponse,
    Priority,
    StatsResponse,
    StreamResponse,
    SubmitResponse,
    Task,
    TaskSpec,
    TaskState,
)
from ._tls import Tls

__all__ = [
    "AlreadyExistsError",
    "AsyncTaskringClient",
    "BatchResult",
    "ChatInput",
    "ChatMessage",
    "ChatParameters",
    "EmbedInput",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "ListResponse",
    "NotFoundError",
    "Priority",
    "ResourceExhaustedError",
    "SpecOptions",
    "StatsResponse",
    "StreamResponse",
    "SubmitResponse",
    "Task",
    "TaskSpec",
    "TaskState",
    "TaskringClient",
    "TaskringError",
    "Tls",
    "UnauthenticatedError",
    "UnavailableError",
]
