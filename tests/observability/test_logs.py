"""Logs: one JSON object per line, carrying the task, client and trace each line is about,
and never a secret: a real server process with an OpenAI member and its API key, run at
DEBUG (every library talking), then its whole stderr read back; and the formatters alone."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.config import ConfigError, ExecutorSettings, Settings
from server.observability import logs
from tests.conftest import ServerProcess, spawn_server_logging, wait_terminal
from tests.fakes import Fail, FakeOpenAI

from .otlp_receiver import OtlpReceiver

SECRET = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"
FIELDS = ("time", "level", "logger", "message")


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log file as JSON; fails the test on the first that is not."""
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} is not JSON: {text!r}")
        assert isinstance(line, dict), text
        assert all(key in line for key in FIELDS), text
        lines.append(line)
    return lines


def chat(model: str, text: str) -> pb.SubmitRequest:
    message = pb.ChatMessage(role="user", content=text)
    return pb.SubmitRequest(task=pb.TaskSpec(chat=pb.ChatInput(model=model, messages=[message])))


@pytest.mark.slow
async def test_server_logs_are_json_with_task_ids_and_no_api_key(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """A success, a provider that echoes the rejected key, and a provider that keeps
    failing (a retry, then the end): every stderr line is a JSON object, every line that
    names a task carries its task_id, the failures' lines carry the client and the trace
    of their attempt, and the key is in no line, not even cut short."""
    async with FakeOpenAI() as openai, OtlpReceiver() as receiver:
        openai.for_model("bad-key", Fail(401, "Incorrect API key provided: {api_key}"))
        openai.for_model("down", Fail(500, "upstream exploded"))
        config = tmp_path / "taskring.toml"
        config.write_text(f"""
[[backends]]
name = "vllm"
kind = "openai"
base_url = "{openai.base_url}"
api_key_env = "TEST_PROVIDER_KEY"
task_types = ["chat"]
""")
        stderr = tmp_path / "stderr.log"
        # Started in a thread: the fakes serve on this loop while the server starts.
        env = {
            "TASKRING_CONFIG": str(config),
            "TEST_PROVIDER_KEY": SECRET,
            "TASKRING_LOG_LEVEL": "DEBUG",
            "TASKRING_DEFAULT_MAX_ATTEMPTS": "2",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        server = await asyncio.to_thread(spawn_server_logging, tmp_path / "tasks.db", stderr, env)
        server_processes.append(server)
        traces: dict[str, str] = {}  # task id -> the trace id its client sent
        finals: dict[str, pb.Task] = {}
        rng = random.Random(3)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            for model in ("fine", "bad-key", "down"):
                trace_id = f"{rng.getrandbits(128):032x}"
                traceparent = f"00-{trace_id}-{rng.getrandbits(64):016x}-01"
                request = chat(model, "hello")
                task = (await stub.Submit(request, metadata=(("traceparent", traceparent),))).task
                final = await wait_terminal(stub, task.id)
                traces[task.id], finals[model] = trace_id, final
        # In a thread too: the exporter's last batch goes to the receiver on this loop.
        assert await asyncio.to_thread(server.terminate) == 0
    assert finals["fine"].state == pb.TASK_STATE_SUCCEEDED
    assert finals["bad-key"].error.code == "BACKEND_AUTH_FAILED"
    assert (finals["down"].error.code, finals["down"].attempt) == ("BACKEND_UNAVAILABLE", 2)

    raw = stderr.read_text()
    for piece in (SECRET, SECRET[:12], SECRET[-12:]):
        assert piece not in raw
    lines = read_lines(stderr)
    for line in lines:
        text = f"{line['message']} {line.get('exc_info', '')}"
        for task_id in traces:
            if task_id in text:
                assert line.get("task_id") == task_id, line

    attempts = {  # (task id, attempt number) -> the attempt's span id, from its trace
        (s.attributes["taskring.task.id"], s.attributes["taskring.attempt"]): s.span_id
        for s in receiver.named("taskring.attempt", "taskring-router")
    }

    def about(final: pb.Task, level: str) -> list[dict[str, Any]]:
        found = [x for x in lines if x.get("task_id") == final.id and x["level"] == level]
        assert found, f"no {level} line about the {final.spec.chat.model!r} task"
        for line in found:
            assert line["client_id"] == "anonymous"
            assert line["trace_id"] == traces[final.id]
        return found

    [succeeded] = [x for x in about(finals["fine"], "DEBUG") if "succeeded" in x["message"]]
    assert succeeded["span_id"] == attempts[finals["fine"].id, 1]
    [rejected] = about(finals["bad-key"], "WARNING")
    assert "BACKEND_AUTH_FAILED" in rejected["message"]
    assert "[REDACTED]" in rejected["message"], "the echoed key is there, hidden"
    retried, failed = about(finals["down"], "WARNING")
    assert "will retry" in retried["message"]
    assert retried["span_id"] == attempts[finals["down"].id, 1]
    assert "after 2 attempts" in failed["message"]
    assert failed["span_id"] == attempts[finals["down"].id, 2]


# -- the formatters --------------------------------------------------------------------------


@pytest.fixture
def redacting() -> logs.Secrets:
    secrets = logs.Secrets()
    secrets.add(SECRET)
    return secrets


def record(
    message: str, *args: object, exc: BaseException | None = None, **extra: object
) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    made = logging.LogRecord("taskring.test", logging.WARNING, __file__, 1, message, args, exc_info)
    made.__dict__.update(extra)
    return made


def test_a_json_line_holds_the_ids_the_trace_and_the_traceback(redacting: logs.Secrets) -> None:
    formatter = logs.JsonFormatter(redacting)
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    try:
        raise ValueError("boom")
    except ValueError as exc:
        error = exc

    async def in_a_task() -> dict[str, Any]:
        logs.bind_task("task-1", "client-1")
        with tracer.start_as_current_span("attempt") as span:
            line = json.loads(formatter.format(record("it %s", "failed", exc=error, attempt=2)))
            context = span.get_span_context()
            assert line["trace_id"] == f"{context.trace_id:032x}"
            assert line["span_id"] == f"{context.span_id:016x}"
        return dict(line)

    line = asyncio.run(in_a_task())
    assert line["message"] == "it failed"
    assert line["level"] == "WARNING"
    assert line["logger"] == "taskring.test"
    assert line["time"].endswith("Z")
    assert (line["task_id"], line["client_id"], line["attempt"]) == ("task-1", "client-1", 2)
    assert line["exc_info"].startswith("Traceback")
    assert "ValueError: boom" in line["exc_info"]
    # Bound in that asyncio task only: a line from elsewhere names no task.
    assert "task_id" not in json.loads(formatter.format(record("elsewhere")))


def test_extra_fields_win_over_the_bound_task() -> None:
    formatter = logs.JsonFormatter(logs.Secrets())

    async def in_a_task() -> Any:
        logs.bind_task("bound", "client-1")
        return json.loads(formatter.format(record("claimed", task_id="explicit")))

    line = asyncio.run(in_a_task())
    assert (line["task_id"], line["client_id"]) == ("explicit", "client-1")


def test_no_secret_survives_in_message_extra_or_exception(redacting: logs.Secrets) -> None:
    """Whatever a library logs, the key does not reach the line, whole or cut short, and
    the line is still JSON (redaction happens before encoding)."""
    try:
        raise RuntimeError(f"bad key\n{SECRET}")
    except RuntimeError as exc:
        error = exc
    cut = f"{SECRET[:12]}...{SECRET[-4:]}"
    made = record("key %s cut %s", SECRET, cut, exc=error, headers={"authorization": SECRET})
    for formatter in (logs.JsonFormatter(redacting), logs.TextFormatter(redacting)):
        text = formatter.format(made)
        assert SECRET not in text
        assert SECRET[:12] not in text
        assert "[REDACTED]" in text
    line = json.loads(logs.JsonFormatter(redacting).format(made))
    assert line["message"] == "key [REDACTED] cut [REDACTED]"
    assert SECRET not in line["headers"]


def test_secret_looking_environment_variables_are_redacted() -> None:
    secrets = logs.Secrets()
    secrets.add_from_env(
        {"MY_SERVICE_TOKEN": "tok-abcdefgh1234", "DB_PASSWORD": "hunter2-long", "HOME": "/home/x"}
    )
    redacted = secrets("a tok-abcdefgh1234 b hunter2-long /home/x")
    assert redacted == "a [REDACTED] b [REDACTED] /home/x"


def test_the_path_of_the_tls_key_stays_readable_in_logs() -> None:
    """TASKRING_TLS_KEY names a file, not a secret: blanking it would also blank the
    certificate's path beside it (same first characters) in the start-up log."""
    secrets = logs.Secrets()
    secrets.add_from_env({"TASKRING_TLS_KEY": "/etc/taskring/tls/server.key"})
    text = "serving TLS with the certificate /etc/taskring/tls/server.pem"
    assert secrets(text) == text


def configured_lines(level: str, *logged: tuple[str, int, str]) -> list[dict[str, Any]]:
    """The JSON lines `logged` (logger, level, message) leave after logs.configure(level)."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure(level, "json", stream)
        for name, at, message in logged:
            logging.getLogger(name).log(at, message)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("httpx2").setLevel(logging.NOTSET)
        logging.captureWarnings(False)
    return [json.loads(text) for text in stream.getvalue().splitlines()]


def test_configure_sends_every_logger_to_the_stream_as_json() -> None:
    [line] = configured_lines(
        "INFO",
        ("some.library", logging.INFO, "hello there"),
        ("some.library", logging.DEBUG, "not at INFO"),
    )
    assert (line["logger"], line["message"]) == ("some.library", "hello there")


def test_the_http_client_logs_no_line_per_request_unless_debugging() -> None:
    """httpx2 logs every provider request at INFO; at INFO the server shows only its
    warnings, and at DEBUG everything."""
    request = ("httpx2", logging.INFO, 'HTTP Request: POST http://x/v1 "HTTP/1.1 200 OK"')
    trouble = ("httpx2", logging.WARNING, "something went wrong")
    assert [x["message"] for x in configured_lines("INFO", request, trouble)] == [trouble[2]]
    assert len(configured_lines("DEBUG", request, trouble)) == 2


def test_log_format_is_a_setting_of_both_processes() -> None:
    assert Settings.from_env({}).server.log_format == "json"
    assert Settings.from_env({"TASKRING_LOG_FORMAT": "Text"}).server.log_format == "text"
    assert ExecutorSettings.from_env({"TASKRING_LOG_FORMAT": "text"}).log_format == "text"
    with pytest.raises(ConfigError, match="TASKRING_LOG_FORMAT='yaml'"):
        Settings.from_env({"TASKRING_LOG_FORMAT": "yaml"})
