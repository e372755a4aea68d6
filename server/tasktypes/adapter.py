"""LoadedHandler: a user's handler behind the Handler contract of the executors.

It turns a task into the user's arguments (`input`, and `ctx` when asked for), the user's
results into BackendEvents, and every failure into a BackendError:

    the user raised BackendError     passed through as raised (their code, their retryable)
    the user raised TimeoutError     HANDLER_TIMEOUT, retryable: as for any backend whose
                                     own call timed out (the task's deadline is not this)
    the user raised anything else    HANDLER_ERROR, not retryable: "<type>: <Exception>: <msg>"
    input breaks the input schema    INVALID_INPUT, not retryable
    output is not JSON or breaks     OUTPUT_INVALID, not retryable, naming the path
    the output schema
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.backends.base import BackendError, BackendEvent, Completed, OutputChunk
from server.clock import Clock
from server.model.errors import FieldViolation
from server.model.task import CustomInput, CustomOutput, Task

from .context import TaskContext
from .schema import JsonSchema, json_output, plain_input

_log = logging.getLogger(__name__)
# A task's error message is stored and shown to clients; a handler's exception text may be
# as long as its input.
_MAX_MESSAGE_CHARS = 1000
# Violations named in one error message; the rest are counted.
_MAX_NAMED = 5


class CtxMode(enum.Enum):
    """How the user's function takes a TaskContext, read from its signature at load."""

    NONE = "none"  # async def f(input)
    POSITIONAL = "positional"  # async def f(input, ctx)
    KEYWORD = "keyword"  # async def f(input, *, ctx)


@dataclass(frozen=True, slots=True)
class UserHandler:
    """What the loader found behind a reference, ready to call."""

    reference: str
    function: Callable[..., Any]
    # An async generator function (streams text, yields its output) or a coroutine function.
    streams: bool
    ctx: CtxMode
    # The `aclose` of an instance taskring created from the user's class: ours to call once.
    close: Callable[[], Awaitable[object]] | None = None


class LoadedHandler:
    """A custom task type's handler, callable as a LocalBackend Handler. Long-lived: one per
    load, shared by the executors of a process; `aclose()` when they have stopped."""

    def __init__(
        self,
        task_type: str,
        user: UserHandler,
        input_schema: JsonSchema | None,
        output_schema: JsonSchema | None,
        clock: Clock,
    ) -> None:
        self._task_type = task_type
        self._user = user
        self._input_schema = input_schema
        self._output_schema = output_schema
        self._clock = clock
        self._closed = False

    @property
    def task_type(self) -> str:
        return self._task_type

    @property
    def reference(self) -> str:
        return self._user.reference

    def input_violations(self, data: Mapping[str, Any], field: str) -> list[FieldViolation]:
        """What in `data` breaks the input schema, with paths under `field`."""
        # Checked as the handler will see it, so a client who sent 5 reads 5, not 5.0.
        return self._violations(plain_input(data), field)

    async def __call__(self, task: Task) -> AsyncGenerator[BackendEvent]:
        data = self._input(task)
        args: list[object] = [data]
        kwargs: dict[str, object] = {}
        if self._user.ctx is CtxMode.POSITIONAL:
            args.append(TaskContext.of(task, self._clock))
        elif self._user.ctx is CtxMode.KEYWORD:
            kwargs["ctx"] = TaskContext.of(task, self._clock)
        result = _Result()
        try:
            if self._user.streams:
                stream = self._stream(self._user.function(*args, **kwargs), result)
                # aclosing, here and in _stream: closing this generator closes the user's.
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        yield chunk
            else:
                result.value = await self._user.function(*args, **kwargs)
        except BackendError:
            raise
        except TimeoutError as exc:
            raise self._failure("HANDLER_TIMEOUT", exc, retryable=True) from exc
        except Exception as exc:  # any bug of the user's fails this task, and only this task
            _log.exception("task %s: the %s handler raised", task.id, self._task_type)
            raise self._failure("HANDLER_ERROR", exc, retryable=False) from exc
        yield Completed(CustomOutput(self._output(result.value)))

    async def _stream(
        self, generator: AsyncGenerator[object], result: _Result
    ) -> AsyncGenerator[OutputChunk]:
        """Streams the text a generator yields; its last dict (or all its text) is the result."""
        text: list[str] = []
        # aclosing: a cancelled task closes the user's generator at once, running its
        # `finally` blocks, instead of leaving that to the garbage collector.
        async with contextlib.aclosing(generator) as stream:
            async for item in stream:
                if isinstance(item, str):
                    if item:
                        text.append(item)
                        yield OutputChunk(item)
                elif isinstance(item, Mapping):
                    result.value = item  # the last dict wins
                else:
                    raise self._output_invalid(
                        f"yielded {type(item).__name__}; yield str for output text "
                        "or a dict for the final output"
                    )
        if result.value is None:
            result.value = {"text": "".join(text)}

    async def aclose(self) -> None:
        """Calls the `aclose()` of the class instance taskring created, once; safe to call
        again, and a no-op for function handlers."""
        if self._closed:
            return
        self._closed = True
        if self._user.close is not None:
            await self._user.close()

    def _input(self, task: Task) -> dict[str, Any]:
        if not isinstance(task.spec.input, CustomInput):
            raise BackendError(
                "INVALID_INPUT",
                f"{self._task_type}: needs custom input (a JSON object)",
                retryable=False,
            )
        data = plain_input(task.spec.input.data)
        # Checked again, although Submit checked it: the task may have been stored under an
        # older schema, or by a server with another configuration than this executor's.
        if problems := self._violations(data, "input"):
            raise BackendError(
                "INVALID_INPUT",
                f"{self._task_type}: input does not match the input schema: {_named(problems)}",
                retryable=False,
            )
        return data

    def _violations(self, data: dict[str, Any], field: str) -> list[FieldViolation]:
        return [] if self._input_schema is None else self._input_schema.violations(data, field)

    def _output(self, result: object) -> dict[str, Any]:
        try:
            output = json_output(result)
        except ValueError as exc:
            raise self._output_invalid(str(exc)) from exc
        if self._output_schema is not None and (
            problems := self._output_schema.violations(output, "output")
        ):
            raise self._output_invalid(f"does not match the output schema: {_named(problems)}")
        return output

    def _output_invalid(self, detail: str) -> BackendError:
        return BackendError("OUTPUT_INVALID", f"{self._task_type}: {detail}", retryable=False)

    def _failure(self, code: str, exc: Exception, *, retryable: bool) -> BackendError:
        detail = f": {exc}" if str(exc) else ""
        message = f"{self._task_type}: {type(exc).__name__}{detail}"
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
        return BackendError(code, message, retryable=retryable)


class _Result:
    """What the user's handler returned, or its final dict, once it has ended."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: object = None


def _named(problems: list[FieldViolation]) -> str:
    named = "; ".join(f"{p.field}: {p.description}" for p in problems[:_MAX_NAMED])
    more = len(problems) - _MAX_NAMED
    return named + (f"; and {more} more" if more > 0 else "")
