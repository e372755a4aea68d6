"""A router whose ring members are executors reached over gRPC (ExecutorService)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.backends.base import Backend, BackendError, BackendEvent, Completed, OutputChunk
from server.backends.local import LocalModelSettings, builtin_handlers
from server.backends.remote import RemoteBackend
from server.config import ExecutorSettings
from server.executor.app import ExecutorApp
from server.model.task import CustomOutput, Task
from tests.api.test_dispatch import Gate, custom_spec
from tests.conftest import (
    StartServer,
    chat_spec,
    final_task,
    submit,
    wait_terminal,
    watched_text,
)

CHAT_AND_EMBED = frozenset({"chat", "embed"})


@pytest.fixture
async def executors() -> AsyncIterator[list[ExecutorApp]]:
    """Executors started by the test (real grpc.aio servers on loopback); stopped after."""
    started: list[ExecutorApp] = []
    yield started
    for app in started:
        await app.stop()


async def start_executor(
    started: list[ExecutorApp], handlers: dict[str, object] | None = None, **settings: object
) -> ExecutorApp:
    app = ExecutorApp(
        ExecutorSettings(listen="127.0.0.1:0", shutdown_grace_s=0.1, **settings),  # type: ignore[arg-type]
        handlers={**builtin_handlers(LocalModelSettings(token_delay_s=0)), **(handlers or {})},  # type: ignore[dict-item]
    )
    await app.start()
    started.append(app)
    return app


def remote(app: ExecutorApp, name: str, types: frozenset[str] = CHAT_AND_EMBED) -> Backend:
    return RemoteBackend(name, address=app.address, max_concurrency=8, task_types=types)


async def test_chat_streams_through_a_remote_executor(
    start_server: StartServer, executors: list[ExecutorApp]
) -> None:
    """Output produced in the executor process reaches the watcher as output deltas."""
    executor = await start_executor(executors)
    server = await start_server({"remote-1": remote(executor, "remote-1")})
    task = await submit(server.stub, chat_spec("three little words"))
    events = [e async for e in server.stub.Stream(pb.StreamRequest(task_id=task.id))]
    final = final_task(events)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert final.backend == "remote-1"
    assert watched_text(events) == final.output.chat.text == "[local-echo] three little words"
    assert final.usage.output_tokens == 4


async def test_embeddings_come_back_intact(
    start_server: StartServer, executors: list[ExecutorApp]
) -> None:
    executor = await start_executor(executors)
    server = await start_server({"remote-1": remote(executor, "remote-1")})
    spec = pb.TaskSpec(embed=pb.EmbedInput(model="local-hash", texts=["a b", "c"]))
    final = await wait_terminal(server.stub, (await submit(server.stub, spec)).id)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert len(final.output.embed.embeddings) == 2
    assert len(final.output.embed.embeddings[0].values) == 64


async def test_cancel_stops_the_work_in_the_executor(
    start_server: StartServer, executors: list[ExecutorApp]
) -> None:
    """Cancel cancels the Execute call, and the executor cancels the handler."""
    gate = Gate()
    executor = await start_executor(executors, {"gate": gate})
    server = await start_server({"remote-1": remote(executor, "remote-1", frozenset({"gate"}))})
    task = await submit(server.stub, custom_spec("gate"))
    await asyncio.wait_for(gate.started.wait(), 5)
    assert executor.servicer.running == 1
    cancelled = (await server.stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    await asyncio.wait_for(gate.cancelled.wait(), 5)
    assert not gate.finished
    assert executor.servicer.running == 0


async def test_handler_errors_cross_the_wire_with_their_class(
    start_server: StartServer, executors: list[ExecutorApp]
) -> None:
    """A non-retryable error raised in the executor fails the task with its code and message
    on the first attempt; a retryable one is retried."""
    calls: list[int] = []

    async def invalid(task: Task) -> AsyncIterator[BackendEvent]:
        calls.append(task.attempt)
        if task.attempt:  # always; the yield below makes this an async generator
            raise BackendError("INVALID_REQUEST", "prompt too long for model x", retryable=False)
        yield OutputChunk("")

    async def flaky(task: Task) -> AsyncIterator[BackendEvent]:
        if task.attempt < 2:
            raise BackendError("BACKEND_UNAVAILABLE", "try again", retryable=True)
        yield Completed(CustomOutput({"attempt": task.attempt}))

    executor = await start_executor(executors, {"invalid": invalid, "flaky": flaky})
    types = frozenset({"invalid", "flaky"})
    server = await start_server({"remote-1": remote(executor, "remote-1", types)})
    invalid_task = await submit(server.stub, custom_spec("invalid"))
    failed = await wait_terminal(server.stub, invalid_task.id)
    assert failed.state == pb.TASK_STATE_FAILED
    assert failed.error.code == "INVALID_REQUEST"
    assert failed.error.message == "prompt too long for model x"
    assert calls == [1]
    ok = await wait_terminal(server.stub, (await submit(server.stub, custom_spec("flaky"))).id)
    assert ok.state == pb.TASK_STATE_SUCCEEDED
    assert ok.output.custom["attempt"] == 2


async def test_a_type_the_executor_does_not_run_is_not_lost(
    start_server: StartServer, executors: list[ExecutorApp]
) -> None:
    """A member configured with a type its executor lacks: the attempt fails retryably and
    the task runs on a member that has it."""

    async def done(task: Task) -> AsyncIterator[BackendEvent]:
        yield Completed(CustomOutput({"ok": True}))

    wrong = await start_executor(executors)  # no "done" handler
    right = await start_executor(executors, {"done": done})
    types = frozenset({"done"})
    server = await start_server(
        {"wrong": remote(wrong, "wrong", types), "right": remote(right, "right", types)},
    )
    tasks = [await submit(server.stub, custom_spec("done", max_attempts=3)) for _ in range(6)]
    for task in tasks:
        final = await wait_terminal(server.stub, task.id)
        assert final.state == pb.TASK_STATE_SUCCEEDED
        assert final.backend == "right"
