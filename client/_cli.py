"""The `taskring` command line: submit, get, cancel, list and watch tasks; stats of them.

Exit codes, so scripts can branch on the outcome of `watch` and `submit --watch`:
0 done (the task SUCCEEDED), 1 the task FAILED, 2 it was CANCELLED, 3 a call failed with a
gRPC status (printed as "error: CODE: message"), 64 bad usage, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from typing import Any, NoReturn, TextIO

from google.protobuf import duration_pb2, json_format

from ._client import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBED_MODEL,
    DEFAULT_TARGET,
    SpecOptions,
    TaskringClient,
    chat_spec,
    conversation,
    custom_spec,
    embed_spec,
    task_of,
)
from ._errors import TaskringError
from ._proto.taskring.v1 import admin_pb2, tasks_pb2
from ._tls import Tls

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_RPC_ERROR = 3
# sysexits' EX_USAGE: argparse's usual 2 would read as CANCELLED.
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

_EXIT_BY_STATE = {
    tasks_pb2.TASK_STATE_SUCCEEDED: EXIT_SUCCEEDED,
    tasks_pb2.TASK_STATE_FAILED: EXIT_FAILED,
    tasks_pb2.TASK_STATE_CANCELLED: EXIT_CANCELLED,
}
PRIORITIES = ("low", "normal", "high", "urgent")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")

# The input flags of `submit` (argparse dest → as the user typed it), and which of them
# each kind of task takes; any other one given is a mistake worth reporting.
_INPUT_FLAGS = {
    "prompt": "PROMPT",
    "messages": "--message",
    "system": "--system",
    "texts": "--text",
    "input_json": "--input-json",
    "model": "--model",
}
_FLAGS_BY_KIND = {
    "chat": {"prompt", "messages", "system", "model"},
    "embed": {"prompt", "texts", "model"},
    "custom": {"input_json"},
}

_Command = Callable[[TaskringClient, argparse.Namespace], int]


class UsageError(Exception):
    """Arguments that parse but do not describe a valid request."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# --- argv → requests ---------------------------------------------------------------------


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The argument parser; `env` supplies TASKRING_TARGET and the TLS files (os.environ in
    `main`). The API key comes from TASKRING_API_KEY only: a flag would show it in `ps` and
    shell history."""
    parser = _Parser(prog="taskring", description="Submit and follow taskring tasks.")
    parser.add_argument(
        "--target",
        default=env.get("TASKRING_TARGET") or DEFAULT_TARGET,
        help="server address (default: $TASKRING_TARGET or %(default)s)",
    )
    _add_tls(parser, env)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="submit a task and print its id")
    submit.set_defaults(run=_submit)
    submit.add_argument("prompt", nargs="?", help="the user prompt (chat) or one text (embed)")
    submit.add_argument(
        "--type",
        dest="task_type",
        default="",
        metavar="TYPE",
        help="chat, embed or a custom type (default: chat; embed with --text)",
    )
    submit.add_argument(
        "--model", help=f"default: {DEFAULT_CHAT_MODEL} (chat), {DEFAULT_EMBED_MODEL} (embed)"
    )
    submit.add_argument(
        "-m",
        "--message",
        dest="messages",
        action="append",
        default=[],
        metavar="TEXT",
        help="a user message (repeatable)",
    )
    submit.add_argument("--system", metavar="TEXT", help="a system message, sent first")
    submit.add_argument(
        "--text",
        dest="texts",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text to embed (repeatable)",
    )
    submit.add_argument(
        "--input-json", type=_json_object, metavar="JSON", help="input of a custom --type"
    )
    submit.add_argument("--priority", choices=PRIORITIES)
    submit.add_argument("--routing-key", default="", metavar="KEY")
    submit.add_argument("--timeout", dest="timeout_s", type=_seconds, metavar="SECONDS")
    submit.add_argument("--max-attempts", type=int, default=0, metavar="N")
    submit.add_argument("--idempotency-key", default="", metavar="KEY")
    submit.add_argument(
        "--label",
        dest="labels",
        action="append",
        type=_label,
        default=[],
        metavar="KEY=VALUE",
        help="a label (repeatable)",
    )
    shown = submit.add_mutually_exclusive_group()
    shown.add_argument("--watch", action="store_true", help="then watch it, as `watch` does")
    shown.add_argument("--json", action="store_true", help="print the SubmitResponse as JSON")

    get = commands.add_parser("get", help="print a task as JSON")
    get.set_defaults(run=_get)
    get.add_argument("task_id", metavar="ID")

    cancel = commands.add_parser("cancel", help="cancel a task and print it as JSON")
    cancel.set_defaults(run=_cancel)
    cancel.add_argument("task_id", metavar="ID")

    list_ = commands.add_parser("list", help="list tasks, newest first")
    list_.set_defaults(run=_list)
    list_.add_argument(
        "--state",
        dest="states",
        action="append",
        default=[],
        choices=STATES,
        help="only tasks in this state (repeatable)",
    )
    list_.add_argument(
        "--type",
        dest="types",
        action="append",
        default=[],
        metavar="TYPE",
        help="only tasks of this type (repeatable)",
    )
    list_.add_argument("--page-size", type=int, default=0, metavar="N")
    list_.add_argument("--page-token", default="", metavar="TOKEN")
    list_.add_argument("--all", action="store_true", help="follow every page")
    list_.add_argument("--json", action="store_true", help="print a ListResponse as JSON")

    backends = commands.add_parser(
        "backends", help="list the ring's members: load, health, circuit"
    )
    backends.set_defaults(run=_backends)
    backends.add_argument("--json", action="store_true", help="print them as JSON")

    stats = commands.add_parser(
        "stats", help="queue depth, success rates, run times, tokens and cost of your tasks"
    )
    stats.set_defaults(run=_stats)
    stats.add_argument(
        "--type",
        dest="types",
        action="append",
        default=[],
        metavar="TYPE",
        help="only tasks of this type (repeatable)",
    )
    stats.add_argument(
        "--window",
        dest="window_s",
        type=_window,
        metavar="DURATION",
        help="tasks created within this long before now: 90s, 15m, 1h, 2d (default: 1h)",
    )
    stats.add_argument("--json", action="store_true", help="print the StatsResponse as JSON")

    _add_keygen(commands)
    watch = commands.add_parser("watch", help="follow a task until it finishes")
    watch.set_defaults(run=_watch)
    watch.add_argument("task_id", metavar="ID")
    watch.add_argument("--after-sequence", type=int, default=0, metavar="N")
    return parser


def _add_tls(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    # grpcurl's names, so one set of files serves both tools.
    tls = parser.add_argument_group("TLS (plaintext unless one of these is given)")
    tls.add_argument(
        "--cacert",
        default=env.get("TASKRING_CACERT") or None,
        metavar="FILE",
        help="PEM CA bundle that signed the server's certificate (default: $TASKRING_CACERT)",
    )
    tls.add_argument(
        "--cert",
        default=env.get("TASKRING_CERT") or None,
        metavar="FILE",
        help="PEM client certificate for mutual TLS, with --key (default: $TASKRING_CERT)",
    )
    tls.add_argument(
        "--key",
        default=env.get("TASKRING_KEY") or None,
        metavar="FILE",
        help="PEM private key of --cert (default: $TASKRING_KEY)",
    )


def _add_keygen(commands: Any) -> None:  # argparse's _SubParsersAction is private
    keygen = commands.add_parser(
        "keygen",
        help="print a new API key for CLIENT and the [[api_keys]] entry the server needs",
    )
    keygen.add_argument("client", metavar="CLIENT", help="the client id the key stands for")
    keygen.add_argument("--admin", action="store_true", help="the key may use AdminService")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


_WINDOW = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _window(text: str) -> float:
    """`--window`: a number of seconds, minutes, hours or days ("90s", "15m", "1h", "2d";
    bare: seconds). The upper bound is the server's to state."""
    match = _WINDOW.fullmatch(text.strip().lower())
    value = float(match[1]) * _UNIT_S[match[2]] if match else 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration like 90s, 15m, 1h")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def spec_from_args(args: argparse.Namespace) -> tasks_pb2.TaskSpec:
    """The TaskSpec `taskring submit` sends; UsageError if the flags do not fit together."""
    if args.task_type in ("chat", "embed"):
        kind = args.task_type
    elif args.task_type:
        kind = "custom"
    elif args.input_json is not None:
        raise UsageError("--input-json needs --type NAME of a custom task type")
    else:
        kind = "embed" if args.texts else "chat"
    for dest, flag in _INPUT_FLAGS.items():
        if dest not in _FLAGS_BY_KIND[kind] and getattr(args, dest) not in (None, []):
            raise UsageError(f"{flag} does not apply to {args.task_type or kind} tasks")

    options = SpecOptions(
        routing_key=args.routing_key,
        timeout_s=args.timeout_s,
        max_attempts=args.max_attempts,
        idempotency_key=args.idempotency_key,
        labels=dict(args.labels),
    )
    if args.priority is not None:
        options["priority"] = tasks_pb2.Priority.Value(f"PRIORITY_{args.priority.upper()}")
    positional = [] if args.prompt is None else [args.prompt]
    if kind == "chat":
        prompts = [*args.messages, *positional]
        if not prompts:
            raise UsageError("a chat task needs a PROMPT or --message")
        messages = conversation(*prompts, system=args.system)
        return chat_spec(messages, model=args.model or DEFAULT_CHAT_MODEL, **options)
    if kind == "embed":
        texts = [*args.texts, *positional]
        if not texts:
            raise UsageError("an embed task needs --text or a PROMPT")
        return embed_spec(texts, model=args.model or DEFAULT_EMBED_MODEL, **options)
    if args.input_json is None:
        raise UsageError(f"a {args.task_type} task needs --input-json")
    return custom_spec(args.task_type, args.input_json, **options)


