"""SubmitAndStream: Submit then Stream in one call, for clients that want output as it is
generated; and the clients' submit_and_watch, which resumes with Stream when it breaks."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from client import AsyncTaskringClient
from client._proto.taskring.v1 import tasks_pb2 as pb
from tests.conftest import (
    Running,
    ServerProcess,
    StartServer,
    chat_spec,
    spawn_server,
    unused_port,
)


async def submit_and_stream(server: Running, spec: pb.TaskSpec) -> list[pb.SubmitAndStreamResponse]:
    call = server.stub.SubmitAndStream(pb.SubmitAndStreamRequest(task=spec))
    return [response async for response in call]


def text_of(responses: list[pb.SubmitAndStreamResponse]) -> str:
    snapshot = responses[0].event.snapshot.output.chat.text
    return snapshot + "".join(r.event.output_delta.text for r in responses[1:])


async def test_first_message_is_the_stored_task_then_every_event_to_the_end(
    start_server: StartServer,
) -> None:
    server = await start_server(token_delay_s=0.01)
    responses = await submit_and_stream(server, chat_spec("one two three four"))
    first, last = responses[0], responses[-1]
    assert first.created
    assert first.event.HasField("snapshot")
    task_id = first.event.snapshot.id
    stored = (await server.stub.Get(pb.GetRequest(task_id=task_id))).task
    assert last.event.state_changed.task.state == pb.TASK_STATE_SUCCEEDED
    assert text_of(responses) == stored.output.chat.text == "[local-echo] one two three four"
    assert any(r.event.HasField("output_delta") for r in responses), "output streams in"
    sequences = [r.event.sequence for r in responses]
    assert sequences == sorted(set(sequences)), "in order, each event once"
    assert all(r.created for r in responses)


async def test_bad_task_is_refused_and_nothing_is_stored(server: Running) -> None:
    spec = chat_spec("hi")
    spec.chat.model = ""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit_and_stream(server, spec)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in (refused.value.details() or "")
    assert not (await server.stub.List(pb.ListRequest())).tasks


async def test_a_repeated_idempotency_key_follows_the_first_task(server: Running) -> None:
    spec = chat_spec("same request")
    spec.idempotency_key = "req-7"
    first = await submit_and_stream(server, spec)
    again = await submit_and_stream(server, spec)
    assert first[0].created
    assert not again[0].created
    assert again[0].event.snapshot.id == first[0].event.snapshot.id
    assert again[-1].event.snapshot.state == pb.TASK_STATE_SUCCEEDED  # finished: one snapshot


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_client_resumes_with_stream_when_the_server_restarts_mid_task(
    tmp_path: Path, server_processes: list[ServerProcess]
) -> None:
    """The call breaks with the server (SIGKILL); submit_and_watch reconnects to the
    restarted one with Stream and follows the same task to its end."""
    db, listen = tmp_path / "restart.db", f"127.0.0.1:{unused_port()}"
    env = {"TASKRING_LISTEN": listen, "TASKRING_LOCAL_TOKEN_DELAY_S": "0.05"}
    first = spawn_server(db, **env)
    server_processes.append(first)
    events: list[pb.SubmitAndStreamResponse] = []
    async with AsyncTaskringClient(listen) as client:
        watch = client.submit_and_watch(
            chat_spec(" ".join(f"w{i}" for i in range(40))), resume_delays_s=(0.5, 1, 2, 4)
        )
        async for response in watch:
            events.append(response)
            if len(events) == 3:  # running, with output on its way
                first.kill()
                second = spawn_server(db, **env)
                server_processes.append(second)
    task_ids = {r.event.snapshot.id for r in events if r.event.HasField("snapshot")}
    assert len(task_ids) == 1, "one task, followed across the restart"
    final = events[-1].event.state_changed.task
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert final.attempt == 2, "the attempt running at the kill ran again after the restart"
