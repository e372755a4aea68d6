"""The `taskring` command line without a server: argv → requests, results → text and exit codes."""

from __future__ import annotations

import io
from datetime import timedelta

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from client import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from client._cli import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    EXIT_USAGE,
    UsageError,
    WatchPrinter,
    build_parser,
    exit_code_for,
    format_duration,
    format_error,
    format_stats,
    format_table,
    main,
    spec_from_args,
    state_line,
    states_from_args,
)
from client._errors import error_from_rpc
from client._proto.taskring.v1 import tasks_pb2 as pb


def spec(*argv: str) -> pb.TaskSpec:
    return spec_from_args(build_parser({}).parse_args(["submit", *argv]))


def task(
    state: pb.TaskState.ValueType,
    sequence: int,
    *,
    attempt: int = 0,
    backend: str = "",
    output: pb.TaskOutput | None = None,
    error: pb.TaskError | None = None,
) -> pb.Task:
    return pb.Task(
        id="t1",
        state=state,
        sequence=sequence,
        attempt=attempt,
        backend=backend,
        output=output,
        error=error,
    )


def changed(t: pb.Task) -> pb.StreamResponse:
    return pb.StreamResponse(sequence=t.sequence, state_changed=pb.StateChanged(task=t))


def delta(sequence: int, text: str) -> pb.StreamResponse:
    return pb.StreamResponse(sequence=sequence, output_delta=pb.OutputDelta(text=text))


def chat_output(text: str) -> pb.TaskOutput:
    return pb.TaskOutput(chat=pb.ChatOutput(text=text))


# --- argv → requests ---------------------------------------------------------------------


def test_positional_prompt_is_one_user_message_to_the_offline_model() -> None:
    """`taskring submit "hi"` asks local-echo, leaving the type for the server to infer."""
    assert spec("hi") == pb.TaskSpec(
        chat=pb.ChatInput(model="local-echo", messages=[pb.ChatMessage(role="user", content="hi")])
    )


def test_system_comes_first_then_messages_then_the_prompt() -> None:
    """--system leads the conversation; -m messages keep their order before the prompt."""
    messages = spec("last", "-m", "one", "--message", "two", "--system", "be brief").chat.messages
    assert [(m.role, m.content) for m in messages] == [
        ("system", "be brief"),
        ("user", "one"),
        ("user", "two"),
        ("user", "last"),
    ]


def test_texts_make_an_embed_task_for_the_offline_model() -> None:
    """--text alone means embed, with local-hash unless --model says otherwise."""
    assert spec("--text", "a", "--text", "b").embed == pb.EmbedInput(
        model="local-hash", texts=["a", "b"]
    )
    assert spec("--type", "embed", "--model", "m", "one").embed == pb.EmbedInput(
        model="m", texts=["one"]
    )


def test_custom_type_sends_its_json_input_as_a_struct() -> None:
    """A custom --type carries --input-json as its Struct input and names its type."""
    custom = spec("--type", "summarize", "--input-json", '{"doc": "x", "n": 2}')
    assert custom.type == "summarize"
    assert dict(custom.custom) == {"doc": "x", "n": 2.0}


def test_spec_flags_fill_every_task_field() -> None:
    """Priority, routing key, timeout, attempts, idempotency key and labels reach the spec."""
    argv = ["hi", "--priority", "urgent", "--routing-key", "r", "--timeout", "2.5"]
    argv += ["--max-attempts", "4", "--idempotency-key", "k1", "--label", "a=b", "--label", "c="]
    got = spec(*argv)
    assert got.priority == pb.PRIORITY_URGENT
    assert got.routing_key == "r"
    assert got.timeout == duration_pb2.Duration(seconds=2, nanos=500_000_000)
    assert got.max_attempts == 4
    assert got.idempotency_key == "k1"
    assert dict(got.labels) == {"a": "b", "c": ""}


