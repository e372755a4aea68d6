"""The token budget's pure parts on a manual clock: the estimate, the use of an ended task,
the bucket's arithmetic, and holds of tasks whose end was never seen."""

from __future__ import annotations

import pytest

from server.admission.budget import TokenBudget
from server.admission.quotas import GRACE_S, TaskQuotas
from server.admission.tokens import Estimate, estimate, used
from server.clock import ManualClock
from server.config_file import Limits, TaskQuota
from server.model.errors import RateLimitedError
from server.model.task import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    CustomInput,
    EmbedInput,
    Task,
    TaskSpec,
    TaskState,
    Usage,
)


def chat(*contents: str, max_tokens: int | None = None) -> TaskSpec:
    messages = tuple(ChatMessage("user", text) for text in contents)
    return TaskSpec("chat", ChatInput("m", messages, max_tokens=max_tokens))


def task_of(spec: TaskSpec, task_id: str = "t1", deadline: float = 2e9, **changes: object) -> Task:
    task = Task(task_id, "c", spec, TaskState.QUEUED, created_at=0.0, deadline=deadline)
    return task.evolve(**changes)


def test_the_estimate_is_bytes_over_four_per_message_plus_max_tokens() -> None:
    """The docstring's worked example: 9 and 5 bytes, max_tokens unset (default 1024)."""
    spec = TaskSpec(
        "chat",
        ChatInput("m", (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello"))),
    )
    assert estimate(spec, 1024) == Estimate(prompt=7 + 6, max_output=1024)
    assert estimate(chat("Hello", max_tokens=10), 1024) == Estimate(6, 10)
    # Three bytes a character in UTF-8: 4 characters count as 3 tokens, not 1.
    assert estimate(chat("日本語だ", max_tokens=1), 1024) == Estimate(3 + 4, 1)


def test_embed_texts_are_charged_and_custom_tasks_are_not() -> None:
    embed = TaskSpec("embed", EmbedInput("m", ("x" * 8, "y" * 9)))
    assert estimate(embed, 1024) == Estimate(2 + 3, 0)
    assert estimate(TaskSpec("summarize", CustomInput({"text": "x" * 400})), 1024) is None


def test_an_ended_task_used_its_reported_usage_else_what_it_ran() -> None:
    """Usage reported wins; a task that never ran used nothing; one cut short without a
    report used its prompt and the output it produced (8 bytes: 2 tokens)."""
    spec = chat("hello", max_tokens=100)
    assert used(task_of(spec, usage=Usage(30, 12), attempt=1), prompt=6) == 42
    assert used(task_of(spec, state=TaskState.CANCELLED), prompt=6) == 0
    cut = task_of(spec, state=TaskState.CANCELLED, attempt=1, output=ChatOutput("12345678"))
    assert used(cut, prompt=6) == 6 + 2


def test_the_bucket_follows_the_worked_example() -> None:
    """6,000 tokens a minute: the docstring of server/admission/budget.py, step by step."""
    clock = ManualClock()
    budget = TokenBudget(clock)
    assert budget.take("a", 4000, 6000) is None
    assert budget.take("a", 3000, 6000) == pytest.approx(10.0), "1000 missing at 100 a second"
    assert budget.left("a", 6000) == pytest.approx(2000), "a refusal charges nothing"
    clock.advance(10.0)
    assert budget.take("a", 3000, 6000) is None
    budget.give_back("a", 3500, 6000)
    assert budget.left("a", 6000) == pytest.approx(3500)
    assert budget.take("b", 6000, 6000) is None, "each client has its own budget"


def test_giving_back_never_overfills_and_an_overshoot_is_a_debt() -> None:
    clock = ManualClock()
    budget = TokenBudget(clock)
    budget.take("a", 100, 6000)
    budget.give_back("a", 5000, 6000)
    assert budget.left("a", 6000) == pytest.approx(6000), "never above the budget's size"
    budget.take("a", 6000, 6000)
    budget.give_back("a", -1200, 6000)  # the task used 1,200 more than it was charged
    assert budget.left("a", 6000) == pytest.approx(-1200)
    assert budget.take("a", 300, 6000) == pytest.approx(15.0), "the debt, then 300: 1500/100"


def test_full_buckets_are_dropped() -> None:
    """A bucket back at its size is the same as none: memory follows active clients."""
    clock = ManualClock()
    budget = TokenBudget(clock)
    for i in range(1000):
        budget.take(f"client-{i}", 10, 600)
    assert len(budget) == 1000
    clock.advance(1.0)  # 10 a second: every bucket is full again
    for i in range(300):
        budget.take(f"later-{i}", 10, 600)
    assert len(budget) < 1000


def test_a_hold_whose_end_was_never_seen_lapses_after_its_deadline() -> None:
    """A task held here but ended unseen (a change feed cut on another replica) stops
    counting against the cap GRACE_S after its deadline."""
    clock = ManualClock(1000.0)
    quotas = TaskQuotas(Limits(quota=TaskQuota(max_queued=2)), clock)
    for task_id in ("t1", "t2"):
        quotas.admit(task_of(chat("hi"), task_id, deadline=1010.0))
    with pytest.raises(RateLimitedError, match="max_queued is 2"):
        quotas.admit(task_of(chat("hi"), "t3", deadline=1010.0))
    clock.advance(10.0 + GRACE_S + 1.0)
    quotas.admit(task_of(chat("hi"), "t3", deadline=2000.0))
    assert quotas.unfinished("c") == 1
