"""OpenAIBackend: a ring member that runs chat and embed tasks on an OpenAI-compatible API
(OpenAI itself, or vLLM, Ollama, llama.cpp... through `base_url`) with the official SDK.

Chat streams (`stream_options.include_usage` asks for the token counts in a last chunk), so
the task's output grows as the model writes and a cancelled task closes the HTTP stream.
The SDK does not retry: the router retries on another ring member, with its own backoff.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import httpx2
import openai
from openai.types.chat import ChatCompletionMessageParam

from server.clock import Clock
from server.model.task import (
    CHAT,
    EMBED,
    ChatInput,
    ChatOutput,
    EmbedInput,
    EmbedOutput,
    Task,
)
from server.observability.tracing import outgoing_headers

from .base import BackendError, BackendEvent, Completed, OutputChunk
from .providers import (
    PriceTable,
    ProviderMember,
    provider_message,
    timed_out,
    transport_error,
)

SUPPORTED_TASK_TYPES = frozenset({CHAT, EMBED})
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# OpenAI deprecated `max_tokens` for `max_completion_tokens` (its reasoning models refuse
# the old name), while many compatible servers only know the old one.
MaxTokensField = Literal["max_tokens", "max_completion_tokens"]


class _StreamError(Exception):
    """An error event (or a chunk that is not an object) inside a stream that had started
    well (HTTP 200); the provider's own message, as the SDK would have raised it."""


