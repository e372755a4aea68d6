"""Task values: what a client asks for (TaskSpec) and what the service knows (Task)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class TaskState(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class Priority(enum.IntEnum):
    """Dispatch order: a higher value runs first."""

    LOW = 1
    NORMAL = 2
    HIGH = 3
    URGENT = 4


CHAT = "chat"
EMBED = "embed"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatInput:
    model: str
    messages: tuple[ChatMessage, ...]
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EmbedInput:
    model: str
    texts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CustomInput:
    """Input of a custom task type: a JSON object."""

    data: Mapping[str, Any]


TaskInput = ChatInput | EmbedInput | CustomInput


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a client asked for, after defaults were applied."""

    type: str
    input: TaskInput
    routing_key: str = ""
    priority: Priority = Priority.NORMAL
    timeout_s: float = 600.0
    max_attempts: int = 3
    idempotency_key: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatOutput:
    text: str
    finish_reason: str = ""


def chat_text(output: object) -> str:
    """The chat text of an output so far; "" for none or another kind of output."""
    return output.text if isinstance(output, ChatOutput) else ""


@dataclass(frozen=True, slots=True)
class EmbedOutput:
    vectors: tuple[tuple[float, ...], ...]


@dataclass(frozen=True, slots=True)
class CustomOutput:
    data: Mapping[str, Any]


TaskOutput = ChatOutput | EmbedOutput | CustomOutput


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why a task (or one attempt of it) failed. `code` is stable, `message` is for people."""

    code: str
    message: str
    retryable: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class EndedAttempt:
    """One execution of a task that has ended: where it ran, when, and how it ended.
    `outcome` QUEUED: the task went back to the queue (a retryable failure, or its router
    stopped); `error` says why it did not succeed (None when it did, or was cancelled)."""

    number: int
    backend: str
    started_at: float
    ended_at: float
    outcome: TaskState
    error: TaskError | None = None


@dataclass(frozen=True, slots=True)
class Task:
    """A task as stored. Every change goes through a function of `states`, which bumps
    `sequence`."""

    id: str
    client_id: str
    spec: TaskSpec
    state: TaskState
    created_at: float
    deadline: float
    sequence: int = 1
    attempt: int = 0
    backend: str = ""
    output: TaskOutput | None = None
    error: TaskError | None = None
    usage: Usage | None = None
    started_at: float | None = None
    ended_at: float | None = None
    # Earliest time a QUEUED task may be claimed again (retry backoff).
    not_before: float = 0.0
    # Every attempt that has ended, oldest first (at most max_attempts, plus those its
    # router's death interrupted). The running one is attempt, backend and started_at.
    attempts: tuple[EndedAttempt, ...] = ()

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    def evolve(self, **changes: Any) -> Task:
        """A copy with `changes`; only states.py should call this for state changes."""
        return replace(self, **changes)
