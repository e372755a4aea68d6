"""The admission of each call: who is calling (auth.py), then whether their limit lets the
call in (limits.py)."""

from __future__ import annotations

from typing import Any

import grpc

from .auth import ANONYMOUS, Authenticator, Caller
from .limits import ClientLimiter


class Gate:
    def __init__(self, auth: Authenticator, limiter: ClientLimiter) -> None:
        self.auth = auth
        self.limiter = limiter

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The caller, once admitted; UnauthenticatedError or RateLimitedError otherwise."""
        caller = self.identify(context)
        await self.limiter.admit(caller.client_id)
        return caller

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The caller, without taking from their limit (AdminService's calls)."""
        return ANONYMOUS if self.auth.open else self.auth.caller(context.invocation_metadata())
