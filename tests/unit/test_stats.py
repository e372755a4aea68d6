"""Statistics values: nearest-rank percentiles and the rates derived from counts."""

from __future__ import annotations

import pytest

from server.model.stats import GroupStats, percentile


def test_nearest_rank_percentile_is_always_an_observed_value() -> None:
    """p50 of [1, 2, 3, 4] is 2 (rank ceil(2)), p99 is 4; one value is every percentile."""
    assert [percentile([1, 2, 3, 4], p) for p in (50, 90, 99, 100)] == [2, 4, 4, 4]
    assert percentile([7.5], 50) == percentile([7.5], 99) == 7.5
    # 29 * 100 / 100 is exactly 29: no float rounding pushes the rank to 30.
    assert percentile(list(range(1, 101)), 29) == 29
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_success_rate_leaves_cancellations_out() -> None:
    """Cancelled tasks are finished but neither succeeded nor failed."""
    group = GroupStats("chat", "b1", succeeded=3, failed=1, cancelled=4, attempts=10)
    assert (group.finished, group.success_rate, group.mean_attempts) == (8, 0.75, 1.25)
    only_cancelled = GroupStats("chat", "", cancelled=2)
    assert (only_cancelled.success_rate, only_cancelled.mean_attempts) == (0.0, 0.0)
