"""Submit, Get, List and Cancel through a real channel, including every error case."""

from __future__ import annotations

import base64
from collections.abc import Awaitable

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client._proto.taskring.v1 import tasks_pb2 as pb
from tests.conftest import Running, chat_spec, submit, wait_terminal


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None, "INVALID_ARGUMENT must carry google.rpc.BadRequest"
    result = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
        result.update({v.field: v.description for v in bad_request.field_violations})
    return result


async def test_submitted_chat_task_succeeds_with_echo_reply(server: Running) -> None:
    """A chat task runs on a local executor and its reply, usage and times are recorded."""
    task = await submit(server.stub, chat_spec("hello taskring"))
    assert task.id
    # Stored QUEUED, or already RUNNING when a backend had room and nothing was waiting.
    assert task.state in (pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING)
    assert task.spec.type == "chat"
    final = await wait_terminal(server.stub, task.id)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    assert final.output.chat.text == "[local-echo] hello taskring"
    assert final.output.chat.finish_reason == "stop"
    assert final.backend in {"local-1", "local-2", "local-3"}
    assert final.attempt == 1
    assert final.usage.input_tokens == 2
    assert final.usage.output_tokens == 3
    assert final.end_time.ToNanoseconds() >= final.start_time.ToNanoseconds() > 0
    fetched = (await server.stub.Get(pb.GetRequest(task_id=task.id))).task
    assert fetched.spec == task.spec, "Get returns the spec; Stream's state changes leave it out"
    # The final event is a snapshot (with spec) if the task ended before the watch began.
    fetched.ClearField("spec")
    final.ClearField("spec")
    assert fetched == final


async def test_embed_task_returns_one_normalised_vector_per_text(server: Running) -> None:
    """The local-hash embedding is deterministic: the same text gives the same vector."""
    spec = pb.TaskSpec(embed=pb.EmbedInput(model="local-hash", texts=["a b c", "x", "a b c"]))
    final = await wait_terminal(server.stub, (await submit(server.stub, spec)).id)
    assert final.state == pb.TASK_STATE_SUCCEEDED
    vectors = [list(e.values) for e in final.output.embed.embeddings]
    assert len(vectors) == 3
    assert vectors[0] == vectors[2] != vectors[1]
    assert sum(v * v for v in vectors[0]) == pytest.approx(1.0, rel=1e-5)


async def test_max_tokens_truncates_the_reply(server: Running) -> None:
    """max_tokens caps the local model's reply and reports finish_reason 'length'."""
    spec = chat_spec("one two three four five")
    spec.chat.parameters.max_tokens = 2
    final = await wait_terminal(server.stub, (await submit(server.stub, spec)).id)
    assert final.output.chat.text == "[local-echo] one "
    assert final.output.chat.finish_reason == "length"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (pb.TaskSpec(), "task.input"),
        (pb.TaskSpec(chat=pb.ChatInput(model="local-echo")), "task.chat.messages"),
        (
            pb.TaskSpec(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x")])),
            "task.chat.model",
        ),
        (
            chat_spec().__class__(
                chat=pb.ChatInput(model="m", messages=[pb.ChatMessage(role="robot")])
            ),
            "task.chat.messages[0].role",
        ),
        (pb.TaskSpec(embed=pb.EmbedInput(model="local-hash")), "task.embed.texts"),
        (pb.TaskSpec(type="summarize", custom=struct_pb2.Struct()), "task.type"),
        (pb.TaskSpec(type="embed", chat=chat_spec().chat), "task.input"),
        (pb.TaskSpec(custom=struct_pb2.Struct()), "task.type"),
        (chat_spec(timeout=duration_pb2.Duration(seconds=-1)), "task.timeout"),
        (chat_spec(timeout=duration_pb2.Duration(seconds=10**7)), "task.timeout"),
        (chat_spec(max_attempts=-1), "task.max_attempts"),
        (chat_spec(max_attempts=1000), "task.max_attempts"),
        (chat_spec(priority=99), "task.priority"),
        (chat_spec(routing_key="k" * 1000), "task.routing_key"),
        (
            pb.TaskSpec(
                type="x",
                custom=struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=float("nan"))}),
            ),
            "task.custom",
        ),
    ],
)
async def test_invalid_submit_names_the_field_to_fix(
    server: Running, spec: pb.TaskSpec, field: str
) -> None:
    """Bad input answers INVALID_ARGUMENT with a BadRequest violation naming the field."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Submit(pb.SubmitRequest(task=spec))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert field in violations, violations
    assert field in (caught.value.details() or "")
    # The server is still up and serving afterwards.
    task = await submit(server.stub, chat_spec())
    assert (await wait_terminal(server.stub, task.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_unknown_task_id_is_not_found_on_every_method(server: Running) -> None:
    """Get, Cancel and Stream of an id that does not exist answer NOT_FOUND."""
    missing = "00000000-0000-0000-0000-000000000000"
    calls: list[Awaitable[object]] = [
        server.stub.Get(pb.GetRequest(task_id=missing)),
        server.stub.Cancel(pb.CancelRequest(task_id=missing)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in server.stub.Stream(pb.StreamRequest(task_id=missing)):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_empty_task_id_is_invalid_argument(server: Running) -> None:
    """A missing task_id is the caller's mistake, not an unknown task."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Get(pb.GetRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task_id" in field_violations(caught.value)