def tls_from_args(args: argparse.Namespace) -> Tls | None:
    """TLS from --cacert, --cert and --key (None: plaintext); UsageError naming the file
    that cannot be used."""
    if (args.cert is None) != (args.key is None):
        given, missing = ("--cert", "--key") if args.key is None else ("--key", "--cert")
        raise UsageError(f"{given} needs {missing}: mutual TLS takes a certificate and its key")
    if args.cacert is None and args.cert is None:
        return None
    try:
        return Tls.from_files(args.cacert, args.cert, args.key)
    except OSError as err:
        raise UsageError(f"cannot read {err.filename}: {err.strerror}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None


def states_from_args(names: Sequence[str]) -> list[tasks_pb2.TaskState.ValueType]:
    return [tasks_pb2.TaskState.Value(f"TASK_STATE_{name.upper()}") for name in names]


# --- results → text ----------------------------------------------------------------------


def exit_code_for(state: tasks_pb2.TaskState.ValueType) -> int:
    """The exit code of a watch that ended in `state` (a terminal state)."""
    return _EXIT_BY_STATE[state]


def state_name(state: tasks_pb2.TaskState.ValueType) -> str:
    return tasks_pb2.TaskState.Name(state).removeprefix("TASK_STATE_")


def state_line(sequence: int, task: tasks_pb2.Task) -> str:
    """One line for a state change, e.g. "[3] RUNNING on local-2 (attempt 1)"."""
    line = f"[{sequence}] {state_name(task.state)}"
    if task.state == tasks_pb2.TASK_STATE_RUNNING:
        line += f" on {task.backend} (attempt {task.attempt})"
    elif task.state == tasks_pb2.TASK_STATE_FAILED:
        line += f": {task.error.code}: {task.error.message}"
    elif task.state == tasks_pb2.TASK_STATE_QUEUED and task.HasField("error"):
        line += f" for a retry; attempt {task.attempt}: {task.error.code}: {task.error.message}"
    return line


def format_error(err: TaskringError) -> str:
    """How a failed call is reported on stderr: "error: CODE: message" and its details."""
    lines = [f"error: {err.code.name}: {err.details}"]
    lines += [f"  {violation}" for violation in err.unstated_violations()]
    if err.retry_after_s is not None:
        lines.append(f"  retry after {err.retry_after_s:g}s")
    return "\n".join(lines)


def _align(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Rows as columns two spaces apart; the columns in `right` (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def format_duration(seconds: float) -> str:
    """A run time at a glance: "0.4ms", "385ms", "1.23s", "2m05s", "1h20m"."""
    if seconds < 0.01:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def format_window(seconds: float) -> str:
    """A window as the user would have typed it: "1h", "15m", "2d", "90s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


_PRIORITIES_HIGH_FIRST = (
    tasks_pb2.PRIORITY_URGENT,
    tasks_pb2.PRIORITY_HIGH,
    tasks_pb2.PRIORITY_NORMAL,
    tasks_pb2.PRIORITY_LOW,
)


def format_stats(stats: tasks_pb2.StatsResponse) -> str:
    """A summary line, a row per task type and backend, and the queue by state and priority.

    tasks of anonymous created in the last 1h: 3 (2 succeeded, 1 failed)

    TYPE  BACKEND  DONE   OK %    P50    P99  ATTEMPTS  TOKENS IN  TOKENS OUT     COST
    chat  local-1     3  66.7%  120ms  1.20s      1.33         42          17  $0.0021

    queue now: 1 queued
    STATE   URGENT  HIGH  NORMAL  LOW  TOTAL
    QUEUED       0     0       1    0      1
    """
    window = format_window(stats.window.ToTimedelta().total_seconds())
    by_state: dict[tasks_pb2.TaskState.ValueType, int] = {}
    for count in stats.window_counts:
        by_state[count.state] = by_state.get(count.state, 0) + count.count
    created = sum(by_state.values())
    summary = f"tasks of {stats.client_id or 'every client'} created in the last {window}:"
    summary += f" {created}"
    if by_state:
        parts = (f"{n} {state_name(state).lower()}" for state, n in sorted(by_state.items()))
        summary += f" ({', '.join(parts)})"
    lines = [summary, ""]

    if stats.groups:
        header = ("TYPE", "BACKEND", "DONE", "OK %", "P50", "P99", "ATTEMPTS")
        rows: list[tuple[str, ...]] = [(*header, "TOKENS IN", "TOKENS OUT", "COST")]
        rows += [_group_row(group) for group in stats.groups]
        lines.append(_align(rows, right=frozenset(range(2, 10))))
    else:
        lines.append("no finished tasks in the window")

    depth = {(c.state, c.priority): c.count for c in stats.queue_depth}
    queue_states = (tasks_pb2.TASK_STATE_QUEUED, tasks_pb2.TASK_STATE_RUNNING)
    totals = {s: sum(n for (state, _), n in depth.items() if state == s) for s in queue_states}
    lines.append("")
    if not any(totals.values()):
        lines.append("queue now: empty")
        return "\n".join(lines)
    lines.append(
        "queue now: " + ", ".join(f"{totals[s]} {state_name(s).lower()}" for s in queue_states)
    )
    priority_names = [
        tasks_pb2.Priority.Name(p).removeprefix("PRIORITY_") for p in _PRIORITIES_HIGH_FIRST
    ]
    queue_rows: list[tuple[str, ...]] = [("STATE", *priority_names, "TOTAL")]
    for state in queue_states:
        counts = [str(depth.get((state, p), 0)) for p in _PRIORITIES_HIGH_FIRST]
        queue_rows.append((state_name(state), *counts, str(totals[state])))
    lines.append(_align(queue_rows, right=frozenset(range(1, 6))))
    return "\n".join(lines)


def _group_row(group: tasks_pb2.TaskGroupStats) -> tuple[str, ...]:
    def run_time(value: duration_pb2.Duration) -> str:
        return format_duration(value.ToTimedelta().total_seconds())

    timed = group.duration_samples > 0
    return (
        group.task_type,
        group.backend or "-",  # never ran: cancelled or expired while queued
        str(group.finished),
        f"{group.success_rate:.1%}" if group.succeeded + group.failed else "-",
        run_time(group.duration_p50) if timed else "-",
        run_time(group.duration_p99) if timed else "-",
        f"{group.mean_attempts:.2f}",
        f"{group.input_tokens:,}",
        f"{group.output_tokens:,}",
        f"${group.cost_usd:,.4f}",
    )


def format_table(tasks: Sequence[tasks_pb2.Task]) -> str:
    """Tasks as aligned columns: id, type, state, attempt, backend, created (UTC)."""
    rows = [("ID", "TYPE", "STATE", "ATTEMPT", "BACKEND", "CREATED")]
    for task in tasks:
        created = "-"
        if task.HasField("create_time"):
            created = task.create_time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        task_type = task.spec.type or task.spec.WhichOneof("input") or "-"
        row = (task.id, task_type, state_name(task.state), str(task.attempt))
        rows.append((*row, task.backend or "-", created))
    return _align(rows)


def format_backends(members: Sequence[admin_pb2.BackendStatus]) -> str:
    """Members as aligned columns: name, kind, types, load/max, health, circuit, state."""
    rows = [("NAME", "KIND", "TYPES", "LOAD", "HEALTH", "CIRCUIT", "TAKES WORK")]
    for member in members:
        config = member.config
        health = admin_pb2.HealthState.Name(member.health).removeprefix("HEALTH_STATE_")
        circuit = admin_pb2.CircuitState.Name(member.circuit).removeprefix("CIRCUIT_STATE_")
        takes = "yes" if member.available else "draining" if member.draining else "no"
        rows.append(
            (
                config.name,
                config.kind,
                ",".join(config.task_types),
                f"{member.in_flight}/{config.max_concurrency}",
                health.lower(),
                circuit.lower(),
                takes,
            )
        )
    return _align(rows)


class WatchPrinter:
    """Renders a task's events: state changes on `err`, its output on `out`.

    Chat text goes to `out` as it is generated, flushed at once. A snapshot or state change
    may carry the text so far (watching mid-run, a resume, a backend that does not stream);
    only the part not yet written is printed. A retry starts its text afresh on a new line.
    """

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self._out = out
        self._err = err
        # The latest task seen; its attempt owns the text written so far.
        self.task: tasks_pb2.Task | None = None
        # Characters of the current attempt's chat text already on `out`.
        self._written = 0
        # Whether _written counts the text from its start, so a task's full text can be
        # compared with it: not when the watch began after a sequence, mid-text, until a
        # snapshot restates the task or a new attempt starts over.
        self._counted_from_start = False
        # Whether `out` has a line waiting for its newline.
        self._open_line = False

    def handle(self, event: tasks_pb2.StreamResponse) -> None:
        if event.WhichOneof("event") == "output_delta":
            self._write(event.output_delta.text)
            return
        task = task_of(event)
        if task is None:  # an event kind newer than this client: nothing to show
            return
        previous, self.task = self.task, task
        if previous is not None and task.attempt != previous.attempt:
            self._written = 0  # a new attempt generates its text from the start
            self._counted_from_start = True
        if event.WhichOneof("event") == "snapshot":
            self._counted_from_start = True
        # A resumed stream restates the task: a line only when the state really changed.
        changed = previous is None or (previous.state, previous.attempt) != (
            task.state,
            task.attempt,
        )
        terminal = task.state in _EXIT_BY_STATE
        # A state line heads the text that follows it, except the terminal one, which
        # closes it: so neither is glued to the other when both go to one terminal.
        if changed and not terminal:
            self._state_line(event.sequence, task)
        kind = task.output.WhichOneof("result")
        if kind == "chat" and self._counted_from_start:
            self._write(task.output.chat.text[self._written :])
        if changed and terminal:
            self._state_line(event.sequence, task)
        if task.state == tasks_pb2.TASK_STATE_SUCCEEDED and kind in ("embed", "custom"):
            result = task.output.embed if kind == "embed" else task.output.custom
            print(json_format.MessageToJson(result, indent=None), file=self._out, flush=True)

    def _state_line(self, sequence: int, task: tasks_pb2.Task) -> None:
        self._end_line()
        print(state_line(sequence, task), file=self._err, flush=True)

    def _write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()
            self._written += len(text)
            self._open_line = not text.endswith("\n")

    def _end_line(self) -> None:
        if self._open_line:
            self._out.write("\n")
            self._out.flush()
            self._open_line = False


# --- commands ----------------------------------------------------------------------------


def _submit(client: TaskringClient, args: argparse.Namespace) -> int:
    if args.watch and not args.json:
        return _submit_and_follow(client, spec_from_args(args))
    response = client.submit(spec_from_args(args))
    if not response.created:
        print("an earlier submit with this idempotency key made it", file=sys.stderr)
    if args.json:
        print(json_format.MessageToJson(response))
    else:
        print(response.task.id)
    return EXIT_SUCCEEDED


def _submit_and_follow(client: TaskringClient, spec: tasks_pb2.TaskSpec) -> int:
    """`submit --watch`: one SubmitAndStream call, so the first token comes a round trip
    sooner than Submit then Stream."""
    printer = WatchPrinter(sys.stdout, sys.stderr)
    for response in client.submit_and_watch(spec):
        if printer.task is None:
            if not response.created:
                print("an earlier submit with this idempotency key made it", file=sys.stderr)
            print(f"submitted {response.event.snapshot.id}", file=sys.stderr)
        printer.handle(response.event)
    assert printer.task is not None, "watch ends only after an event carrying the final task"
    return exit_code_for(printer.task.state)


def _get(client: TaskringClient, args: argparse.Namespace) -> int:
    print(json_format.MessageToJson(client.get(args.task_id)))
    return EXIT_SUCCEEDED


def _cancel(client: TaskringClient, args: argparse.Namespace) -> int:
    print(json_format.MessageToJson(client.cancel(args.task_id)))
    return EXIT_SUCCEEDED


def _list(client: TaskringClient, args: argparse.Namespace) -> int:
    states = states_from_args(args.states)
    if args.all:
        tasks = list(client.list_all(states, args.types, args.page_size))
        page = tasks_pb2.ListResponse(tasks=tasks)
    else:
        page = client.list(states, args.types, args.page_size, args.page_token)
    if args.json:
        print(json_format.MessageToJson(page))
        return EXIT_SUCCEEDED
    print(format_table(page.tasks))
    if page.next_page_token:
        print(f"more: taskring list --page-token {page.next_page_token}", file=sys.stderr)
    return EXIT_SUCCEEDED


def _backends(client: TaskringClient, args: argparse.Namespace) -> int:
    members = client.list_backends()
    if args.json:
        for member in members:
            print(json_format.MessageToJson(member, indent=None))
        return EXIT_SUCCEEDED
    print(format_backends(members))
    return EXIT_SUCCEEDED


def _stats(client: TaskringClient, args: argparse.Namespace) -> int:
    stats = client.stats(args.types, args.window_s)
    if args.json:
        print(json_format.MessageToJson(stats))
    else:
        print(format_stats(stats))
    return EXIT_SUCCEEDED


def _watch(client: TaskringClient, args: argparse.Namespace) -> int:
    return _follow(client, args.task_id, args.after_sequence)


def _follow(client: TaskringClient, task_id: str, after_sequence: int) -> int:
    printer = WatchPrinter(sys.stdout, sys.stderr)
    for event in client.watch(task_id, after_sequence):
        printer.handle(event)
    assert printer.task is not None, "watch ends only after an event carrying the final task"
    return exit_code_for(printer.task.state)


# Marks a string as a taskring key (in a leaked file, a secret scanner's pattern).
KEY_PREFIX = "trk_"


def _keygen(client_id: str, admin: bool) -> int:
    """The key to stdout (for the client), the server's entry to stderr (for its operator),
    so `taskring keygen team-a > team-a.key` keeps the key out of the terminal."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    print(key)
    digest = hashlib.sha256(key.encode()).hexdigest()
    entry = f'[[api_keys]]\nclient = {json.dumps(client_id)}\nsha256 = "{digest}"\n'
    if admin:
        entry += "admin = true\n"
    print(f"# add to the server's TASKRING_CONFIG:\n{entry}", file=sys.stderr, end="")
    return EXIT_SUCCEEDED


def _seconds(raw: str) -> float:
    """A positive, finite number of seconds: a usage error (exit 64) otherwise, not a
    traceback that would exit 1 like a FAILED task."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a positive number of seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line in `argv` (default: sys.argv[1:]) and return its exit code."""
    parser = build_parser(os.environ)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error _Parser.error reported
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.command == "keygen":
        return _keygen(args.client, args.admin)
    command: _Command = args.run
    try:
        api_key = os.environ.get("TASKRING_API_KEY")
        with TaskringClient(args.target, api_key=api_key, tls=tls_from_args(args)) as client:
            return command(client, args)
    except UsageError as err:
        print(f"taskring {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TaskringError as err:
        print(format_error(err), file=sys.stderr)
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops `watch`: leaving is the answer, a traceback is noise.
        return EXIT_INTERRUPTED
