"""Priority aging, the pure part: how waiting raises a task's priority, and the dispatch
order that follows (URGENT > HIGH > NORMAL > LOW by effective priority, then oldest)."""

from __future__ import annotations

from server.model.aging import dispatch_order, effective_priority
from server.model.task import Priority

AGING_S = 60.0


def test_a_waiting_task_rises_one_level_per_aging_period_up_to_urgent() -> None:
    """LOW created at 0 is NORMAL from 60 s, HIGH from 120 s, URGENT from 180 s on."""
    seen = {
        waited: effective_priority(Priority.LOW, 1000.0, 1000.0 + waited, AGING_S)
        for waited in (0.0, 59.9, 60.0, 119.9, 120.0, 180.0, 86400.0)
    }
    assert seen == {
        0.0: Priority.LOW,
        59.9: Priority.LOW,
        60.0: Priority.NORMAL,
        119.9: Priority.NORMAL,
        120.0: Priority.HIGH,
        180.0: Priority.URGENT,
        86400.0: Priority.URGENT,
    }
    assert effective_priority(Priority.HIGH, 0.0, 60.0, AGING_S) is Priority.URGENT
    assert effective_priority(Priority.URGENT, 0.0, 1e9, AGING_S) is Priority.URGENT


def test_aging_zero_keeps_every_priority_as_submitted() -> None:
    assert effective_priority(Priority.LOW, 0.0, 1e9, 0.0) is Priority.LOW


def test_a_creation_time_ahead_of_now_is_no_wait() -> None:
    """Another replica's clock a little ahead must not lower (or raise) a priority."""
    assert effective_priority(Priority.NORMAL, 1005.0, 1000.0, AGING_S) is Priority.NORMAL


def ordered(tasks: dict[str, tuple[Priority, float]], now: float, aging_s: float) -> list[str]:
    """The names of `tasks` ({name: (priority, created_at)}) in dispatch order."""
    return sorted(tasks, key=lambda name: dispatch_order(*tasks[name], now, aging_s))


def test_without_waiting_the_order_is_urgent_high_normal_low_then_oldest() -> None:
    tasks = {
        "low": (Priority.LOW, 100.0),
        "normal-2": (Priority.NORMAL, 103.0),
        "urgent": (Priority.URGENT, 102.0),
        "normal-1": (Priority.NORMAL, 101.0),
        "high": (Priority.HIGH, 104.0),
    }
    assert ordered(tasks, now=110.0, aging_s=AGING_S) == [
        "urgent",
        "high",
        "normal-1",
        "normal-2",
        "low",
    ]


def test_a_low_task_that_waited_three_periods_goes_before_newer_urgent_work() -> None:
    """Aged to URGENT, the LOW task is the oldest URGENT: first. Newer HIGH stays behind
    every URGENT task, and a LOW task that waited less stays behind it."""
    tasks = {
        "urgent-new": (Priority.URGENT, 1170.0),
        "high-new": (Priority.HIGH, 1175.0),
        "low-old": (Priority.LOW, 1000.0),
        "low-newer": (Priority.LOW, 1100.0),  # waited 80 s: NORMAL
    }
    assert ordered(tasks, now=1180.0, aging_s=AGING_S) == [
        "low-old",
        "urgent-new",
        "high-new",
        "low-newer",
    ]
    assert ordered(tasks, now=1180.0, aging_s=0.0) == [
        "urgent-new",
        "high-new",
        "low-old",
        "low-newer",
    ]


def test_within_one_effective_level_the_older_task_goes_first() -> None:
    """A NORMAL task aged to HIGH that waited longer runs before a HIGH task created after
    it (FIFO within the level)."""
    tasks = {"high": (Priority.HIGH, 1050.0), "normal-aged": (Priority.NORMAL, 1000.0)}
    assert ordered(tasks, now=1060.0, aging_s=AGING_S) == ["normal-aged", "high"]


def test_created_at_the_same_moment_the_higher_own_priority_goes_first() -> None:
    """Both aged to URGENT (the cap), both as old: the one asked for higher goes first."""
    tasks = {"normal": (Priority.NORMAL, 1000.0), "high": (Priority.HIGH, 1000.0)}
    assert ordered(tasks, now=1120.0, aging_s=AGING_S) == ["high", "normal"]
