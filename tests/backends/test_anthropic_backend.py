"""AnthropicBackend through the real anthropic SDK against a local server speaking the
Messages API wire format (tests/fakes): streaming, usage and cost, the system prompt,
parameters, and every failure class."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import AsyncIterator

import pytest

from server.backends.anthropic_backend import AnthropicBackend
from server.backends.base import BackendError, BackendEvent, Completed, OutputChunk
from server.backends.providers import PriceTable
from server.config_file import ModelPrice
from server.model.task import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    EmbedInput,
    Task,
    TaskInput,
    TaskSpec,
    TaskState,
    Usage,
)
from tests.conftest import unused_port
from tests.fakes import BreakStream, Fail, FakeAnthropic, Hang, Reply

KEY = "sk-ant-api03-Zq7Xw2Lm9Pv4Rt6Yu1Io3Kj5Hg8Fd0Sa2Qw4Er6Ty8Ui"
MODEL = "claude-test"
PRICES = PriceTable({MODEL: ModelPrice(input_usd_per_mtok=3.0, output_usd_per_mtok=15.0)})
TIMEOUT_S = 0.3


def task(kind: str, spec: TaskInput) -> Task:
    return Task("t-1", "c-1", TaskSpec(kind, spec), TaskState.RUNNING, 0.0, 1e12)


def chat(*messages: ChatMessage, **params: object) -> Task:
    messages = messages or (
        ChatMessage("system", "be brief"),
        ChatMessage("user", "hello brave new world"),
    )
    return task("chat", ChatInput(MODEL, messages, **params))  # type: ignore[arg-type]


def make_backend(base_url: str, **overrides: object) -> AnthropicBackend:
    settings: dict[str, object] = {
        "base_url": base_url,
        "api_key": KEY,
        "max_concurrency": 4,
        "task_types": frozenset({"chat"}),
        "timeout_s": TIMEOUT_S,
        "prices": PRICES,
        "default_max_tokens": 1024,
    }
    return AnthropicBackend("claude-1", **{**settings, **overrides})  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        yield server


@pytest.fixture
async def backend(fake: FakeAnthropic) -> AsyncIterator[AnthropicBackend]:
    backend = make_backend(fake.base_url)
    yield backend
    await backend.aclose()


async def run(backend: AnthropicBackend, t: Task) -> list[BackendEvent]:
    return [event async for event in backend.execute(t)]


async def failure(backend: AnthropicBackend, t: Task) -> BackendError:
    with pytest.raises(BackendError) as caught:
        await run(backend, t)
    return caught.value


# -- success ---------------------------------------------------------------------------


async def test_chat_streams_chunks_then_completed(backend: AnthropicBackend) -> None:
    """Text deltas arrive as chunks that join to the final text; end_turn reads "stop"."""
    *chunks, last = await run(backend, chat())
    assert [c.text for c in chunks if isinstance(c, OutputChunk)] == [
        "hello ",
        "brave ",
        "new ",
        "world",
    ]
    assert isinstance(last, Completed)
    assert last.output == ChatOutput("hello brave new world", "stop")


async def test_usage_comes_from_message_start_and_message_delta(
    backend: AnthropicBackend,
) -> None:
    """Input tokens from message_start, output tokens from the last message_delta, priced."""
    *_, last = await run(backend, chat())
    assert isinstance(last, Completed)
    # input: system "be brief" (2) + "hello brave new world" (4); output: 4 words.
    assert last.usage == Usage(6, 4, (6 * 3.0 + 4 * 15.0) / 1e6)


async def test_system_messages_go_to_the_system_parameter(
    backend: AnthropicBackend, fake: FakeAnthropic
) -> None:
    """System messages leave the message list for `system`; the key goes as a header."""
    await run(
        backend,
        chat(
            ChatMessage("system", "be brief"),
            ChatMessage("user", "hi"),
            ChatMessage("assistant", "hello"),
            ChatMessage("system", "and kind"),
            ChatMessage("user", "how are you"),
        ),
    )
    [request] = fake.requests
    assert request.path == "/v1/messages"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert "anthropic-version" in request.headers
    assert request.body["system"] == "be brief\n\nand kind"
    assert request.body["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]
    assert request.body["stream"] is True


async def test_parameters_are_sent(backend: AnthropicBackend, fake: FakeAnthropic) -> None:
    """max_tokens, stop sequences and (as extra fields) temperature and top_p are sent."""
    *_, last = await run(backend, chat(temperature=0.2, top_p=0.9, max_tokens=2, stop=("END",)))
    body = fake.requests[0].body
    assert (body["max_tokens"], body["stop_sequences"]) == (2, ["END"])
    assert (body["temperature"], body["top_p"]) == (0.2, 0.9)
    assert isinstance(last, Completed)
    assert last.output == ChatOutput("hello brave ", "length")


async def test_unset_parameters_use_the_defaults(
    backend: AnthropicBackend, fake: FakeAnthropic
) -> None:
    """Without max_tokens the configured default is sent (Anthropic requires one); unset
    sampling parameters are not sent at all."""
    await run(backend, chat())
    body = fake.requests[0].body
    assert body["max_tokens"] == 1024
    assert not set(body) & {"temperature", "top_p", "stop_sequences"}


async def test_tool_messages_are_refused(backend: AnthropicBackend, fake: FakeAnthropic) -> None:
    """A "tool" message has no plain-text form in the Messages API: refused up front."""
    error = await failure(backend, chat(ChatMessage("user", "hi"), ChatMessage("tool", "42")))
    assert (error.error.code, error.error.retryable) == ("INVALID_REQUEST", False)
    assert "'tool'" in error.error.message
    assert fake.requests == []


# -- failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "code", "retryable", "backend_fault", "retry_after_s"),
    [
        (Fail(429, headers={"retry-after": "12"}), "RATE_LIMITED", True, False, 12.0),
        (Fail(529), "BACKEND_UNAVAILABLE", True, True, None),
        (Fail(500), "BACKEND_UNAVAILABLE", True, True, None),
        (Fail(401), "BACKEND_AUTH_FAILED", False, True, None),
        (Fail(403), "BACKEND_AUTH_FAILED", False, True, None),
        (Fail(400), "INVALID_REQUEST", False, False, None),
        (Fail(404), "INVALID_REQUEST", False, False, None),
        (BreakStream(how="abort"), "BACKEND_UNAVAILABLE", True, True, None),
        (BreakStream(how="end"), "BACKEND_UNAVAILABLE", True, True, None),
        (
            BreakStream(how="error", error_type="overloaded_error"),
            "BACKEND_UNAVAILABLE",
            True,
            True,
            None,
        ),
        (
            BreakStream(how="error", error_type="rate_limit_error"),
            "RATE_LIMITED",
            True,
            False,
            None,
        ),
    ],
    ids=lambda v: repr(v) if isinstance(v, Fail | BreakStream) else None,
)
async def test_failures_map_to_backend_errors(
    backend: AnthropicBackend,
    fake: FakeAnthropic,
    answer: Fail | BreakStream,
    code: str,
    retryable: bool,
    backend_fault: bool,
    retry_after_s: float | None,
) -> None:
    """Each provider failure, before or inside the stream, becomes the code, retryability
    and fault the router acts on."""
    fake.script(answer)
    error = await failure(backend, chat())
    assert (error.error.code, error.error.retryable) == (code, retryable)
    assert error.backend_fault is backend_fault
    assert error.retry_after_s == retry_after_s
    assert len(fake.requests) == 1, "the SDK must not retry"


async def test_invalid_request_says_what_the_provider_said(
    backend: AnthropicBackend, fake: FakeAnthropic
) -> None:
    """The user sees the provider's reason, to fix the request."""
    fake.script(Fail(400, "temperature: range: 0..1"))
    error = await failure(backend, chat(temperature=1.5))
    assert "temperature: range: 0..1" in error.error.message


