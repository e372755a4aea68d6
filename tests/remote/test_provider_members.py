"""OpenAI and Anthropic members configured by TOML, through a real router and the real SDKs
talking HTTP to local servers that speak their wire formats."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import admin_pb2 as apb
from client._proto.taskring.v1 import admin_pb2_grpc, tasks_pb2_grpc
from client._proto.taskring.v1 import tasks_pb2 as pb
from server.app import App
from server.config import Settings
from server.config_file import read_file_config
from tests.conftest import FAST_RETRY, make_settings, wait_terminal, watched_text
from tests.fakes import Fail, FakeAnthropic, FakeOpenAI

SECRET = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic]]:
    async with FakeOpenAI() as openai, FakeAnthropic() as anthropic:
        yield openai, anthropic


@contextlib.asynccontextmanager
async def start_router(
    tmp_path: Path, config: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[App, tasks_pb2_grpc.TaskServiceAsyncStub, grpc.aio.Channel]]:
    monkeypatch.setenv("TEST_PROVIDER_KEY", SECRET)
    path = tmp_path / "taskring.toml"
    path.write_text(config)
    file, problems = read_file_config(path)
    assert problems == []
    base = make_settings(tmp_path / "tasks.db")
    settings = Settings(base.server, base.store, base.local, base.tasks, file)
    app = App(settings, dispatch=FAST_RETRY)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield app, tasks_pb2_grpc.TaskServiceStub(channel), channel
    finally:
        await channel.close()
        await app.stop()


def chat(model: str, text: str, routing_key: str = "") -> pb.SubmitRequest:
    return pb.SubmitRequest(
        task=pb.TaskSpec(
            chat=pb.ChatInput(
                model=model,
                messages=[
                    pb.ChatMessage(role="system", content="Be brief."),
                    pb.ChatMessage(role="user", content=text),
                ],
            ),
            routing_key=routing_key,
        )
    )


def members_config(openai: FakeOpenAI, anthropic: FakeAnthropic) -> str:
    return f"""
[[backends]]
name = "vllm"
kind = "openai"
base_url = "{openai.base_url}"
api_key_env = "TEST_PROVIDER_KEY"
task_types = ["chat"]

[[backends]]
name = "claude"
kind = "anthropic"
base_url = "{anthropic.base_url}"
api_key_env = "TEST_PROVIDER_KEY"

