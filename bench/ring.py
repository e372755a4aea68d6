"""Benchmark the hash ring and the balancer over it: balance, moves, affinity, time per call.

    python bench/ring.py [--keys N] [--vnodes V] [--requests R] [--json]

The ring: balance, keys moved on join and leave, stray moves, pick time.

The balancer (server/routing/balancer.py), 10 equal members serving one task type:

* zipf: R requests (200,000) whose keys are drawn Zipf(1.1) from the N keys (the hottest
  key is 13% of requests), with 200 in flight: 20 per member. Once 200 are in flight,
  each request first releases a random one of them, then acquires. Random completion
  rather than oldest first, because AI tasks vary widely in duration (a short embedding
  started after a long generation ends first), and a memoryless completion, every task in
  flight as likely to end next, models that; releasing the oldest instead gives the same
  figures within 0.1 point. max_concurrency is 200, the whole load, so it never refuses
  and the bound alone limits a member; "no bound" is the same balancer with
  load_factor=None, which is the plain ring: every request goes to its key's owner.
  Figures: peak max/mean load over the run (the mean is 20); the share of requests that
  reach their key's owner ("first choice"); of requests whose key was seen before, the
  share that land on a member that has served that key ("warm repeats": its prompt cache
  may hold it); and acquire + release in µs, the minimum over rounds of 2,000 requests of
  the same load (releasing the oldest there, so the harness costs only a deque's popleft
  and append).
* down: one member turns unhealthy on an idle balancer (each key acquired and released at
  once, so bounds play no part and this is routing alone), then recovers. Its keys, and
  only its keys, move (ideal: 1/n of them), and all come back.

Exits 1 if any figure misses its goal, so `make bench` and CI can gate on it.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import sys
import time
import timeit
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# When run as `python bench/ring.py` from the repo root, Python puts bench/ (not the root) on
# sys.path; put the root first so `server` imports without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.routing.balancer import DEFAULT_LOAD_FACTOR, Balancer, PoolMember
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

ZIPF_EXPONENT = 1.1
BALANCED_MEMBERS = 10
IN_FLIGHT_PER_MEMBER = 20
TASK_TYPE = "chat"
BOUNDED_MAX_LOAD_GOAL = DEFAULT_LOAD_FACTOR
FIRST_CHOICE_GOAL = 0.80
WARM_REPEATS_GOAL = 0.97
ACQUIRE_RELEASE_GOAL_US = 3.0
TIMED_REQUESTS = 2_000  # requests per timing round of the balancer: ~100 rounds of ~3 ms


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


# -- the balancer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZipfFigures:
    peak_max_over_mean: float
    first_choice: float
    warm_repeats: float


def zipf_stream(keys: Sequence[str], count: int) -> list[str]:
    """`count` keys drawn Zipf(ZIPF_EXPONENT) by rank: keys[0] is the hottest."""
    weights = itertools.accumulate(rank**-ZIPF_EXPONENT for rank in range(1, len(keys) + 1))
    return random.Random(SEED).choices(keys, cum_weights=list(weights), k=count)


def balancer(vnodes: int, load_factor: float | None) -> Balancer:
    in_flight = BALANCED_MEMBERS * IN_FLIGHT_PER_MEMBER
    # max_concurrency is the whole load in flight: it never refuses, so the bound (or
    # nothing, without one) is the only limit, and "no bound" is the plain ring.
    members = [
        PoolMember(f"backend-{i}", frozenset({TASK_TYPE}), max_concurrency=in_flight)
        for i in range(BALANCED_MEMBERS)
    ]
    return Balancer(members, load_factor=load_factor, vnodes_per_weight=vnodes)


def simulate(router: Balancer, stream: Sequence[str], owner_of: dict[str, str]) -> ZipfFigures:
    """Routes `stream` with IN_FLIGHT_PER_MEMBER per member in flight, random completions."""
    capacity = BALANCED_MEMBERS * IN_FLIGHT_PER_MEMBER
    completions = random.Random(SEED + 1)
    in_flight: list[str] = []
    load: Counter[str] = Counter()
    served: set[tuple[str, str]] = set()  # (key, member) pairs seen
    seen: set[str] = set()
    first = repeats = warm = 0
    peak = 0
    for key in stream:
        if len(in_flight) == capacity:
            # Swap a random task to the end and pop it: O(1), and the order is irrelevant.
            i = completions.randrange(capacity)
            in_flight[i], in_flight[-1] = in_flight[-1], in_flight[i]
            done = in_flight.pop()
            router.release(done)
            load[done] -= 1
        name = router.acquire(TASK_TYPE, key)
        if name is None:
            raise RuntimeError(f"no member took {key!r}: the bound refused work")
        in_flight.append(name)
        load[name] += 1
        first += name == owner_of[key]
        if key in seen:
            repeats += 1
            warm += (key, name) in served
        else:
            seen.add(key)
        served.add((key, name))
        if len(in_flight) == capacity:
            peak = max(peak, *load.values())
    if {s.name: s.load for s in router.snapshot()} != +load:
        raise RuntimeError("the balancer's loads disagree with the tasks in flight")
    return ZipfFigures(peak / IN_FLIGHT_PER_MEMBER, first / len(stream), warm / repeats)


def acquire_release_times_us(router: Balancer, stream: Sequence[str]) -> list[float]:
    """µs per acquire + release pair in the steady state, one figure per round."""
    capacity = BALANCED_MEMBERS * IN_FLIGHT_PER_MEMBER
    in_flight = deque(router.acquire(TASK_TYPE, key) for key in stream[:capacity])
    acquire, release = router.acquire, router.release

    def run(keys: Sequence[str]) -> None:
        for key in keys:
            release(in_flight.popleft())  # type: ignore[arg-type]  # never None: see simulate
            in_flight.append(acquire(TASK_TYPE, key))

    runs = []
    gc.disable()  # as timeit does for pick: a collection would land on one round's bill
    try:
        for start in range(capacity, len(stream) - TIMED_REQUESTS + 1, TIMED_REQUESTS):
            chunk = stream[start : start + TIMED_REQUESTS]
            started = time.perf_counter()
            run(chunk)
            runs.append((time.perf_counter() - started) / len(chunk) * 1e6)
    finally:
        gc.enable()
    return runs


def balancer_rows(keys: list[str], requests: int, vnodes: int) -> list[Row]:
    stream = zipf_stream(keys, requests)
    reference = HashRing(
        [Member(f"backend-{i}") for i in range(BALANCED_MEMBERS)], vnodes_per_weight=vnodes
    )
    owner_of = {key: reference.pick(key) for key in set(stream)}
    label = f"zipf c={DEFAULT_LOAD_FACTOR:g}"
    bounded = simulate(balancer(vnodes, DEFAULT_LOAD_FACTOR), stream, owner_of)
    plain = simulate(balancer(vnodes, None), stream, owner_of)
    runs = acquire_release_times_us(balancer(vnodes, DEFAULT_LOAD_FACTOR), stream)
    fastest = min(runs)
    rows = [
        Row(
            label,
            "max/mean load",
            bounded.peak_max_over_mean,
            f"<= {BOUNDED_MAX_LOAD_GOAL:.2f}",
            bounded.peak_max_over_mean <= BOUNDED_MAX_LOAD_GOAL,
        ),
        Row(
            label,
            "first choice",
            bounded.first_choice,
            f">= {FIRST_CHOICE_GOAL:.2f}",
            bounded.first_choice >= FIRST_CHOICE_GOAL,
        ),
        Row(
            label,
            "warm repeats",
            bounded.warm_repeats,
            f">= {WARM_REPEATS_GOAL:.2f}",
            bounded.warm_repeats >= WARM_REPEATS_GOAL,
        ),
        Row(
            label,
            "acq+rel µs (min)",
            fastest,
            f"<= {ACQUIRE_RELEASE_GOAL_US:.2f}",
            fastest <= ACQUIRE_RELEASE_GOAL_US,
        ),
        Row(label, "acq+rel µs (med.)", statistics.median(runs), "none", None),
        Row("zipf no bound", "max/mean load", plain.peak_max_over_mean, "none", None),
        Row("zipf no bound", "first choice", plain.first_choice, "none", None),
        Row("zipf no bound", "warm repeats", plain.warm_repeats, "none", None),
    ]
    return rows + unhealthy_rows(keys, vnodes)


def unhealthy_rows(keys: list[str], vnodes: int) -> list[Row]:
    router = balancer(vnodes, DEFAULT_LOAD_FACTOR)
    victim = "backend-3"

    def placement() -> list[str | None]:
        placed = []
        for key in keys:
            name = router.acquire(TASK_TYPE, key)
            if name is not None:
                router.release(name)
            placed.append(name)
        return placed

    before = placement()
    router.set_healthy(victim, False)
    during = placement()
    router.set_healthy(victim, True)
    after = placement()

    moves = [old for old, new in zip(before, during, strict=True) if old != new]
    ratio = len(moves) / (len(keys) / BALANCED_MEMBERS)
    stray = sum(1 for old in moves if old != victim)
    owned = [i for i, old in enumerate(before) if old == victim]
    returned = sum(1 for i in owned if after[i] == victim) / len(owned)
    label = f"1 of {BALANCED_MEMBERS} down"
    goal = f"1.00 ± {MOVE_TOLERANCE:.2f}"
    return [
        Row(label, "moved/ideal", ratio, goal, abs(ratio - 1) <= MOVE_TOLERANCE),
        Row(label, "stray moves", stray, "0", stray == 0),
        Row(label, "share returned", returned, "1.00", returned == 1),
    ]


def print_table(rows: list[Row], key_count: int, vnodes: int, requests: int) -> None:
    print(f"hash ring: {key_count:,} keys, vnodes_per_weight={vnodes}, hash=BLAKE2b")
    print(
        f"balancer: {requests:,} requests, keys Zipf({ZIPF_EXPONENT}) over the ring's keys, "
        f"{BALANCED_MEMBERS} members, {IN_FLIGHT_PER_MEMBER} tasks in flight per member"
    )
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
    parser.add_argument(
        "--requests", type=int, default=200_000, help="requests the balancer routes (200000)"
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
    rows += balancer_rows(keys, args.requests, args.vnodes)
    if args.json:
        report = {
            "keys": args.keys,
            "vnodes_per_weight": args.vnodes,
            "requests": args.requests,
            "rows": rows,
        }
        print(json.dumps(report, default=asdict, indent=2, ensure_ascii=False))
    else:
        print_table(rows, args.keys, args.vnodes, args.requests)
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