async def _chunks(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a chat completion's server-sent events, up to `data: [DONE]`.

    Only what OpenAI-compatible servers send: `data:` lines, one JSON object each (the SSE
    spec joins several `data:` lines of one event with newlines; JSON does not care), events
    ending at a blank line, comments (`:`) and other fields ignored."""
    data: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
            continue
        if line or not data:
            continue  # a comment, another field, or a blank line without data
        payload, data = "\n".join(data), []
        if payload.startswith("[DONE]"):
            # Read the body to its end, as the SDK's own stream does: a response closed
            # with bytes unread cannot go back to the connection pool, and every next
            # request paid for a new connection on the router's loop (~5% of it at 50/s).
            async for _ in lines:
                pass
            return
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise _StreamError(f"a chunk that is not an object: {payload[:80]!r}")
        if error := chunk.get("error"):
            message = error.get("message") if isinstance(error, dict) else None
            raise _StreamError(
                message if isinstance(message, str) and message else "an error occurred"
            )
        yield chunk


# Everything the SDK (and httpx2 under it, and a malformed stream) can raise for a failed
# call; our own bugs are not in the list and surface as INTERNAL.
_FAILURES = (openai.APIError, httpx2.HTTPError, json.JSONDecodeError, _StreamError)


class OpenAIBackend(ProviderMember):
    """One SDK client, and its connection pool, shared by every attempt on this member.

    `timeout_s` bounds each wait (connecting, the first byte, the gap between two chunks),
    not the whole reply: a long answer that keeps streaming is not cut; the task's own
    deadline bounds the whole.

    `max_tokens_field` names the field a task's max_tokens is sent as: "max_tokens" for
    most compatible servers, "max_completion_tokens" for OpenAI's reasoning models.
    """

    kind = "openai"
    supported = SUPPORTED_TASK_TYPES

    def __init__(
        self,
        name: str,
        *,
        base_url: str | None,
        api_key: str,
        max_concurrency: int,
        task_types: frozenset[str],
        timeout_s: float,
        prices: PriceTable,
        max_tokens_field: MaxTokensField = "max_tokens",
        clock: Clock | None = None,
    ) -> None:
        super().__init__(
            name,
            base_url=base_url or DEFAULT_BASE_URL,
            api_key=api_key,
            max_concurrency=max_concurrency,
            task_types=task_types,
            timeout_s=timeout_s,
            prices=prices,
            clock=clock,
        )
        self._max_tokens_field: MaxTokensField = max_tokens_field
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=self.base_url,
            timeout=timeout_s,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(limits=self._connection_limits()),
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def execute(self, task: Task) -> AsyncIterator[BackendEvent]:
        spec = task.spec.input
        if (unsupported := self._unsupported(task)) is not None:
            raise unsupported
        failure: BackendError | None = None
        try:
            if task.spec.type == CHAT and isinstance(spec, ChatInput):
                async for event in self._chat(spec):
                    yield event
            elif task.spec.type == EMBED and isinstance(spec, EmbedInput):
                yield await self._embed(spec)
            else:
                kind = task.spec.type
                raise BackendError("INVALID_INPUT", f"{kind} needs {kind} input", retryable=False)
        except _FAILURES as exc:
            failure = self._translate(exc)
        # Raised outside the handler so that the SDK's exception is not chained to ours.
        if failure is not None:
            raise failure

    async def _chat(self, spec: ChatInput) -> AsyncIterator[BackendEvent]:
        messages = [
            cast("ChatCompletionMessageParam", {"role": m.role, "content": m.content})
            for m in spec.messages
        ]
        max_tokens = openai.omit if spec.max_tokens is None else spec.max_tokens
        # The raw response rather than the SDK's parsed stream: building a pydantic model
        # per chunk cost 1.5 ms of the router's event loop per 16-token reply, 60% of the
        # SDK's share (bench/routing.py). The SDK still builds, sends and checks the request
        # (a non-2xx status raises its APIStatusError before any chunk).
        response = self._client.chat.completions.with_streaming_response.create(
            model=spec.model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            temperature=openai.omit if spec.temperature is None else spec.temperature,
            top_p=openai.omit if spec.top_p is None else spec.top_p,
            stop=list(spec.stop) if spec.stop else openai.omit,
            max_tokens=max_tokens if self._max_tokens_field == "max_tokens" else openai.omit,
            max_completion_tokens=(
                max_tokens if self._max_tokens_field == "max_completion_tokens" else openai.omit
            ),
            # The attempt's trace context: a traced provider (or proxy) joins the task's trace.
            extra_headers=outgoing_headers(),
        )
        text: list[str] = []
        finish_reason = ""
        answered_model = ""
        usage: dict[str, Any] | None = None
        # Leaving this block by any way (the consumer closed us, the task was cancelled)
        # closes the HTTP response, which tells the server to stop generating.
        async with response as raw:
            async for chunk in _chunks(raw.iter_lines()):
                answered_model = chunk.get("model") or answered_model
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", ())[:1]:  # we never ask for n > 1
                    delta = choice.get("delta") or {}
                    content = delta.get("content") or delta.get("refusal")
                    if content:
                        text.append(content)
                        yield OutputChunk(content)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
        if not finish_reason:
            raise self._errors.incomplete()
        yield Completed(
            ChatOutput("".join(text), finish_reason),
            None
            if usage is None  # a server that ignores include_usage: unknown, not free
            else self._prices.priced(
                (spec.model, answered_model),
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
            ),
        )

    async def _embed(self, spec: EmbedInput) -> Completed:
        try:
            response = await self._client.embeddings.create(
                model=spec.model, input=list(spec.texts), extra_headers=outgoing_headers()
            )
        except ValueError as exc:  # the SDK's decoding of an empty or garbled answer
            if isinstance(exc, json.JSONDecodeError):
                raise
            raise self._errors.unavailable(
                f"the provider sent unusable embeddings: {exc}"
            ) from None
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(spec.texts):
            raise self._errors.unavailable(
                f"sent {len(data)} embeddings for {len(spec.texts)} texts"
            )
        vectors = tuple(tuple(item.embedding) for item in data)
        # Some compatible servers leave usage out, although the schema requires it.
        usage = getattr(response, "usage", None)
        tokens = usage.prompt_tokens if usage is not None else 0
        return Completed(
            EmbedOutput(vectors), self._prices.priced((spec.model, response.model), tokens, 0)
        )

    def _translate(self, exc: BaseException) -> BackendError:
        """The one place where the SDK's errors become ours (see providers.py for the table)."""
        errors = self._errors
        if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException) and timed_out(exc):
            return errors.timeout(self._timeout_s)
        if isinstance(exc, openai.APIStatusError):
            message = provider_message(exc.body, exc.message)
            return errors.status(exc.status_code, message, exc.response.headers)
        if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
            return errors.connection(self.base_url, transport_error(exc))
        if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError):
            return errors.unavailable("the provider sent a malformed response")
        if isinstance(exc, _StreamError):
            return errors.unavailable(f"error in the stream: {exc}")
        return errors.unavailable(type(exc).__name__)
