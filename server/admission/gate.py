"""The admission of each call: who is calling (auth.py), then whether their limit lets the
call in (limits.py)."""

from __future__ import annotations

from typing import Any

import grpc

from .auth import ANONYMOUS, Authenticator, Caller
from .limits import ClientLimiter, Grant


class Gate:
    def __init__(self, auth: Authenticator, limiter: ClientLimiter) -> None:
        self.auth = auth
        self.limiter = limiter

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The caller, once admitted; UnauthenticatedError or RateLimitedError otherwise."""
        caller = self.identify(context)
        await self.limiter.admit(caller.client_id)
        return caller

    async def admit_more(self, caller: Caller, count: int) -> Grant:
        """Up to `count` more tokens of the caller's limit, for a call admitted already that
        costs one per item (SubmitBatch: one per task after the first)."""
        return await self.limiter.admit_up_to(caller.client_id, count)

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The caller, without taking from their limit (AdminService's calls)."""
        return ANONYMOUS if self.auth.open else self.auth.caller(context.invocation_metadata())
