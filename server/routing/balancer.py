"""Which member runs a task now: a hash ring per task type, bounded loads, health and holds.

Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018; what
Vimeo added to HAProxy as hash-balance-factor): a task walks clockwise from its key on its
type's ring, and no member takes it at or above its bound

    bound_i = ceil(c * (T + 1) * w_i / W)

where c is the load factor, T the tasks in flight on the pool's available members, w_i the
member's weight and W the pool's available weight. No member ever carries more than c
times its share, keys stay on their owner while it has room (prompt caches stay warm), and
a hot key spills over onto its successors instead of burying its owner.

Own keys and guests. The key's home (its owner, or the first available member after it)
takes the task below its bound; a member further along the walk takes it as a guest only
below its mean share, ceil((T + 1) * w_i / W), and only when none will does the walk run
again with the bound. So a member spends the headroom between its mean and its bound on
its own keys, not on a neighbour's overflow. Plain bounded loads fill the hot key's
successor to its bound, which then spills its own keys to the next member, and so on down
the chain. Under bench/ring.py's Zipf load (seed 20240601, then seeds 1-6), plain bounded
loads sent 81% (70-81%) of tasks to their key's owner, and this rule 87% (78-86%; the
low end is a seed that puts the two hottest keys on one member, whose excess must go
elsewhere); repeats landed on a member that had served their key as often or more:
97.7% (97.5-97.9%) against 97.8% (97.9-98.2%).

With three equal members, c = 1.25 and every task on key k owned by a (walk: a, b, c),
the tasks go a b a b a c b a: at T = 5, a is at its bound ceil(1.25 * 6 / 3) = 3 and b at
its mean 6 / 3 = 2, so c, the next member below its mean, takes the task; at T = 6, b is
below its mean 7 / 3 and takes it.

The rules never refuse work by themselves: bounds and means each sum to at least T + 1 > T
over the available members, so some member is below its mean (or the key's home below its
bound). Only max_concurrency and availability make acquire() return None.

One load per member, across types. A member that serves "chat" and "embed" is in both
pools, and its load counts all its tasks, because that is what its backend feels. T of a
pool is the sum of its available members' loads (tasks of any type), and W their weights,
so each pool compares like with like: embedding work on a shared member makes it take
fewer chats, and the chat-only members take more. (A total over every member would refuse
a small pool's members whenever other pools are quiet; a total of one type's tasks would
compare a member's whole load with part of it.)

Availability. A member that is unhealthy (failed health checks, open circuit), draining
(takes no new work; what runs finishes) or held (a 429's retry-after) is skipped by the
walk, so only its keys move, each to the member after it (now their home), and they all
come back when it recovers. Its load is left out of T and W while it is unavailable, and
still counts for release().

Single-threaded: the dispatcher's event loop calls everything, so there are no locks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from itertools import chain, islice

from server.clock import Clock, SystemClock
from server.routing.ring import (
    DEFAULT_VNODES_PER_WEIGHT,
    HashFunction,
    HashRing,
    Member,
    default_hash,
)

DEFAULT_LOAD_FACTOR = 1.25
"""c: no member above 1.25 times its share. Lower spreads more evenly but sends more tasks
past their key's owner, where its cache is cold. Under bench/ring.py's Zipf load, c = 1.1,
1.25, 1.5 and 2 send 76%, 87%, 93% and 99% of tasks to the owner, and 95.3%, 97.8%, 99.1%
and 99.8% of repeats to a member that has served their key."""

_LOAD_FACTOR_DENOMINATOR_LIMIT = 1000
"""c is kept as a fraction with a denominator up to this (1.1 is 11/10, not the binary
float's 2476979795053773/2251799813685248), so the bound test is exact integer arithmetic
on small ints."""


@dataclass(frozen=True, slots=True)
class PoolMember:
    """A backend the balancer may route to: the task types it serves, its capacity and its
    weight (a member of weight 2 gets twice the keys and twice the bound)."""

    name: str
    task_types: frozenset[str]
    max_concurrency: int
    weight: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("member name must be a non-empty string")
        if not isinstance(self.task_types, frozenset):
            # A bare str would be taken as its letters; a set would be mutable.
            raise TypeError(
                f"member {self.name!r}: task_types must be a frozenset, "
                f"got {type(self.task_types).__name__}"
            )
        if not self.task_types or not all(self.task_types):
            raise ValueError(
                f"member {self.name!r}: task_types must be non-empty names, "
                f"got {sorted(self.task_types)}"
            )
        if self.max_concurrency < 1:
            raise ValueError(
                f"member {self.name!r}: max_concurrency must be >= 1, got {self.max_concurrency}"
            )
        if self.weight < 1:
            raise ValueError(f"member {self.name!r}: weight must be >= 1, got {self.weight}")


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One member as operators see it (Balancer.snapshot())."""

    name: str
    weight: int
    max_concurrency: int
    task_types: frozenset[str]
    load: int  # tasks in flight, all types
    healthy: bool
    draining: bool
    held_until: float | None  # clock time a 429 hold ends; None when not held
    available: bool  # healthy, not draining, not held, not removed: takes new work
    removed: bool  # out of every ring; listed until its last task is released


class _Pool:
    """The members that serve one task type: their ring and their summed load and weight."""

    __slots__ = ("guest_den", "home_den", "load", "ring")

    def __init__(self, ring: HashRing) -> None:
        self.ring = ring
        # T: tasks in flight, of any type, on the pool's available members.
        self.load = 0
        # W * c.denominator and W, W summed over the available members: the left-hand
        # factors of the bound and mean tests (see _State). Both 0 when loads are unbounded,
        # so that `load * 0 < (T + 1) * w_i` always holds.
        self.home_den = 0
        self.guest_den = 0


class _State:
    """A member's mutable state; one object per member, shared by all its pools."""

    __slots__ = (
        "available",
        "cap",
        "draining",
        "guest_num",
        "healthy",
        "held_until",
        "home_num",
        "load",
        "pools",
        "removed",
        "spec",
    )

    def __init__(self, spec: PoolMember, healthy: bool) -> None:
        self.spec = spec
        self.load = 0
        self.healthy = healthy
        self.draining = False
        self.held_until: float | None = None
        self.removed = False
        # The pools whose load and weight include this member's, while it is available.
        self.pools: tuple[_Pool, ...] = ()
        # Starts False with cap 0 and no pools: _refresh() makes it available, and counts it
        # into its pools, in one place.
        self.available = False
        # max_concurrency while available, else 0: one comparison tests both.
        self.cap = 0
        # For integer loads the tests are exact in integers:
        #   load < bound_i  <=>  load < c * (T + 1) * w_i / W
        #                   <=>  load * (W * c.den) < (T + 1) * (w_i * c.num)
        #   load < mean_i   <=>  load * W < (T + 1) * w_i
        # home_num = w_i * c.num and guest_num = w_i; set by Balancer.add().
        self.home_num = 0
        self.guest_num = 0


class Balancer:
    """Routes a task to a member of its type's pool: consistent hashing with bounded loads,
    skipping members that are unhealthy, draining or held."""

    __slots__ = (
        "_c_den",
        "_c_num",
        "_clock",
        "_departed",
        "_hash_fn",
        "_holds",
        "_load_factor",
        "_mean_den",
        "_next_expiry",
        "_pools",
        "_states",
        "_vnodes_per_weight",
    )

    def __init__(
        self,
        members: Iterable[PoolMember] = (),
        *,
        load_factor: float | None = DEFAULT_LOAD_FACTOR,
        clock: Clock | None = None,
        vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT,
        hash_fn: HashFunction = default_hash,
    ) -> None:
        """`load_factor` is c (>= 1); None turns bounds (and means) off: each task goes to
        the first available member with a free slot, as the plain ring would. `clock` reads
        the time holds end at (the system clock unless given)."""
        if load_factor is None:
            # The pools' left-hand factors are then 0 (see _Pool), and every test passes.
            self._c_num, self._c_den, self._mean_den = 1, 0, 0
        else:
            if not (math.isfinite(load_factor) and load_factor >= 1):
                # Below 1 the bounds can sum to less than T + 1 and refuse work every
                # member has room for.
                raise ValueError(f"load_factor must be a finite number >= 1, got {load_factor}")
            c = Fraction(load_factor).limit_denominator(_LOAD_FACTOR_DENOMINATOR_LIMIT)
            self._c_num, self._c_den, self._mean_den = c.numerator, c.denominator, 1
        if vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be >= 1, got {vnodes_per_weight}")
        self._load_factor = load_factor
        self._clock: Clock = clock or SystemClock()
        self._vnodes_per_weight = vnodes_per_weight
        self._hash_fn = hash_fn
        self._pools: dict[str, _Pool] = {}
        self._states: dict[str, _State] = {}
        # Removed members that still have tasks in flight, so their releases still count.
        self._departed: dict[str, _State] = {}
        # Held member -> when its hold ends, and the earliest of those: acquire() reads the
        # clock only while some hold exists, and expires holds only once one is due.
        self._holds: dict[str, float] = {}
        self._next_expiry = math.inf
        # Each type's ring built once: add() one by one would rebuild it per member.
        given = tuple(members)
        by_type: dict[str, list[Member]] = {}
        for member in given:
            if member.name in self._states:
                raise ValueError(f"duplicate member name {member.name!r}")
            self._states[member.name] = _State(member, healthy=True)
            for task_type in member.task_types:
                by_type.setdefault(task_type, []).append(Member(member.name, member.weight))
        for task_type, ring_members in by_type.items():
            membership = frozenset((m.name, m.weight) for m in ring_members)
            ring = self._shared_ring(membership, partial(self._new_ring, ring_members))
            self._pools[task_type] = _Pool(ring)
        for member in given:
            self._join(self._states[member.name], member)

    # -- routing: the hot path -------------------------------------------------------------

    def acquire(self, task_type: str, key: str | bytes, attempt: int = 0) -> str | None:
        """Reserves a slot for a task and names its member; None if no member can take it now.

        Walks `task_type`'s ring clockwise from `key`. Attempt n starts at the n-th distinct
        member of the pool (wrapping), so a retry goes to the successor of the member that
        just failed rather than back to it; `attempt` is how many attempts ran before. The
        first available member with a free slot takes the task below its bound, the others
        below their mean (see the module docstring). A type that no member serves gets
        None, like a full pool: its tasks wait until a member that serves it is added.
        """
        pool = self._pools.get(task_type)
        if pool is None:
            return None
        if self._holds and self._clock.now() >= self._next_expiry:  # _expire_due_holds()
            self._expire_holds()
        if attempt:
            if attempt < 0:
                raise ValueError(f"attempt must be >= 0, got {attempt}")
            return self._acquire_by_walking(pool, key, attempt)
        # The common case: _acquire_by_walking's loop over the ring's precomputed walk head
        # (owner and the two after it), with no generator, set or list per call, and
        # without its last resort. Under bench/ring.py's Zipf load 98% of tasks stop here.
        states = self._states
        total = pool.load + 1
        homed = False
        for name in pool.ring.walk_head(key):
            state = states[name]
            load = state.load
            if load < state.cap and (
                load * pool.guest_den < total * state.guest_num
                if homed
                else load * pool.home_den < total * state.home_num
            ):
                _take(state)
                return name
            homed = homed or state.cap > 0
        return self._acquire_by_walking(pool, key, 0)

    def _acquire_by_walking(self, pool: _Pool, key: str | bytes, attempt: int) -> str | None:
        """acquire() the long way: retries, and keys whose walk head is full or out."""
        walk = pool.ring.walk(key)
        # Attempt n starts at the n-th member: the n skipped ones come last.
        skipped = list(islice(walk, attempt % len(pool.ring)))
        if attempt:
            # A retry: getting away from the member that just failed it comes first, and
            # balance second (retries are few). Under the bound, a busy successor could
            # otherwise send the task straight back to the failing member.
            for name in chain(walk, skipped):
                state = self._states[name]
                if state.load < state.cap:  # cap is 0 while the member is unavailable
                    _take(state)
                    return name
            return None
        total = pool.load + 1
        homed = False  # passed the key's home: the first available member
        guests: list[_State] = []  # members past it that were at their mean
        for name in chain(walk, skipped):
            state = self._states[name]
            load = state.load
            if not state.cap:
                continue  # unavailable: as if it were not on the ring
            if not homed:
                homed = True
                if load < state.cap and load * pool.home_den < total * state.home_num:
                    _take(state)
                    return name
            elif load < state.cap and load * pool.guest_den < total * state.guest_num:
                _take(state)
                return name
            else:
                guests.append(state)
        # The last resort: every member but the home is at its mean (or full), so take the
        # first below its bound, as plain bounded loads would.
        for state in guests:
            load = state.load
            if load < state.cap and load * pool.home_den < total * state.home_num:
                _take(state)
                return state.spec.name
        return None

    def release(self, name: str) -> None:
        """Gives back a slot acquire() reserved on `name`: its task finished or never ran.

        Counts for members that became unavailable or were removed since the task started.
        """
        state = self._states.get(name)
        if state is None:
            state = self._departed.get(name)
            if state is None:
                raise KeyError(f"release of unknown member {name!r}")
        if state.load == 0:
            raise ValueError(f"release of {name!r}, which has no task in flight")
        state.load -= 1
        if state.available:
            for pool in state.pools:
                pool.load -= 1
        elif state.removed and state.load == 0:
            del self._departed[name]

    # -- availability ------------------------------------------------------------------------

    def set_healthy(self, name: str, healthy: bool) -> None:
        """Marks `name` healthy or not (health checks, circuit breaker)."""
        state = self._state(name)
        state.healthy = healthy
        self._refresh(state)

    def drain(self, name: str) -> None:
        """`name` takes no new tasks; those in flight run on and are released as usual."""
        state = self._state(name)
        state.draining = True
        self._refresh(state)

    def undrain(self, name: str) -> None:
        """`name` takes new tasks again after drain()."""
        state = self._state(name)
        state.draining = False
        self._refresh(state)

    def hold(self, name: str, until: float) -> None:
        """`name` takes no new tasks until clock time `until` (a 429's retry-after).

        A hold only grows: of two overlapping retry-afters the later one wins, so the
        backend is not called before either asked. A time already past changes nothing.
        """
        state = self._state(name)
        if not math.isfinite(until):
            raise ValueError(f"hold of {name!r}: until must be a finite time, got {until}")
        if until <= self._clock.now() or (
            state.held_until is not None and until <= state.held_until
        ):
            return
        state.held_until = until
        self._holds[name] = until
        self._next_expiry = min(self._next_expiry, until)
        self._refresh(state)

    @property
    def next_hold_expiry(self) -> float | None:
        """When the earliest hold ends (clock time), so a waiting caller knows when a member
        may take work again; None when no member is held."""
        return min(self._holds.values(), default=None)

    def _expire_due_holds(self) -> None:
        """Ends holds that are over; cheap when none is (acquire() inlines it)."""
        if self._holds and self._clock.now() >= self._next_expiry:
            self._expire_holds()

    def _expire_holds(self) -> None:
        now = self._clock.now()
        for name, until in list(self._holds.items()):
            if until <= now:
                del self._holds[name]
                state = self._states[name]
                state.held_until = None
                self._refresh(state)
        self._next_expiry = min(self._holds.values(), default=math.inf)

    def _refresh(self, state: _State) -> None:
        """Recomputes whether `state` takes new work; counts it in or out of its pools."""
        available = (
            state.healthy and not state.draining and state.held_until is None and not state.removed
        )
        if available != state.available:
            self._count_in_pools(state, 1 if available else -1)
            state.available = available
            state.cap = state.spec.max_concurrency if available else 0

    def _count_in_pools(self, state: _State, sign: int) -> None:
        weight = state.spec.weight
        for pool in state.pools:
            pool.load += sign * state.load
            pool.home_den += sign * weight * self._c_den
            pool.guest_den += sign * weight * self._mean_den

    # -- membership ----------------------------------------------------------------------------

    def add(self, member: PoolMember, *, healthy: bool = True) -> None:
        """Adds `member`, or updates the member of that name (its load, health, drain and
        hold carry over; `healthy` applies only to a new member). Only the rings of the
        types it joins, leaves or changes weight in are rebuilt; the others are untouched."""
        state = self._states.get(member.name)
        if state is None:
            state = _State(member, healthy)
            departed = self._departed.pop(member.name, None)
            if departed is not None:
                # Re-added while tasks from before its removal still run: the backend is
                # still running them, so they are its load.
                state.load = departed.load
            self._states[member.name] = state
            old_types: frozenset[str] = frozenset()
            old_weight = 0
        else:
            old_types, old_weight = state.spec.task_types, state.spec.weight
        if state.available:
            # Out of its old pools at its old weight; _join() counts it into the new ones.
            self._count_in_pools(state, -1)
            state.available = False
        ring_member = Member(member.name, member.weight)
        for task_type in old_types - member.task_types:
            self._leave(task_type, member.name)
        entry = (member.name, member.weight)
        for task_type in member.task_types:
            pool = self._pools.get(task_type)
            if pool is None:
                ring = self._shared_ring(frozenset({entry}), lambda: self._new_ring([ring_member]))
                self._pools[task_type] = _Pool(ring)
            elif task_type not in old_types or member.weight != old_weight:
                old = pool.ring
                membership = _membership(old) - {(member.name, old_weight)} | {entry}
                pool.ring = self._shared_ring(membership, partial(old.with_member, ring_member))
        self._join(state, member)

    def _join(self, state: _State, member: PoolMember) -> None:
        """Makes `member` the spec of `state` (not counted in any pool), whose type rings
        already include it, and counts it into their pools if it is available."""
        state.spec = member
        state.home_num = member.weight * self._c_num
        state.guest_num = member.weight
        state.pools = tuple(self._pools[t] for t in sorted(member.task_types))
        state.cap = 0
        self._refresh(state)

    def remove(self, name: str) -> None:
        """Takes `name` out of every ring: its keys move to their next members, and only
        they do. Its tasks in flight run on; release() still accepts them."""
        state = self._state(name)
        state.removed = True
        self._refresh(state)
        for task_type in state.spec.task_types:
            self._leave(task_type, name)
        state.pools = ()
        del self._states[name]
        self._holds.pop(name, None)
        state.held_until = None
        if state.load:
            self._departed[name] = state

    def _leave(self, task_type: str, name: str) -> None:
        pool = self._pools[task_type]
        if len(pool.ring) == 1:
            del self._pools[task_type]  # nobody serves the type: acquire() returns None
        else:
            old = pool.ring
            membership = frozenset(e for e in _membership(old) if e[0] != name)
            pool.ring = self._shared_ring(membership, partial(old.without_member, name))

    def _new_ring(self, members: list[Member]) -> HashRing:
        return HashRing(members, vnodes_per_weight=self._vnodes_per_weight, hash_fn=self._hash_fn)

    def _shared_ring(
        self, membership: frozenset[tuple[str, int]], build: Callable[[], HashRing]
    ) -> HashRing:
        """The ring of a pool with this membership if one exists, else `build()`: types
        served by the same members share one immutable ring (each costs ~20 ms and
        megabytes to build), while each pool keeps its own loads."""
        for pool in self._pools.values():
            if _membership(pool.ring) == membership:
                return pool.ring
        return build()

    def _state(self, name: str) -> _State:
        state = self._states.get(name)
        if state is None:
            raise KeyError(f"no member named {name!r}")
        return state

    # -- introspection -------------------------------------------------------------------------

    @property
    def load_factor(self) -> float | None:
        """c, or None when loads are not bounded."""
        return self._load_factor

    @property
    def task_types(self) -> frozenset[str]:
        """The types some member serves."""
        return frozenset(self._pools)

    def free_slots(self) -> int:
        """Tasks the available members could start now, by max_concurrency alone."""
        self._expire_due_holds()
        return sum(max(0, s.cap - s.load) for s in self._states.values())

    def types_with_room(self) -> frozenset[str]:
        """Types some available member has a free slot for: acquire() of any other returns
        None, whatever the key. (The bound alone never refuses; see the module docstring.)"""
        self._expire_due_holds()
        return frozenset(
            task_type
            for state in self._states.values()
            if state.load < state.cap
            for task_type in state.spec.task_types
        )

    def snapshot(self) -> tuple[MemberStatus, ...]:
        """Every member, then removed members with tasks still in flight, by name."""
        self._expire_due_holds()
        return tuple(
            _status(state)
            for states in (self._states, self._departed)
            for state in sorted(states.values(), key=_name)
        )


def _take(state: _State) -> None:
    """Counts one more task on `state`, in its load and in every pool it is in."""
    state.load += 1
    for pool in state.pools:
        pool.load += 1


def _membership(ring: HashRing) -> frozenset[tuple[str, int]]:
    return frozenset((m.name, m.weight) for m in ring.members)


def _name(state: _State) -> str:
    return state.spec.name


def _status(state: _State) -> MemberStatus:
    spec = state.spec
    return MemberStatus(
        name=spec.name,
        weight=spec.weight,
        max_concurrency=spec.max_concurrency,
        task_types=spec.task_types,
        load=state.load,
        healthy=state.healthy,
        draining=state.draining,
        held_until=state.held_until,
        available=state.available,
        removed=state.removed,
    )
