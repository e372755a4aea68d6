"""Custom task type handlers in every shape a user may write (and some they may not),
loaded by reference ("tests.unit.tasktype_handlers:reply") in test_tasktypes.py."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

from server.backends.base import BackendError
from server.tasktypes import TaskContext

# ------------------------------------------------------------------ the supported shapes


async def reply(input: dict[str, Any]) -> dict[str, Any]:
    """Shape 1: a coroutine returning the output."""
    return {"echo": input}


async def stream_words(input: dict[str, Any]) -> AsyncIterator[str]:
    """Shape 2, text only: the output is {"text": <all the text>}."""
    for word in input["words"]:
        yield f"{word} "


async def stream_then_result(input: dict[str, Any]) -> AsyncIterator[str | dict[str, Any]]:
    """Shape 2 with dicts: text streams, and the last dict is the output."""
    yield "draft "
    yield {"version": 1}
    yield "final"
    yield {"version": 2}


async def with_ctx(input: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Shape 3: a second parameter receives the TaskContext."""
    return {
        "task_id": ctx.task_id,
        "task_type": ctx.task_type,
        "attempt": ctx.attempt,
        "labels": dict(ctx.labels),
        "remaining_s": ctx.remaining_s(),
    }


async def with_keyword_ctx(input: dict[str, Any], *, ctx: TaskContext) -> dict[str, Any]:
    return {"task_id": ctx.task_id}


async def mutates_input(input: dict[str, Any]) -> dict[str, Any]:
    input["nested"]["added"] = True
    return {"types": {key: type(value).__name__ for key, value in input.items()}}


class Numbered:
    """Shape 4: one instance per load, made with the options; `log` records its life."""

    def __init__(self, prefix: str, log: list[str]) -> None:
        self.prefix = prefix
        self.log = log
        self.calls = 0
        log.append("created")

    async def __call__(self, input: dict[str, Any], ctx: TaskContext) -> AsyncIterator[str]:
        self.calls += 1
        yield f"{self.prefix}{self.calls} (attempt {ctx.attempt})"

    async def aclose(self) -> None:
        self.log.append("closed")


class Endless:
    """Streams until it is closed; records that its `finally` ran."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def __call__(self, input: dict[str, Any]) -> AsyncIterator[str]:
        try:
            while True:
                yield "tick "
                await asyncio.sleep(0)
        finally:
            self.log.append("generator closed")


class _Shared:
    async def __call__(self, input: dict[str, Any]) -> dict[str, Any]:
        return {"shared": True}


shared_instance = _Shared()

# ------------------------------------------------------------------ failures at run time


async def raises(input: dict[str, Any]) -> dict[str, Any]:
    return {"text": input["text"]}  # KeyError when there is no text


async def raises_retryable(input: dict[str, Any]) -> dict[str, Any]:
    raise BackendError("UPSTREAM_BUSY", "the upstream model is overloaded", retryable=True)


async def times_out(input: dict[str, Any]) -> dict[str, Any]:
    async with asyncio.timeout(0):
        await asyncio.sleep(1)
    return {}


async def returns_count(input: dict[str, Any]) -> dict[str, Any]:
    return {"count": input.get("count", "three")}


async def returns_datetime(input: dict[str, Any]) -> dict[str, Any]:
    return {"at": [datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)]}


async def returns_list(input: dict[str, Any]) -> list[int]:
    return [1, 2]


async def yields_bytes(input: dict[str, Any]) -> AsyncIterator[bytes]:
    yield b"raw"


# ------------------------------------------------------------------ rejected at load


NOT_CALLABLE = 42


def not_async(input: dict[str, Any]) -> dict[str, Any]:
    return input


def sync_generator(input: dict[str, Any]) -> Any:
    yield "text"


async def too_many_parameters(input: dict[str, Any], ctx: TaskContext, extra: int) -> None:
    return None


class SyncCall:
    def __call__(self, input: dict[str, Any]) -> dict[str, Any]:
        return input


class SyncClose:
    async def __call__(self, input: dict[str, Any]) -> dict[str, Any]:
        return input

    def aclose(self) -> None:
        return None


class NeedsModelPath:
    def __init__(self, model_path: str) -> None:
        self.model_path = model_path

    async def __call__(self, input: dict[str, Any]) -> dict[str, Any]:
        return input


class BrokenInit:
    def __init__(self) -> None:
        raise RuntimeError("model file missing")

    async def __call__(self, input: dict[str, Any]) -> dict[str, Any]:
        return input
