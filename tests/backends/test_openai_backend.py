"""OpenAIBackend through the real openai SDK against a local server speaking OpenAI's wire
format (tests/fakes): streaming, usage and cost, parameters, and every failure class."""

from __future__ import annotations

import asyncio
import email.utils
import time
import traceback
from collections.abc import AsyncIterator

import pytest

from server.backends.base import BackendError, BackendEvent, Completed, OutputChunk
from server.backends.openai_backend import OpenAIBackend
from server.backends.providers import PriceTable
from server.clock import ManualClock
from server.config_file import ModelPrice
from server.model.task import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    EmbedInput,
    EmbedOutput,
    Task,
    TaskInput,
    TaskSpec,
    TaskState,
    Usage,
)
from tests.conftest import unused_port
from tests.fakes import BreakStream, Fail, FakeOpenAI, Hang, Reply

KEY = "sk-test-4f9a2c7e1b8d3a6f0e5c9b2d7a4f1e8c"
PRICES = PriceTable({"gpt-test": ModelPrice(input_usd_per_mtok=2.0, output_usd_per_mtok=8.0)})
TIMEOUT_S = 0.3
CLOCK = ManualClock()


def task(kind: str, spec: TaskInput) -> Task:
    return Task("t-1", "c-1", TaskSpec(kind, spec), TaskState.RUNNING, 0.0, 1e12)


def chat(text: str = "hello brave new world", model: str = "gpt-test", **params: object) -> Task:
    messages = (ChatMessage("system", "be brief"), ChatMessage("user", text))
    return task("chat", ChatInput(model, messages, **params))  # type: ignore[arg-type]


def make_backend(base_url: str, **overrides: object) -> OpenAIBackend:
    settings: dict[str, object] = {
        "base_url": base_url,
        "api_key": KEY,
        "max_concurrency": 4,
        "task_types": frozenset({"chat", "embed"}),
        "timeout_s": TIMEOUT_S,
        "prices": PRICES,
        "clock": CLOCK,
    }
    return OpenAIBackend("openai-1", **{**settings, **overrides})  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def backend(fake: FakeOpenAI) -> AsyncIterator[OpenAIBackend]:
    backend = make_backend(fake.base_url)
    yield backend
    await backend.aclose()


async def run(backend: OpenAIBackend, t: Task) -> list[BackendEvent]:
    return [event async for event in backend.execute(t)]


async def failure(backend: OpenAIBackend, t: Task) -> BackendError:
    with pytest.raises(BackendError) as caught:
        await run(backend, t)
    return caught.value


# -- success ---------------------------------------------------------------------------


async def test_chat_streams_chunks_then_completed(backend: OpenAIBackend) -> None:
    """The reply arrives word by word, and the chunks join to the final text."""
    events = await run(backend, chat("hello brave new world"))
    *chunks, last = events
    assert [c.text for c in chunks if isinstance(c, OutputChunk)] == [
        "hello ",
        "brave ",
        "new ",
        "world",
    ]
    assert isinstance(last, Completed)
    assert last.output == ChatOutput("hello brave new world", "stop")


async def test_chat_replies_reuse_one_connection(fake: FakeOpenAI, backend: OpenAIBackend) -> None:
    """A finished stream hands its connection back to the pool: the next request does not
    open a new one (a stream closed before its last bytes were read cannot be reused)."""
    for _ in range(3):
        await run(backend, chat())
    peers = {request.peer for request in fake.requests}
    assert len(fake.requests) == 3
    assert len(peers) == 1, f"each request came on a new connection: {peers}"


async def test_usage_and_cost_come_from_the_price_table(backend: OpenAIBackend) -> None:
    """Usage is the server's count; the cost is tokens x the model's price per million."""
    *_, last = await run(backend, chat("hello brave new world"))
    assert isinstance(last, Completed)
    # prompt: "be brief" (2) + "hello brave new world" (4); completion: 4 words.
    assert last.usage == Usage(6, 4, (6 * 2.0 + 4 * 8.0) / 1e6)


async def test_unknown_model_costs_nothing(backend: OpenAIBackend) -> None:
    """A model missing from the price list is counted, at 0.0 USD, not refused."""
    *_, last = await run(backend, chat(model="unpriced"))
    assert isinstance(last, Completed)
    assert last.usage == Usage(6, 4, 0.0)


async def test_key_and_parameters_are_sent(backend: OpenAIBackend, fake: FakeOpenAI) -> None:
    """The key goes as a bearer token; set parameters go in the body, as the API names them."""
    await run(backend, chat(temperature=0.2, max_tokens=3, top_p=0.9, stop=("END",)))
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "gpt-test"
    assert request.body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello brave new world"},
    ]
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert (request.body["temperature"], request.body["top_p"]) == (0.2, 0.9)
    assert (request.body["max_tokens"], request.body["stop"]) == (3, ["END"])


