"""The one source of time: wall-clock seconds for records, monotonic for waiting."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """What every part that reads time depends on, so tests can drive time by hand."""

    def now(self) -> float:
        """Seconds since the epoch (UTC); stored on tasks."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when a test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
