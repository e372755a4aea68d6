"""SubmitBatch through a real channel: each task admitted or refused on its own, the
accepted ones stored together and run, whole-call errors for a batch of the wrong size."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import struct_pb2
from prometheus_client import generate_latest

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.observability.metrics import PrometheusMetrics
from tests.api.test_tasks_api import field_violations
from tests.conftest import Running, chat_spec, submit, wait_terminal

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]


async def submit_batch(server: Running, *specs: pb.TaskSpec) -> list[pb.SubmitBatchResult]:
    response = await server.stub.SubmitBatch(pb.SubmitBatchRequest(tasks=specs))
    assert len(response.results) == len(specs), "one result per task"
    return list(response.results)


async def stored_ids(server: Running) -> list[str]:
    listed = await server.stub.List(pb.ListRequest(page_size=1000))
    return [task.id for task in listed.tasks]


def violated(result: pb.SubmitBatchResult) -> dict[str, str]:
    return {v.field: v.description for v in result.error.field_violations}


async def test_a_batch_of_good_tasks_is_stored_and_every_task_succeeds(server: Running) -> None:
    """Every task is created, answered in request order, and runs to its own reply."""
    prompts = [f"prompt {i}" for i in range(20)]
    results = await submit_batch(server, *(chat_spec(p, labels={"n": p}) for p in prompts))
    assert all(r.HasField("task") and r.created for r in results)
    assert all(r.task.state == pb.TASK_STATE_QUEUED for r in results)
    finals = await asyncio.gather(*(wait_terminal(server.stub, r.task.id) for r in results))
    for prompt, final in zip(prompts, finals, strict=True):
        assert final.state == pb.TASK_STATE_SUCCEEDED
        assert final.output.chat.text == f"[local-echo] {prompt}"
    # The reply leaves the spec out; Get has it, with the server's defaults applied.
    assert not results[0].task.HasField("spec")
    stored = (await server.stub.Get(pb.GetRequest(task_id=results[0].task.id))).task
    assert stored.spec.labels == {"n": "prompt 0"}
    assert stored.spec.max_attempts > 0
    assert sorted(await stored_ids(server)) == sorted(r.task.id for r in results)


async def test_bad_tasks_are_refused_by_name_and_the_good_ones_run(server: Running) -> None:
    """Refused tasks say which of them is at fault and which field to fix; the good ones
    around them are stored and run."""
    results = await submit_batch(
        server,
        chat_spec("first"),
        pb.TaskSpec(chat=pb.ChatInput(model="local-echo")),  # no messages
        chat_spec("third"),
        pb.TaskSpec(type="no-such-type", custom=struct_pb2.Struct()),
        chat_spec("fifth", priority=99),  # refused when converted, before validation
        chat_spec("sixth"),
    )
    good = [results[i] for i in (0, 2, 5)]
    bad = {i: results[i] for i in (1, 3, 4)}
    assert all(r.HasField("task") and r.created for r in good)
    assert all(r.error.code == INVALID_ARGUMENT and not r.created for r in bad.values())
    assert "tasks[1].chat.messages" in violated(bad[1])
    assert "tasks[3].type" in violated(bad[3])
    assert "tasks[4].priority" in violated(bad[4])
    assert "tasks[1].chat.messages" in bad[1].error.message
    finals = await asyncio.gather(*(wait_terminal(server.stub, r.task.id) for r in good))
    texts = [final.output.chat.text for final in finals]
    assert texts == ["[local-echo] first", "[local-echo] third", "[local-echo] sixth"]
    assert sorted(await stored_ids(server)) == sorted(r.task.id for r in good)


async def test_a_batch_whose_every_task_is_bad_answers_each(server: Running) -> None:
    """Every task refused, the call still succeeds: the errors are the tasks', not the
    batch's, whether found when converting (priority) or when validating (model)."""
    results = await submit_batch(
        server, chat_spec(priority=99), pb.TaskSpec(chat=pb.ChatInput(model=""))
    )
    assert "tasks[0].priority" in violated(results[0])
    assert "tasks[1].chat.model" in violated(results[1])
    results = await submit_batch(server, chat_spec(priority=99))
    assert "tasks[0].priority" in violated(results[0])
    assert await stored_ids(server) == []


