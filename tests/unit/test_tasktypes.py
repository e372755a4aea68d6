"""Custom task types: loading user handlers of every shape, their schemas and their errors."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from server.backends.base import BackendError, OutputChunk
from server.backends.local import Handler, LocalBackend, LocalModelSettings, builtin_handlers
from server.clock import ManualClock
from server.model.errors import FieldViolation
from server.model.task import CustomInput, CustomOutput, Task, TaskSpec, TaskState
from server.tasktypes import (
    LoadedHandler,
    TaskTypeConfigError,
    TaskTypes,
    TaskTypeSpec,
    load_handler,
    spec_from_mapping,
)
from server.tasktypes.schema import MAX_VIOLATIONS

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = "tests.unit.tasktype_handlers"
NOW = 1_700_000_000.0


def ref(name: str) -> str:
    return f"{HANDLERS}:{name}"


def make_task(
    data: Mapping[str, Any],
    *,
    task_type: str = "t",
    attempt: int = 1,
    labels: Mapping[str, str] | None = None,
) -> Task:
    spec = TaskSpec(type=task_type, input=CustomInput(data), labels=labels or {})
    return Task(
        id="task-1",
        client_id="client",
        spec=spec,
        state=TaskState.RUNNING,
        created_at=NOW,
        deadline=NOW + 30,
        attempt=attempt,
    )


async def run(handler: Handler, task: Task) -> tuple[list[str], Mapping[str, Any]]:
    """The text chunks a handler streamed and its output."""
    chunks: list[str] = []
    output: Mapping[str, Any] | None = None
    async for event in handler(task):
        if isinstance(event, OutputChunk):
            chunks.append(event.text)
        else:
            assert isinstance(event.output, CustomOutput)
            output = event.output.data
    assert output is not None, "a handler that ends without error completes"
    return chunks, output


async def failure(handler: Handler, task: Task) -> BackendError:
    with pytest.raises(BackendError) as caught:
        await run(handler, task)
    return caught.value


def load(reference: str, **fields: Any) -> LoadedHandler:
    return load_handler(TaskTypeSpec("t", reference, **fields), ManualClock(NOW))


def load_problems(spec: TaskTypeSpec) -> list[str]:
    with pytest.raises(TaskTypeConfigError) as caught:
        load_handler(spec)
    return caught.value.problems


# ----------------------------------------------------------------------------- shapes


async def test_coroutine_handler_returns_its_dict_as_output() -> None:
    """`async def f(input) -> dict`: the dict is the output; nothing is streamed."""
    chunks, output = await run(load(ref("reply")), make_task({"text": "hi"}))
    assert chunks == []
    assert output == {"echo": {"text": "hi"}}


async def test_async_generator_streams_text_and_its_text_is_the_output() -> None:
    """Each str yielded is an output chunk; with no dict the output is {"text": all text}."""
    chunks, output = await run(load(ref("stream_words")), make_task({"words": ["a", "b"]}))
    assert chunks == ["a ", "b "]
    assert output == {"text": "a b "}


async def test_last_dict_yielded_is_the_output() -> None:
    """Text keeps streaming around dicts; the last dict wins."""
    chunks, output = await run(load(ref("stream_then_result")), make_task({}))
    assert chunks == ["draft ", "final"]
    assert output == {"version": 2}


async def test_ctx_is_passed_to_a_handler_that_declares_it() -> None:
    """A second parameter gets the task's id, type, attempt, labels and time left."""
    task = make_task({}, attempt=2, labels={"team": "search"})
    _, output = await run(load(ref("with_ctx")), task)
    assert output == {
        "task_id": "task-1",
        "task_type": "t",
        "attempt": 2,
        "labels": {"team": "search"},
        "remaining_s": 30.0,
    }


async def test_keyword_only_ctx_is_passed_by_name() -> None:
    """`async def f(input, *, ctx)` gets ctx as a keyword."""
    _, output = await run(load(ref("with_keyword_ctx")), make_task({}))
    assert output == {"task_id": "task-1"}


