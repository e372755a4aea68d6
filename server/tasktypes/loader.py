"""Loading a custom task type: import its handler reference, recognise the shape of what
is there, check its schemas, and adapt it, so that every mistake fails at start."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any, cast

from server.clock import Clock, SystemClock

from .adapter import CtxMode, LoadedHandler, UserHandler
from .schema import JsonSchema
from .spec import TaskTypeConfigError, TaskTypeSpec

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_REFERENCE = re.compile(rf"(?P<module>{_DOTTED}):(?P<attribute>{_DOTTED})")
_SHAPES = (
    "an `async def` function (returning a dict, or yielding str and a final dict) "
    "or a class with such an `async def __call__`"
)


class _BadHandlerError(Exception):
    """One thing wrong with a handler reference; becomes a line of TaskTypeConfigError."""


def load_handler(spec: TaskTypeSpec, clock: Clock | None = None) -> LoadedHandler:
    """Imports and adapts the handler of `spec`, checks its schemas, and creates the
    instance of a class handler (with `spec.options`). Raises TaskTypeConfigError naming
    each problem and its configuration key. The result is a LocalBackend Handler; call its
    `aclose()` when the executors that use it have stopped."""
    problems: list[str] = []
    schemas: dict[str, JsonSchema | None] = {}
    for kind, schema in (("input", spec.input_schema), ("output", spec.output_schema)):
        try:
            schemas[kind] = None if schema is None else JsonSchema(schema)
        except ValueError as exc:
            problems.append(f"{spec.where}.{kind}_schema: {exc}")
    user: UserHandler | None = None
    try:
        user = _user_handler(spec)
    except _BadHandlerError as exc:
        problems.append(f"{spec.where}.handler = {spec.handler!r}: {exc}")
    if user is None or problems:
        # A class instance created already is dropped unclosed: the server will not start.
        raise TaskTypeConfigError(problems)
    return LoadedHandler(
        spec.name, user, schemas["input"], schemas["output"], clock or SystemClock()
    )


def _user_handler(spec: TaskTypeSpec) -> UserHandler:
    target = _resolve(spec.handler)
    if inspect.isclass(target):
        return _from_class(target, spec)
    if spec.options:
        raise _BadHandlerError(
            "options are passed to a class handler's constructor, and this is not a class; "
            f"remove {spec.where}.options or point the handler at a class"
        )
    if _is_async(target) or inspect.isfunction(target) or inspect.ismethod(target):
        function = cast("Callable[..., Any]", target)
    elif callable(target):
        # An object with `__call__` created by the user's module: used as is, shared, and
        # never closed by taskring (the module owns it).
        function = target.__call__
    else:
        raise _BadHandlerError(f"is a value of type {type(target).__name__}; expected {_SHAPES}")
    return _adapt(spec.handler, function, close=None)


def _resolve(reference: str) -> object:
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        hint = ""
        if ":" not in reference and "." in reference:
            head, _, tail = reference.rpartition(".")
            hint = f"; did you mean {head + ':' + tail!r}?"
        raise _BadHandlerError(f"must look like 'package.module:function'{hint}")
    module = _import(match["module"])
    target: object = module
    walked = match["module"]
    for name in match["attribute"].split("."):
        if not hasattr(target, name):
            raise _BadHandlerError(
                f"{walked} has no attribute {name!r}{_did_you_mean(name, target)}"
            )
        target = getattr(target, name)
        walked = f"{walked}.{name}"
    return target


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if name == missing or name.startswith(missing + "."):
            raise _BadHandlerError(
                f"no module named {missing!r}; install it, or run from the directory that "
                "holds it, or add that directory to PYTHONPATH"
            ) from exc
        raise _BadHandlerError(
            f"importing {name} failed: it imports {missing!r}, which is not installed"
        ) from exc
    except Exception as exc:  # the user's module runs at import: any failure is theirs
        raise _BadHandlerError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc


def _did_you_mean(name: str, target: object) -> str:
    public = [n for n in dir(target) if not n.startswith("_")]
    close = difflib.get_close_matches(name, public, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _from_class(cls: type, spec: TaskTypeSpec) -> UserHandler:
    call = getattr(cls, "__call__", None)  # noqa: B004 - the method itself, to inspect it
    if not _is_async(call):
        raise _BadHandlerError(
            f"class {cls.__name__} needs `async def __call__(self, input)` (a coroutine or an "
            "async generator) to be a handler"
        )
    closer = getattr(cls, "aclose", None)
    if closer is not None and not inspect.iscoroutinefunction(closer):
        raise _BadHandlerError(f"{cls.__name__}.aclose must be `async def aclose(self)`")
    try:
        instance = cls(**spec.options)
    except TypeError as exc:
        raise _BadHandlerError(
            f"cannot create {cls.__name__}(**{spec.where}.options): {exc}; "
            "options are the constructor's keyword arguments"
        ) from exc
    except Exception as exc:  # the user's constructor (loading a model, say)
        raise _BadHandlerError(f"{cls.__name__}(...) raised {type(exc).__name__}: {exc}") from exc
    close = getattr(instance, "aclose", None)
    return _adapt(spec.handler, instance.__call__, close=close)


def _adapt(
    reference: str, function: Callable[..., Any], close: Callable[[], Awaitable[object]] | None
) -> UserHandler:
    if not _is_async(function):
        if inspect.isgeneratorfunction(function):
            raise _BadHandlerError("is a generator; make it `async def` (an async generator)")
        raise _BadHandlerError(
            f"is not async; expected {_SHAPES} (run blocking work inside it with "
            "`await asyncio.to_thread(...)`)"
        )
    return UserHandler(
        reference,
        function,
        streams=inspect.isasyncgenfunction(function),
        ctx=_ctx_mode(function),
        close=close,
    )


def _is_async(function: object) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


def _ctx_mode(function: Callable[..., Any]) -> CtxMode:
    """Whether to pass a TaskContext, and how, from the signature: a second positional
    parameter takes it (`f(input, ctx)`), else a keyword-only `ctx` (`f(input, *, ctx)`)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as exc:
        raise _BadHandlerError(f"its signature cannot be read: {exc}") from exc

    def accepts(*args: object, **kwargs: object) -> bool:
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            return False
        return True

    if accepts("input", "ctx"):
        return CtxMode.POSITIONAL
    if "ctx" in signature.parameters and accepts("input", ctx="ctx"):
        return CtxMode.KEYWORD
    if accepts("input"):
        return CtxMode.NONE
    raise _BadHandlerError(
        f"its parameters {signature} do not fit; a handler takes the input, and optionally "
        "ctx: `async def f(input)` or `async def f(input, ctx)`"
    )
