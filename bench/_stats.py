"""Latency figures of a load: nearest-rank percentiles and their summary."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), as celery_baseline.py computes it."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass(frozen=True, slots=True)
class Latency:
    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, latencies_s: Sequence[float]) -> Latency:
        lat = sorted(latencies_s)
        return cls(
            n=len(lat),
            p50_ms=percentile(lat, 50) * 1e3,
            p90_ms=percentile(lat, 90) * 1e3,
            p99_ms=percentile(lat, 99) * 1e3,
            max_ms=(lat[-1] if lat else math.nan) * 1e3,
            mean_ms=(statistics.fmean(lat) if lat else math.nan) * 1e3,
        )
