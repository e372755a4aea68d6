"""Logs: one JSON object per line (or plain text, for people), each with the task, client and
trace it is about, and never a secret.

    {"time": "2025-06-01T12:00:00.123Z", "level": "WARNING", "logger": "server.dispatch...",
     "message": "attempt 1 on openai failed; will retry: ...", "task_id": "0197...",
     "client_id": "anonymous", "trace_id": "4bf9...", "span_id": "00f0..."}

Ids come from `extra=` at the call, else from the asyncio task's context (`bind_task`: the
dispatcher binds each attempt, the servicers each RPC), and the trace from the current
span. Every string a line holds (message, exception text, extra fields) passes through
`SECRETS` first: API keys are registered there when they are read (backends/factory.py),
and so are the values of secret-looking environment variables at start-up, so that no
library logging at DEBUG, and no exception text, can put one in a line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, TextIO

from opentelemetry import trace

LOG_FORMATS = ("json", "text")

# (task id, client id) of what this asyncio task is doing; copied into the tasks it starts.
_TASK: ContextVar[tuple[str, str] | None] = ContextVar("taskring_log_task", default=None)

# Environment variables whose values are secrets by their name (OPENAI_API_KEY, DB_PASSWORD).
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Named like secrets, but holding the path of one: redacting it would blank every path that
# shares its first characters (the certificate beside the key), and the file's content
# never reaches a log.
_SECRET_PATHS = frozenset({"TASKRING_TLS_KEY"})
# Shorter values are too likely to be ordinary words ("true", a port) to redact everywhere.
_MIN_ENV_SECRET = 8

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def bind_task(task_id: str, client_id: str = "") -> None:
    """Lines logged from here on in this asyncio task (and the tasks it starts) carry these
    ids. Each attempt and each RPC runs in its own asyncio task, so nothing is unbound."""
    _TASK.set((task_id, client_id))


class Secrets:
    """Redacts every secret this process holds from text. Logging is process-wide, so this
    is too: the one module-level instance `SECRETS`, filled at start-up."""

    def __init__(self) -> None:
        # By secret, so that a key registered twice is matched once.
        self._redactors: dict[str, Callable[[str], str]] = {}

    def add(self, secret: str) -> None:
        if not secret or secret in self._redactors:
            return
        # Deferred: the provider module (and httpx2 under it) is needed only once a secret
        # exists, and it registers its keys here itself.
        from server.backends.providers import Redactor

        # The providers' rules: whole keys and their truncated echoes ("sk-abc...xyz").
        self._redactors[secret] = Redactor(secret)

    def add_from_env(self, environ: Mapping[str, str]) -> None:
        """The values of variables named like secrets (…_API_KEY, …_TOKEN, …_PASSWORD):
        a custom task type may read its own key, which no configuration names."""
        for name, value in environ.items():
            if name in _SECRET_PATHS:
                continue
            if _SECRET_NAME.search(name) and len(value.strip()) >= _MIN_ENV_SECRET:
                self.add(value.strip())

    def __call__(self, text: str) -> str:
        for redact in self._redactors.values():
            text = redact(text)
        return text


SECRETS = Secrets()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, then task_id,
    client_id, trace_id and span_id when known, exc_info as one string, and `extra=`
    fields. Every string is redacted before it is encoded (redacting the encoded line could
    split an escape like `\\n` and break the JSON)."""

    def __init__(self, redact: Callable[[str], str] = SECRETS) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        redact = self._redact
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        line.update(_context_fields(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc_info"] = redact(record.exc_text)
        if record.stack_info:
            line["stack_info"] = redact(self.formatStack(record.stack_info))
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = _json_value(value, redact)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [task=… client=… trace=…]`, for people; redacted too."""

    def __init__(self, redact: Callable[[str], str] = SECRETS) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _context_fields(record)
        if fields:
            names = {"task_id": "task", "client_id": "client", "trace_id": "trace"}
            tags = " ".join(f"{names[k]}={v}" for k, v in fields.items() if k in names)
            head, newline, rest = text.partition("\n")  # after the message, before a traceback
            text = f"{head} [{tags}]{newline}{rest}"
        return self._redact(text)


def configure(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Sends every logger's records (the libraries' too, and warnings) to `stream`
    (stderr) in `log_format`, at `level` and above."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx2, under the provider SDKs, logs each request at INFO: a line per task that
    # says nothing the metrics do not (and ~3% of a busy router's loop). Kept for DEBUG.
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    logging.getLogger("httpx2").setLevel(quiet)
    # warnings.warn() output would otherwise be plain text on stderr.
    logging.captureWarnings(True)


def _context_fields(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = {}
    bound = _TASK.get()
    task_id = getattr(record, "task_id", None) or (bound[0] if bound else "")
    client_id = getattr(record, "client_id", None) or (bound[1] if bound else "")
    if task_id:
        fields["task_id"] = str(task_id)
    if client_id:
        fields["client_id"] = str(client_id)
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = format(span.trace_id, "032x")
        fields["span_id"] = format(span.span_id, "016x")
    return fields


def _json_value(value: object, redact: Callable[[str], str]) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(value if isinstance(value, str) else repr(value))


def _utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"
