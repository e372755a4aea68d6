"""The balancer: owners keep their keys, bounded loads, health, holds, per-type pools, moves."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial

import pytest

from server.clock import ManualClock
from server.routing.balancer import Balancer, MemberStatus, PoolMember
from server.routing.ring import HashRing, Member
from tests.unit.test_ring import HAND

# The hand ring of test_ring.py (see its POINTS): with vnodes_per_weight=2 a key's hash is
# the number it spells.
hand_hash = HAND


CHAT = frozenset({"chat"})
EMBED = frozenset({"embed"})


def member(name: str, types: frozenset[str] = CHAT, cap: int = 100, weight: int = 1) -> PoolMember:
    return PoolMember(name, types, max_concurrency=cap, weight=weight)


def hand_balancer(
    *members: PoolMember, load_factor: float | None = 1.25, clock: ManualClock | None = None
) -> Balancer:
    return Balancer(
        members, load_factor=load_factor, clock=clock, vnodes_per_weight=2, hash_fn=hand_hash
    )


ABC = (member("a"), member("b"), member("c"))

# Spread-out keys for the statistical tests; 200 points per member keep rings quick to build.
_rng = random.Random(7)
KEYS = [f"task-{_rng.getrandbits(64):016x}" for _ in range(3000)]
NAMES = [f"backend-{i}" for i in range(10)]


def ten(clock: ManualClock | None = None) -> Balancer:
    return Balancer([member(n) for n in NAMES], clock=clock, vnodes_per_weight=200)


def placement(balancer: Balancer, keys: Iterable[str], task_type: str = "chat") -> list[str | None]:
    """Where each key goes on an idle balancer (acquired, then released at once)."""
    placed: list[str | None] = []
    for key in keys:
        name = balancer.acquire(task_type, key)
        placed.append(name)
        if name is not None:
            balancer.release(name)
    return placed


def loads(balancer: Balancer) -> dict[str, int]:
    return {s.name: s.load for s in balancer.snapshot()}


def test_the_ring_walk_head_is_the_start_of_its_walk() -> None:
    """walk_head, which acquire() reads instead of walking, names walk()'s first members."""
    ring = HashRing([Member(n) for n in NAMES], vnodes_per_weight=200)
    for key in KEYS[:1000]:
        assert ring.walk_head(key) == tuple(list(ring.walk(key))[:3])
    hand = HashRing([Member("a"), Member("b"), Member("c")], vnodes_per_weight=2, hash_fn=hand_hash)
    assert hand.walk_head("85") == ("c", "a", "b")  # 90 c, wraps: 10 a, 30 b
    assert hand.without_member("c").walk_head("85") == ("a", "b")
    assert hand.without_member("c").without_member("b").walk_head("85") == ("a",)


def test_a_key_goes_to_its_owner_and_stays_there() -> None:
    """While membership is stable and members have room, a key always lands on its owner."""
    balancer = hand_balancer(*ABC)

    assert placement(balancer, ["5", "45", "45", "85", "91"]) == ["a", "a", "a", "c", "a"]
    ring = HashRing([Member(n) for n in NAMES], vnodes_per_weight=200)
    assert placement(ten(), KEYS) == [ring.pick(k) for k in KEYS]


def test_rings_built_at_once_or_member_by_member_route_alike() -> None:
    """A member's points are the same in every ring: the constructor's rings, rings grown
    by add(), and the rings of two types with the same members all place keys alike."""
    both = CHAT | EMBED
    at_once = Balancer([member(n, both) for n in NAMES], vnodes_per_weight=200)
    one_by_one = Balancer(vnodes_per_weight=200)
    for name in NAMES:
        one_by_one.add(member(name, both))

    chat = placement(at_once, KEYS[:500])
    assert placement(at_once, KEYS[:500], "embed") == chat
    assert placement(one_by_one, KEYS[:500]) == chat


def test_attempt_n_starts_at_the_nth_member_clockwise() -> None:
    """A retry goes to the owner's successor, not back to the member that just failed."""
    balancer = hand_balancer(*ABC)  # from 45: 50 a, 70 b, 90 c

    assert [balancer.acquire("chat", "45", attempt) for attempt in range(5)] == [
        "a",
        "b",
        "c",
        "a",  # wraps around the pool
        "b",
    ]


