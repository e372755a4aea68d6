"""The consistent-hash ring: placement you can follow by hand, balance, and minimal movement."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

import pytest

from server.routing import EmptyRingError, HashRing, Member
from server.routing.ring import HashFunction, default_hash

# Point hashes for the hand-checked tests, with vnodes_per_weight=2. A key's hash is the
# number it spells ("45" hashes to 45), so the ring can be followed on paper:
#
#     10 a   20 d   30 b   40 c   50 a   60 d   70 b   75 a   90 c   95 a
#            (d only once added; a#2 and a#3 only at weight 2)
POINTS = {
    "a#0": 10,
    "a#1": 50,
    "a#2": 75,
    "a#3": 95,
    "b#0": 30,
    "b#1": 70,
    "c#0": 40,
    "c#1": 90,
    "d#0": 20,
    "d#1": 60,
}


def table_hash(points: Mapping[str, int]) -> HashFunction:
    def hash_fn(data: bytes) -> int:
        text = data.decode()
        return points[text] if "#" in text else int(text)

    return hash_fn


HAND = table_hash(POINTS)


def hand_ring(*members: Member) -> HashRing:
    return HashRing(members, vnodes_per_weight=2, hash_fn=HAND)


ABC = (Member("a"), Member("b"), Member("c"))


def seeded_keys(count: int) -> list[str]:
    rng = random.Random(7)
    return [f"task-{rng.getrandbits(64):016x}" for _ in range(count)]


KEYS = seeded_keys(20_000)


def owners(ring: HashRing, keys: list[str]) -> list[str]:
    return [ring.pick(key) for key in keys]


def moves(before: HashRing, after: HashRing) -> list[tuple[str, str]]:
    """(old owner, new owner) of every key in KEYS whose owner changed."""
    pairs = zip(owners(before, KEYS), owners(after, KEYS), strict=True)
    return [(old, new) for old, new in pairs if old != new]


def test_pick_takes_the_first_point_clockwise_from_the_key() -> None:
    """A key goes to the member of the next point at or after its hash, wrapping past the end."""
    ring = hand_ring(*ABC)  # 10 a, 30 b, 40 c, 50 a, 70 b, 90 c

    assert ring.pick("5") == "a"
    assert ring.pick("10") == "a"  # a point's own hash belongs to it
    assert ring.pick("11") == "b"
    assert ring.pick("45") == "a"
    assert ring.pick("85") == "c"
    assert ring.pick("91") == "a"  # past the last point: wraps to 10


def test_walk_gives_the_owner_then_each_other_member_once_clockwise() -> None:
    """Retries go to the next distinct member clockwise, never the same member twice."""
    ring = hand_ring(*ABC)

    assert list(ring.walk("45")) == ["a", "b", "c"]  # 50 a, 70 b, 90 c
    assert list(ring.walk("35")) == ["c", "a", "b"]  # 40 c, 50 a, 70 b
    assert list(ring.walk("91")) == ["a", "b", "c"]  # wraps: 10 a, 30 b, 40 c
    assert list(ring.walk("85")) == ["c", "a", "b"]  # 90 c, wraps: 10 a, 30 b


def test_walk_visits_every_member_exactly_once_owner_first() -> None:
    """Walking from any key reaches every member, starting with the key's owner."""
    ring = HashRing(Member(f"backend-{i}") for i in range(7))
    for key in KEYS[:200]:
        walked = list(ring.walk(key))
        assert walked[0] == ring.pick(key)
        assert sorted(walked) == sorted(m.name for m in ring.members)


def test_pick_agrees_with_walk_for_many_keys() -> None:
    """The fast lookup table and the clockwise walk always name the same owner."""
    ring = HashRing(Member(f"backend-{i}") for i in range(10))
    assert all(ring.pick(key) == next(ring.walk(key)) for key in KEYS[:5000])


def test_placement_is_deterministic_and_pinned() -> None:
    """Every process, and every future version, routes a key to the same member."""
    forward = HashRing(Member(f"backend-{i}") for i in range(5))
    backward = HashRing(Member(f"backend-{i}") for i in reversed(range(5)))

    assert owners(forward, KEYS[:2000]) == owners(backward, KEYS[:2000])
    # Pinned: changing the hash would move nearly every key of a running fleet.
    assert default_hash(b"task-1") == 13379355446831587400
    assert default_hash(b"") == 8676750893070244099


def test_str_and_bytes_keys_pick_the_same_member() -> None:
    """A str key is routed as its UTF-8 bytes."""
    ring = HashRing(Member(f"backend-{i}") for i in range(5))
    for key in [*KEYS[:100], "clé-ünïcode"]:
        assert ring.pick(key) == ring.pick(key.encode())
        assert list(ring.walk(key)) == list(ring.walk(key.encode()))


def test_weights_give_proportional_shares() -> None:
    """A member of weight 4 gets about four times the keys of a member of weight 1."""
    ring = HashRing([Member("small", 1), Member("medium", 2), Member("large", 4)])
    counts = Counter(owners(ring, KEYS))

    for name, weight in [("small", 1), ("medium", 2), ("large", 4)]:
        share = counts[name] / len(KEYS)
        assert share == pytest.approx(weight / 7, rel=0.08), name


