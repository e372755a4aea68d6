"""The report of a run: the table, the Celery comparison, the ratios and the hot spots
on stderr, and the one-line JSON summary."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import IO, Any

from _profile import HotSpots
from _results import Check, LoadResult, RateResult, Ratio, Report, StoreLoad, StoreRun


def fmt(value: float, digits: int = 0) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _per_s(r: LoadResult | RateResult) -> float:
    return r.per_s if isinstance(r, LoadResult) else r.achieved_rate


# The table's columns: header, width, cell. The first two are left-aligned.
COLUMNS: list[tuple[str, int, Callable[[LoadResult | RateResult], str]]] = [
    ("stage", 11, lambda r: r.stage),
    ("setting", 22, lambda r: r.setting),
    ("ok", 7, lambda r: str(r.n_ok)),
    ("err", 5, lambda r: str(sum(r.errors.values()))),
    ("per s", 8, lambda r: fmt(_per_s(r))),
    ("p50 ms", 9, lambda r: fmt(r.latency.p50_ms, 2)),
    ("p99 ms", 9, lambda r: fmt(r.latency.p99_ms, 2)),
    ("max ms", 9, lambda r: fmt(r.latency.max_ms, 2)),
    ("srv CPU%", 9, lambda r: fmt(r.cpu.server_pct)),
    ("loop%", 6, lambda r: fmt(r.cpu.server_loop_pct)),
    ("srv us/op", 10, lambda r: fmt(r.cpu.server_us_per_op)),
    ("cli CPU%", 9, lambda r: fmt(r.cpu.client_pct)),
    ("cli us/op", 10, lambda r: fmt(r.cpu.client_us_per_op)),
    ("other%", 7, lambda r: fmt(r.cpu.other_pct)),
]


def print_table(report: Report) -> None:
    """The figures as a table on stderr."""
    env = report.environment
    out = sys.stderr
    print(
        f"\ntaskring Submit benchmark: {env['cpus']} CPUs, Python {env['python']}, grpcio "
        f"{env['grpcio']}, uvloop {env['uvloop']}, tree {env['git']}",
        file=out,
    )
    rows: list[LoadResult | RateResult] = [*report.echo, *report.submit, *report.e2e]
    rows += report.observability
    if report.rate:
        rows.append(report.rate)
    if rows:  # none when only the stores stage ran: it has its own table and stores
        print(f"store: {report.config['store_url']}  {report.config['durability']}", file=out)
        print(
            "".join(
                f"{name:{'<' if i < 2 else '>'}{width}}"
                for i, (name, width, _) in enumerate(COLUMNS)
            ),
            file=out,
        )
    for r in rows:
        print(
            "".join(
                f"{cell(r):{'<' if i < 2 else '>'}{width}}"
                for i, (_, width, cell) in enumerate(COLUMNS)
            ),
            file=out,
        )
    for r in rows:
        for error, count in r.errors.items():
            print(f"  {r.stage} {r.setting}: {count} x {error}", file=out)
    if report.rate:
        print(
            f"rate: target {report.rate.target_rate:g}/s, worst send lag "
            f"{report.rate.max_schedule_lag_ms:.2f} ms",
            file=out,
        )
    print_stores(report.stores, out)
    print_ratios(report.store_ratios(), out)
    print_celery(report, out)
    print_checks(report.checks(), out)
    print_profiles(report.profiles, out)
    if report.failure:
        print(f"\nRUN INCOMPLETE: {report.failure}", file=out)
    print(file=out, flush=True)


# The stores table: one row per load. Routers' CPU is summed (in % of one core: the
# machine has os.cpu_count() * 100); loop% is the busiest router's event loop; db CPU% is
# every process of the PostgreSQL server (backends, WAL writer, ...), "-" for SQLite,
# whose commits run in the router's own threads.
STORE_COLUMNS: list[tuple[str, int, Callable[[StoreRun, StoreLoad], str]]] = [
    ("config", 15, lambda run, _: run.label),
    ("load", 7, lambda _, load: load.result.stage),
    ("setting", 11, lambda _, load: load.result.setting),
    ("ok", 6, lambda _, load: str(load.result.n_ok)),
    ("err", 5, lambda _, load: str(sum(load.result.errors.values()))),
    ("per s", 7, lambda _, load: fmt(load.result.per_s)),
    ("p50 ms", 8, lambda _, load: fmt(load.result.latency.p50_ms, 2)),
    ("p99 ms", 8, lambda _, load: fmt(load.result.latency.p99_ms, 2)),
    ("rtr CPU%", 9, lambda _, load: fmt(load.result.cpu.server_pct)),
    ("loop%", 6, lambda _, load: fmt(load.result.cpu.server_loop_pct)),
    ("db CPU%", 8, lambda _, load: fmt(load.db_cpu_pct)),
    ("cli CPU%", 9, lambda _, load: fmt(load.result.cpu.client_pct)),
    ("other%", 7, lambda _, load: fmt(load.result.cpu.other_pct)),
    ("rtr us/op", 10, lambda _, load: fmt(load.result.cpu.server_us_per_op)),
    ("db us/op", 9, lambda _, load: fmt(load.db_us_per_op)),
]


def _align(column: int) -> str:
    """The first three columns (names) are left-aligned, the figures right-aligned."""
    return "<" if column < 3 else ">"


def print_stores(runs: Sequence[StoreRun], out: IO[str]) -> None:
    if not runs:
        return
    print("\nstores: Submit and e2e per store and router count (fresh store each)", file=out)
    for run in runs:
        if run.durability:
            print(f"  {run.label}: {run.durability}", file=out)
    print("".join(f"{h:{_align(i)}{w}}" for i, (h, w, _) in enumerate(STORE_COLUMNS)), file=out)
    loads = [(run, load) for run in runs for load in (run.submit, run.e2e) if load]
    for run, load in loads:
        cells = (
            f"{cell(run, load):{_align(i)}{w}}" for i, (_, w, cell) in enumerate(STORE_COLUMNS)
        )
        print("".join(cells), file=out)
    for run, load in loads:
        for error, count in load.result.errors.items():
            print(f"  {run.label} {load.result.stage}: {count} x {error}", file=out)


def print_ratios(ratios: Sequence[Ratio], out: IO[str]) -> None:
    if not ratios:
        return
    print(f"\n{'ratio (a figure, no goal)':<48}{'value':>7}  detail", file=out)
    for r in ratios:
        print(f"{r.name:<48}{fmt(r.value, 2):>7}  {r.detail}", file=out)


def print_celery(report: Report, out: IO[str]) -> None:
    if report.celery is None:
        print(f"\nCelery + Redis: not measured ({report.celery_note or 'skipped'})", file=out)
        return
    print(
        "\nCelery + Redis (no-op task; Redis without persistence, early acks: not durable)",
        file=out,
    )
    print(
        f"{'pool':<14}{'e2e tasks/s':>12}{'p50 @rate ms':>14}{'p99 @rate ms':>14}"
        f"{'apply_async p50 ms':>20}",
        file=out,
    )
    for p in report.celery.pools:
        print(
            f"{p.label:<14}{fmt(p.tasks_per_s):>12}{fmt(p.e2e_p50_ms, 2):>14}"
            f"{fmt(p.e2e_p99_ms, 2):>14}{fmt(p.submit_p50_ms, 3):>20}",
            file=out,
        )
    best = report.best_e2e()
    if best and report.rate:
        print(
            f"{'taskring':<14}{fmt(best.per_s):>12}{fmt(report.rate.latency.p50_ms, 2):>14}"
            f"{fmt(report.rate.latency.p99_ms, 2):>14}{'-':>20}",
            file=out,
        )
    for failure in report.celery.failures:
        print(f"  celery failure: {failure}", file=out)


def print_checks(checks: Sequence[Check], out: IO[str]) -> None:
    print(f"\n{'ratio':<42}{'value':>7}  {'goal':<7} result  detail", file=out)
    for c in checks:
        mark = {True: "PASS", False: "MISS", None: "N/A"}[c.passed]
        goal = f"{'>=' if c.at_least else '<='} {c.goal:g}"
        print(f"{c.name:<42}{fmt(c.value, 2):>7}  {goal:<7} {mark:<6}  {c.detail}", file=out)


def print_profiles(profiles: Mapping[str, HotSpots], out: IO[str]) -> None:
    for label, spots in profiles.items():
        print(f"\nserver hot spots during {label} (py-spy, {spots.samples} samples)", file=out)
        for kind, rows in (("self", spots.self_pct), ("total", spots.total_pct)):
            print(f"  {kind}:", file=out)
            for name, pct in rows:
                print(f"    {pct:5.1f}%  {name}", file=out)


def jsonable(value: Any) -> Any:
    """Dataclasses to dicts and NaN/inf to null, so the JSON line is strict JSON."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_json(report: Report) -> str:
    best = report.best_e2e()
    checks = [{**asdict(c), "passed": c.passed} for c in report.checks()]
    data = {
        "bench": "taskring_submit",
        **{
            k: getattr(report, k)
            for k in ("config", "environment", "echo", "submit", "e2e", "observability")
        },
        "e2e_best": best,
        "rate": report.rate,
        "stores": report.stores,
        "store_ratios": report.store_ratios(),
        "celery": report.celery,
        "celery_note": report.celery_note,
        "checks": checks,
        "profiles": report.profiles,
        "failure": report.failure,
    }
    return json.dumps(jsonable(data), allow_nan=False)