async def test_hanging_server_times_out(backend: AnthropicBackend, fake: FakeAnthropic) -> None:
    """A server that never answers fails the attempt after timeout_s, as a timeout."""
    fake.script(Hang())
    started = time.monotonic()
    error = await failure(backend, chat())
    assert (error.error.code, error.error.retryable, error.backend_fault) == (
        "BACKEND_TIMEOUT",
        True,
        True,
    )
    assert TIMEOUT_S * 0.9 <= time.monotonic() - started < TIMEOUT_S + 0.5


async def test_stream_that_stalls_times_out(backend: AnthropicBackend, fake: FakeAnthropic) -> None:
    """Silence midway through a stream is a timeout too (the 2.x SDK lets httpx2's
    ReadTimeout through while a stream is read)."""
    fake.script(BreakStream(after_tokens=2, how="stall"))
    error = await failure(backend, chat())
    assert error.error.code == "BACKEND_TIMEOUT"


async def test_refused_connection_is_unavailable() -> None:
    """Nothing listening on the port: a retryable fault of the backend, not a timeout (the
    SDK's aiohttp transport calls every connection error a ConnectTimeout)."""
    backend = make_backend(f"http://127.0.0.1:{unused_port()}")
    try:
        error = await failure(backend, chat())
    finally:
        await backend.aclose()
    assert (error.error.code, error.error.retryable, error.backend_fault) == (
        "BACKEND_UNAVAILABLE",
        True,
        True,
    )
    assert "ConnectionRefusedError" in error.error.message


