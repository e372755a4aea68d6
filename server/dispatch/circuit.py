"""A circuit breaker per backend: stop sending work to a member that keeps failing.

    closed --N consecutive backend faults--> open --reset timeout--> half-open
    half-open --one success--> closed;  half-open --a fault--> open again

Only the backend's own faults count (BackendError.backend_fault: 5xx, timeouts, refused
connections, rejected credentials). A client's invalid request never does, and a 429 is a
pause the router honours, not a failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitSettings:
    failure_threshold: int = 5
    reset_timeout_s: float = 30.0


class CircuitBreaker:
    def __init__(self, settings: CircuitSettings) -> None:
        self._settings = settings
        self._failures = 0
        self._opened_at = 0.0
        self._state = CircuitState.CLOSED

    def state(self, now: float) -> CircuitState:
        if (
            self._state is CircuitState.OPEN
            and now - self._opened_at >= self._settings.reset_timeout_s
        ):
            self._state = CircuitState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def reopens_at(self) -> float | None:
        """When an open circuit lets a trial attempt through."""
        if self._state is CircuitState.OPEN:
            return self._opened_at + self._settings.reset_timeout_s
        return None

    def half_open(self) -> None:
        """Lets a trial through before the reset timeout: an active health check just saw
        the backend come back, which says more than the time that passed."""
        if self._state is CircuitState.OPEN:
            self._state = CircuitState.HALF_OPEN

    def success(self) -> bool:
        """Records a success; True if that closed the circuit."""
        self._failures = 0
        changed = self._state is not CircuitState.CLOSED
        self._state = CircuitState.CLOSED
        return changed

    def failure(self, now: float) -> bool:
        """Records a backend fault; True if that opened the circuit."""
        self._failures += 1
        if self.state(now) is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED
            and self._failures >= self._settings.failure_threshold
        ):
            self._state = CircuitState.OPEN
            self._opened_at = now
            return True
        return False