[prices."fake-model"]
input = 1.0
output = 2.0
"""


async def test_chat_streams_from_providers_with_usage_and_cost(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    openai, anthropic = fakes
    openai.token_delay_s = anthropic.token_delay_s = 0.01
    async with start_router(tmp_path, members_config(openai, anthropic), monkeypatch) as (
        _,
        stub,
        _channel,
    ):
        seen = set()
        for i in range(12):
            task = (
                await stub.Submit(chat("fake-model", f"tell me about {i} things", f"k{i}"))
            ).task
            events = [e async for e in stub.Stream(pb.StreamRequest(task_id=task.id))]
            final = events[-1].state_changed.task
            assert final.state == pb.TASK_STATE_SUCCEEDED, final.error
            deltas = [e.output_delta.text for e in events if e.HasField("output_delta")]
            assert len(deltas) > 1, "the reply arrives as it is generated"
            assert watched_text(events) == final.output.chat.text
            assert f"{i} things" in final.output.chat.text
            usage = final.usage
            assert usage.input_tokens > 0
            assert usage.output_tokens > 0
            expected = (usage.input_tokens * 1.0 + usage.output_tokens * 2.0) / 1e6
            assert usage.cost_usd == pytest.approx(expected)
            seen.add(final.backend)
        assert seen == {"vllm", "claude"}, "both providers are ring members"
        for request in openai.requests + anthropic.requests:
            assert request.headers.get("Authorization") == f"Bearer {SECRET}" or (
                request.headers.get("x-api-key") == SECRET
            )


async def test_a_rate_limited_member_is_held_not_failed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    """A 429 with retry-after: the task runs on the other member at once, the limited one
    gets no work until the pause ends, and its circuit counts no failure."""
    openai, anthropic = fakes
    async with start_router(tmp_path, members_config(openai, anthropic), monkeypatch) as (
        _,
        stub,
        channel,
    ):
        openai.script(*[Fail(429, "slow down", headers={"retry-after": "30"})] * 3)
        finals = []
        for i in range(10):
            task = (await stub.Submit(chat("fake-model", "hi", f"key-{i}"))).task
            finals.append(await wait_terminal(stub, task.id))
        assert all(f.state == pb.TASK_STATE_SUCCEEDED for f in finals)
        assert all(f.backend == "claude" for f in finals[1:])
        assert len(openai.requests) == 1, "held for its retry-after: no more requests"
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        listed = {
            b.config.name: b for b in (await admin.ListBackends(apb.ListBackendsRequest())).backends
        }
        vllm = listed["vllm"]
        assert vllm.HasField("held_until")
        assert not vllm.available
        assert vllm.circuit == apb.CIRCUIT_STATE_CLOSED
        assert vllm.consecutive_failures == 0


async def test_invalid_requests_fail_fast_and_never_open_a_circuit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    openai, anthropic = fakes
    openai.for_model("too-big", Fail(400, "maximum context length exceeded"))
    anthropic.for_model("too-big", Fail(400, "prompt is too long"))
    async with start_router(tmp_path, members_config(openai, anthropic), monkeypatch) as (
        _,
        stub,
        channel,
    ):
        finals = await asyncio.gather(
            *[
                wait_terminal(stub, (await stub.Submit(chat("too-big", "x", f"k{i}"))).task.id)
                for i in range(12)
            ]
        )
        for final in finals:
            assert final.state == pb.TASK_STATE_FAILED
            assert final.error.code == "INVALID_REQUEST"
            assert not final.error.retryable
            assert final.attempt == 1
            assert "too long" in final.error.message or "context length" in final.error.message
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for member in (await admin.ListBackends(apb.ListBackendsRequest())).backends:
            assert member.circuit == apb.CIRCUIT_STATE_CLOSED
            assert member.available


async def test_a_failing_member_opens_its_circuit_and_traffic_moves(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    openai, anthropic = fakes
    openai.default = Fail(500, "upstream exploded")
    async with start_router(tmp_path, members_config(openai, anthropic), monkeypatch) as (
        _,
        stub,
        channel,
    ):
        finals = []
        for i in range(20):
            task = (await stub.Submit(chat("fake-model", "hi", f"key-{i}"))).task
            finals.append(await wait_terminal(stub, task.id))
        assert all(f.state == pb.TASK_STATE_SUCCEEDED for f in finals)
        assert all(f.backend == "claude" for f in finals)
        assert len(openai.requests) == 5, "open after 5 consecutive failures: no more requests"
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        listed = {
            b.config.name: b for b in (await admin.ListBackends(apb.ListBackendsRequest())).backends
        }
        assert listed["vllm"].circuit == apb.CIRCUIT_STATE_OPEN
        assert listed["vllm"].consecutive_failures == 5


async def test_error_messages_never_carry_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes: tuple[FakeOpenAI, FakeAnthropic],
) -> None:
    openai, anthropic = fakes
    openai.default = Fail(401, "Incorrect API key provided: {api_key}")
    anthropic.default = Fail(401, "invalid x-api-key {api_key}")
    async with start_router(tmp_path, members_config(openai, anthropic), monkeypatch) as (
        _,
        stub,
        _channel,
    ):
        task = (await stub.Submit(chat("fake-model", "hi"))).task
        final = await wait_terminal(stub, task.id)
        assert final.state == pb.TASK_STATE_FAILED
        assert final.error.code == "BACKEND_AUTH_FAILED"
        assert SECRET not in str(final)
        assert SECRET[:24] not in str(final)
