"""The part both provider fakes share: an aiohttp server on 127.0.0.1:0 that records each
request and answers it as the test scripted, or with a deterministic echo by default.

A test scripts answers in one of two ways:
    fake.script(Fail(429, headers={"retry-after": "7"}), Reply())   the next requests, in order
    fake.for_model("bad-model", Fail(404))                          every request for a model
Requests nobody scripted get `fake.default` (a `Reply()` unless changed).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import web
from multidict import CIMultiDictProxy

_TOKEN = re.compile(r"\S+\s*|\s+")


def tokens(text: str) -> list[str]:
    """Words with their trailing whitespace: the fakes' tokenizer (joining gives the text)."""
    return _TOKEN.findall(text)


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text`; float32 values, so base64 round-trips exactly."""
    digest = hashlib.sha256(text.encode()).digest() * (dim // 32 + 1)
    raw = [b / 255 - 0.5 for b in digest[:dim]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in raw]


def encode_floats(vector: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer normally: `text`, or else an echo of the last user message, token by token."""

    text: str | None = None
    # Pause before each streamed token; None takes the fake's own.
    token_delay_s: float | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer with an HTTP error in the provider's error format. "{api_key}" in `message`
    becomes the key the request carried (providers do echo rejected keys)."""

    status: int
    message: str = "scripted failure"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hang:
    """Accept the request and never answer (until the fake stops)."""


@dataclass(frozen=True, slots=True)
class BreakStream:
    """Stream `after_tokens` tokens, then: "abort" the connection mid-body, "end" the body
    cleanly without the finish, "stall" (send nothing more), or send an "error" event of
    the provider's kind `error_type` (e.g. "overloaded_error", "server_error")."""

    after_tokens: int = 2
    how: Literal["abort", "end", "stall", "error"] = "abort"
    error_type: str = "server_error"
    message: str = "scripted stream failure"


Behaviour = Reply | Fail | Hang | BreakStream


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDictProxy[str]  # case-insensitive: headers["authorization"]
    body: Any
    # The client's address and port: requests on one kept-alive connection share it.
    peer: tuple[str, int] | None = None


class ScriptedServer:
    """Base of the provider fakes. Subclasses add routes and speak the wire format."""

    def __init__(self, *, token_delay_s: float = 0.0, record: bool = True) -> None:
        self.token_delay_s = token_delay_s
        self.default: Behaviour = Reply()
        # Off for long benchmarks, where the list would only grow.
        self.record = record
        self.requests: list[RecordedRequest] = []
        # Streams the client closed before they were finished; `disconnected` is set at
        # the first, so a test can wait for it.
        self.disconnects = 0
        self.disconnected = asyncio.Event()
        self._queue: deque[Behaviour] = deque()
        self._by_model: dict[str, Behaviour] = {}
        # Set when the fake stops: releases hanging and stalled handlers.
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- scripting -------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        """The next requests get these, in order; then `default`."""
        self._queue.extend(behaviours)

    def for_model(self, model: str, behaviour: Behaviour) -> None:
        """Every request for `model` gets `behaviour` (before anything scripted)."""
        self._by_model[model] = behaviour

    async def take(self, request: web.Request) -> tuple[Any, Behaviour]:
        """Records `request` and picks its behaviour."""
        body = await request.json()
        if self.record:
            self.requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    request.headers,
                    body,
                    request.transport.get_extra_info("peername") if request.transport else None,
                )
            )
        model = body.get("model", "") if isinstance(body, dict) else ""
        behaviour = self._by_model.get(model)
        if behaviour is None:
            behaviour = self._queue.popleft() if self._queue else self.default
        return body, behaviour

    # -- helpers for the wire formats ------------------------------------------------

    @staticmethod
    def api_key_of(request: web.Request) -> str:
        """The key a request carried: `x-api-key`, or `Authorization: Bearer` (which both
        SDKs send now; Anthropic's API takes either)."""
        key = request.headers.get("x-api-key")
        if key is None:
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return key

    async def hang(self) -> web.Response:
        await self._stopping.wait()
        return web.Response(status=503)

    def delay_of(self, reply: Reply | BreakStream) -> float:
        if isinstance(reply, Reply) and reply.token_delay_s is not None:
            return reply.token_delay_s
        return self.token_delay_s

    async def start_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        return response

    async def send(self, response: web.StreamResponse, data: bytes, delay_s: float) -> bool:
        """Writes one event; False when the client has gone (the caller stops)."""
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        try:
            await response.write(data)
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            self.disconnects += 1
            self.disconnected.set()
            return False
        return True

    async def break_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        behaviour: BreakStream,
        pending: bytes,
        error_event: bytes,
    ) -> web.StreamResponse:
        """Sends what is `pending`, then breaks the stream the way `behaviour` says."""
        if pending and not await self.send(response, pending, 0.0):
            return response
        if behaviour.how == "stall":
            await self._stopping.wait()
        elif behaviour.how == "abort" and request.transport is not None:
            request.transport.abort()
        elif behaviour.how == "error":
            if await self.send(response, error_event, 0.0):
                await response.write_eof()
        elif behaviour.how == "end":
            await response.write_eof()
        return response
