"""Protobuf ⇄ domain conversions. The only module besides the servicers that knows *_pb2."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.model.errors import FieldViolation, InvalidArgumentError
from server.model.stats import GroupStats, StateCount, StatsReport
from server.model.task import (
    CHAT,
    EMBED,
    ChatInput,
    ChatMessage,
    ChatOutput,
    CustomInput,
    CustomOutput,
    EmbedInput,
    EmbedOutput,
    EndedAttempt,
    Priority,
    Task,
    TaskError,
    TaskInput,
    TaskOutput,
    TaskSpec,
    TaskState,
    Usage,
)

STATE_TO_PB = {
    TaskState.QUEUED: pb.TASK_STATE_QUEUED,
    TaskState.RUNNING: pb.TASK_STATE_RUNNING,
    TaskState.SUCCEEDED: pb.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: pb.TASK_STATE_FAILED,
    TaskState.CANCELLED: pb.TASK_STATE_CANCELLED,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}
PRIORITY_FROM_PB = {
    pb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    pb.PRIORITY_LOW: Priority.LOW,
    pb.PRIORITY_NORMAL: Priority.NORMAL,
    pb.PRIORITY_HIGH: Priority.HIGH,
    pb.PRIORITY_URGENT: Priority.URGENT,
}
PRIORITY_TO_PB = {v: k for k, v in PRIORITY_FROM_PB.items() if k != pb.PRIORITY_UNSPECIFIED}


def spec_from_pb(message: pb.TaskSpec) -> TaskSpec:
    """Structural checks only (which input, enum values, durations); validate_spec checks
    the content. Raises InvalidArgumentError naming the request's fields."""
    problems: list[FieldViolation] = []
    which = message.WhichOneof("input")
    task_input: TaskInput
    if which == "chat":
        chat = message.chat
        params = chat.parameters
        task_input = ChatInput(
            model=chat.model,
            messages=tuple(ChatMessage(m.role, m.content) for m in chat.messages),
            temperature=params.temperature if params.HasField("temperature") else None,
            max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
            top_p=params.top_p if params.HasField("top_p") else None,
            stop=tuple(params.stop),
        )
        if task_input.temperature is not None and not math.isfinite(task_input.temperature):
            problems.append(FieldViolation("task.chat.parameters.temperature", "must be finite"))
    elif which == "embed":
        task_input = EmbedInput(model=message.embed.model, texts=tuple(message.embed.texts))
    elif which == "custom":
        try:
            task_input = CustomInput(json_format.MessageToDict(message.custom))
        except ValueError as exc:  # NaN and infinities have no JSON form
            problems.append(FieldViolation("task.custom", f"not representable as JSON: {exc}"))
            task_input = CustomInput({})
    else:
        problems.append(
            FieldViolation("task.input", "set one of task.chat, task.embed, task.custom")
        )
        task_input = CustomInput({})
    task_type = message.type or {"chat": CHAT, "embed": EMBED}.get(which or "", "")
    if not task_type:
        problems.append(FieldViolation("task.type", "required for custom input"))
    if message.priority not in PRIORITY_FROM_PB:
        problems.append(FieldViolation("task.priority", f"unknown priority {message.priority}"))
    timeout_s = 0.0
    if message.HasField("timeout"):
        timeout = message.timeout
        timeout_s = timeout.seconds + timeout.nanos / 1e9
        if timeout_s <= 0:
            problems.append(FieldViolation("task.timeout", "must be positive (or unset)"))
    if message.max_attempts < 0:
        problems.append(FieldViolation("task.max_attempts", "must not be negative"))
    if problems:
        raise InvalidArgumentError(problems)
    return TaskSpec(
        type=task_type,
        input=task_input,
        routing_key=message.routing_key,
        priority=PRIORITY_FROM_PB[message.priority],
        timeout_s=timeout_s,
        max_attempts=message.max_attempts,
        idempotency_key=message.idempotency_key,
        labels=dict(message.labels),
    )


def spec_to_pb(spec: TaskSpec) -> pb.TaskSpec:
    message = pb.TaskSpec(
        type=spec.type,
        routing_key=spec.routing_key,
        priority=PRIORITY_TO_PB[spec.priority],
        max_attempts=spec.max_attempts,
        idempotency_key=spec.idempotency_key,
        labels=dict(spec.labels),
    )
    message.timeout.FromNanoseconds(round(spec.timeout_s * 1e9))
    value = spec.input
    if isinstance(value, ChatInput):
        message.chat.model = value.model
        message.chat.messages.extend(
            pb.ChatMessage(role=m.role, content=m.content) for m in value.messages
        )
        if value.temperature is not None:
            message.chat.parameters.temperature = value.temperature
        if value.max_tokens is not None:
            message.chat.parameters.max_tokens = value.max_tokens
        if value.top_p is not None:
            message.chat.parameters.top_p = value.top_p
        if value.stop:
            message.chat.parameters.stop.extend(value.stop)
    elif isinstance(value, EmbedInput):
        message.embed.model = value.model
        message.embed.texts.extend(value.texts)
    else:
        message.custom.CopyFrom(_struct(value.data))
    return message


def task_to_pb(task: Task, *, with_spec: bool = True) -> pb.Task:
    """`with_spec=False` leaves the spec out: it never changes, so Stream's state changes
    omit it (the snapshot that starts every watch has it)."""
    # Built in one constructor call: this runs for every reply and Stream event, and each
    # CopyFrom into a submessage costs as much as building it.
    return pb.Task(
        id=task.id,
        client_id=task.client_id,
        spec=spec_to_pb(task.spec) if with_spec else None,
        state=STATE_TO_PB[task.state],
        attempt=task.attempt,
        backend=task.backend,
        sequence=task.sequence,
        create_time=timestamp_to_pb(task.created_at),
        deadline=timestamp_to_pb(task.deadline),
        start_time=None if task.started_at is None else timestamp_to_pb(task.started_at),
        end_time=None if task.ended_at is None else timestamp_to_pb(task.ended_at),
        output=None if task.output is None else output_to_pb(task.output),
        error=None if task.error is None else error_to_pb(task.error),
        usage=None if task.usage is None else usage_to_pb(task.usage),
        attempts=[attempt_to_pb(a) for a in task.attempts] if task.attempts else None,
    )


