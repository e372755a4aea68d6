"""JSON encoding of the task values a store keeps in text columns."""

from __future__ import annotations

import json
from typing import Any

from server.model.task import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    CustomInput,
    CustomOutput,
    EmbedInput,
    EmbedOutput,
    EndedAttempt,
    Priority,
    TaskError,
    TaskInput,
    TaskOutput,
    TaskSpec,
    TaskState,
    Usage,
)

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_spec(spec: TaskSpec) -> str:
    return _compact(
        {
            "type": spec.type,
            "input": _encode_input(spec.input),
            "routing_key": spec.routing_key,
            "priority": int(spec.priority),
            "timeout_s": spec.timeout_s,
            "max_attempts": spec.max_attempts,
            "idempotency_key": spec.idempotency_key,
            "labels": dict(spec.labels),
        }
    )


def decode_spec(text: str) -> TaskSpec:
    raw = json.loads(text)
    return TaskSpec(
        type=raw["type"],
        input=_decode_input(raw["input"]),
        routing_key=raw["routing_key"],
        priority=Priority(raw["priority"]),
        timeout_s=raw["timeout_s"],
        max_attempts=raw["max_attempts"],
        idempotency_key=raw["idempotency_key"],
        labels=raw["labels"],
    )


def _encode_input(value: TaskInput) -> dict[str, Any]:
    if isinstance(value, ChatInput):
        return {
            "kind": "chat",
            "model": value.model,
            "messages": [[m.role, m.content] for m in value.messages],
            "temperature": value.temperature,
            "max_tokens": value.max_tokens,
            "top_p": value.top_p,
            "stop": list(value.stop),
        }
    if isinstance(value, EmbedInput):
        return {"kind": "embed", "model": value.model, "texts": list(value.texts)}
    return {"kind": "custom", "data": value.data}


def _decode_input(raw: dict[str, Any]) -> TaskInput:
    kind = raw["kind"]
    if kind == "chat":
        return ChatInput(
            model=raw["model"],
            messages=tuple(ChatMessage(role, content) for role, content in raw["messages"]),
            temperature=raw["temperature"],
            max_tokens=raw["max_tokens"],
            top_p=raw["top_p"],
            stop=tuple(raw["stop"]),
        )
    if kind == "embed":
        return EmbedInput(model=raw["model"], texts=tuple(raw["texts"]))
    return CustomInput(data=raw["data"])


def encode_output(value: TaskOutput | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, ChatOutput):
        return _compact({"kind": "chat", "text": value.text, "finish_reason": value.finish_reason})
    if isinstance(value, EmbedOutput):
        return _compact({"kind": "embed", "vectors": [list(v) for v in value.vectors]})
    return _compact({"kind": "custom", "data": value.data})


def decode_output(text: str | None) -> TaskOutput | None:
    if text is None:
        return None
    raw = json.loads(text)
    if raw["kind"] == "chat":
        return ChatOutput(raw["text"], raw["finish_reason"])
    if raw["kind"] == "embed":
        return EmbedOutput(tuple(tuple(v) for v in raw["vectors"]))
    return CustomOutput(raw["data"])


def encode_error(value: TaskError | None) -> str | None:
    if value is None:
        return None
    return _compact(_error_list(value))


def _error_list(value: TaskError | None) -> list[Any] | None:
    return None if value is None else [value.code, value.message, value.retryable]


def decode_error(text: str | None) -> TaskError | None:
    if text is None:
        return None
    code, message, retryable = json.loads(text)
    return TaskError(code, message, retryable)


def encode_usage(value: Usage | None) -> str | None:
    if value is None:
        return None
    # Both stores sum these positions in SQL for Stats (json_extract, ->>): keep their order.
    return _compact([value.input_tokens, value.output_tokens, value.cost_usd])


def decode_usage(text: str | None) -> Usage | None:
    if text is None:
        return None
    input_tokens, output_tokens, cost_usd = json.loads(text)
    return Usage(input_tokens, output_tokens, cost_usd)


def encode_attempts(value: tuple[EndedAttempt, ...]) -> str | None:
    if not value:
        return None
    return _compact(
        [
            [a.number, a.backend, a.started_at, a.ended_at, a.outcome.value, _error_list(a.error)]
            for a in value
        ]
    )


def decode_attempts(text: str | None) -> tuple[EndedAttempt, ...]:
    if text is None:
        return ()
    return tuple(
        EndedAttempt(
            number,
            backend,
            started_at,
            ended_at,
            TaskState(outcome),
            None if error is None else TaskError(*error),
        )
        for number, backend, started_at, ended_at, outcome, error in json.loads(text)
    )
