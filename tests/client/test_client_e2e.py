"""The Python clients and the command line against a real server."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client import (
    AsyncTaskringClient,
    BatchResult,
    TaskringClient,
    TaskState,
)
from client._client import chat_spec, conversation, embed_spec, task_of
from client._errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from server.backends.base import BackendError, BackendEvent, OutputChunk
from server.model.task import Task
from tests.conftest import (
    ROOT,
    Running,
    ServerProcess,
    StartServer,
    local_backends,
    spawn_server,
)

MISSING = "00000000-0000-0000-0000-000000000000"


async def run_cli(address: str, *args: str) -> tuple[int, str, str]:
    """`python -m client --target ADDRESS ARGS…` as a user would run it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client", "--target", address, *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_async_client_submits_waits_gets_and_lists(server: Running) -> None:
    """The async client covers the whole life of a task with typed errors."""
    async with AsyncTaskringClient(server.app.address) as client:
        task = await client.submit_chat("hi there", system="be brief", labels={"team": "a"})
        final = await client.wait(task.id)
        assert final.state == TaskState.Value("TASK_STATE_SUCCEEDED")
        assert final.output.chat.text == "[local-echo] hi there"
        assert (await client.get(task.id)) == final
        listed = [t.id async for t in client.list_all(page_size=1)]
        assert listed == [task.id]
        with pytest.raises(FailedPreconditionError):
            await client.cancel(task.id)
        with pytest.raises(NotFoundError):
            await client.get(MISSING)
        with pytest.raises(InvalidArgumentError) as caught:
            await client.submit_chat("x", model="")
        assert ("task.chat.model", "required, e.g. 'local-echo'") in caught.value.field_violations


async def test_sync_client_works_from_plain_code(server: Running) -> None:
    """The blocking client does the same from code without an event loop."""

    def use_sync_client() -> tuple[int, list[float]]:
        with TaskringClient(server.app.address) as client:
            task = client.submit_embed(["one text"])
            final = client.wait(task.id)
            return final.state, list(final.output.embed.embeddings[0].values)

    state, vector = await asyncio.to_thread(use_sync_client)
    assert state == TaskState.Value("TASK_STATE_SUCCEEDED")
    assert len(vector) == 64


async def test_async_client_submits_a_batch_with_a_result_per_task(server: Running) -> None:
    """submit_batch answers each task in order: the task, or the error it would have
    raised alone, naming the task's field."""
    specs = [
        chat_spec(conversation("one")),
        chat_spec(conversation("two"), model=""),
        embed_spec("three", idempotency_key="k"),
        embed_spec("three", idempotency_key="k"),
    ]
    async with AsyncTaskringClient(server.app.address) as client:
        results = await client.submit_batch(specs)
        assert [r.ok for r in results] == [True, False, True, True]
        assert [r.created for r in results] == [True, False, True, False]
        error = results[1].error
        assert isinstance(error, InvalidArgumentError)
        assert "tasks[1].chat.model" in dict(error.field_violations)
        assert results[3].task == results[2].task, "the same key: the same task"
        assert results[0].task is not None
        final = await client.wait(results[0].task.id)
        assert final.output.chat.text == "[local-echo] one"
        with pytest.raises(InvalidArgumentError) as caught:
            await client.submit_batch([])
        assert "tasks" in dict(caught.value.field_violations)


async def test_sync_client_submits_a_batch(server: Running) -> None:
    def use_sync_client() -> list[BatchResult]:
        with TaskringClient(server.app.address) as client:
            return client.submit_batch([embed_spec("a"), embed_spec("b", max_attempts=-1)])

    results = await asyncio.to_thread(use_sync_client)
    assert results[0].created
    assert results[0].task is not None
    assert results[0].task.state == TaskState.Value("TASK_STATE_QUEUED")
    assert isinstance(results[1].error, InvalidArgumentError)
    assert "tasks[1].max_attempts" in dict(results[1].error.field_violations)


@pytest.mark.slow
async def test_cli_submit_watch_streams_reply_and_exits_zero(start_server: StartServer) -> None:
    """`taskring submit … --watch` prints the reply as it streams and exits 0."""
    server = await start_server(token_delay_s=0.01)
    code, out, err = await run_cli(server.app.address, "submit", "stream me please", "--watch")
    assert code == 0, err
    assert "[local-echo] stream me please" in out
    assert "SUCCEEDED" in err


@pytest.mark.slow
async def test_cli_commands_and_exit_codes(start_server: StartServer) -> None:
    """submit prints only the id; get/list/cancel work; errors exit 3 with the code."""
    server = await start_server(token_delay_s=0.5)
    code, out, _ = await run_cli(server.app.address, "submit", "a b c d e f")
    assert code == 0
    task_id = out.strip()
    assert len(task_id) == 36
    code, out, _ = await run_cli(server.app.address, "cancel", task_id)
    assert code == 0
    assert json.loads(out)["state"] == "TASK_STATE_CANCELLED"
    code, out, err = await run_cli(server.app.address, "watch", task_id)
    assert code == 2, "watch of a cancelled task exits 2"
    code, out, _ = await run_cli(server.app.address, "get", task_id)
    assert json.loads(out)["id"] == task_id
    code, out, _ = await run_cli(server.app.address, "list")
    assert task_id in out
    code, out, err = await run_cli(server.app.address, "get", MISSING)
    assert code == 3
    assert "NOT_FOUND" in err
    code, out, _ = await run_cli(server.app.address, "backends")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "KIND",
        "TYPES",
        "LOAD",
        "HEALTH",
        "CIRCUIT",
        "TAKES",
        "WORK",
    ]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["local-1", "local"],
        ["local-2", "local"],
        ["local-3", "local"],
    ]
    assert all(line.split()[4:7] == ["healthy", "closed", "yes"] for line in lines[1:])


