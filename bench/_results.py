"""What a run measured: each load's result, the Celery baseline's figures, and the
ratios checked against their goals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from _load import Outcomes
from _procs import CpuUse
from _profile import HotSpots
from _stats import Latency

GOAL_SUBMIT_VS_ECHO = 0.6  # Submit calls/s over echo calls/s, at least
GOAL_E2E_VS_CELERY = 2.0  # taskring e2e tasks/s over Celery's best pool, at least
GOAL_P99_VS_CELERY = 0.5  # taskring e2e p99 at the fixed rate over Celery's best, at most
# Submit calls/s with metrics and tracing on over off, at least (they cost under 10%).
GOAL_OBSERVABILITY_COST = 0.9


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One closed-loop load: operations per second and their latency."""

    stage: str
    setting: str
    n_ok: int
    errors: dict[str, int]
    wall_s: float  # first start to last completion
    per_s: float
    latency: Latency
    cpu: CpuUse

    @classmethod
    def of(
        cls, stage: str, setting: str, outcomes: Outcomes, started: float, cpu: CpuUse
    ) -> LoadResult:
        end = max(outcomes.completed_at, default=started)
        wall = max(end - started, 1e-9)
        return cls(
            stage,
            setting,
            len(outcomes.latencies_s),
            dict(outcomes.errors),
            wall,
            len(outcomes.latencies_s) / wall,
            Latency.of(outcomes.latencies_s),
            cpu,
        )


@dataclass(frozen=True, slots=True)
class RateResult:
    """The open-loop load at a fixed rate."""

    stage: str
    setting: str
    target_rate: float
    achieved_rate: float
    n_ok: int
    errors: dict[str, int]
    max_schedule_lag_ms: float
    latency: Latency
    cpu: CpuUse


@dataclass(frozen=True, slots=True)
class StoreLoad:
    """One load of the stores stage. result.cpu sums the routers (its loop% is the busiest
    router's event loop); db_* is the PostgreSQL server's processes (NaN for SQLite, whose
    work runs inside the router)."""

    result: LoadResult
    db_cpu_pct: float
    db_us_per_op: float


@dataclass(slots=True)
class StoreRun:
    """One configuration of the stores stage: a store, a router count, a fresh store.
    Filled in as its loads are measured, so a run stopped midway still shows the first."""

    label: str  # "sqlite", "postgresql x1", "postgresql x2"
    store: str  # "sqlite" or "postgresql"
    replicas: int
    durability: str = ""
    submit: StoreLoad | None = None
    e2e: StoreLoad | None = None


@dataclass(frozen=True, slots=True)
class Ratio:
    """A ratio reported as a figure: no goal, it never fails the run."""

    name: str
    value: float
    detail: str


@dataclass(frozen=True, slots=True)
class CeleryPool:
    label: str
    tasks_per_s: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    submit_p50_ms: float


@dataclass(frozen=True, slots=True)
class CeleryResult:
    pools: list[CeleryPool]
    failures: list[str]
    versions: dict[str, str]

    def best_throughput(self) -> CeleryPool | None:
        usable = [p for p in self.pools if math.isfinite(p.tasks_per_s)]
        return max(usable, key=lambda p: p.tasks_per_s, default=None)

    def best_p99(self) -> CeleryPool | None:
        usable = [p for p in self.pools if math.isfinite(p.e2e_p99_ms)]
        return min(usable, key=lambda p: p.e2e_p99_ms, default=None)


@dataclass(frozen=True, slots=True)
class Check:
    """A ratio and its goal; passed is None when it could not be measured."""

    name: str
    value: float
    goal: float
    at_least: bool  # True: value >= goal passes; False: value <= goal passes
    detail: str

    @property
    def passed(self) -> bool | None:
        if not math.isfinite(self.value):
            return None
        return self.value >= self.goal if self.at_least else self.value <= self.goal


