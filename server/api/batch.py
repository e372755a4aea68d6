"""SubmitBatch's results as protobuf: each refused task gets the status a Submit of it
alone would have had, its fields named from the batch request (`tasks[3].chat.model`)."""

from __future__ import annotations

import math

from google.protobuf import duration_pb2

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.model.errors import InvalidArgumentError, RateLimitedError, TaskringError
from server.tasks import BatchOutcome

from . import convert
from .status import code_of


def result_to_pb(index: int, outcome: BatchOutcome) -> pb.SubmitBatchResult:
    if isinstance(outcome, TaskringError):
        return pb.SubmitBatchResult(error=item_error_to_pb(index, outcome))
    task, created = outcome
    # The spec stays out: the client sent it, and with it the reply could outgrow the
    # request (and a client's 4 MiB default receive limit).
    return pb.SubmitBatchResult(task=convert.task_to_pb(task, with_spec=False), created=created)


def item_error_to_pb(index: int, error: TaskringError) -> pb.BatchItemError:
    message = pb.BatchItemError(code=code_of(error).value[0], message=str(error))
    if isinstance(error, InvalidArgumentError):
        violations = [
            pb.FieldViolation(field=item_field(index, v.field), description=v.description)
            for v in error.violations
        ]
        message.field_violations.extend(violations)
        # The message lists the violations too: named as the batch names them.
        message.message = "; ".join(f"{v.field}: {v.description}" for v in violations)
    elif isinstance(error, RateLimitedError):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(math.ceil(error.retry_after_s * 1e9))
        message.retry_delay.CopyFrom(delay)
    return message


def item_field(index: int, field: str) -> str:
    """A field of Submit's request (`task.chat.model`) as the same field of task `index`
    of SubmitBatch's request (`tasks[3].chat.model`)."""
    if field == "task" or field.startswith("task."):
        return f"tasks[{index}]{field[4:]}"
    return f"tasks[{index}].{field}"
