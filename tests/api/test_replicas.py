"""Two router replicas in one test process sharing one PostgreSQL schema: a task submitted
through one is seen, streamed, cancelled and finished through the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.backends.base import Backend, BackendEvent, Completed
from server.backends.local import LocalBackend
from server.dispatch.dispatcher import DispatchSettings
from server.model.task import CustomOutput, Task
from tests.api.test_dispatch import Gate, custom_spec
from tests.conftest import (
    Running,
    StartServer,
    chat_spec,
    local_backends,
    submit,
    wait_terminal,
    watch_all,
    watched_text,
)

pytestmark = pytest.mark.postgresql_only


async def noop(task: Task) -> AsyncIterator[BackendEvent]:
    yield Completed(CustomOutput({}))


def runs_nothing_shared() -> dict[str, Backend]:
    """A replica whose ring runs only a type of its own: what it sees of the shared types'
    tasks comes from the other replica through the store."""
    return {"other-1": LocalBackend("other-1", {"other": noop}, 1)}


async def replicas(
    start_server: StartServer, tmp_path: Path, a_backends: dict[str, Backend]
) -> tuple[Running, Running]:
    db = tmp_path / "shared.db"  # one schema for both
    return (
        await start_server(a_backends, db=db),
        await start_server(runs_nothing_shared(), db=db),
    )


async def test_a_task_submitted_to_one_replica_streams_from_the_other(
    start_server: StartServer, tmp_path: Path
) -> None:
    a, b = await replicas(start_server, tmp_path, local_backends(token_delay_s=0.02))
    task = await submit(a.stub, chat_spec("one two three four five"))
    got = (await b.stub.Get(pb.GetRequest(task_id=task.id))).task
    assert got.id == task.id
    events = await watch_all(b.stub, task.id)
    assert watched_text(events) == "[local-echo] one two three four five"
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)), "in order, none twice"
    assert events[-1].state_changed.task.state == pb.TASK_STATE_SUCCEEDED
    assert events[-1].state_changed.task.backend.startswith("local-")
    final = (await b.stub.Get(pb.GetRequest(task_id=task.id))).task
    assert final.state == pb.TASK_STATE_SUCCEEDED, "B's Get shows A's latest change"


async def test_cancel_through_one_replica_stops_the_work_on_the_other(
    start_server: StartServer, tmp_path: Path
) -> None:
    gate = Gate()
    a, b = await replicas(start_server, tmp_path, local_backends(extra={"gate": gate}))
    task = await submit(a.stub, custom_spec("gate"))
    await asyncio.wait_for(gate.started.wait(), 5)
    cancelled = (await b.stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    await asyncio.wait_for(gate.cancelled.wait(), 5)  # A's attempt was stopped, not left
    assert not gate.finished
    assert (await wait_terminal(a.stub, task.id)).state == pb.TASK_STATE_CANCELLED


async def test_a_cancel_through_one_replica_reaches_the_watchers_of_the_other(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The replica running a task sends its watchers output it has not stored yet; a Cancel
    made on another replica still comes after that output, in order, and ends their watch."""
    talker = Gate(tokens=("one ", "two ", "three ", "four"))
    db = tmp_path / "shared.db"
    # A stores the output once (its first token) and then not for a minute.
    keeps_output = DispatchSettings(poll_interval_s=0.05, output_store_interval_s=60.0)
    a = await start_server(local_backends(extra={"talk": talker}), db=db, dispatch=keeps_output)
    b = await start_server(runs_nothing_shared(), db=db)
    task = await submit(a.stub, custom_spec("talk"))
    watch = asyncio.create_task(watch_all(a.stub, task.id))
    await asyncio.wait_for(talker.said.wait(), 5)
    stored = (await b.stub.Get(pb.GetRequest(task_id=task.id))).task
    assert stored.output.chat.text == "one ", "B sees what A stored: the first token"

    assert (await b.stub.Cancel(pb.CancelRequest(task_id=task.id))).task.state == (
        pb.TASK_STATE_CANCELLED
    )
    events = await asyncio.wait_for(watch, 5)
    await asyncio.wait_for(talker.cancelled.wait(), 5)  # A's attempt was stopped
    assert watched_text(events) == "one two three four"
    assert events[-1].state_changed.task.state == pb.TASK_STATE_CANCELLED
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)), "the end comes after every delta, none twice"


async def test_tasks_waiting_on_a_busy_replica_run_on_the_other(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Any replica accepts a Submit; whichever has room claims the task."""
    gate = Gate()
    db = tmp_path / "shared.db"
    # B runs chat tasks one at a time, and its one slot is held by the gate.
    b = await start_server({"held-1": LocalBackend("held-1", {"chat": gate}, 1)}, db=db)
    first = await submit(b.stub, chat_spec("held"))
    await asyncio.wait_for(gate.started.wait(), 5)
    a = await start_server(local_backends(), db=db)
    chats = [await submit(b.stub, chat_spec(f"via b {i}")) for i in range(20)]
    finals = await asyncio.gather(*(wait_terminal(b.stub, t.id) for t in chats))
    assert {f.state for f in finals} == {pb.TASK_STATE_SUCCEEDED}
    assert {f.backend for f in finals} <= {"local-1", "local-2", "local-3"}
    gate.opened.set()
    assert (await wait_terminal(a.stub, first.id)).backend == "held-1"