@pytest.mark.slow
async def test_cli_watch_of_failed_task_exits_one_with_the_error(
    start_server: StartServer,
) -> None:
    """A task that fails makes `watch` exit 1 and print the error code and message."""

    async def broken(task: Task) -> AsyncIterator[BackendEvent]:
        if task.attempt:  # always; the yield below makes this an async generator
            raise BackendError("INVALID_INPUT", "the model rejected the prompt", retryable=False)
        yield OutputChunk("")

    server = await start_server(local_backends(extra={"broken": broken}))
    args = ("submit", "--type", "broken", "--input-json", '{"x": 1}', "--watch")
    code, _, err = await run_cli(server.app.address, *args)
    assert code == 1
    assert "INVALID_INPUT" in err
    assert "the model rejected the prompt" in err


@pytest.mark.slow
async def test_cli_stats_shows_the_figures_of_a_spawned_server(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """`taskring stats` against `python -m server`: after two chats that succeed and one
    that misses its deadline, the chat row shows 3 done, 66.7% ok and the echo model's
    tokens; a long chat running and one waiting show in the queue; --type, --json and a
    window the server refuses work as documented."""
    server = await asyncio.to_thread(
        spawn_server,
        tmp_path / "stats.db",
        TASKRING_LOCAL_EXECUTORS="1",
        TASKRING_LOCAL_MAX_CONCURRENCY="1",
        TASKRING_LOCAL_TOKEN_DELAY_S="0.02",
    )
    server_processes.append(server)
    address = server.address
    for prompt in ("one two three", "four five six"):
        # 3 prompt tokens in; "[local-echo]" and the 3 words out.
        code, _, err = await run_cli(address, "submit", prompt, "--watch")
        assert code == 0, err
    late = " ".join(["word"] * 40)  # 41 tokens at 0.02 s each: far past a 0.05 s deadline
    code, _, err = await run_cli(address, "submit", late, "--timeout", "0.05", "--watch")
    assert code == 1, err
    assert "DEADLINE_EXCEEDED" in err
    code, _, err = await run_cli(address, "submit", "--text", "a b c d e", "--watch")
    assert code == 0, err
    # 1,000 tokens (20 s) hold the only slot while the HIGH one waits behind it.
    code, out, _ = await run_cli(address, "submit", " ".join(["w"] * 999), "--timeout", "60")
    assert code == 0
    async with AsyncTaskringClient(address) as client:  # RUNNING before the next one comes
        async for event in client.watch(out.strip()):
            task = task_of(event)
            if task is not None and task.state == TaskState.Value("TASK_STATE_RUNNING"):
                break
    code, _, _ = await run_cli(address, "submit", "wait", "--priority", "high")
    assert code == 0

    code, out, err = await run_cli(address, "stats")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        "tasks of anonymous created in the last 1h: 6 (1 queued, 1 running, 3 succeeded, 1 failed)"
    )
    header = lines[2].split()
    assert header == ["TYPE", "BACKEND", "DONE", "OK", "%", "P50", "P99", "ATTEMPTS",
                      "TOKENS", "IN", "TOKENS", "OUT", "COST"]  # fmt: skip
    rows = {tuple(line.split()[:2]): line.split() for line in lines[3:5]}
    chat = rows["chat", "local-1"]
    assert (chat[2], chat[3], chat[6:]) == ("3", "66.7%", ["1.00", "6", "8", "$0.0000"])
    embed = rows["embed", "local-1"]
    assert (embed[2], embed[3], embed[6:]) == ("1", "100.0%", ["1.00", "5", "0", "$0.0000"])
    queue = lines[lines.index("queue now: 1 queued, 1 running") + 1 :]
    assert [line.split() for line in queue] == [
        ["STATE", "URGENT", "HIGH", "NORMAL", "LOW", "TOTAL"],
        ["QUEUED", "0", "1", "0", "0", "1"],
        ["RUNNING", "0", "0", "1", "0", "1"],
    ]

    code, out, err = await run_cli(address, "stats", "--type", "embed", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert [(g["taskType"], g["finished"], g["inputTokens"]) for g in stats["groups"]] == [
        ("embed", "1", "5")
    ]
    assert "queueDepth" not in stats, "no embed task is waiting"
    code, out, err = await run_cli(address, "stats", "--window", "30d")
    assert code == 3
    assert "INVALID_ARGUMENT" in err
    assert "window" in err