def test_unset_flags_leave_the_server_defaults() -> None:
    """Without flags the spec leaves priority, timeout and attempts to the server."""
    got = spec("hi")
    assert got.priority == pb.PRIORITY_UNSPECIFIED
    assert not got.HasField("timeout")
    assert got.max_attempts == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "needs a PROMPT or --message"),
        (["--type", "embed"], "needs --text or a PROMPT"),
        (["--type", "summarize"], "needs --input-json"),
        (["--input-json", "{}"], "--input-json needs --type"),
        (["hi", "--text", "a", "--type", "chat"], "--text does not apply to chat"),
        (["--text", "a", "-m", "hi"], "--message does not apply to embed"),
        (["--type", "x", "--input-json", "{}", "--model", "m"], "--model does not apply to x"),
        (["--type", "x", "--input-json", "{}", "hi"], "PROMPT does not apply to x"),
    ],
)
def test_flags_that_do_not_fit_together_are_usage_errors(argv: list[str], message: str) -> None:
    """Each inconsistent submit names the flag to fix instead of sending a bad request."""
    with pytest.raises(UsageError, match=message):
        spec(*argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "hi", "--label", "novalue"],
        ["submit", "--type", "x", "--input-json", "[1, 2]"],
        ["submit", "--type", "x", "--input-json", "{nope"],
        ["submit", "hi", "--priority", "asap"],
        ["submit", "hi", "--watch", "--json"],
        ["list", "--state", "done"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_64_not_2_which_means_cancelled(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo never reads as a CANCELLED task to a script checking the exit code."""
    assert main(argv) == EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_target_comes_from_flag_then_environment_then_localhost() -> None:
    """--target beats $TASKRING_TARGET, which beats the server's default address."""
    assert build_parser({}).parse_args(["get", "x"]).target == "127.0.0.1:50051"
    env = {"TASKRING_TARGET": "tr:1"}
    assert build_parser(env).parse_args(["get", "x"]).target == "tr:1"
    assert build_parser(env).parse_args(["--target", "f:2", "get", "x"]).target == "f:2"


def test_list_state_names_become_task_states() -> None:
    """`list --state queued --state failed` filters by those two states."""
    args = build_parser({}).parse_args(["list", "--state", "queued", "--state", "failed"])
    assert states_from_args(args.states) == [pb.TASK_STATE_QUEUED, pb.TASK_STATE_FAILED]


# --- results → text and exit codes -------------------------------------------------------


def test_terminal_states_map_to_exit_codes() -> None:
    """SUCCEEDED exits 0, FAILED 1, CANCELLED 2."""
    assert exit_code_for(pb.TASK_STATE_SUCCEEDED) == EXIT_SUCCEEDED == 0
    assert exit_code_for(pb.TASK_STATE_FAILED) == EXIT_FAILED == 1
    assert exit_code_for(pb.TASK_STATE_CANCELLED) == EXIT_CANCELLED == 2


def test_state_lines_say_where_and_why() -> None:
    """Running names backend and attempt; failed and re-queued name the error."""
    running = task(pb.TASK_STATE_RUNNING, 3, backend="local-2", attempt=1)
    assert state_line(3, running) == "[3] RUNNING on local-2 (attempt 1)"
    error = pb.TaskError(code="BACKEND_ERROR", message="boom")
    failed = task(pb.TASK_STATE_FAILED, 9, attempt=2, error=error)
    assert state_line(9, failed) == "[9] FAILED: BACKEND_ERROR: boom"
    requeued = task(pb.TASK_STATE_QUEUED, 5, attempt=1, error=error)
    assert state_line(5, requeued) == "[5] QUEUED for a retry; attempt 1: BACKEND_ERROR: boom"
    assert state_line(1, task(pb.TASK_STATE_QUEUED, 1)) == "[1] QUEUED"


def test_rpc_errors_print_code_message_and_field_violations() -> None:
    """A rejected submit names each field to fix, once even when the message already does."""
    violations = [("task.chat.messages", "must not be empty")]
    err = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "bad task", violations)
    assert format_error(err) == (
        "error: INVALID_ARGUMENT: bad task\n  task.chat.messages: must not be empty"
    )
    message = "task.chat.messages: must not be empty"
    stated = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, message, violations)
    assert format_error(stated) == "error: INVALID_ARGUMENT: task.chat.messages: must not be empty"
    missing = NotFoundError(grpc.StatusCode.NOT_FOUND, "task 'x' not found")
    assert format_error(missing) == "error: NOT_FOUND: task 'x' not found"


def test_rich_status_trailers_become_violations_and_retry_delay() -> None:
    """BadRequest and RetryInfo packed in grpc-status-details-bin reach the error's fields."""
    violation = error_details_pb2.BadRequest.FieldViolation(field="task.type", description="?")
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromTimedelta(timedelta(seconds=1.5))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="slow down")
    for detail in (error_details_pb2.BadRequest(field_violations=[violation]), retry):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    rpc_error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailers, "slow down"
    )

    err = error_from_rpc(rpc_error)

    assert isinstance(err, ResourceExhaustedError)
    assert err.retryable
    assert (err.field_violations, err.retry_after_s) == ([("task.type", "?")], 1.5)
    assert format_error(err) == (
        "error: RESOURCE_EXHAUSTED: slow down\n  task.type: ?\n  retry after 1.5s"
    )


