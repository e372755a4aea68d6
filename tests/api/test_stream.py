"""Stream: snapshot first, then every state change and output delta in order; resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.api.servicer import encoded_stream_response, stream_response
from server.dispatch.dispatcher import DispatchSettings
from server.events.hub import EventHub, EventKind, TaskEvent
from server.events.recorder import MAX_UNSTORED_DELTAS
from server.model.task import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    Task,
    TaskSpec,
    TaskState,
)
from tests.api.test_dispatch import Gate, custom_spec
from tests.conftest import (
    Running,
    StartServer,
    chat_spec,
    local_backends,
    submit,
    wait_terminal,
    watch_all,
)


def kinds(events: list[pb.StreamResponse]) -> list[str]:
    out = []
    for event in events:
        which = event.WhichOneof("event")
        if which == "state_changed":
            out.append(
                pb.TaskState.Name(event.state_changed.task.state).removeprefix("TASK_STATE_")
            )
        else:
            out.append(str(which))
    return out


def streamed_text(events: list[pb.StreamResponse]) -> str:
    return "".join(e.output_delta.text for e in events if e.HasField("output_delta"))


async def slow_server(start_server: StartServer) -> Running:
    # 20 ms per token: slow enough that every delta is published on its own.
    return await start_server(token_delay_s=0.02)


async def test_stream_shows_snapshot_then_each_token_then_success(
    start_server: StartServer,
) -> None:
    """A watcher sees the queued snapshot, RUNNING, the reply token by token, SUCCEEDED."""
    server = await slow_server(start_server)
    task = await submit(server.stub, chat_spec("one two three"))
    events = await watch_all(server.stub, task.id)
    assert kinds(events)[0] == "snapshot"
    snapshot = events[0].snapshot
    states = [pb.TaskState.Name(snapshot.state).removeprefix("TASK_STATE_")]
    states += [k for k in kinds(events[1:]) if k != "output_delta"]
    # The watch may begin while the task is still QUEUED or already RUNNING.
    assert states in (["QUEUED", "RUNNING", "SUCCEEDED"], ["RUNNING", "SUCCEEDED"])
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences)), "strictly increasing, no repeats"
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), "no gaps"
    deltas = [e.output_delta.text for e in events if e.HasField("output_delta")]
    assert snapshot.output.chat.text + "".join(deltas) == "[local-echo] one two three"
    # Tokens 20 ms apart arrive one by one (a slow commit may merge two, never lose one).
    assert len(deltas) >= 3, "the reply streams in as it is generated"
    final = events[-1].state_changed.task
    assert final.sequence == events[-1].sequence
    assert final.output.chat.text == snapshot.output.chat.text + streamed_text(events)


async def test_a_long_reply_streams_token_by_token_and_is_stored_in_a_few_writes(
    start_server: StartServer,
) -> None:
    """Each token goes out as it comes, but the output is stored every so often, not per
    token: storing the whole text so far on every token made a long reply's writes grow
    with the square of its length."""
    server = await start_server(token_delay_s=0.005)
    words = [f"word{i}" for i in range(100)]  # 101 tokens with the model's tag: ~0.5 s
    writes_before = server.app.store.statistics()["writes"]
    task = await submit(server.stub, chat_spec(" ".join(words)))
    events = await watch_all(server.stub, task.id)
    writes = server.app.store.statistics()["writes"] - writes_before
    reply = "[local-echo] " + " ".join(words)
    assert events[0].snapshot.output.chat.text + streamed_text(events) == reply
    deltas = [e for e in events if e.HasField("output_delta")]
    assert len(deltas) >= 50, "tokens 5 ms apart go out one by one (a busy moment may merge some)"
    # Submit, start, the output about every 0.25 s, the end: not one write per token.
    assert writes <= 10, f"{writes} store writes for {len(deltas)} deltas"
    stored = (await server.stub.Get(pb.GetRequest(task_id=task.id))).task
    assert (stored.state, stored.output.chat.text) == (pb.TASK_STATE_SUCCEEDED, reply)


async def test_the_stored_output_is_never_far_behind_what_watchers_saw(
    start_server: StartServer,
) -> None:
    """However long the store interval, at most MAX_UNSTORED_DELTAS deltas a watcher saw
    are not stored yet: the numbers recovery skips for them."""
    chatter = Gate(tokens=[f"{i} " for i in range(3 * MAX_UNSTORED_DELTAS)], gap_s=0.001)
    never = DispatchSettings(poll_interval_s=0.05, output_store_interval_s=3600.0)
    server = await start_server(local_backends(extra={"chatter": chatter}), dispatch=never)
    task = await submit(server.stub, custom_spec("chatter"))
    watch = asyncio.create_task(watch_all(server.stub, task.id))
    await asyncio.wait_for(chatter.said.wait(), 10)
    seen = (await server.stub.Get(pb.GetRequest(task_id=task.id))).task
    stored = await server.app.store.get(task.id)
    assert stored is not None
    assert seen.output.chat.text.count(" ") == 3 * MAX_UNSTORED_DELTAS
    assert seen.sequence - MAX_UNSTORED_DELTAS <= stored.sequence < seen.sequence
    await server.stub.Cancel(pb.CancelRequest(task_id=task.id))
    events = await asyncio.wait_for(watch, 5)
    assert events[-1].state_changed.task.state == pb.TASK_STATE_CANCELLED
    assert events[-1].state_changed.task.output.chat.text == seen.output.chat.text


async def test_stream_of_finished_task_is_one_snapshot(server: Running) -> None:
    """Watching a finished task returns its final snapshot and ends."""
    task = await submit(server.stub, chat_spec())
    await watch_all(server.stub, task.id)
    events = await watch_all(server.stub, task.id)
    assert kinds(events) == ["snapshot"]
    assert events[0].snapshot.state == pb.TASK_STATE_SUCCEEDED


async def test_stream_resumes_from_sequence_after_reconnect(start_server: StartServer) -> None:
    """A watch dropped midway resumes with after_sequence: no gaps, no repeats."""
    server = await slow_server(start_server)
    task = await submit(server.stub, chat_spec("alpha beta gamma delta epsilon"))
    call = server.stub.Stream(pb.StreamRequest(task_id=task.id))
    first: list[pb.StreamResponse] = []
    async for event in call:
        first.append(event)
        if event.HasField("output_delta") and len(first) >= 4:
            break
    call.cancel()
    resumed = await watch_all(server.stub, task.id, after_sequence=first[-1].sequence)
    assert resumed, "events after the drop must be delivered"
    assert resumed[0].sequence == first[-1].sequence + 1
    assert not any(e.HasField("snapshot") for e in resumed)
    combined = first + resumed
    sequences = [e.sequence for e in combined]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    final = resumed[-1].state_changed.task
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert streamed_text(combined) == final.output.chat.text


async def test_resume_after_the_end_returns_nothing_more(server: Running) -> None:
    """Resuming at the final sequence of a finished task ends at once with no events."""
    task = await submit(server.stub, chat_spec())
    events = await watch_all(server.stub, task.id)
    assert await watch_all(server.stub, task.id, after_sequence=events[-1].sequence) == []


async def test_resume_without_history_falls_back_to_snapshot(
    start_server: StartServer, tmp_path: Path
) -> None:
    """After a restart the old events are gone: a resume gets a full snapshot instead."""
    db = tmp_path / "restart.db"
    first = await start_server(db=db)
    task = await submit(first.stub, chat_spec("x y"))
    final = await wait_terminal(first.stub, task.id)
    assert final.sequence > 2
    await first.app.stop()
    second = await start_server(db=db)
    resumed = await watch_all(second.stub, task.id, after_sequence=2)
    assert kinds(resumed) == ["snapshot"]
    assert resumed[0].snapshot.output.chat.text == final.output.chat.text == "[local-echo] x y"


async def test_many_watchers_all_get_every_event(start_server: StartServer) -> None:
    """Ten watchers of one task each see the same complete sequence of events."""
    server = await slow_server(start_server)
    task = await submit(server.stub, chat_spec("a b c d"))
    results = await asyncio.gather(*(watch_all(server.stub, task.id) for _ in range(10)))
    finals = {r[-1].sequence for r in results}
    assert len(finals) == 1
    # Watchers that joined later start from a later snapshot; each then sees every later
    # event in order and ends with SUCCEEDED and the full text.
    for events in results:
        snapshot = events[0].snapshot
        assert snapshot.output.chat.text + streamed_text(events) == "[local-echo] a b c d"
        seen = [pb.TaskState.Name(snapshot.state).removeprefix("TASK_STATE_")]
        seen += [k for k in kinds(events[1:]) if k != "output_delta"]
        assert seen in (["QUEUED", "RUNNING", "SUCCEEDED"], ["RUNNING", "SUCCEEDED"])
        sequences = [e.sequence for e in events]
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))


async def test_stream_of_cancelled_task_ends_cancelled(start_server: StartServer) -> None:
    """A watcher of a task that gets cancelled sees CANCELLED last and the stream ends."""
    server = await start_server(token_delay_s=0.5)
    task = await submit(server.stub, chat_spec("a b c d e f g"))
    watcher = asyncio.create_task(watch_all(server.stub, task.id))
    await asyncio.sleep(0.1)
    await server.stub.Cancel(pb.CancelRequest(task_id=task.id))
    events = await asyncio.wait_for(watcher, 5)
    assert kinds(events)[-1] == "CANCELLED"


async def test_resume_beyond_the_current_sequence_is_invalid(server: Running) -> None:
    """A resume point the task never reached is the caller's mistake, said at once."""
    task = await submit(server.stub, chat_spec())
    events = await watch_all(server.stub, task.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch_all(server.stub, task.id, after_sequence=events[-1].sequence + 100)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_sequence" in (caught.value.details() or "")


def test_an_event_is_encoded_once_for_all_its_watchers() -> None:
    """Every watcher of a task sends the same bytes for an event, encoded by the first: a
    finished task's 100 KiB reply is not encoded again for each of its watchers."""
    spec = TaskSpec(type="chat", input=ChatInput("m", (ChatMessage("user", "hi"),)))
    finished = Task(
        id="t",
        client_id="c",
        spec=spec,
        state=TaskState.SUCCEEDED,
        created_at=0,
        deadline=9,
        sequence=7,
        output=ChatOutput("x" * 100_000, "stop"),
    )
    event = TaskEvent(EventKind.STATE, finished)
    encoded = encoded_stream_response(event)
    assert pb.StreamResponse.FromString(encoded) == stream_response(event)
    assert encoded_stream_response(event) is encoded


async def test_a_coalesced_delta_is_encoded_with_all_its_text() -> None:
    """A slow watcher's merged delta is an event of its own: it does not reuse the encoding
    a fast watcher made of the first delta it merged."""
    spec = TaskSpec(type="chat", input=ChatInput("m", (ChatMessage("user", "hi"),)))
    running = Task(
        id="t", client_id="c", spec=spec, state=TaskState.RUNNING, created_at=0, deadline=9
    )
    hub = EventHub(coalesce_after=1)
    with hub.subscribe("t") as fast, hub.subscribe("t") as slow:
        sent: list[pb.StreamResponse] = []
        for sequence, text in enumerate(["", "a", "b"], start=1):
            kind = EventKind.OUTPUT if text else EventKind.STATE
            hub.publish(TaskEvent(kind, running.evolve(sequence=sequence), text))
            event = await fast.next_event()
            assert event is not None
            sent.append(pb.StreamResponse.FromString(encoded_stream_response(event)))
        assert [e.output_delta.text for e in sent[1:]] == ["a", "b"]
        await slow.next_event()  # RUNNING
        coalesced = await slow.next_event()
        assert coalesced is not None
        merged = pb.StreamResponse.FromString(encoded_stream_response(coalesced))
        assert (merged.sequence, merged.output_delta.text) == (3, "ab")