def test_adding_a_member_moves_keys_only_to_it() -> None:
    """A new member takes about 1/(n+1) of the keys and no key moves between old members."""
    before = HashRing(Member(f"backend-{i}") for i in range(10))
    after = before.with_member(Member("backend-new"))

    moved = moves(before, after)

    assert {new for _, new in moved} == {"backend-new"}
    assert len(moved) / len(KEYS) == pytest.approx(1 / 11, rel=0.15)


def test_removing_a_member_moves_only_its_keys() -> None:
    """Only the keys of the removed member move; everyone else keeps theirs."""
    before = HashRing(Member(f"backend-{i}") for i in range(10))
    after = before.without_member("backend-3")

    moved = moves(before, after)

    assert {old for old, _ in moved} == {"backend-3"}
    assert len(moved) == owners(before, KEYS).count("backend-3")


def test_adding_a_member_by_hand() -> None:
    """Adding d (points 20 and 60) takes exactly the keys just before those points."""
    before = hand_ring(*ABC)
    after = before.with_member(Member("d"))  # 10 a, 20 d, 30 b, 40 c, 50 a, 60 d, 70 b, ...

    assert (before.pick("15"), after.pick("15")) == ("b", "d")
    assert (before.pick("55"), after.pick("55")) == ("b", "d")
    assert (before.pick("25"), after.pick("25")) == ("b", "b")
    assert list(after.walk("55")) == ["d", "b", "c", "a"]


def test_raising_a_weight_pulls_keys_only_to_that_member() -> None:
    """Re-adding a with weight 2 keeps its points and adds 75 and 95, taking keys from c only."""
    before = hand_ring(*ABC)
    after = before.with_member(Member("a", 2))

    assert after.members == (Member("a", 2), Member("b"), Member("c"))
    assert (before.pick("72"), after.pick("72")) == ("c", "a")
    assert (before.pick("92"), after.pick("92")) == ("a", "a")
    assert (before.pick("85"), after.pick("85")) == ("c", "c")


def test_membership_changes_return_new_rings_and_leave_the_old_one_alone() -> None:
    """with_member and without_member build a new ring; the old one still routes as before."""
    ring = hand_ring(*ABC)
    grown = ring.with_member(Member("d"))
    shrunk = ring.without_member("b")

    assert grown is not ring
    assert shrunk is not ring
    assert ring.members == ABC
    assert [m.name for m in grown.members] == ["a", "b", "c", "d"]
    assert [m.name for m in shrunk.members] == ["a", "c"]
    assert ring.pick("15") == "b"
    assert ring.with_member(Member("a")) is ring  # nothing to change


def test_members_len_and_contains_describe_the_ring() -> None:
    """A ring reports its members, how many there are, and whether a name is on it."""
    ring = hand_ring(Member("a", 2), Member("b"))

    assert ring.members == (Member("a", 2), Member("b", 1))
    assert len(ring) == 2
    assert "a" in ring
    assert "z" not in ring


def test_colliding_points_go_to_the_smallest_name_whatever_the_order() -> None:
    """Two members hashing a point to the same spot resolve the same way on every ring."""
    colliding = table_hash({"x#0": 50, "x#1": 80, "y#0": 50, "y#1": 20})
    forward = HashRing([Member("x"), Member("y")], vnodes_per_weight=2, hash_fn=colliding)
    backward = HashRing([Member("y"), Member("x")], vnodes_per_weight=2, hash_fn=colliding)

    assert forward.pick("45") == backward.pick("45") == "x"
    assert forward.without_member("x").pick("45") == "y"


def test_empty_ring_raises_on_pick_and_walk() -> None:
    """Looking up a key with no members fails loudly instead of returning nothing."""
    ring = HashRing()

    assert len(ring) == 0
    with pytest.raises(EmptyRingError, match="no members"):
        ring.pick("task-1")
    with pytest.raises(EmptyRingError, match="no members"):
        ring.walk("task-1")
    with pytest.raises(LookupError):
        hand_ring(Member("a")).without_member("a").pick("5")


def test_invalid_members_are_rejected() -> None:
    """An empty name or a weight below 1 is refused with a message naming the problem."""
    with pytest.raises(ValueError, match="non-empty"):
        Member("")
    with pytest.raises(ValueError, match=r"'a'.*weight must be >= 1, got 0"):
        Member("a", 0)


def test_duplicate_names_are_rejected() -> None:
    """Two members with one name would be ambiguous, so the ring refuses them."""
    with pytest.raises(ValueError, match="duplicate member name 'a'"):
        HashRing([Member("a"), Member("b"), Member("a", 2)])


def test_removing_an_unknown_member_is_an_error() -> None:
    """without_member names the member it could not find."""
    with pytest.raises(KeyError, match="'z'"):
        hand_ring(*ABC).without_member("z")


def test_bad_ring_settings_are_rejected() -> None:
    """A ring needs at least one point per weight and hashes inside 64 bits."""
    with pytest.raises(ValueError, match="vnodes_per_weight"):
        HashRing([Member("a")], vnodes_per_weight=0)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        HashRing([Member("a")], vnodes_per_weight=1, hash_fn=lambda _: -1)