def test_max_concurrency_is_respected_and_none_when_every_member_is_full() -> None:
    """A full member passes its keys to the next; when all are full the task waits."""
    balancer = hand_balancer(member("a", cap=2), member("b", cap=1), load_factor=None)

    assert [balancer.acquire("chat", "45") for _ in range(4)] == ["a", "a", "b", None]
    balancer.release("a")
    assert balancer.acquire("chat", "45") == "a"
    assert balancer.acquire("chat", "45", attempt=1) is None


def test_bounded_loads_by_hand() -> None:
    """c = 1.25, three equal members, one hot key (walk a, b, c): a, its home, takes tasks
    below its bound ceil(1.25 * (T + 1) / 3); b and c take the overflow as guests, below
    their mean (T + 1) / 3, which keeps their headroom for their own keys."""
    balancer = hand_balancer(*ABC)

    assert [balancer.acquire("chat", "45") for _ in range(8)] == [
        "a",  # T=0: a 0 < bound 1
        "b",  # T=1: a 1 = bound 1; b 0 < mean 0.67
        "a",  # T=2: a 1 < bound 2
        "b",  # T=3: a 2 = bound 2; b 1 < mean 1.33
        "a",  # T=4: a 2 < bound 3
        "c",  # T=5: a 3 = bound 3; b 2 = mean 2 (its bound would still take it); c 0 < 2
        "b",  # T=6: a 3 = bound 3; b 2 < mean 2.33
        "a",  # T=7: a 3 < bound 4
    ]
    assert loads(balancer) == {"a": 4, "b": 3, "c": 1}
    assert hand_balancer(*ABC, load_factor=None).acquire("chat", "45") == "a"


def test_guests_fall_back_to_the_bound_when_every_member_is_at_its_mean() -> None:
    """Past the mean, the walk takes the first member below its bound, as plain bounded
    loads do: the mean rule never makes a task wait."""
    balancer = hand_balancer(member("a", cap=1), member("b"), member("c"))
    assert placement(balancer, ["15", "35"]) == ["b", "c"]  # owners: 30 b, 40 c
    assert balancer.acquire("chat", "15") == "b"
    assert balancer.acquire("chat", "35") == "c"
    assert balancer.acquire("chat", "45") == "a"  # T = 2: a 0 < bound 1
    # T = 3: a is full (max_concurrency 1); b 1 < mean 4/3 takes it as a guest.
    assert balancer.acquire("chat", "45") == "b"
    # T = 4: b 2 is past mean 5/3, c 1 is not.
    assert balancer.acquire("chat", "45") == "c"
    # T = 5: b 2 and c 2 are at mean 2, so their bound decides: 2 < ceil(1.25 * 6 / 3) = 3.
    assert balancer.acquire("chat", "45") == "b"


def test_no_member_ever_exceeds_its_bound() -> None:
    """Under skewed keys and random completions, weighted members stay within
    ceil(c * (T + 1) * w / W) of the load in flight when they were chosen."""
    weights = {"backend-0": 1, "backend-1": 2, "backend-2": 3, "backend-3": 1, "backend-4": 1}
    c = 1.1
    balancer = Balancer(
        [member(n, weight=w) for n, w in weights.items()], load_factor=c, vnodes_per_weight=100
    )
    rng = random.Random(3)
    hot = KEYS[:50]
    in_flight: list[str] = []
    for _ in range(4000):
        if len(in_flight) >= 60 or (in_flight and rng.random() < 0.3):
            balancer.release(in_flight.pop(rng.randrange(len(in_flight))))
        total = len(in_flight)
        name = balancer.acquire("chat", rng.choice(hot))
        assert name is not None
        in_flight.append(name)
        bound = math.ceil(c * (total + 1) * weights[name] / sum(weights.values()))
        assert loads(balancer)[name] <= bound
    assert sum(loads(balancer).values()) == len(in_flight)


