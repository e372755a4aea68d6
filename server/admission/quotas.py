"""TaskQuotas: what each client's unfinished tasks hold, from admission until they end: a
charge on the client's budget of model tokens per minute (budget.py, estimated by
tokens.py) and a place under its cap of unfinished tasks (`max_queued`).

A hold is taken at admission (Submit, and each task of a SubmitBatch), before the task's
write and without awaiting anything between the check and the charge, so concurrent
Submits cannot all pass a check that none of them has counted yet. It is given back:
- whole, when the write failed or was an idempotent replay (`release`): no task was stored;
- corrected by what the task used, when it ends (`ended`): the ChangeRecorder reports
  every end this process stores (success, failure, Cancel of a queued task, a deadline
  passing), the ChangeFeed those another replica stores;
- as charged, when an end is known but not how it went (`ended_unread`), or when the
  task is GRACE_S past its deadline with no end seen (a change feed that was cut while
  the task ended on another replica).
A Submit repeating an idempotency key is checked as a new task (that it is a replay shows
only in the write): a client at its cap, or out of budget, gets its replay once it has
room again, like the rate limit's refusals.

Per replica: the holds live in this process's memory, one small record per unfinished
task it admitted. With several replicas on PostgreSQL each one enforces the budget and
the cap over the tasks admitted through it, so a client spread over n replicas may have
up to n times either. A restart forgets the charges (the budget fails open, for a minute
at most) but not the backlog: `seed` counts the store's unfinished tasks against their
clients' caps (on PostgreSQL, those admitted through other replicas too: stricter, until
they end).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.clock import Clock
from server.config_file import Limits
from server.model.errors import InvalidArgumentError, RateLimitedError
from server.model.task import ChatInput, Task
from server.store.base import Unfinished

from .budget import TokenBudget
from .tokens import Estimate, estimate, used
from .validate import shown

# How long past its deadline a task may stay held with no end seen: the dispatchers fail
# overdue tasks within a second or two, so a hold still there missed its task's end.
GRACE_S = 60.0
# How often (clock seconds, checked at admissions) the holds are swept for those.
SWEEP_INTERVAL_S = 60.0
# A client at its cap is told to come back after this long. When one of its tasks will end
# is unknown; a second is a polite poll, and RetryInfo keeps the answer the same as every
# other RESOURCE_EXHAUSTED of taskring, which clients already retry after its delay.
QUEUE_FULL_RETRY_S = 1.0


@dataclass(slots=True)
class _Hold:
    client_id: str
    # Tokens charged to the client's budget; 0 when none were (no budget, a custom task).
    charged: int
    # The task's estimated input: what a run that reports no usage is charged (tokens.used).
    prompt: int
    deadline: float
    # Whether it counts against the client's cap (only clients with one are counted).
    counted: bool


class TaskQuotas:
    def __init__(self, limits: Limits, clock: Clock) -> None:
        self._limits = limits
        self._clock = clock
        self._budget = TokenBudget(clock)
        # By task id; only the event loop's thread touches these.
        self._holds: dict[str, _Hold] = {}
        # Holds that count against a cap, by client (no entry: none).
        self._counts: dict[str, int] = {}
        self._next_sweep = 0.0

    def admit(self, task: Task) -> None:
        """Holds `task`'s share of its client's quotas, or raises RateLimitedError (over the
        cap, or the budget has too little left now) or InvalidArgumentError (its estimate
        is more than the whole budget: it can never fit)."""
        client = task.client_id
        quota = self._limits.quota_for(client)
        if quota.max_queued is None and quota.tokens_per_minute is None:
            return
        self._sweep()
        counted = quota.max_queued is not None
        held = self._counts.get(client, 0)
        if quota.max_queued is not None and held >= quota.max_queued:
            raise RateLimitedError(
                f"client {client!r} has {held} unfinished tasks (queued or running), its"
                f" max_queued is {quota.max_queued}; submit more as they finish (retry after"
                " the delay in RetryInfo)",
                QUEUE_FULL_RETRY_S,
                "max_queued",
            )
        need = estimate(task.spec, self._limits.default_max_tokens)
        per_minute = quota.tokens_per_minute
        charged = prompt = 0
        if per_minute is not None and need is not None:
            _check_fits(client, task, need, per_minute)
            wait_s = self._budget.take(client, need.total, per_minute)
            if wait_s is not None:
                left = max(0, int(self._budget.left(client, per_minute)))
                raise RateLimitedError(
                    f"client {client!r} is over its token budget of {per_minute} model tokens"
                    f" per minute: this task is estimated at {need.total} ({need.prompt} in,"
                    f" up to {need.max_output} out) and {left} are left; retry after the"
                    " delay in RetryInfo",
                    wait_s,
                    "token_budget",
                )
            charged, prompt = need.total, need.prompt
        if counted or charged:
            self._holds[task.id] = _Hold(client, charged, prompt, task.deadline, counted)
            if counted:
                self._counts[client] = held + 1

    def release(self, task_id: str) -> None:
        """The task admitted was not stored (a later check refused it, its write failed,
        or it was a replay of an idempotency key): all of its hold is given back."""
        hold = self._drop(task_id)
        if hold is not None:
            self._give_back(hold, hold.charged)

    def ended(self, task: Task) -> None:
        """`task` ended (it is as stored, terminal): its charge is corrected by its use."""
        hold = self._drop(task.id)
        if hold is not None:
            self._give_back(hold, hold.charged - used(task, hold.prompt))

    def ended_unread(self, task_id: str) -> None:
        """The task ended, but how is unknown (its row could not be read): it keeps its
        charge, and its place under the cap is free."""
        self._drop(task_id)

    def holds(self, task_id: str) -> bool:
        return task_id in self._holds

    @property
    def counts_tasks(self) -> bool:
        """Whether some client's unfinished tasks are capped (and so `seed` has work)."""
        return self._limits.caps_queued

    def seed(self, unfinished: Iterable[Unfinished]) -> None:
        """Counts tasks already in the store (at start: the backlog a restart must not
        forget) against their clients' caps; their charges are not known."""
        for task in unfinished:
            if task.task_id in self._holds:
                continue
            if self._limits.quota_for(task.client_id).max_queued is None:
                continue
            self._holds[task.task_id] = _Hold(task.client_id, 0, 0, task.deadline, True)
            self._counts[task.client_id] = self._counts.get(task.client_id, 0) + 1

    def unfinished(self, client_id: str) -> int:
        """The client's tasks counted against its cap now."""
        return self._counts.get(client_id, 0)

    def statistics(self) -> dict[str, int]:
        return {
            "holds": len(self._holds),
            "capped_clients": len(self._counts),
            "budgets": len(self._budget),
        }

    def _drop(self, task_id: str) -> _Hold | None:
        hold = self._holds.pop(task_id, None)
        if hold is not None and hold.counted:
            count = self._counts[hold.client_id] - 1
            if count:
                self._counts[hold.client_id] = count
            else:
                del self._counts[hold.client_id]
        return hold

    def _give_back(self, hold: _Hold, tokens: int) -> None:
        per_minute = self._limits.quota_for(hold.client_id).tokens_per_minute
        if hold.charged and per_minute is not None:
            self._budget.give_back(hold.client_id, tokens, per_minute)

    def _sweep(self) -> None:
        """Drops the holds of tasks long past their deadline (see GRACE_S), once a minute:
        a scan of the holds, which are as many as the unfinished tasks admitted here."""
        now = self._clock.now()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        for task_id in [i for i, hold in self._holds.items() if hold.deadline + GRACE_S < now]:
            self._drop(task_id)


def _check_fits(client: str, task: Task, need: Estimate, per_minute: int) -> None:
    """InvalidArgumentError when `need` is more than the whole budget: retrying cannot help
    (RESOURCE_EXHAUSTED would tell clients to retry), a smaller request can."""
    if need.total <= per_minute:
        return
    chat = isinstance(task.spec.input, ChatInput)
    if need.prompt > per_minute:
        field = "task.chat.messages" if chat else "task.embed.texts"
        fix = "send less text"
    else:
        field, fix = "task.chat.parameters.max_tokens", "set a smaller max_tokens"
    raise InvalidArgumentError.single(
        field,
        f"estimated at {need.total} tokens ({need.prompt} in, up to {need.max_output} out),"
        f" more than client {shown(client)}'s whole budget of {per_minute} per minute: {fix}",
    )