async def test_a_batch_of_no_task_is_invalid_argument(server: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.SubmitBatch(pb.SubmitBatchRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one task" in field_violations(caught.value)["tasks"]


async def test_more_than_1000_tasks_is_invalid_argument_and_1000_pass(server: Running) -> None:
    """1,001 tasks are refused as a whole, nothing stored, saying to split the batch; 1,000
    are stored, all in one call."""
    specs = [
        pb.TaskSpec(embed=pb.EmbedInput(model="local-hash", texts=[str(i)])) for i in range(1001)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.SubmitBatch(pb.SubmitBatchRequest(tasks=specs))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "split" in field_violations(caught.value)["tasks"]
    assert await stored_ids(server) == []
    results = await submit_batch(server, *specs[:1000])
    assert all(r.created for r in results)
    assert len(set(await stored_ids(server))) == 1000


async def test_idempotency_keys_replay_within_and_across_batches(server: Running) -> None:
    """A key used before returns its task (created=false); a key repeated within a batch
    behaves as if the tasks came one after the other; a key reused for a different task
    is ALREADY_EXISTS for that task alone."""
    earlier = await submit(server.stub, chat_spec("a", idempotency_key="key-a"))
    first = await submit_batch(
        server,
        chat_spec("a", idempotency_key="key-a"),  # Submit's, before the batch
        chat_spec("b", idempotency_key="key-b"),
        chat_spec("b", idempotency_key="key-b"),  # the task just before
        chat_spec("c", idempotency_key="key-c"),
        chat_spec("not c", idempotency_key="key-c"),  # the same key, another task
    )
    assert (first[0].task.id, first[0].created) == (earlier.id, False)
    assert first[1].created
    assert (first[2].task.id, first[2].created) == (first[1].task.id, False)
    assert first[3].created
    assert first[4].error.code == ALREADY_EXISTS
    assert first[3].task.id in first[4].error.message
    second = await submit_batch(
        server,
        chat_spec("b", idempotency_key="key-b"),
        chat_spec("not a", idempotency_key="key-a"),
        chat_spec("d", idempotency_key="key-d"),
    )
    assert (second[0].task.id, second[0].created) == (first[1].task.id, False)
    assert second[1].error.code == ALREADY_EXISTS
    assert earlier.id in second[1].error.message
    assert second[2].created
    created = [earlier.id, first[1].task.id, first[3].task.id, second[2].task.id]
    assert sorted(await stored_ids(server)) == sorted(created)
    final = await wait_terminal(server.stub, first[1].task.id)
    assert final.output.chat.text == "[local-echo] b", "a replay ran nothing twice"


async def test_a_batch_while_shutting_down_is_unavailable(server: Running) -> None:
    """Once shutdown began (as SIGTERM does it), a batch is refused whole, nothing stored."""
    server.app.tasks.stop_accepting()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.SubmitBatch(pb.SubmitBatchRequest(tasks=[chat_spec()]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await stored_ids(server) == []


async def test_each_task_of_a_batch_counts_in_the_submit_metrics(server: Running) -> None:
    """The Submit counters count a batch's tasks one by one, refusals by their code."""
    assert isinstance(server.app.metrics, PrometheusMetrics)
    await submit_batch(
        server,
        chat_spec("one"),
        chat_spec("two"),
        pb.TaskSpec(chat=pb.ChatInput(model="")),
        pb.TaskSpec(embed=pb.EmbedInput(model="local-hash", texts=["x"])),
    )
    text = generate_latest(server.app.metrics.registry).decode()
    assert 'taskring_submit_requests_total{task_type="chat"} 3.0' in text
    assert 'taskring_submit_requests_total{task_type="embed"} 1.0' in text
    assert 'taskring_submit_rejections_total{reason="INVALID_ARGUMENT"} 1.0' in text