async def test_input_is_a_private_copy_with_whole_numbers_as_int() -> None:
    """Struct sends every number as a double; the handler sees 3 as int, 2.5 as float,
    and its changes to the input do not reach the stored task."""
    data = {"count": 3.0, "ratio": 2.5, "flag": True, "nested": {"items": [1.0]}}
    task = make_task(data)
    _, output = await run(load(ref("mutates_input")), task)
    assert output == {"types": {"count": "int", "ratio": "float", "flag": "bool", "nested": "dict"}}
    assert data["nested"] == {"items": [1.0]}


async def test_class_handler_is_created_once_with_its_options_and_closed_once() -> None:
    """A class is instantiated at load with `options`; its instance serves every task and
    its `aclose()` is awaited once when the types are closed."""
    log: list[str] = []
    spec = TaskTypeSpec("numbered", ref("Numbered"), options={"prefix": "call-", "log": log})
    async with TaskTypes.load([spec]) as types:
        assert log == ["created"], "created at load, before any task"
        handler = types.handlers()["numbered"]
        first, _ = await run(handler, make_task({}, task_type="numbered"))
        second, output = await run(handler, make_task({}, task_type="numbered", attempt=3))
        assert first == ["call-1 (attempt 1)"]
        assert second == ["call-2 (attempt 3)"]
        assert output == {"text": "call-2 (attempt 3)"}
        await types.aclose()
    assert log == ["created", "closed"], "closed once, though closed twice"


async def test_cancelled_task_closes_the_users_generator() -> None:
    """Stopping an attempt runs the `finally` of the user's generator at once."""
    log: list[str] = []
    handler = load(ref("Endless"), options={"log": log})
    events = handler(make_task({}))
    assert await anext(events) == OutputChunk("tick ")
    await events.aclose()  # what the dispatcher does when the task is cancelled
    assert log == ["generator closed"]


async def test_an_instance_in_the_module_is_used_as_is() -> None:
    """A callable object the module created is called directly (and never closed by us)."""
    _, output = await run(load(ref("shared_instance")), make_task({}))
    assert output == {"shared": True}


# ----------------------------------------------------------------------------- load errors


@pytest.mark.parametrize(
    ("reference", "options", "expected"),
    [
        (
            f"{HANDLERS}.reply",
            {},
            f"must look like 'package.module:function'; did you mean '{HANDLERS}:reply'?",
        ),
        ("tests.unit.no_such_module:reply", {}, "no module named 'tests.unit.no_such_module'"),
        (ref("replay"), {}, f"{HANDLERS} has no attribute 'replay'; did you mean 'reply'?"),
        (ref("NOT_CALLABLE"), {}, "is a value of type int; expected an `async def` function"),
        (ref("not_async"), {}, "is not async; expected an `async def` function"),
        (ref("sync_generator"), {}, "is a generator; make it `async def`"),
        (ref("too_many_parameters"), {}, "a handler takes the input, and optionally ctx"),
        (ref("SyncCall"), {}, "class SyncCall needs `async def __call__(self, input)`"),
        (ref("SyncClose"), {}, "SyncClose.aclose must be `async def aclose(self)`"),
        (ref("NeedsModelPath"), {}, "cannot create NeedsModelPath(**task_types.t.options)"),
        (
            ref("NeedsModelPath"),
            {"model": "x"},
            "got an unexpected keyword argument 'model'",
        ),
        (ref("BrokenInit"), {}, "BrokenInit(...) raised RuntimeError: model file missing"),
        (ref("reply"), {"size": 1}, "options are passed to a class handler's constructor"),
    ],
)
def test_bad_handler_reference_fails_at_load_saying_what_to_fix(
    reference: str, options: dict[str, Any], expected: str
) -> None:
    """Each mistake fails at start with the configuration key, the reference and a fix."""
    (problem,) = load_problems(TaskTypeSpec("t", reference, options=options))
    assert problem.startswith(f"task_types.t.handler = {reference!r}: "), problem
    assert expected in problem, problem


