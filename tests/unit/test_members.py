"""Members: which ring members take work, from circuit, health and membership changes."""

from __future__ import annotations

import asyncio

from server.backends.base import BackendError
from server.backends.local import LocalBackend, LocalModelSettings, builtin_handlers
from server.clock import ManualClock
from server.dispatch.circuit import CircuitSettings, CircuitState
from server.dispatch.members import Members
from server.model.task import ChatInput, ChatMessage, Task, TaskSpec, TaskState

FAULT = BackendError("BACKEND_UNAVAILABLE", "500", retryable=True, backend_fault=True)


def members(clock: ManualClock, *names: str) -> Members:
    handlers = builtin_handlers(LocalModelSettings(token_delay_s=0))
    return Members(
        [(LocalBackend(name, handlers, 4), 1) for name in names],
        load_factor=1.25,
        clock=clock,
        circuit=CircuitSettings(failure_threshold=1, reset_timeout_s=10),
    )


def task(key: str = "k") -> Task:
    spec = TaskSpec("chat", ChatInput("m", (ChatMessage("user", "hi"),)), routing_key=key)
    return Task("id", "c", spec, TaskState.QUEUED, 0.0, 1e12)


async def test_a_trial_that_ends_without_an_outcome_does_not_shut_the_member_out() -> None:
    clock = ManualClock()
    ring = members(clock, "a")
    assert ring.acquire(task()) == "a"
    ring.release("a")
    ring.failed("a", FAULT)
    assert ring.acquire(task()) is None, "open: no work"
    clock.advance(10)
    ring.tick()  # the dispatcher's periodic sweep
    assert ring.acquire(task()) == "a", "half-open: one trial"
    assert ring.acquire(task()) is None, "only one trial at a time"
    ring.release("a")  # the trial was cancelled: no success, no failure
    assert ring.acquire(task()) == "a", "the next attempt is the trial"
    ring.succeeded("a")
    ring.release("a")
    assert ring.views()[0].circuit is CircuitState.CLOSED


async def test_outcomes_of_a_removed_members_attempts_are_ignored() -> None:
    clock = ManualClock()
    ring = members(clock, "a", "b")
    name = ring.acquire(task())
    assert name is not None
    view = await ring.remove(name)
    assert view.status.load == 1
    assert [v.status.name for v in ring.views()] == [n for n in ("a", "b") if n != name]
    ring.failed(name, FAULT)  # must not raise for a member that left
    ring.succeeded(name)
    ring.release(name)  # the last attempt ends: the member is closed and forgotten
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert name not in ring.backends
    assert [v.status.name for v in ring.views()] == [n for n in ("a", "b") if n != name]