async def test_chat_replies_reuse_one_connection(
    fake: FakeAnthropic, backend: AnthropicBackend
) -> None:
    """A finished stream hands its connection back to the pool for the next request."""
    for _ in range(3):
        await run(backend, chat())
    peers = {request.peer for request in fake.requests}
    assert len(fake.requests) == 3
    assert len(peers) == 1, f"each request came on a new connection: {peers}"


# -- keys stay secret --------------------------------------------------------------------


async def test_key_never_appears_in_errors(backend: AnthropicBackend, fake: FakeAnthropic) -> None:
    """A provider that echoes the key in its error body does not leak it through us."""
    fake.script(Fail(401, "invalid x-api-key: {api_key}"))
    error = await failure(backend, chat())
    shown = [
        str(error),
        repr(error),
        error.error.message,
        "".join(traceback.format_exception(error)),
    ]
    assert all(KEY not in text for text in shown)
    assert "credentials were rejected" in error.error.message
    assert error.__context__ is None


async def test_repr_does_not_show_the_key() -> None:
    """The backend's repr names it and its server, never its key."""
    backend = make_backend("http://127.0.0.1:1")
    try:
        assert repr(backend) == "AnthropicBackend('claude-1', base_url='http://127.0.0.1:1')"
        assert KEY not in repr(backend.__dict__)
    finally:
        await backend.aclose()


# -- cancellation ------------------------------------------------------------------------


async def test_closing_the_iterator_closes_the_http_stream(fake: FakeAnthropic) -> None:
    """Closing the events midway (the task was cancelled) hangs up on the server."""
    backend = make_backend(fake.base_url)
    fake.script(Reply(" ".join(["word"] * 50), token_delay_s=0.01))
    events = backend.execute(chat())
    try:
        assert isinstance(await anext(events), OutputChunk)
        await events.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(fake.disconnected.wait(), timeout=1.0)
    finally:
        await backend.aclose()
    assert fake.disconnects == 1


async def test_cancelling_the_consumer_closes_the_http_stream(fake: FakeAnthropic) -> None:
    """Cancelling the task that reads the events (a deadline, a Cancel) hangs up too."""
    backend = make_backend(fake.base_url)
    fake.script(Reply(" ".join(["word"] * 50), token_delay_s=0.01))
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.execute(chat()):
            started.set()

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(started.wait(), timeout=1.0)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await asyncio.wait_for(fake.disconnected.wait(), timeout=1.0)
    finally:
        await backend.aclose()


# -- configuration -----------------------------------------------------------------------


def test_anthropic_runs_chat_only() -> None:
    """Embeddings are not an Anthropic API: configuring them fails at start-up."""
    with pytest.raises(ValueError, match="not \\['embed'\\]"):
        make_backend("http://127.0.0.1:1", task_types=frozenset({"chat", "embed"}))


async def test_embed_task_is_refused(backend: AnthropicBackend, fake: FakeAnthropic) -> None:
    """An embed task that reaches this member is refused without a request."""
    error = await failure(backend, task("embed", EmbedInput(MODEL, ("a",))))
    assert error.error.code == "UNSUPPORTED"
    assert fake.requests == []