def test_table_aligns_id_type_state_attempt_backend_created() -> None:
    """`taskring list` prints one aligned row per task, type inferred from the input."""
    done = task(pb.TASK_STATE_SUCCEEDED, 4, attempt=1, backend="local-1")
    done.spec.chat.model = "local-echo"
    done.create_time.FromSeconds(0)
    queued = pb.Task(id="t22", spec=pb.TaskSpec(type="summarize"), state=pb.TASK_STATE_QUEUED)
    assert format_table([done, queued]).splitlines() == [
        "ID   TYPE       STATE      ATTEMPT  BACKEND  CREATED",
        "t1   chat       SUCCEEDED  1        local-1  1970-01-01T00:00:00Z",
        "t22  summarize  QUEUED     0        -        -",
    ]


def watch(*events: pb.StreamResponse) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    printer = WatchPrinter(out, err)
    for event in events:
        printer.handle(event)
    return out.getvalue(), err.getvalue()


def test_watch_streams_chat_text_and_reports_states_on_stderr() -> None:
    """Deltas go to stdout as they come; the final full text is not printed again."""
    running = task(pb.TASK_STATE_RUNNING, 2, backend="local-2", attempt=1)
    done = task(pb.TASK_STATE_SUCCEEDED, 5, attempt=1, output=chat_output("hello"))
    snapshot = pb.StreamResponse(sequence=1, snapshot=task(pb.TASK_STATE_QUEUED, 1))
    out, err = watch(snapshot, changed(running), delta(3, "hel"), delta(4, "lo"), changed(done))
    assert out == "hello\n"
    assert err == "[1] QUEUED\n[2] RUNNING on local-2 (attempt 1)\n[5] SUCCEEDED\n"


def test_watch_joining_mid_run_prints_the_text_so_far_once() -> None:
    """A snapshot of a running task shows its text so far; a resume snapshot adds nothing."""
    so_far = task(pb.TASK_STATE_RUNNING, 3, attempt=1, backend="b", output=chat_output("hel"))
    snapshot = pb.StreamResponse(sequence=3, snapshot=so_far)
    resumed = pb.Task()
    resumed.CopyFrom(so_far)
    resumed.sequence, resumed.output.chat.text = 4, "hello"
    out, err = watch(snapshot, pb.StreamResponse(sequence=4, snapshot=resumed))
    assert (out, err) == ("hello", "[3] RUNNING on b (attempt 1)\n")


def test_watch_after_a_sequence_prints_only_new_deltas() -> None:
    """`watch ID --after-sequence N` cannot know the earlier text, so it never reprints it."""
    done = task(pb.TASK_STATE_SUCCEEDED, 6, attempt=1, output=chat_output("hello world"))
    out, _ = watch(delta(5, "world"), changed(done))
    assert out == "world\n"


def test_watch_retry_starts_the_new_attempts_text_on_its_own_line() -> None:
    """A failed attempt's partial text is closed off before the retry's text begins."""
    error = pb.TaskError(code="BACKEND_ERROR", message="lost", retryable=True)
    first = task(pb.TASK_STATE_RUNNING, 1, attempt=1, backend="a")
    requeued = task(pb.TASK_STATE_QUEUED, 3, attempt=1, error=error)
    second = task(pb.TASK_STATE_RUNNING, 4, attempt=2, backend="b")
    done = task(pb.TASK_STATE_SUCCEEDED, 6, attempt=2, output=chat_output("ok"))
    events = (pb.StreamResponse(sequence=1, snapshot=first), delta(2, "o"), changed(requeued))
    out, err = watch(*events, changed(second), delta(5, "ok"), changed(done))
    assert out == "o\nok\n"
    assert err.splitlines()[1:3] == [
        "[3] QUEUED for a retry; attempt 1: BACKEND_ERROR: lost",
        "[4] RUNNING on b (attempt 2)",
    ]