def test_user_module_that_fails_to_import_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while importing the module, or a dependency it lacks, is reported as
    such, not as a missing module."""
    (tmp_path / "tt_raises_at_import.py").write_text("raise RuntimeError('no GPU found')\n")
    (tmp_path / "tt_needs_dependency.py").write_text("import tt_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(tmp_path)
    (raised,) = load_problems(TaskTypeSpec("t", "tt_raises_at_import:f"))
    assert "importing tt_raises_at_import failed: RuntimeError: no GPU found" in raised
    (missing,) = load_problems(TaskTypeSpec("t", "tt_needs_dependency:f"))
    assert "it imports 'tt_not_installed_anywhere', which is not installed" in missing


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (
            {"type": "object", "properties": {"text": {"type": "strin"}}},
            "not a valid JSON Schema at $.properties.text.type: 'strin' is not valid",
        ),
        (
            {"properties": {"a": {"$ref": "#/$defs/missing"}}},
            "\"$ref\": '#/$defs/missing' cannot be resolved",
        ),
        (
            {"properties": {"a": {"$ref": "https://example.com/a.json"}}},
            "only references within the schema",
        ),
        (
            {"$schema": "http://json-schema.org/draft-07/schema#"},
            'only Draft 2020-12 is supported: "$schema" = "https://json-schema.org/draft/2020-12',
        ),
    ],
)
def test_bad_schema_fails_at_load(schema: dict[str, Any], expected: str) -> None:
    """A schema that is not valid Draft 2020-12, or refers to nowhere, stops the start."""
    (problem,) = load_problems(TaskTypeSpec("t", ref("reply"), input_schema=schema))
    assert problem.startswith("task_types.t.input_schema: "), problem
    assert expected in problem, problem


def test_every_problem_of_a_type_is_reported_at_once() -> None:
    """A bad handler and two bad schemas: three lines, one error."""
    bad = {"type": 1}
    problems = load_problems(TaskTypeSpec("t", ref("nope"), input_schema=bad, output_schema=bad))
    assert [p.split(":")[0] for p in problems] == [
        "task_types.t.input_schema",
        "task_types.t.output_schema",
        "task_types.t.handler = 'tests.unit.tasktype_handlers",
    ]


# ----------------------------------------------------------------------------- schemas

ITEMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "count": {"type": "integer", "minimum": 1},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
        },
        "first name": {"$ref": "#/$defs/name"},
    },
    "required": ["text", "count"],
    "additionalProperties": False,
    "$defs": {"name": {"type": "string"}},
}


def items_type() -> TaskTypes:
    return TaskTypes.load([TaskTypeSpec("items", ref("reply"), input_schema=ITEMS_SCHEMA)])


def test_valid_input_has_no_violations() -> None:
    """Struct's 2.0 is an integer for the schema, as in JSON."""
    data = {"text": "x", "count": 2.0, "items": [{"name": "a"}], "first name": "Ada"}
    assert items_type()["items"].validate_input(data) == []


def test_input_violations_name_each_field_path() -> None:
    """Each violation names the request field to fix, in validate.py's path style, and the
    value as the client sent it (Struct's 0.0 is the client's 0)."""
    data = {"count": 0.0, "items": [{"name": "a"}, {"name": 3}, {}], "first name": 1, "x": 1}
    violations = items_type()["items"].validate_input(data)
    assert sorted(violations, key=lambda v: v.field) == [
        FieldViolation("task.custom", "Additional properties are not allowed ('x' was unexpected)"),
        FieldViolation("task.custom.count", "0 is less than the minimum of 1"),
        FieldViolation("task.custom.items[1].name", "3 is not of type 'string'"),
        FieldViolation("task.custom.items[2].name", "required"),
        FieldViolation("task.custom.text", "required"),
        FieldViolation("task.custom['first name']", "1 is not of type 'string'"),
    ]


def test_input_violations_are_capped_and_their_descriptions_shortened() -> None:
    """10,000 bad items give a bounded answer; a huge value is not echoed back."""
    schema = {
        "type": "object",
        "properties": {
            "xs": {"type": "array", "items": {"type": "integer"}},
            "s": {"maxLength": 1},
        },
    }
    types = TaskTypes.load([TaskTypeSpec("list", ref("reply"), input_schema=schema)])
    violations = types["list"].validate_input({"xs": ["a"] * 10_000, "s": "y" * 100_000})
    assert len(violations) == MAX_VIOLATIONS
    assert violations[-1] == FieldViolation("task.custom", "more violations not listed")
    (long,) = types["list"].validate_input({"s": "y" * 100_000})
    assert len(long.description) <= 200


async def test_input_breaking_the_schema_at_execution_fails_as_invalid_input() -> None:
    """A task stored under an older schema fails clearly instead of inside the handler."""
    handler = items_type()["items"].handler
    error = await failure(handler, make_task({"text": "x"}, task_type="items"))
    assert error.error.code == "INVALID_INPUT"
    assert not error.error.retryable
    assert "input.count: required" in error.error.message


