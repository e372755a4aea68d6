"""FakeAnthropic: a local server speaking Anthropic's Messages API wire format.

    async with FakeAnthropic(token_delay_s=0.0) as fake:
        client = AsyncAnthropic(base_url=fake.base_url, api_key="...")

Replies echo the last user message, one text_delta per word; usage counts words (input:
`system` plus every message; output: the reply's). `max_tokens` cuts the reply
(stop_reason "max_tokens"). Streams follow the API: message_start (input tokens, output 1),
content_block_start, a ping, one content_block_delta per token, content_block_stop,
message_delta (stop_reason, cumulative output tokens), message_stop.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .scripted import BreakStream, Fail, Hang, Reply, ScriptedServer, tokens

# The `error.type` Anthropic sends with each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _text(content: object) -> str:
    """A message's or system prompt's text: a string, or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


class FakeAnthropic(ScriptedServer):
    def __init__(self, *, token_delay_s: float = 0.0, record: bool = True) -> None:
        super().__init__(token_delay_s=token_delay_s, record=record)
        self._ids = 0

    @property
    def base_url(self) -> str:
        return self.origin

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self._messages)]

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, behaviour = await self.take(request)
        if isinstance(behaviour, Fail):
            return self._fail(request, behaviour)
        if isinstance(behaviour, Hang):
            return await self.hang()
        messages = body.get("messages", [])
        text = behaviour.text if isinstance(behaviour, Reply) else None
        if text is None:
            last = next((m for m in reversed(messages) if m["role"] == "user"), None)
            text = _text(last["content"]) if last else ""
        reply, stop_reason = tokens(text), "end_turn"
        if len(reply) > body["max_tokens"]:
            reply, stop_reason = reply[: body["max_tokens"]], "max_tokens"
        prompt = [_text(body.get("system", ""))] + [_text(m["content"]) for m in messages]
        input_tokens = sum(len(tokens(p)) for p in prompt)
        self._ids += 1
        message = {
            "id": f"msg_{self._ids:04d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        if body.get("stream"):
            return await self._stream(request, message, reply, stop_reason, behaviour)
        message["content"] = [{"type": "text", "text": "".join(reply)}]
        message["stop_reason"] = stop_reason
        message["usage"] = {"input_tokens": input_tokens, "output_tokens": len(reply)}
        return web.json_response(message)

    async def _stream(
        self,
        request: web.Request,
        message: dict[str, Any],
        reply: list[str],
        stop_reason: str,
        behaviour: Reply | BreakStream,
    ) -> web.StreamResponse:
        response = await self.start_stream(request)
        block = {"type": "text", "text": ""}
        events = [
            _event("message_start", {"type": "message_start", "message": message}),
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            ),
            _event("ping", {"type": "ping"}),
        ]
        delay = self.delay_of(behaviour)
        sent = reply[: behaviour.after_tokens] if isinstance(behaviour, BreakStream) else reply
        for token in sent:
            delta = {"type": "text_delta", "text": token}
            events.append(
                _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            )
            if not await self.send(response, b"".join(events), delay):
                return response
            events.clear()
        if isinstance(behaviour, BreakStream):
            error = {
                "type": "error",
                "error": {"type": behaviour.error_type, "message": behaviour.message},
            }
            event = _event("error", error)
            return await self.break_stream(request, response, behaviour, b"".join(events), event)
        final = {"stop_reason": stop_reason, "stop_sequence": None}
        events += [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event(
                "message_delta",
                {"type": "message_delta", "delta": final, "usage": {"output_tokens": len(reply)}},
            ),
            _event("message_stop", {"type": "message_stop"}),
        ]
        if await self.send(response, b"".join(events), 0.0):
            await response.write_eof()
        return response

    def _fail(self, request: web.Request, fail: Fail) -> web.Response:
        key = self.api_key_of(request)
        error = {
            "type": "error",
            "error": {
                "type": ERROR_TYPES.get(fail.status, "api_error"),
                "message": fail.message.replace("{api_key}", key),
            },
            "request_id": "req_fake",
        }
        return web.json_response(error, status=fail.status, headers=fail.headers)