def test_unhealthy_drained_and_held_members_are_skipped_and_only_their_keys_move() -> None:
    """Each kind of unavailability moves exactly the member's own keys, each to the next
    member of its walk, and recovery brings every one of them back."""
    clock = ManualClock()
    balancer = ten(clock=clock)
    ring = HashRing([Member(n) for n in NAMES], vnodes_per_weight=200)
    before = placement(balancer, KEYS)

    def check_only_backend_3_moved() -> None:
        after = placement(balancer, KEYS)
        for key, old, new in zip(KEYS, before, after, strict=True):
            if old == "backend-3":
                assert new == list(ring.walk(key))[1]
            else:
                assert new == old

    balancer.set_healthy("backend-3", False)
    check_only_backend_3_moved()
    balancer.set_healthy("backend-3", True)
    assert placement(balancer, KEYS) == before

    balancer.drain("backend-3")
    check_only_backend_3_moved()
    balancer.undrain("backend-3")
    assert placement(balancer, KEYS) == before

    balancer.hold("backend-3", clock.now() + 5)
    check_only_backend_3_moved()
    clock.advance(4.9)
    check_only_backend_3_moved()
    clock.advance(0.1)
    assert placement(balancer, KEYS) == before


def test_holds_grow_only_and_expire_on_the_clock() -> None:
    """A later retry-after extends a hold, an earlier one does not shorten it, and a time
    already past changes nothing; the snapshot shows when the hold ends."""
    clock = ManualClock(1000.0)
    balancer = hand_balancer(*ABC, clock=clock)

    balancer.hold("a", 999.0)
    assert balancer.snapshot()[0].held_until is None
    balancer.hold("a", 1010.0)
    balancer.hold("a", 1005.0)
    assert balancer.snapshot()[0].held_until == 1010.0
    assert balancer.next_hold_expiry == 1010.0
    assert balancer.acquire("chat", "45") == "b"
    clock.advance(10)
    assert balancer.acquire("chat", "45") == "a"
    assert balancer.snapshot()[0].held_until is None
    assert balancer.next_hold_expiry is None


def test_an_unavailable_member_with_tasks_in_flight_still_releases_them() -> None:
    """Tasks running on a member that turned unhealthy still give their slots back."""
    balancer = hand_balancer(*ABC)
    assert balancer.acquire("chat", "45") == "a"
    balancer.set_healthy("a", False)

    balancer.release("a")
    balancer.set_healthy("a", True)

    assert loads(balancer) == {"a": 0, "b": 0, "c": 0}
    assert [balancer.acquire("chat", "45") for _ in range(2)] == ["a", "b"]  # bound from 0


def test_a_member_serves_only_its_own_task_types() -> None:
    """A member that serves only "embed" never gets "chat"; attempts count pool members."""
    balancer = hand_balancer(
        member("a", CHAT), member("b", CHAT | EMBED), member("c", EMBED), load_factor=None
    )

    assert balancer.task_types == {"chat", "embed"}
    assert {balancer.acquire("chat", str(k)) for k in range(100)} == {"a", "b"}
    assert [balancer.acquire("chat", "45", n) for n in range(3)] == ["a", "b", "a"]
    assert [balancer.acquire("embed", "45", n) for n in range(3)] == ["b", "c", "b"]  # 70 b
    assert balancer.acquire("image", "45") is None  # nobody serves it: the task waits


def test_a_shared_member_counts_all_its_tasks_against_each_pool() -> None:
    """One load per member across types: embeddings on b make it pass chats on to a."""
    balancer = hand_balancer(member("a", CHAT), member("b", CHAT | EMBED))

    for _ in range(4):
        assert balancer.acquire("embed", "45") == "b"  # its only member: never bounded
    # Chat pool: T = 4 (all b's), W = 2, so b's bound is ceil(1.25 * 5 / 2) = 4: full.
    assert balancer.acquire("chat", "65") == "a"  # 70 b owns 65
    for _ in range(4):
        balancer.release("b")
    assert balancer.acquire("chat", "65") == "b"


def test_adding_a_member_moves_about_one_key_in_n_only_to_it() -> None:
    """A joining member takes about 1/11 of the keys of ten, from every other member."""
    balancer = ten()
    before = placement(balancer, KEYS)

    balancer.add(member("backend-new"))
    after = placement(balancer, KEYS)

    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert {new for _, new in moved} == {"backend-new"}
    assert len(moved) / len(KEYS) == pytest.approx(1 / 11, rel=0.25)