async def test_unset_parameters_are_left_to_the_server(
    backend: OpenAIBackend, fake: FakeOpenAI
) -> None:
    """Parameters a task leaves unset are not sent, so the server's defaults apply."""
    await run(backend, chat())
    sent = set(fake.requests[0].body)
    assert not sent & {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop"}


async def test_max_tokens_can_use_the_newer_field(fake: FakeOpenAI) -> None:
    """For OpenAI's reasoning models, max_tokens is sent as max_completion_tokens."""
    backend = make_backend(fake.base_url, max_tokens_field="max_completion_tokens")
    try:
        *_, last = await run(backend, chat("one two three four", max_tokens=2))
    finally:
        await backend.aclose()
    assert fake.requests[0].body["max_completion_tokens"] == 2
    assert "max_tokens" not in fake.requests[0].body
    assert isinstance(last, Completed)
    assert last.output == ChatOutput("one two ", "length")


async def test_embeddings(backend: OpenAIBackend, fake: FakeOpenAI) -> None:
    """Embed returns one vector per text, in order, with the server's token count."""
    [event] = await run(backend, task("embed", EmbedInput("gpt-test", ("a b", "c"))))
    assert isinstance(event, Completed)
    assert event.output == EmbedOutput((tuple(fake.embedding("a b")), tuple(fake.embedding("c"))))
    assert event.usage == Usage(3, 0, 3 * 2.0 / 1e6)
    assert fake.requests[0].body["input"] == ["a b", "c"]


# -- failures --------------------------------------------------------------------------

HTTP_DATE = email.utils.formatdate(CLOCK.now() + 30, usegmt=True)


@pytest.mark.parametrize(
    ("answer", "code", "retryable", "backend_fault", "retry_after_s"),
    [
        (Fail(429, headers={"retry-after": "7"}), "RATE_LIMITED", True, False, 7.0),
        (Fail(429, headers={"retry-after-ms": "1500"}), "RATE_LIMITED", True, False, 1.5),
        (Fail(429, headers={"retry-after": HTTP_DATE}), "RATE_LIMITED", True, False, 30.0),
        (Fail(429), "RATE_LIMITED", True, False, None),
        (Fail(500), "BACKEND_UNAVAILABLE", True, True, None),
        (Fail(503), "BACKEND_UNAVAILABLE", True, True, None),
        (Fail(401), "BACKEND_AUTH_FAILED", False, True, None),
        (Fail(403), "BACKEND_AUTH_FAILED", False, True, None),
        (Fail(400), "INVALID_REQUEST", False, False, None),
        (Fail(404), "INVALID_REQUEST", False, False, None),
        (Fail(422), "INVALID_REQUEST", False, False, None),
        (BreakStream(how="abort"), "BACKEND_UNAVAILABLE", True, True, None),
        (BreakStream(how="end"), "BACKEND_UNAVAILABLE", True, True, None),
        (BreakStream(how="error"), "BACKEND_UNAVAILABLE", True, True, None),
    ],
    ids=lambda v: repr(v) if isinstance(v, Fail | BreakStream) else None,
)
async def test_failures_map_to_backend_errors(
    backend: OpenAIBackend,
    fake: FakeOpenAI,
    answer: Fail | BreakStream,
    code: str,
    retryable: bool,
    backend_fault: bool,
    retry_after_s: float | None,
) -> None:
    """Each provider failure becomes the code, retryability and fault the router acts on."""
    fake.script(answer)
    error = await failure(backend, chat())
    assert (error.error.code, error.error.retryable) == (code, retryable)
    assert error.backend_fault is backend_fault
    assert error.retry_after_s == retry_after_s


async def test_invalid_request_says_what_the_provider_said(
    backend: OpenAIBackend, fake: FakeOpenAI
) -> None:
    """The user sees the provider's reason, e.g. an unknown model, to fix the request."""
    fake.script(Fail(404, "The model `gpt-nope` does not exist"))
    error = await failure(backend, chat(model="gpt-nope"))
    assert "The model `gpt-nope` does not exist" in error.error.message


async def test_error_event_in_the_stream_says_what_the_provider_said(
    backend: OpenAIBackend, fake: FakeOpenAI
) -> None:
    """An error sent inside a stream that began well fails the attempt with its words."""
    fake.script(BreakStream(after_tokens=1, how="error", message="the GPU fell over"))
    error = await failure(backend, chat())
    assert error.error.code == "BACKEND_UNAVAILABLE"
    assert "error in the stream: the GPU fell over" in error.error.message


async def test_sdk_does_not_retry(backend: OpenAIBackend, fake: FakeOpenAI) -> None:
    """One attempt is one request: retrying is the router's job, on another member."""
    fake.script(Fail(500), Fail(429))
    await failure(backend, chat())
    assert len(fake.requests) == 1


async def test_hanging_server_times_out(backend: OpenAIBackend, fake: FakeOpenAI) -> None:
    """A server that never answers fails the attempt after timeout_s, as a timeout."""
    fake.script(Hang())
    started = time.monotonic()
    error = await failure(backend, chat())
    assert error.error.code == "BACKEND_TIMEOUT"
    assert (error.error.retryable, error.backend_fault) == (True, True)
    assert TIMEOUT_S * 0.9 <= time.monotonic() - started < TIMEOUT_S + 0.5


async def test_stream_that_stalls_times_out(backend: OpenAIBackend, fake: FakeOpenAI) -> None:
    """A stream that stops sending midway fails after timeout_s of silence."""
    fake.script(BreakStream(after_tokens=2, how="stall"))
    error = await failure(backend, chat())
    assert error.error.code == "BACKEND_TIMEOUT"


async def test_refused_connection_is_unavailable() -> None:
    """Nothing listening on the port: a retryable fault of the backend, not a timeout (the
    SDK's aiohttp transport calls every connection error a ConnectTimeout)."""
    backend = make_backend(f"http://127.0.0.1:{unused_port()}/v1")
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


# -- keys stay secret --------------------------------------------------------------------


@pytest.mark.parametrize(
    "echo",
    [
        "Incorrect API key provided: {api_key}.",
        "Incorrect API key provided: " + KEY[:14] + "*" * 10 + KEY[-4:] + ".",
    ],
    ids=["whole", "truncated"],
)
async def test_key_never_appears_in_errors(
    backend: OpenAIBackend, fake: FakeOpenAI, echo: str
) -> None:
    """A provider that echoes the key in its error body does not leak it through us."""
    fake.script(Fail(401, echo))
    error = await failure(backend, chat())
    shown = [
        str(error),
        repr(error),
        error.error.message,
        repr(error.error),
        "".join(traceback.format_exception(error)),
    ]
    assert all(KEY not in text and KEY[:14] not in text for text in shown)
    assert "credentials were rejected" in error.error.message
    assert error.__cause__ is None
    assert error.__context__ is None


async def test_repr_does_not_show_the_key() -> None:
    """The backend's repr names it and its server, never its key."""
    backend = make_backend("http://127.0.0.1:1/v1")
    try:
        assert repr(backend) == "OpenAIBackend('openai-1', base_url='http://127.0.0.1:1/v1')"
        assert KEY not in repr(backend.__dict__)
    finally:
        await backend.aclose()


async def test_aclose_is_safe_twice() -> None:
    """Shutdown may close a backend more than once."""
    backend = make_backend("http://127.0.0.1:1/v1")
    await backend.aclose()
    await backend.aclose()


# -- cancellation ------------------------------------------------------------------------


async def test_closing_the_iterator_closes_the_http_stream(fake: FakeOpenAI) -> None:
    """Closing the events midway (the task was cancelled) hangs up on the server."""
    backend = make_backend(fake.base_url)
    fake.script(Reply(" ".join(["word"] * 50), token_delay_s=0.01))
    events = backend.execute(chat())
    try:
        first = await anext(events)
        assert isinstance(first, OutputChunk)
        await events.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(fake.disconnected.wait(), timeout=1.0)
    finally:
        await backend.aclose()
    assert fake.disconnects == 1


async def test_cancelling_the_consumer_closes_the_http_stream(fake: FakeOpenAI) -> None:
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


def test_task_types_are_checked_against_the_provider() -> None:
    """A configuration that gives OpenAI a type it cannot run fails at start-up."""
    with pytest.raises(ValueError, match="not \\['summarize'\\]"):
        make_backend("http://127.0.0.1:1/v1", task_types=frozenset({"chat", "summarize"}))


async def test_task_of_a_type_not_served_is_refused(fake: FakeOpenAI) -> None:
    """A chat-only member asked to embed refuses without calling the provider."""
    backend = make_backend(fake.base_url, task_types=frozenset({"chat"}))
    try:
        error = await failure(backend, task("embed", EmbedInput("gpt-test", ("a",))))
    finally:
        await backend.aclose()
    assert error.error.code == "UNSUPPORTED"
    assert fake.requests == []