def attempt_to_pb(attempt: EndedAttempt) -> pb.Attempt:
    return pb.Attempt(
        number=attempt.number,
        backend=attempt.backend,
        start_time=timestamp_to_pb(attempt.started_at),
        end_time=timestamp_to_pb(attempt.ended_at),
        outcome=STATE_TO_PB[attempt.outcome],
        error=None if attempt.error is None else error_to_pb(attempt.error),
    )


def task_from_pb(message: pb.Task) -> Task:
    """A task as a router sends it to a remote executor (ExecuteRequest.task)."""
    if message.state not in STATE_FROM_PB:
        raise InvalidArgumentError.single("task.state", f"unknown task state {message.state}")
    return Task(
        id=message.id,
        client_id=message.client_id,
        spec=spec_from_pb(message.spec),
        state=STATE_FROM_PB[message.state],
        created_at=_seconds(message.create_time),
        deadline=_seconds(message.deadline),
        sequence=message.sequence,
        attempt=message.attempt,
        backend=message.backend,
        started_at=_seconds(message.start_time) if message.HasField("start_time") else None,
    )


def output_from_pb(message: pb.TaskOutput) -> TaskOutput:
    which = message.WhichOneof("result")
    if which == "chat":
        return ChatOutput(message.chat.text, message.chat.finish_reason)
    if which == "embed":
        return EmbedOutput(tuple(tuple(e.values) for e in message.embed.embeddings))
    return CustomOutput(json_format.MessageToDict(message.custom))


def usage_from_pb(message: pb.Usage) -> Usage:
    return Usage(message.input_tokens, message.output_tokens, message.cost_usd)


def output_to_pb(output: TaskOutput) -> pb.TaskOutput:
    if isinstance(output, ChatOutput):
        return pb.TaskOutput(
            chat=pb.ChatOutput(text=output.text, finish_reason=output.finish_reason)
        )
    if isinstance(output, EmbedOutput):
        embeddings = [pb.Embedding(values=v) for v in output.vectors]
        return pb.TaskOutput(embed=pb.EmbedOutput(embeddings=embeddings))
    assert isinstance(output, CustomOutput)
    return pb.TaskOutput(custom=_struct(output.data))


def error_to_pb(error: TaskError) -> pb.TaskError:
    return pb.TaskError(code=error.code, message=error.message, retryable=error.retryable)


def usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, cost_usd=usage.cost_usd
    )


def states_from_pb(values: Any, field: str) -> set[TaskState]:
    result = set()
    for i, value in enumerate(values):
        if value not in STATE_FROM_PB:
            raise InvalidArgumentError.single(f"{field}[{i}]", f"unknown task state {value}")
        result.add(STATE_FROM_PB[value])
    return result


def duration_from_pb(value: duration_pb2.Duration, field: str) -> float:
    """Seconds; InvalidArgumentError naming `field` for a Duration the spec forbids (nanos
    beyond a second, or of the other sign than seconds), which no sane client sends."""
    nanos_ok = abs(value.nanos) < 1_000_000_000 and value.seconds * value.nanos >= 0
    if not nanos_ok:
        raise InvalidArgumentError.single(
            field, "not a valid Duration: nanos must be below one second, with the sign of seconds"
        )
    return value.seconds + value.nanos / 1e9


def duration_to_pb(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def stats_to_pb(report: StatsReport) -> pb.StatsResponse:
    stats = report.stats
    return pb.StatsResponse(
        client_id=report.client_id,
        window=duration_to_pb(report.window_s),
        compute_time=timestamp_to_pb(report.computed_at),
        queue_depth=[_state_count_to_pb(c) for c in stats.queue_depth],
        window_counts=[_state_count_to_pb(c) for c in stats.window_counts],
        groups=[_group_stats_to_pb(g) for g in stats.groups],
        duration_sample_limit=stats.duration_sample_limit,
    )


def _state_count_to_pb(count: StateCount) -> pb.StateCount:
    return pb.StateCount(
        state=STATE_TO_PB[count.state], priority=PRIORITY_TO_PB[count.priority], count=count.count
    )


def _group_stats_to_pb(group: GroupStats) -> pb.TaskGroupStats:
    def optional(seconds: float | None) -> duration_pb2.Duration | None:
        return None if seconds is None else duration_to_pb(seconds)

    return pb.TaskGroupStats(
        task_type=group.task_type,
        backend=group.backend,
        finished=group.finished,
        succeeded=group.succeeded,
        failed=group.failed,
        cancelled=group.cancelled,
        success_rate=group.success_rate,
        duration_p50=optional(group.duration_p50_s),
        duration_p90=optional(group.duration_p90_s),
        duration_p99=optional(group.duration_p99_s),
        duration_samples=group.duration_samples,
        mean_attempts=group.mean_attempts,
        input_tokens=group.input_tokens,
        output_tokens=group.output_tokens,
        cost_usd=group.cost_usd,
    )


def timestamp_to_pb(seconds: float) -> timestamp_pb2.Timestamp:
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def _seconds(value: timestamp_pb2.Timestamp) -> float:
    return value.seconds + value.nanos / 1e9


def _struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(data)
    return value
