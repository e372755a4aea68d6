"""The circuit breaker's states: closed, open after N faults, half-open after the reset
timeout (or when a health check sees the backend back), closed after one success."""

from __future__ import annotations

from server.dispatch.circuit import CircuitBreaker, CircuitSettings, CircuitState


def test_opens_after_the_threshold_of_consecutive_faults() -> None:
    breaker = CircuitBreaker(CircuitSettings(failure_threshold=3, reset_timeout_s=30))
    assert not breaker.failure(0.0)
    assert not breaker.failure(1.0)
    assert breaker.failure(2.0), "the third consecutive fault opens it"
    assert breaker.state(2.0) is CircuitState.OPEN
    assert breaker.reopens_at == 32.0


def test_a_success_in_between_starts_the_count_again() -> None:
    breaker = CircuitBreaker(CircuitSettings(failure_threshold=3))
    breaker.failure(0.0)
    breaker.failure(0.0)
    assert not breaker.success(), "it was closed already"
    breaker.failure(0.0)
    breaker.failure(0.0)
    assert breaker.state(0.0) is CircuitState.CLOSED


def test_half_open_after_the_timeout_then_one_trial_decides() -> None:
    breaker = CircuitBreaker(CircuitSettings(failure_threshold=1, reset_timeout_s=10))
    breaker.failure(0.0)
    assert breaker.state(9.9) is CircuitState.OPEN
    assert breaker.state(10.0) is CircuitState.HALF_OPEN
    assert breaker.failure(10.5), "a failed trial opens it again at once"
    assert breaker.state(15.0) is CircuitState.OPEN
    assert breaker.state(20.5) is CircuitState.HALF_OPEN
    assert breaker.success(), "a good trial closes it"
    assert breaker.state(20.5) is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0


def test_a_health_check_seeing_the_backend_back_half_opens_it_early() -> None:
    breaker = CircuitBreaker(CircuitSettings(failure_threshold=1, reset_timeout_s=30))
    breaker.failure(0.0)
    breaker.half_open()
    assert breaker.state(1.0) is CircuitState.HALF_OPEN
    closed = CircuitBreaker(CircuitSettings())
    closed.half_open()
    assert closed.state(0.0) is CircuitState.CLOSED, "only an open circuit half-opens"