async def test_output_breaking_the_output_schema_fails_with_output_invalid() -> None:
    """The attempt fails, not retried, and the message names the output's path."""
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    handler = load(ref("returns_count"), output_schema=schema)
    error = await failure(handler, make_task({}))
    assert error.error.code == "OUTPUT_INVALID"
    assert not error.error.retryable
    assert error.error.message == (
        "t: does not match the output schema: output.count: 'three' is not of type 'integer'"
    )
    _, output = await run(handler, make_task({"count": 3}))
    assert output == {"count": 3}


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("returns_datetime", "t: output.at[0]: datetime is not JSON (use str, list or dict)"),
        ("returns_list", "t: output: must be a dict, not list"),
        ("yields_bytes", "t: yielded bytes; yield str for output text or a dict"),
    ],
)
async def test_output_that_is_not_a_json_object_fails_with_output_invalid(
    reference: str, expected: str
) -> None:
    """What cannot be stored as JSON fails the attempt with the path that cannot."""
    error = await failure(load(ref(reference)), make_task({}))
    assert error.error.code == "OUTPUT_INVALID"
    assert error.error.message.startswith(expected), error.error.message


async def test_non_finite_number_in_output_fails_with_output_invalid() -> None:
    """NaN is not JSON: a client could not parse the result."""
    error = await failure(load(ref("reply")), make_task({"x": math.nan}))
    assert error.error.code == "OUTPUT_INVALID"
    assert "output.echo.x: nan is not a JSON number" in error.error.message


# ----------------------------------------------------------------------------- run errors


async def test_handler_exception_fails_without_retry_as_handler_error() -> None:
    """A bug in the user's code fails the task at once, with the exception's type and text."""
    error = await failure(load(ref("raises")), make_task({}))
    assert error.error.code == "HANDLER_ERROR"
    assert error.error.message == "t: KeyError: 'text'"
    assert not error.error.retryable


async def test_backend_error_raised_by_the_user_passes_through() -> None:
    """A user who wants a retry raises BackendError(retryable=True) and gets exactly that."""
    error = await failure(load(ref("raises_retryable")), make_task({}))
    assert error.error.code == "UPSTREAM_BUSY"
    assert error.error.retryable


async def test_timeout_inside_the_handler_is_a_retryable_handler_timeout() -> None:
    """The handler's own call timing out is worth another attempt, as for any backend."""
    error = await failure(load(ref("times_out")), make_task({}))
    assert error.error.code == "HANDLER_TIMEOUT"
    assert error.error.retryable


# ----------------------------------------------------------------------------- configuration


def test_spec_from_a_toml_table_reads_inline_and_file_schemas(tmp_path: Path) -> None:
    """Schema files are relative to the configuration file's directory."""
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "out.json").write_text(json.dumps({"type": "object"}))
    table = {
        "handler": ref("Numbered"),
        "input_schema": {"type": "object"},
        "output_schema_file": "schemas/out.json",
        "options": {"prefix": "n"},
    }
    spec = spec_from_mapping("numbered", table, tmp_path)
    assert spec == TaskTypeSpec(
        "numbered",
        ref("Numbered"),
        input_schema={"type": "object"},
        output_schema={"type": "object"},
        options={"prefix": "n"},
    )


def test_every_problem_of_a_toml_table_is_named(tmp_path: Path) -> None:
    """Unknown keys (with a suggestion), wrong types and unreadable files, all at once."""
    (tmp_path / "broken.json").write_text("{not json")
    table = {
        "handlr": "x:y",
        "options": ["a"],
        "input_schema": {"type": "object"},
        "input_schema_file": "in.json",
        "output_schema_file": "broken.json",
    }
    with pytest.raises(TaskTypeConfigError) as caught:
        spec_from_mapping("chat", table, tmp_path)
    problems = caught.value.problems
    assert problems[0] == "task_types.chat: 'chat' is a built-in task type; choose another name"
    assert problems[1].startswith("task_types.chat.handlr: unknown key; did you mean 'handler'?")
    assert problems[2].startswith("task_types.chat.handler: required, e.g. handler = ")
    assert problems[3] == "task_types.chat.options: must be a table of constructor arguments"
    assert problems[4] == ("task_types.chat: set input_schema or input_schema_file, not both")
    assert problems[5].startswith(
        f"task_types.chat.output_schema_file: {tmp_path / 'broken.json'} is not valid JSON"
    )
    assert len(problems) == 6


