"""FakeOpenAI: a local server speaking OpenAI's chat completions and embeddings wire format.

    async with FakeOpenAI(token_delay_s=0.0) as fake:
        client = AsyncOpenAI(base_url=fake.base_url, api_key="...")

Replies echo the last user message, one chunk per word; usage counts words (prompt: every
message's words; completion: the reply's). `max_tokens` / `max_completion_tokens` cut the
reply (finish_reason "length"). Streams follow the API: a first chunk with the role, one
chunk per token, a chunk with finish_reason, the usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .scripted import (
    BreakStream,
    Fail,
    Hang,
    Reply,
    ScriptedServer,
    embedding,
    encode_floats,
    tokens,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_denied",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


@dataclass(frozen=True, slots=True)
class _Answer:
    head: dict[str, Any]  # id, object, created, model
    reply: list[str]
    finish_reason: str
    usage: dict[str, int] | None  # None unless stream_options.include_usage


class FakeOpenAI(ScriptedServer):
    def __init__(
        self, *, token_delay_s: float = 0.0, embed_dim: int = 8, record: bool = True
    ) -> None:
        super().__init__(token_delay_s=token_delay_s, record=record)
        self.embed_dim = embed_dim
        self._ids = 0

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/embeddings", self._embeddings),
        ]

    def embedding(self, text: str) -> list[float]:
        """The vector this fake returns for `text`."""
        return embedding(text, self.embed_dim)

    # -- handlers ------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, behaviour = await self.take(request)
        if isinstance(behaviour, Fail):
            return self._fail(request, behaviour)
        if isinstance(behaviour, Hang):
            return await self.hang()
        messages = body.get("messages", [])
        text = behaviour.text if isinstance(behaviour, Reply) else None
        if text is None:
            text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        reply, finish = tokens(text), "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is not None and len(reply) > limit:
            reply, finish = reply[:limit], "length"
        prompt = sum(len(tokens(m["content"])) for m in messages)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(reply),
            "total_tokens": prompt + len(reply),
        }
        self._ids += 1
        head = {
            "id": f"chatcmpl-{self._ids}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            head["object"] = "chat.completion.chunk"
            answer = _Answer(head, reply, finish, usage if include_usage else None)
            return await self._stream(request, answer, behaviour)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(reply)},
            "logprobs": None,
            "finish_reason": finish,
        }
        return web.json_response({**head, "choices": [choice], "usage": usage})

    async def _stream(
        self, request: web.Request, answer: _Answer, behaviour: Reply | BreakStream
    ) -> web.StreamResponse:
        # Each chunk is the same head with another choice: serialise the head once.
        head = json.dumps(answer.head)[:-1]
        tail = ', "usage": null}' if answer.usage is not None else "}"

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return f'data: {head}, "choices": [{json.dumps(choice)}]{tail}\n\n'.encode()

        delay = self.delay_of(behaviour)
        sent = (
            answer.reply[: behaviour.after_tokens]
            if isinstance(behaviour, BreakStream)
            else answer.reply
        )
        response = await self.start_stream(request)
        events = [chunk({"role": "assistant", "content": ""})]
        for token in sent:
            events.append(chunk({"content": token}))
            if not await self.send(response, b"".join(events), delay):
                return response
            events.clear()
        if isinstance(behaviour, BreakStream):
            error = {"error": {"message": behaviour.message, "type": behaviour.error_type}}
            event = f"data: {json.dumps(error)}\n\n".encode()
            return await self.break_stream(request, response, behaviour, b"".join(events), event)
        events.append(chunk({}, answer.finish_reason))
        if answer.usage is not None:
            usage = json.dumps(answer.usage)
            events.append(f'data: {head}, "choices": [], "usage": {usage}}}\n\n'.encode())
        events.append(b"data: [DONE]\n\n")
        if await self.send(response, b"".join(events), 0.0):
            await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, behaviour = await self.take(request)
        if isinstance(behaviour, Fail):
            return self._fail(request, behaviour)
        if isinstance(behaviour, Hang):
            return await self.hang()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        as_base64 = body.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        for i, text in enumerate(texts):
            vector = self.embedding(text)
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": encode_floats(vector) if as_base64 else vector,
                }
            )
        used = sum(len(tokens(t)) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": used, "total_tokens": used},
            }
        )

    def _fail(self, request: web.Request, fail: Fail) -> web.Response:
        key = self.api_key_of(request)
        error = {
            "message": fail.message.replace("{api_key}", key),
            "type": _ERROR_TYPES.get(fail.status, "server_error"),
            "param": None,
            "code": None,
        }
        return web.json_response({"error": error}, status=fail.status, headers=fail.headers)
