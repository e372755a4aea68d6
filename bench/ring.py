"""Benchmark the hash ring: balance, keys moved on join and leave, stray moves, pick time.

    python bench/ring.py [--keys N] [--vnodes V] [--json]

Exits 1 if any figure misses its goal, so `make bench` and CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import timeit
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# When run as `python bench/ring.py` from the repo root, Python puts bench/ (not the root) on
# sys.path; put the root first so `server` imports without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.routing.ring import (
    DEFAULT_VNODES_PER_WEIGHT,
    HashRing,
    Member,
)

SEED = 20240601
TIMED_KEYS = 5_000  # keys per timing run; the minimum of TIMING_ROUNDS runs is reported
TIMING_ROUNDS = 40
PICK_GOAL_US = 1.0
MOVE_TOLERANCE = 0.10
JOINER = Member("backend-joining")


@dataclass(frozen=True, slots=True)
class Scenario:
    label: str
    members: tuple[Member, ...]
    max_load_goal: float | None  # max over members of actual share / expected share


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    metric: str
    value: float
    goal: str
    passed: bool | None  # None: printed for information, no goal


def scenarios() -> list[Scenario]:
    def equal(n: int) -> tuple[Member, ...]:
        return tuple(Member(f"backend-{i}") for i in range(n))

    return [
        Scenario("3 equal", equal(3), None),
        Scenario("10 equal", equal(10), 1.06),
        Scenario("50 equal", equal(50), 1.10),
        Scenario(
            "3 weights 1:2:4",
            (Member("backend-0", 1), Member("backend-1", 2), Member("backend-2", 4)),
            1.05,
        ),
    ]


def make_keys(count: int) -> list[str]:
    """Task-id-like keys (UUIDs) from a seeded generator, so every run sees the same keys."""
    rng = random.Random(SEED)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def owners(ring: HashRing, keys: Sequence[str]) -> list[str]:
    pick = ring.pick
    return [pick(key) for key in keys]


def moved(before: list[str], after: list[str], changed: str) -> tuple[float, float]:
    """(share of keys whose owner changed, share that moved between two unchanged members)."""
    moves = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    stray = sum(1 for a, b in moves if changed not in (a, b))
    return len(moves) / len(before), stray / len(before)


def pick_times_us(rings: dict[str, HashRing], keys: Sequence[str]) -> dict[str, list[float]]:
    """µs per pick of each ring, one run per ring per round.

    Round-robin, so a burst of load elsewhere on the machine slows one run of every ring
    rather than every run of one; the minimum is the machine's speed, as timeit advises.
    """
    timers = {
        label: timeit.Timer("for key in keys: pick(key)", globals={"keys": keys, "pick": r.pick})
        for label, r in rings.items()
    }
    runs: dict[str, list[float]] = {label: [] for label in rings}
    for _ in range(TIMING_ROUNDS):
        for label, timer in timers.items():
            runs[label].append(timer.timeit(number=1) / len(keys) * 1e6)
    return runs


def measure(scenario: Scenario, keys: list[str], vnodes: int) -> tuple[HashRing, list[Row]]:
    """The ring, and every figure but the pick time."""
    label = scenario.label
    started = time.perf_counter()
    ring = HashRing(scenario.members, vnodes_per_weight=vnodes)
    build_ms = (time.perf_counter() - started) * 1e3
    rows = [Row(label, "build ms", build_ms, "< 1000", build_ms < 1000)]

    base = owners(ring, keys)
    total_weight = sum(m.weight for m in scenario.members)
    counts = Counter(base)
    load = max(counts[m.name] / len(keys) / (m.weight / total_weight) for m in scenario.members)
    goal = scenario.max_load_goal
    rows.append(
        Row(
            label,
            "max/mean load",
            load,
            "none" if goal is None else f"<= {goal:.2f}",
            None if goal is None else load <= goal,
        )
    )

    def movement(metric: str, fraction: float, ideal: float) -> Row:
        ratio = fraction / ideal
        goal = f"1.00 ± {MOVE_TOLERANCE:.2f}"
        return Row(label, metric, ratio, goal, abs(ratio - 1) <= MOVE_TOLERANCE)

    joined = ring.with_member(JOINER)
    join_moved, join_stray = moved(base, owners(joined, keys), JOINER.name)
    rows.append(
        movement("join moved/ideal", join_moved, JOINER.weight / (total_weight + JOINER.weight))
    )
    leaver = scenario.members[0]
    left = ring.without_member(leaver.name)
    leave_moved, leave_stray = moved(base, owners(left, keys), leaver.name)
    rows.append(movement("leave moved/ideal", leave_moved, leaver.weight / total_weight))
    stray = join_stray + leave_stray
    rows.append(Row(label, "stray moves", stray, "0", stray == 0))
    return ring, rows


def timing_rows(label: str, runs: list[float]) -> list[Row]:
    fastest, median = min(runs), statistics.median(runs)
    return [
        Row(label, "pick µs (min)", fastest, f"<= {PICK_GOAL_US:.2f}", fastest <= PICK_GOAL_US),
        Row(label, "pick µs (median)", median, "none", None),
    ]


def print_table(rows: list[Row], key_count: int, vnodes: int) -> None:
    print(f"hash ring: {key_count:,} keys, vnodes_per_weight={vnodes}, hash=BLAKE2b")
    print(f"{'scenario':<16} {'metric':<18} {'value':>9}  {'goal':<12} result")
    for row in rows:
        result = "-" if row.passed is None else ("PASS" if row.passed else "FAIL")
        print(f"{row.scenario:<16} {row.metric:<18} {row.value:>9.3f}  {row.goal:<12} {result}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000, help="keys to route (100000)")
    parser.add_argument(
        "--vnodes",
        type=int,
        default=DEFAULT_VNODES_PER_WEIGHT,
        help=f"points per unit of weight ({DEFAULT_VNODES_PER_WEIGHT}, the ring's default)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    keys = make_keys(args.keys)
    measured = {s.label: measure(s, keys, args.vnodes) for s in scenarios()}
    runs = pick_times_us({label: ring for label, (ring, _) in measured.items()}, keys[:TIMED_KEYS])
    rows = [
        row
        for label, (_, figures) in measured.items()
        for row in [*figures, *timing_rows(label, runs[label])]
    ]
    if args.json:
        report = {"keys": args.keys, "vnodes_per_weight": args.vnodes, "rows": rows}
        print(json.dumps(report, default=asdict, indent=2, ensure_ascii=False))
    else:
        print_table(rows, args.keys, args.vnodes)
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