def test_removing_a_member_moves_only_its_keys() -> None:
    """A leaving member's keys go to their next members; no other key moves."""
    balancer = ten()
    before = placement(balancer, KEYS)

    balancer.remove("backend-3")
    after = placement(balancer, KEYS)

    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert {old for old, _ in moved} == {"backend-3"}
    assert len(moved) == before.count("backend-3")
    assert len(moved) / len(KEYS) == pytest.approx(1 / 10, rel=0.25)


def test_release_after_remove_counts_and_then_forgets_the_member() -> None:
    """Tasks of a removed member finish normally; it is listed until the last one does."""
    balancer = hand_balancer(*ABC)
    assert [balancer.acquire("chat", "45") for _ in range(2)] == ["a", "b"]
    assert balancer.acquire("chat", "45") == "a"

    balancer.remove("a")
    assert balancer.acquire("chat", "45") == "b"
    assert [(s.name, s.load, s.removed) for s in balancer.snapshot()] == [
        ("b", 2, False),
        ("c", 0, False),
        ("a", 2, True),
    ]
    balancer.release("a")
    balancer.release("a")
    assert [s.name for s in balancer.snapshot()] == ["b", "c"]
    with pytest.raises(KeyError, match="'a'"):
        balancer.release("a")


def test_a_member_re_added_while_its_tasks_run_keeps_their_load() -> None:
    """Removed then re-added (say, a config reload): its backend still runs those tasks."""
    balancer = hand_balancer(*ABC)
    assert balancer.acquire("chat", "45") == "a"
    balancer.remove("a")

    balancer.add(member("a"))

    assert loads(balancer)["a"] == 1
    balancer.release("a")
    assert loads(balancer)["a"] == 0


def test_updating_a_member_keeps_its_load_and_state() -> None:
    """add() of a known name changes types, capacity and weight, and keeps load and health."""
    balancer = hand_balancer(*ABC, load_factor=None)
    assert balancer.acquire("chat", "45") == "a"
    balancer.drain("a")

    balancer.add(member("a", CHAT | EMBED, cap=1, weight=2))
    balancer.undrain("a")

    (status,) = [s for s in balancer.snapshot() if s.name == "a"]
    assert (status.load, status.max_concurrency, status.weight) == (1, 1, 2)
    assert status.task_types == CHAT | EMBED
    assert balancer.acquire("chat", "45") == "b"  # a is at max_concurrency 1
    assert balancer.acquire("embed", "45") is None  # a is its only member, and full
    balancer.add(member("a", EMBED))
    assert {balancer.acquire("chat", str(k)) for k in range(100)} == {"b", "c"}


def test_removing_the_last_member_of_a_type_unserves_it() -> None:
    """Without members a type gets None, and comes back with the next member that serves it."""
    balancer = hand_balancer(member("a", EMBED), *ABC[1:])

    balancer.remove("a")
    assert balancer.task_types == {"chat"}
    assert balancer.acquire("embed", "45") is None
    balancer.add(member("d", EMBED))
    assert balancer.acquire("embed", "45") == "d"


def test_snapshot_free_slots_and_types_with_room_describe_the_members() -> None:
    """Operators see every member's capacity, load and availability."""
    clock = ManualClock(100.0)
    balancer = hand_balancer(member("a", cap=2), member("b", EMBED, cap=1), clock=clock)
    assert balancer.acquire("embed", "1") == "b"
    balancer.hold("a", 130.0)

    assert balancer.snapshot() == (
        MemberStatus("a", 1, 2, CHAT, 0, True, False, 130.0, False, False),
        MemberStatus("b", 1, 1, EMBED, 1, True, False, None, True, False),
    )
    assert balancer.free_slots() == 0
    assert balancer.types_with_room() == frozenset()
    clock.advance(30)
    assert balancer.free_slots() == 2
    assert balancer.types_with_room() == CHAT
    assert balancer.load_factor == 1.25