def test_watch_prints_a_final_embedding_as_json() -> None:
    """An embed task's vectors are printed once, as one line of JSON on stdout."""
    output = pb.TaskOutput(embed=pb.EmbedOutput(embeddings=[pb.Embedding(values=[0.5, 0.25])]))
    done = task(pb.TASK_STATE_SUCCEEDED, 3, attempt=1, output=output)
    out, _ = watch(pb.StreamResponse(sequence=3, snapshot=done))
    assert out == '{"embeddings": [{"values": [0.5, 0.25]}]}\n'


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "soon"])
def test_bad_timeout_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A timeout that is not a positive number exits 64 with a message, not a traceback."""
    assert main(["--target", "127.0.0.1:1", "submit", "hi", "--timeout", value]) == 64
    assert "not a positive number of seconds" in capsys.readouterr().err


def group(task_type: str, backend: str, **fields: object) -> pb.TaskGroupStats:
    return pb.TaskGroupStats(task_type=task_type, backend=backend, **fields)  # type: ignore[arg-type]


def test_stats_table_aligns_numbers_right_and_shows_the_queue() -> None:
    """`taskring stats`: a summary, a row per type and backend with numbers right-aligned,
    "-" where there is nothing to show, then the queue by state and priority."""
    ms = duration_pb2.Duration
    stats = pb.StatsResponse(
        client_id="anonymous",
        window=ms(seconds=3600),
        window_counts=[
            pb.StateCount(state=pb.TASK_STATE_QUEUED, priority=pb.PRIORITY_HIGH, count=1),
            pb.StateCount(state=pb.TASK_STATE_SUCCEEDED, priority=pb.PRIORITY_NORMAL, count=1234),
            pb.StateCount(state=pb.TASK_STATE_FAILED, priority=pb.PRIORITY_NORMAL, count=2),
            pb.StateCount(state=pb.TASK_STATE_CANCELLED, priority=pb.PRIORITY_LOW, count=1),
        ],
        queue_depth=[
            pb.StateCount(state=pb.TASK_STATE_QUEUED, priority=pb.PRIORITY_HIGH, count=1),
            pb.StateCount(state=pb.TASK_STATE_RUNNING, priority=pb.PRIORITY_NORMAL, count=12),
        ],
        groups=[
            group(
                "chat", "openai", finished=1236, succeeded=1234, failed=2, success_rate=1234 / 1236,
                duration_p50=ms(nanos=120_000_000), duration_p99=ms(seconds=75),
                duration_samples=1236, mean_attempts=1.25, input_tokens=123456,
                output_tokens=7890, cost_usd=1.5,
            ),
            group("summarize", "", finished=1, cancelled=1),
        ],
    )  # fmt: skip
    assert format_stats(stats).splitlines() == [
        "tasks of anonymous created in the last 1h: 1238"
        " (1 queued, 1234 succeeded, 2 failed, 1 cancelled)",
        "",
        "TYPE       BACKEND  DONE   OK %    P50    P99  ATTEMPTS  TOKENS IN  TOKENS OUT     COST",
        "chat       openai   1236  99.8%  120ms  1m15s      1.25    123,456       7,890  $1.5000",
        "summarize  -           1      -      -      -      0.00          0           0  $0.0000",
        "",
        "queue now: 1 queued, 12 running",
        "STATE    URGENT  HIGH  NORMAL  LOW  TOTAL",
        "QUEUED        0     1       0    0      1",
        "RUNNING       0     0      12    0     12",
    ]


def test_stats_of_nothing_says_so() -> None:
    """No tasks in the window and an empty queue read as such, not as empty tables."""
    stats = pb.StatsResponse(client_id="anonymous", window=duration_pb2.Duration(seconds=900))
    assert format_stats(stats).splitlines() == [
        "tasks of anonymous created in the last 15m: 0",
        "",
        "no finished tasks in the window",
        "",
        "queue now: empty",
    ]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0004, "0.4ms"), (0.385, "385ms"), (1.234, "1.23s"), (125, "2m05s"), (4800, "1h20m")],
)
def test_run_times_read_at_a_glance(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1.5h", 5400), ("2d", 172800), ("30", 30)],
)
def test_stats_window_takes_a_number_and_a_unit(value: str, seconds: float) -> None:
    """`taskring stats --window 1h`: seconds, minutes, hours or days; bare: seconds."""
    args = build_parser({}).parse_args(["stats", "--window", value, "--type", "chat"])
    assert (args.window_s, args.types) == (seconds, ["chat"])


@pytest.mark.parametrize("value", ["0", "-1h", "1w", "h", "soon", "1h30m"])
def test_bad_stats_window_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A window that is not a positive number with an optional unit exits 64, naming it."""
    # --window=VALUE: as a separate word "-1h" would read as an option.
    assert main(["--target", "127.0.0.1:1", "stats", f"--window={value}"]) == EXIT_USAGE
    assert "is not a positive duration" in capsys.readouterr().err
