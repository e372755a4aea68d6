"""Validation of a submitted TaskSpec: every violation is reported with the field to fix."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Set
from dataclasses import replace

from server.config import TaskLimits
from server.model.errors import FieldViolation, InvalidArgumentError
from server.model.task import CHAT, EMBED, ChatInput, CustomInput, EmbedInput, TaskSpec
from server.tasktypes import TaskType

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_MESSAGES = 1000
MAX_TEXT_CHARS = 1_000_000
MAX_EMBED_TEXTS = 2048
MAX_KEY_CHARS = 256
MAX_LABELS = 64
# A rejection travels in trailers (grpc-message, and the BadRequest detail): past 8 KiB a
# grpc client drops them at random, past 16 KiB always, and then reports RESOURCE_EXHAUSTED
# instead of the violations. So values the client sent are echoed clipped, and a rejection
# lists violations up to a byte budget (a few KiB on the wire even when every char is
# non-ASCII and percent-encoded).
MAX_ECHO_CHARS = 32
MAX_FIELD_CHARS = 80
MAX_DESCRIPTION_CHARS = 160
MAX_REPORT_BYTES = 1024

_Bad = Callable[[str, str], None]


def validate_spec(
    spec: TaskSpec,
    limits: TaskLimits,
    known_types: Set[str],
    custom_types: Mapping[str, TaskType] | None = None,
) -> TaskSpec:
    """Returns `spec` with server defaults applied, or raises InvalidArgumentError listing
    every problem. Field names are those of the protobuf request (`task.chat.messages[0]`).
    A custom type's input must also match its input schema."""
    problems: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        problems.append(FieldViolation(field, description))

    if spec.type not in known_types:
        bad(
            "task.type",
            f"unknown task type {shown(spec.type)}; known: {', '.join(sorted(known_types))}",
        )
    expected = {CHAT: ChatInput, EMBED: EmbedInput}.get(spec.type, CustomInput)
    if not isinstance(spec.input, expected):
        bad("task.input", f"a {spec.type!r} task needs {expected.__name__} input")
    if isinstance(spec.input, ChatInput):
        _check_chat(spec.input, bad)
    elif isinstance(spec.input, EmbedInput):
        _check_embed(spec.input, bad)
    elif custom_types and spec.type in custom_types:
        problems.extend(custom_types[spec.type].validate_input(spec.input.data))

    timeout_s = spec.timeout_s or limits.default_timeout_s
    max_attempts = spec.max_attempts or limits.default_max_attempts
    _check_limits(spec, timeout_s, max_attempts, limits, bad)
    if problems:
        raise InvalidArgumentError(reportable(problems))
    return replace(spec, timeout_s=timeout_s, max_attempts=max_attempts)


def reportable(problems: list[FieldViolation], whole: str = "task") -> list[FieldViolation]:
    """The violations to send: each clipped, the first ones up to MAX_REPORT_BYTES, then
    one on `whole` (the request's field they are all in) saying how many more there are."""
    kept: list[FieldViolation] = []
    used = 0
    for problem in problems:
        clipped = FieldViolation(
            clip(problem.field, MAX_FIELD_CHARS), clip(problem.description, MAX_DESCRIPTION_CHARS)
        )
        size = len(clipped.field.encode()) + len(clipped.description.encode())
        if kept and used + size > MAX_REPORT_BYTES:
            more = len(problems) - len(kept)
            kept.append(FieldViolation(whole, f"{more} more problems not listed: fix these first"))
            break
        kept.append(clipped)
        used += size
    return kept


def shown(value: str) -> str:
    """A client's value as an error message quotes it: repr, clipped."""
    return repr(clip(value, MAX_ECHO_CHARS))


def clip(text: str, most: int) -> str:
    """`text`, cut to at most `most` characters (an ellipsis marks the cut)."""
    return text if len(text) <= most else text[: most - 1] + "…"


def _check_limits(
    spec: TaskSpec, timeout_s: float, max_attempts: int, limits: TaskLimits, bad: _Bad
) -> None:
    if not math.isfinite(timeout_s) or timeout_s < 0:
        bad("task.timeout", "must be a positive duration")
    elif timeout_s > limits.max_timeout_s:
        bad("task.timeout", f"must be at most {limits.max_timeout_s:g}s")
    if not 1 <= max_attempts <= limits.max_attempts:
        bad("task.max_attempts", f"must be between 1 and {limits.max_attempts}")
    if len(spec.routing_key) > MAX_KEY_CHARS:
        bad("task.routing_key", f"must be at most {MAX_KEY_CHARS} characters")
    if len(spec.idempotency_key) > MAX_KEY_CHARS:
        bad("task.idempotency_key", f"must be at most {MAX_KEY_CHARS} characters")
    if len(spec.labels) > MAX_LABELS:
        bad("task.labels", f"at most {MAX_LABELS} labels")
    for key, value in spec.labels.items():
        if not key or len(key) > MAX_KEY_CHARS or len(value) > MAX_KEY_CHARS:
            bad(
                f"task.labels[{shown(key)}]",
                f"keys must be non-empty; keys and values at most {MAX_KEY_CHARS} characters",
            )


def _check_chat(chat: ChatInput, bad: _Bad) -> None:
    if not chat.model:
        bad("task.chat.model", "required, e.g. 'local-echo'")
    if not chat.messages:
        bad("task.chat.messages", "at least one message is required")
    if len(chat.messages) > MAX_MESSAGES:
        bad("task.chat.messages", f"at most {MAX_MESSAGES} messages")
    for i, message in enumerate(chat.messages[:MAX_MESSAGES]):
        if message.role not in CHAT_ROLES:
            bad(f"task.chat.messages[{i}].role", f"must be one of {', '.join(sorted(CHAT_ROLES))}")
        if len(message.content) > MAX_TEXT_CHARS:
            bad(f"task.chat.messages[{i}].content", f"at most {MAX_TEXT_CHARS} characters")
    if chat.max_tokens is not None and chat.max_tokens < 1:
        bad("task.chat.parameters.max_tokens", "must be at least 1")
    if chat.temperature is not None and not 0 <= chat.temperature <= 2:
        bad("task.chat.parameters.temperature", "must be between 0 and 2")
    if chat.top_p is not None and not 0 < chat.top_p <= 1:
        bad("task.chat.parameters.top_p", "must be in (0, 1]")


def _check_embed(embed: EmbedInput, bad: _Bad) -> None:
    if not embed.model:
        bad("task.embed.model", "required, e.g. 'local-hash'")
    if not embed.texts:
        bad("task.embed.texts", "at least one text is required")
    if len(embed.texts) > MAX_EMBED_TEXTS:
        bad("task.embed.texts", f"at most {MAX_EMBED_TEXTS} texts")
    for i, text in enumerate(embed.texts[:MAX_EMBED_TEXTS]):
        if len(text) > MAX_TEXT_CHARS:
            bad(f"task.embed.texts[{i}]", f"at most {MAX_TEXT_CHARS} characters")