def test_load_is_spread_in_proportion_to_weight_when_keys_are_hot() -> None:
    """With c = 1, a few hot keys leave a weight-3 member exactly three times the load of a
    weight-1 member: 200 in flight, bounds ceil(200 / 4) = 50 and ceil(3 * 200 / 4) = 150."""
    balancer = Balancer(
        [member("x", cap=200, weight=1), member("y", cap=200, weight=3)],
        load_factor=1.0,
        vnodes_per_weight=50,
    )
    held = [balancer.acquire("chat", key) for key in KEYS[:5] * 40]
    assert Counter(held) == {"x": 50, "y": 150}


def test_invalid_arguments_raise_clear_errors() -> None:
    """Bad members, settings and calls are refused with a message naming the problem."""
    with pytest.raises(ValueError, match="non-empty string"):
        PoolMember("", CHAT, 1)
    with pytest.raises(TypeError, match="'a': task_types must be a frozenset, got str"):
        PoolMember("a", "chat", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'a': task_types must be non-empty"):
        PoolMember("a", frozenset(), 1)
    with pytest.raises(ValueError, match="'a': max_concurrency must be >= 1, got 0"):
        PoolMember("a", CHAT, 0)
    with pytest.raises(ValueError, match="'a': weight must be >= 1, got 0"):
        PoolMember("a", CHAT, 1, weight=0)
    with pytest.raises(ValueError, match=r"load_factor must be a finite number >= 1, got 0\.9"):
        Balancer(load_factor=0.9)
    with pytest.raises(ValueError, match="vnodes_per_weight"):
        Balancer(vnodes_per_weight=0)
    with pytest.raises(ValueError, match="duplicate member name 'a'"):
        hand_balancer(member("a"), member("a"))

    balancer = hand_balancer(*ABC)
    with pytest.raises(ValueError, match="attempt must be >= 0, got -1"):
        balancer.acquire("chat", "45", -1)
    with pytest.raises(ValueError, match="'a', which has no task in flight"):
        balancer.release("a")
    with pytest.raises(KeyError, match="unknown member 'z'"):
        balancer.release("z")
    with pytest.raises(ValueError, match="until must be a finite time"):
        balancer.hold("a", math.inf)
    calls: list[Callable[[], None]] = [
        partial(balancer.set_healthy, "z", False),
        partial(balancer.drain, "z"),
        partial(balancer.undrain, "z"),
        partial(balancer.hold, "z", 1e12),
        partial(balancer.remove, "z"),
    ]
    for call in calls:
        with pytest.raises(KeyError, match="no member named 'z'"):
            call()


def test_a_retry_never_returns_to_the_failed_member_while_another_has_a_free_slot() -> None:
    """Under the bound a busy successor could send a retry straight back to the member that
    just failed it; a retry takes any other member with a free slot first."""
    balancer = Balancer(
        [PoolMember("a", frozenset({"t"}), 8), PoolMember("b", frozenset({"t"}), 8)]
    )
    for i in range(200):
        key = f"key-{i}"
        first = balancer.acquire("t", key, 0)
        assert first is not None
        other = "b" if first == "a" else "a"
        # Load the other member above its bounded share, then retry the first task.
        held = [balancer.acquire("t", f"{other}-{j}", 0) for j in range(3)]
        retry = balancer.acquire("t", key, 1)
        assert retry == other
        for name in [first, retry, *held]:
            assert name is not None
            balancer.release(name)


def test_types_with_the_same_members_route_alike_and_part_when_membership_differs() -> None:
    """Types served by the same members send a key to the same member (they share one
    ring); once a member leaves one type, only that type's keys move."""
    both = frozenset({"chat", "embed"})
    balancer = Balancer([member(n, both) for n in ("a", "b", "c")], vnodes_per_weight=50)
    keys = [f"k{i}" for i in range(300)]

    def owners(task_type: str) -> list[str]:
        picked = []
        for key in keys:  # one at a time: no load, so each key goes to its owner
            name = balancer.acquire(task_type, key)
            assert name is not None
            balancer.release(name)
            picked.append(name)
        return picked

    assert owners("chat") == owners("embed")
    before = owners("embed")
    balancer.add(member("b", CHAT))  # b stops serving embed
    after = owners("embed")
    assert "b" not in after
    assert all(was == now for was, now in zip(before, after, strict=True) if was != "b")
    assert owners("chat") == before, "chat's ring did not change"