@dataclass(slots=True)
class Report:
    """Everything the run measured so far; printed even when the run stops early."""

    config: dict[str, Any]
    environment: dict[str, Any]
    echo: list[LoadResult] = field(default_factory=list)
    submit: list[LoadResult] = field(default_factory=list)
    e2e: list[LoadResult] = field(default_factory=list)
    rate: RateResult | None = None
    # Submit loads without and with metrics + tracing, settings "off ..." / "on ...".
    observability: list[LoadResult] = field(default_factory=list)
    stores: list[StoreRun] = field(default_factory=list)
    celery: CeleryResult | None = None
    celery_note: str = ""
    profiles: dict[str, HotSpots] = field(default_factory=dict)
    failure: str = ""

    def best_e2e(self) -> LoadResult | None:
        return max(self.e2e, key=lambda r: r.per_s, default=None)

    def store_ratios(self) -> list[Ratio]:
        """PostgreSQL with one router over SQLite, and each larger router count over one
        router on PostgreSQL, for Submit calls/s and e2e tasks/s."""
        by_key = {(run.store, run.replicas): run for run in self.stores}
        one_pg, sqlite = by_key.get(("postgresql", 1)), by_key.get(("sqlite", 1))
        pairs = [(one_pg, sqlite)] if one_pg and sqlite else []
        if one_pg:
            pairs += [
                (r, one_pg) for r in self.stores if r.store == "postgresql" and r.replicas > 1
            ]
        out = []
        for num, den in pairs:
            for kind, unit in (("submit", "Submit calls/s"), ("e2e", "e2e tasks/s")):
                a: StoreLoad | None = getattr(num, kind)
                b: StoreLoad | None = getattr(den, kind)
                if a and b:
                    value = a.result.per_s / b.result.per_s if b.result.per_s else math.nan
                    detail = f"{a.result.per_s:.0f} / {b.result.per_s:.0f}"
                else:
                    value, detail = math.nan, "not measured"
                out.append(Ratio(f"{unit}: {num.label} / {den.label}", value, detail))
        return out

    def checks(self) -> list[Check]:
        return [*self._submit_checks(), *self._celery_checks(), *self._observability_checks()]

    def _observability_checks(self) -> list[Check]:
        if not self.observability:
            return []

        def mean_per_s(mode: str) -> float:
            runs = [r.per_s for r in self.observability if r.setting.startswith(mode + " ")]
            return sum(runs) / len(runs) if runs else math.nan

        on, off = mean_per_s("on"), mean_per_s("off")
        detail = f"{on:.0f} / {off:.0f} Submits/s (mean of the runs)"
        value = on / off if off else math.nan
        name = "Submit/s: metrics+tracing on / off"
        return [Check(name, value, GOAL_OBSERVABILITY_COST, True, detail)]

    def _submit_checks(self) -> list[Check]:
        echo_by_setting = {r.setting: r for r in self.echo}
        out = []
        for sub in self.submit:
            echo = echo_by_setting.get(sub.setting)
            value = sub.per_s / echo.per_s if echo and echo.per_s else math.nan
            detail = f"{sub.per_s:.0f} / {echo.per_s:.0f} calls/s" if echo else "no echo"
            out.append(
                Check(
                    f"Submit/echo calls/s ({sub.setting})", value, GOAL_SUBMIT_VS_ECHO, True, detail
                )
            )
        return out

    def _celery_checks(self) -> list[Check]:
        best_pool = self.celery.best_throughput() if self.celery else None
        p99_pool = self.celery.best_p99() if self.celery else None
        e2e, rate = self.best_e2e(), self.rate
        tput = e2e.per_s / best_pool.tasks_per_s if e2e and best_pool else math.nan
        p99 = rate.latency.p99_ms / p99_pool.e2e_p99_ms if rate and p99_pool else math.nan
        tput_detail = (
            f"{e2e.per_s:.0f} ({e2e.setting}) / {best_pool.tasks_per_s:.0f} "
            f"({best_pool.label}) tasks/s"
            if e2e and best_pool
            else "not measured"
        )
        p99_detail = (
            f"{rate.latency.p99_ms:.2f} / {p99_pool.e2e_p99_ms:.2f} ms ({p99_pool.label})"
            if rate and p99_pool
            else "not measured"
        )
        return [
            Check(
                "e2e tasks/s: taskring / Celery best", tput, GOAL_E2E_VS_CELERY, True, tput_detail
            ),
            Check(
                "e2e p99 @rate: taskring / Celery best", p99, GOAL_P99_VS_CELERY, False, p99_detail
            ),
        ]
