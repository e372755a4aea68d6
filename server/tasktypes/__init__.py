"""Custom task types: handlers users write as plain Python, registered by configuration.

    [task_types.summarize]
    handler = "examples.summarize:summarize"        # "package.module:attribute"
    input_schema_file = "examples/summarize.input.schema.json"   # or input_schema = {...}
    output_schema_file = "examples/summarize.output.schema.json" # both optional
    options = { max_sentences = 5 }                  # a class handler's constructor kwargs

The handler may be any of these; none needs to import taskring:

    async def f(input: dict) -> dict                 the returned dict is the output
    async def f(input: dict): yield ...              each str yielded is streamed as output
                                                     text; the last dict yielded is the
                                                     output (none: {"text": <all text>})
    async def f(input: dict, ctx) ...                either shape, plus a TaskContext (task
                                                     id, attempt, labels, remaining_s())
    class C: def __init__(self, **options)           created once per load (per process),
             async def __call__(self, input[, ctx])  called like the functions above;
             async def aclose(self)                  optional, awaited at shutdown

`input` is a private copy of the task's JSON object: dicts, lists, str, bool, None, int for
whole numbers and float otherwise. It matches the input schema: Submit rejects anything
else with INVALID_ARGUMENT naming each field (`task.custom.items[0].name`).

Failures (see adapter.py): an exception fails the task at once with HANDLER_ERROR, not
retried ("<type>: <ExceptionType>: <message>"; ValueError included, as Python raises it for
bugs too); TimeoutError is HANDLER_TIMEOUT and retried; to choose the code and whether to
retry, raise server.backends.base.BackendError(code, message, retryable=...). An output
that is not JSON or breaks the output schema fails with OUTPUT_INVALID, naming the path.
A bad reference, schema or option fails at load, as TaskTypeConfigError, before serving.
"""

from __future__ import annotations

from .adapter import LoadedHandler
from .context import TaskContext
from .loader import load_handler
from .registry import TaskType, TaskTypes
from .spec import BUILTIN_TYPES, TaskTypeConfigError, TaskTypeSpec, spec_from_mapping

__all__ = [
    "BUILTIN_TYPES",
    "LoadedHandler",
    "TaskContext",
    "TaskType",
    "TaskTypeConfigError",
    "TaskTypeSpec",
    "TaskTypes",
    "load_handler",
    "spec_from_mapping",
]
