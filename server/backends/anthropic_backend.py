"""AnthropicBackend: a ring member that runs chat tasks on Anthropic's Messages API with
the official SDK, streaming.

Our chat messages map onto the Messages API this way: system messages become the
`system` parameter (joined by blank lines), user and assistant messages stay in order,
and a "tool" message is refused (Anthropic carries tool results inside user messages,
which a plain text message cannot express). The 2.x SDK dropped `temperature` and
`top_p` from its signature: current models refuse them, older ones honour them, so they
are sent as extra body fields only when a task sets them, and the API says which it is.

Anthropic's stop reasons are reported in OpenAI's words, so that a task's finish_reason
does not depend on which ring member ran it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import cast

import anthropic
import httpx2
from anthropic.types import MessageDeltaUsage, MessageParam, Usage

from server.clock import Clock
from server.model.task import CHAT, ChatInput, ChatOutput, Task
from server.observability.tracing import outgoing_headers

from .base import BackendError, BackendEvent, Completed, OutputChunk
from .providers import (
    PriceTable,
    ProviderMember,
    provider_message,
    timed_out,
    transport_error,
)

SUPPORTED_TASK_TYPES = frozenset({CHAT})
DEFAULT_BASE_URL = "https://api.anthropic.com"

FINISH_REASONS: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}

# An error event inside a stream arrives after "200 OK": its type says what went wrong,
# and this is the status that would have said the same.
STATUS_OF_ERROR_TYPE: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# Everything the SDK (and httpx2 under it, which the 2.x SDK lets through while a stream
# is read, and a malformed stream) can raise for a failed call.
_FAILURES = (anthropic.APIError, httpx2.HTTPError, json.JSONDecodeError)


class AnthropicBackend(ProviderMember):
    """One SDK client, and its connection pool, shared by every attempt on this member.

    `timeout_s` bounds each wait (connecting, the first byte, the gap between two chunks),
    not the whole reply: a long answer that keeps streaming is not cut; the task's own
    deadline bounds the whole.

    `default_max_tokens` is sent when a task sets no max_tokens: Anthropic requires one.
    """

    kind = "anthropic"
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
        default_max_tokens: int = 1024,
        clock: Clock | None = None,
    ) -> None:
        if default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
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
        # Anthropic requires max_tokens on every request; tasks may leave it unset.
        self._default_max_tokens = default_max_tokens
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=self.base_url,
            timeout=timeout_s,
            max_retries=0,
            http_client=anthropic.DefaultAioHttpClient(limits=self._connection_limits()),
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def execute(self, task: Task) -> AsyncIterator[BackendEvent]:
        spec = task.spec.input
        if (unsupported := self._unsupported(task)) is not None:
            raise unsupported
        if not isinstance(spec, ChatInput):
            raise BackendError("INVALID_INPUT", "chat needs chat input", retryable=False)
        failure: BackendError | None = None
        try:
            async for event in self._chat(spec):
                yield event
        except _FAILURES as exc:
            failure = self._translate(exc)
        # Raised outside the handler so that the SDK's exception is not chained to ours.
        if failure is not None:
            raise failure

    async def _chat(self, spec: ChatInput) -> AsyncIterator[BackendEvent]:
        system, messages = _split_system(spec)
        sampling = {
            name: value
            for name, value in (("temperature", spec.temperature), ("top_p", spec.top_p))
            if value is not None
        }
        stream = await self._client.messages.create(
            model=spec.model,
            messages=messages,
            max_tokens=spec.max_tokens or self._default_max_tokens,
            system=system or anthropic.omit,
            stop_sequences=list(spec.stop) if spec.stop else anthropic.omit,
            stream=True,
            extra_body=sampling or None,
            # The attempt's trace context. With a global tracer provider the SDK sends its
            # own span's instead, a child of the attempt's: the trace stays connected.
            extra_headers=outgoing_headers(),
        )
        text: list[str] = []
        stop_reason = ""
        answered_model = ""
        usage = _Tokens()
        # Leaving this block by any way (the consumer closed us, the task was cancelled)
        # closes the HTTP response, which tells the API to stop generating.
        async with stream:
            async for event in stream:
                if event.type == "content_block_delta":
                    if event.delta.type == "text_delta" and event.delta.text:
                        text.append(event.delta.text)
                        yield OutputChunk(event.delta.text)
                elif event.type == "content_block_start":
                    block = event.content_block
                    if block.type == "text" and block.text:
                        text.append(block.text)
                        yield OutputChunk(block.text)
                elif event.type == "message_start":
                    answered_model = event.message.model or ""
                    usage.update(event.message.usage)
                elif event.type == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    usage.update(event.usage)
        if not stop_reason:
            raise self._errors.incomplete()
        yield Completed(
            ChatOutput("".join(text), FINISH_REASONS.get(stop_reason, stop_reason)),
            self._prices.priced((spec.model, answered_model), usage.input, usage.output),
        )

    def _translate(self, exc: BaseException) -> BackendError:
        """The one place where the SDK's errors become ours (see providers.py for the table)."""
        errors = self._errors
        if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException) and timed_out(exc):
            return errors.timeout(self._timeout_s)
        if isinstance(exc, anthropic.APIStatusError):
            message = provider_message(exc.body, exc.message)
            if exc.status_code >= 400:
                return errors.status(exc.status_code, message, exc.response.headers)
            # An error event in a stream that had started well ("200 OK").
            status = STATUS_OF_ERROR_TYPE.get(str(exc.type), 500)
            what = f"{exc.type} in the stream"
            return errors.status(status, message, exc.response.headers, what=what)
        if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
            return errors.connection(self.base_url, transport_error(exc))
        if isinstance(exc, anthropic.APIResponseValidationError | json.JSONDecodeError):
            return errors.unavailable("the provider sent a malformed response")
        return errors.unavailable(type(exc).__name__)


class _Tokens:
    """Token counts of a stream. Anthropic's are cumulative: message_start carries the
    prompt's (and an output of 1), each message_delta the output so far and, from newer
    API versions, the prompt's again. Cache reads and writes are prompt tokens too, and
    are priced at the plain input rate: we send no cache_control, so they are rare."""

    def __init__(self) -> None:
        self.input = 0
        self.output = 0

    def update(self, usage: Usage | MessageDeltaUsage | None) -> None:
        if usage is None:  # absent from some compatible proxies' events
            return
        if usage.input_tokens is not None:
            self.input = (
                usage.input_tokens
                + (usage.cache_creation_input_tokens or 0)
                + (usage.cache_read_input_tokens or 0)
            )
        self.output = usage.output_tokens or self.output


def _split_system(spec: ChatInput) -> tuple[str, list[MessageParam]]:
    system = "\n\n".join(m.content for m in spec.messages if m.role == "system")
    messages: list[MessageParam] = []
    for i, message in enumerate(spec.messages):
        if message.role == "system":
            continue
        if message.role not in ("user", "assistant"):
            raise BackendError(
                "INVALID_REQUEST",
                f"messages[{i}]: Anthropic takes user, assistant and system messages, "
                f"not {message.role!r}",
                retryable=False,
            )
        messages.append(cast("MessageParam", {"role": message.role, "content": message.content}))
    return system, messages
