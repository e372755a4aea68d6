"""The results of `submit_batch`, one per task: the task, or the error that refused it."""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import TaskringError, error_from_item
from ._proto.taskring.v1 import tasks_pb2


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What became of one task of a batch. Accepted: `task` as stored (without its spec,
    which is the one sent; `get` returns it) and whether this call `created` it (False
    for an idempotent replay). Refused: `error`, the TaskringError a `submit` of that task
    would have raised (InvalidArgumentError with `.field_violations` naming
    `tasks[i]...`, AlreadyExistsError, ResourceExhaustedError with `.retry_after_s`);
    nothing of it was stored."""

    task: tasks_pb2.Task | None
    created: bool
    error: TaskringError | None

    @property
    def ok(self) -> bool:
        return self.error is None


def batch_results(response: tasks_pb2.SubmitBatchResponse) -> list[BatchResult]:
    return [_result(result) for result in response.results]


def _result(result: tasks_pb2.SubmitBatchResult) -> BatchResult:
    if result.HasField("error"):
        return BatchResult(None, False, error_from_item(result.error))
    return BatchResult(result.task, result.created, None)