async def test_cancel_of_finished_task_is_failed_precondition(server: Running) -> None:
    """Cancelling a task that already succeeded says so and changes nothing."""
    task = await submit(server.stub, chat_spec())
    final = await wait_terminal(server.stub, task.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Cancel(pb.CancelRequest(task_id=task.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SUCCEEDED" in (caught.value.details() or "")
    after = (await server.stub.Get(pb.GetRequest(task_id=task.id))).task
    assert (after.state, after.sequence, after.end_time) == (
        final.state,
        final.sequence,
        final.end_time,
    ), "the failed Cancel changed nothing"


async def test_list_filters_by_state_and_type_and_pages_newest_first(server: Running) -> None:
    """List pages through every task exactly once, newest first, honouring filters."""
    ids = []
    for i in range(7):
        task = await submit(server.stub, chat_spec(f"task {i}"))
        ids.append(task.id)
        await wait_terminal(server.stub, task.id)
    embed = await submit(
        server.stub, pb.TaskSpec(embed=pb.EmbedInput(model="local-hash", texts=["x"]))
    )
    await wait_terminal(server.stub, embed.id)

    seen: list[str] = []
    token = ""
    while True:
        page = await server.stub.List(pb.ListRequest(types=["chat"], page_size=3, page_token=token))
        assert len(page.tasks) <= 3
        seen.extend(t.id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))

    succeeded = await server.stub.List(pb.ListRequest(states=[pb.TASK_STATE_SUCCEEDED]))
    assert len(succeeded.tasks) == 8
    queued = await server.stub.List(pb.ListRequest(states=[pb.TASK_STATE_QUEUED]))
    assert list(queued.tasks) == []
    embeds = await server.stub.List(pb.ListRequest(types=["embed"]))
    assert [t.id for t in embeds.tasks] == [embed.id]


async def test_list_of_large_tasks_fits_a_default_client_page_by_page(server: Running) -> None:
    """Five tasks of ~1.8 MB each (a 900,000-char prompt and its echo): a page of all five
    would pass the 4 MiB a gRPC client receives by default, and fail every time. The reply
    holds fewer tasks than asked instead, and its token goes on from the first left out."""
    ids = []
    for i in range(5):
        task = await submit(server.stub, chat_spec(f"{i} " + "x" * 900_000))
        ids.append(task.id)
        await wait_terminal(server.stub, task.id)

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await server.stub.List(pb.ListRequest(page_token=token))
        assert page.ByteSize() <= 4 * 1024 * 1024
        pages.append([t.id for t in page.tasks])
        token = page.next_page_token
        if not token:
            break
    assert [i for page_ids in pages for i in page_ids] == list(reversed(ids))
    assert len(pages) > 1
    assert all(page_ids for page_ids in pages)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListRequest(page_token="not-a-token"), "page_token"),
        (
            pb.ListRequest(
                page_token=base64.urlsafe_b64encode(b"v1:" + str(2**70).encode()).decode()
            ),
            "page_token",
        ),
        (pb.ListRequest(page_size=-1), "page_size"),
        (pb.ListRequest(page_size=100_000), "page_size"),
        (pb.ListRequest(states=[42]), "states[0]"),  # type: ignore[list-item]
    ],
)
async def test_bad_list_request_names_the_field(
    server: Running, request_: pb.ListRequest, field: str
) -> None:
    """Garbage page tokens, sizes and states answer INVALID_ARGUMENT."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.List(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value)


async def test_same_idempotency_key_returns_the_original_task(server: Running) -> None:
    """A retried Submit with the same key gets the same task back, marked not created."""
    first = await server.stub.Submit(pb.SubmitRequest(task=chat_spec(idempotency_key="k1")))
    again = await server.stub.Submit(pb.SubmitRequest(task=chat_spec(idempotency_key="k1")))
    assert first.created
    assert not again.created
    assert again.task.id == first.task.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.Submit(pb.SubmitRequest(task=chat_spec("other", idempotency_key="k1")))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