def test_missing_schema_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TaskTypeConfigError, match=r"input_schema_file: cannot read .*in\.json"):
        spec_from_mapping("t", {"handler": ref("reply"), "input_schema_file": "in.json"}, tmp_path)


def test_builtin_and_duplicate_names_are_rejected_with_every_other_problem() -> None:
    """`chat` and `embed` are taken; a name used twice is an error; all reported at once."""
    with pytest.raises(TaskTypeConfigError) as caught:
        TaskTypes.load(
            [
                TaskTypeSpec("embed", ref("reply")),
                TaskTypeSpec("a", ref("reply")),
                TaskTypeSpec("a", ref("reply")),
                TaskTypeSpec("b", ref("nope")),
            ]
        )
    problems = caught.value.problems
    assert problems[0] == "task_types.embed: 'embed' is a built-in task type; choose another name"
    assert problems[1] == "task_types.a: defined twice"
    assert problems[2].startswith("task_types.b.handler")
    assert len(problems) == 3


# ----------------------------------------------------------------------------- the example

EXAMPLE_TEXT = (
    "Taskring stores AI tasks durably before it answers. "
    "The weather was pleasant on Tuesday. "
    "It routes each task over a ring of executor backends. "
    "Executor backends run tasks with deadlines, retries and cancellation. "
    "Lunch was pasta. "
    "Clients watch tasks and their output as executor backends stream it."
)
EXAMPLE_TABLES: dict[str, object] = {
    "summarize": {
        "handler": "examples.summarize:summarize",
        "input_schema_file": "examples/summarize.input.schema.json",
        "output_schema_file": "examples/summarize.output.schema.json",
    },
    "summarize-short": {
        "handler": "examples.summarize:Summarizer",
        "input_schema_file": "examples/summarize.input.schema.json",
        "output_schema_file": "examples/summarize.output.schema.json",
        "options": {"max_sentences": 1, "extra_stopwords": ["taskring"]},
    },
}


async def test_example_summarizer_streams_its_summary_through_a_local_backend() -> None:
    """The example, configured as in examples/README.md, runs on a real LocalBackend next
    to the built-in types: its sentences stream, and the output matches its schema."""
    async with TaskTypes.from_tables(EXAMPLE_TABLES, ROOT) as types:
        handlers = {**builtin_handlers(LocalModelSettings(token_delay_s=0)), **types.handlers()}
        backend = LocalBackend("local-1", handlers, 4)
        assert backend.task_types == {"chat", "embed", "summarize", "summarize-short"}
        task = make_task({"text": EXAMPLE_TEXT, "max_sentences": 2.0}, task_type="summarize")
        chunks, output = await run(backend.execute, task)
        assert output == {
            "summary": (
                "Executor backends run tasks with deadlines, retries and cancellation. "
                "Clients watch tasks and their output as executor backends stream it."
            ),
            "sentences": [3, 5],
            "source_sentences": 6,
        }
        assert "".join(chunks) == output["summary"]
        short = make_task({"text": EXAMPLE_TEXT}, task_type="summarize-short")
        _, output = await run(backend.execute, short)
        assert output["sentences"] == [3]


def test_example_input_schema_rejects_what_the_summarizer_cannot_use() -> None:
    """Submit would answer INVALID_ARGUMENT naming these fields."""
    types = TaskTypes.from_tables(EXAMPLE_TABLES, ROOT)
    violations = types["summarize"].validate_input({"max_sentences": 0, "lang": "en"})
    assert {v.field for v in violations} == {
        "task.custom",
        "task.custom.max_sentences",
        "task.custom.text",
    }


def test_a_task_type_that_is_not_a_table_is_named() -> None:
    """`task_types.x = "mod:f"` instead of a `[task_types.x]` table."""
    with pytest.raises(TaskTypeConfigError) as caught:
        TaskTypes.from_tables({"x": "examples.summarize:summarize"}, ROOT)
    assert caught.value.problems == ["task_types.x: must be a table"]
