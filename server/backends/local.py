"""LocalBackend: in-process executors with built-in offline task types.

The built-in types need no network and no model weights, and say so in their output:
  chat   "local-echo" model: replies "[local-echo] <last user message>", streamed word by
         word with a configurable delay per token, honouring max_tokens.
  embed  "local-hash" model: a deterministic feature-hashing embedding (not semantic).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from server.model.task import (
    CHAT,
    EMBED,
    ChatInput,
    ChatOutput,
    EmbedInput,
    EmbedOutput,
    Task,
    Usage,
)

from .base import BackendBase, BackendError, BackendEvent, Completed, OutputChunk

Handler = Callable[[Task], AsyncIterator[BackendEvent]]
_TOKEN = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True, slots=True)
class LocalModelSettings:
    token_delay_s: float = 0.02
    embed_dim: int = 64


def tokens(text: str) -> list[str]:
    """Words with their trailing whitespace: joining them gives the text back."""
    return _TOKEN.findall(text)


def echo_chat(settings: LocalModelSettings) -> Handler:
    async def run(task: Task) -> AsyncIterator[BackendEvent]:
        spec = task.spec.input
        if not isinstance(spec, ChatInput):
            raise BackendError("INVALID_INPUT", "chat needs chat input", retryable=False)
        last_user = next((m.content for m in reversed(spec.messages) if m.role == "user"), "")
        reply = tokens(f"[local-echo] {last_user}")
        finish = "stop"
        if spec.max_tokens is not None and len(reply) > spec.max_tokens:
            reply, finish = reply[: spec.max_tokens], "length"
        for token in reply:
            if settings.token_delay_s > 0:
                await asyncio.sleep(settings.token_delay_s)
            yield OutputChunk(token)
        prompt_tokens = sum(len(tokens(m.content)) for m in spec.messages)
        yield Completed(ChatOutput("".join(reply), finish), Usage(prompt_tokens, len(reply)))

    return run


def hash_embed(settings: LocalModelSettings) -> Handler:
    async def run(task: Task) -> AsyncIterator[BackendEvent]:
        spec = task.spec.input
        if not isinstance(spec, EmbedInput):
            raise BackendError("INVALID_INPUT", "embed needs embed input", retryable=False)
        vectors = tuple(embed_text(text, settings.embed_dim) for text in spec.texts)
        used = sum(len(tokens(text)) for text in spec.texts)
        yield Completed(EmbedOutput(vectors), Usage(used, 0))

    return run


def embed_text(text: str, dim: int) -> tuple[float, ...]:
    """Feature hashing: each word adds ±1 to one of `dim` buckets; the result has norm 1."""
    vector = [0.0] * dim
    for word in text.lower().split():
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        (value,) = struct.unpack(">Q", digest)
        vector[value % dim] += 1.0 if value >> 63 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return tuple(v / norm for v in vector)


def builtin_handlers(settings: LocalModelSettings) -> dict[str, Handler]:
    return {CHAT: echo_chat(settings), EMBED: hash_embed(settings)}


class LocalBackend(BackendBase):
    """Runs handlers in this process; `max_concurrency` bounds how many at once."""

    def __init__(self, name: str, handlers: Mapping[str, Handler], max_concurrency: int) -> None:
        super().__init__(name, max_concurrency, frozenset(handlers))
        self._handlers = dict(handlers)

    def execute(self, task: Task) -> AsyncIterator[BackendEvent]:
        handler = self._handlers.get(task.spec.type)
        if handler is None:
            return _fail(f"backend {self._name} does not run tasks of type {task.spec.type!r}")
        return handler(task)


async def _fail(message: str) -> AsyncIterator[BackendEvent]:
    if message:  # always; the `yield` below makes this an async generator
        raise BackendError("UNSUPPORTED", message, retryable=True)
    yield Completed(ChatOutput(""))
