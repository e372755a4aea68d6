"""Per-client priority caps (`max_priority` in the file's [limits]): a task that asks for a
higher priority than its client may have is stored at the cap, and its reply says so.

Lowered, not refused: a priority is a wish about the order of work, and the task is just as
worth running at the cap. A refusal (PERMISSION_DENIED) would stop a client whose code asks
for URGENT everywhere, or whose cap an operator just lowered, from getting any work done,
and a retry would not help; lowered, the work runs, behind the clients allowed to go first,
and the stored task (in the Submit reply, Get, List and Stream) shows the priority it got.
"""

from __future__ import annotations

from dataclasses import replace

from server.config_file import Limits
from server.model.task import TaskSpec


class PriorityCaps:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    def apply(self, client_id: str, spec: TaskSpec) -> TaskSpec:
        """`spec` with its priority lowered to `client_id`'s cap, if above it. Applied before
        the idempotency check: a replay of one request is capped the same way, and so
        still finds its task."""
        cap = self._limits.max_priority_of(client_id)
        return replace(spec, priority=cap) if spec.priority > cap else spec
