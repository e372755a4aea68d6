"""Priority aging: the longer a task has waited, the higher the priority it competes at, so
that LOW work is never starved for good by a steady stream of higher work.

A task's effective priority is its own plus one level per `aging_s` seconds since it was
created, at most URGENT. With aging_s = 60, a LOW task created at t=0 competes as NORMAL
from t=60, as HIGH from t=120 and as URGENT from t=180; a HIGH task created at t=170 is
URGENT from t=230. Within one effective level the older task goes first (FIFO), so at
t=200 the LOW task (URGENT by age, created at 0) runs before a native URGENT task created
at t=190. A task queued again for a retry keeps its creation time: it has waited all along.

Why the stores can rank cheaply (reading a few rows, never the whole queue): within one
priority, a task created earlier has an effective priority at least as high and comes first
on a tie, so the best `limit` tasks overall are among the first `limit` (oldest) of each of
the four priorities. The stores read those through their (priority, pk) index and sort
them by `dispatch_order`. (The index orders a priority's tasks by pk, the order they reached
the store: on SQLite that is their creation order; on PostgreSQL tasks created within a few
milliseconds on different replicas may interleave, and one of them may then wait for the
next claim.)
"""

from __future__ import annotations

from .task import Priority

# The default of `[priorities] aging_s`: a LOW task competes as URGENT after 3 minutes.
DEFAULT_AGING_S = 60.0


def effective_priority(
    priority: Priority, created_at: float, now: float, aging_s: float
) -> Priority:
    """`priority` raised one level per `aging_s` seconds waited since `created_at`, at most
    URGENT; `aging_s` 0 turns aging off."""
    if aging_s <= 0:
        return priority
    # A clock that stepped back (or another replica's, slightly ahead) is no wait at all.
    levels = int(max(0.0, now - created_at) // aging_s)
    return Priority(min(int(Priority.URGENT), int(priority) + levels))


def dispatch_order(
    priority: int, created_at: float, now: float, aging_s: float
) -> tuple[int, float, int]:
    """The sort key of dispatch order, first to run first: highest effective priority, then
    oldest, then the higher own priority. Takes a task's priority and creation time rather
    than the task, so that stores rank rows before decoding them."""
    own = Priority(priority)
    return (-effective_priority(own, created_at, now, aging_s), created_at, -own)
