"""The consistent-hash ring: a routing key to its member, then distinct successors for retries."""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from hashlib import blake2b
from itertools import chain, compress, repeat
from operator import ne, sub

HashFunction = Callable[[bytes], int]
"""Maps bytes to an int in [0, 2**64); hashes both point names and keys. Point hashes are
checked when a ring is built; key hashes are trusted, as pick() is the hot path."""

DEFAULT_VNODES_PER_WEIGHT = 2000
"""Points per unit of weight. A member's share wanders by about 1/sqrt(its points), so it
takes thousands to hold max/mean load near the goals of bench/ring.py (100,000 keys):
at 10 / 50 equal members, 160 points give 1.155 / 1.153, 1000 give 1.080 / 1.092, and
2000 give 1.024 / 1.071 (goals 1.06 / 1.10), and weights 1:2:4 reach 1.000. A 50-member
ring is then 100,000 points: it builds in about 0.4 s (walk heads take 0.15 s of it),
and a 4 MB prefix table keeps pick() O(1), another walk_head()."""

_TABLE_EXPANSION = 4
"""Prefix-table slots per point, at least. At 50 members about 1 slot in 6 is split between
owners and needs a short scan; doubling the table saves ~5% of a pick for twice the memory."""

_HASH_LIMIT = 1 << 64

Head = tuple[str, ...]
"""The first members of a walk, owner first (see walk_head)."""

_HEAD_DEPTH = 3
"""Members in a walk head. A router that skips full or unavailable members reads the head
(as cheap as pick) and needs walk() (a bisect, a generator and a set: ~4 µs) only past it:
under bench/ring.py's Zipf load, for 8.8% of tasks with two members, 3.8% with three, which
makes acquire + release ~7% cheaper. A head is shared by every point with the same next
members, so a ring holds at most n!/(n-3)! of them: 720 at 10 members, a ring of 4.7 MB
instead of 2.8 (most of it the second prefix table, see _head_table); at 50 members,
66,000 tuples, 25.8 MB instead of 13.4, and walk_head() costs ~1.2x pick(), as they no
longer fit in the CPU's cache. With two, 50 members hold 2,450 heads in 21.7 MB."""


# Reads the first 8 bytes of a digest as an unsigned big-endian int, without slicing.
_FIRST_U64 = struct.Struct(">Q").unpack_from


def default_hash(data: bytes) -> int:
    """The first 8 bytes of BLAKE2b-512 of `data`, as a big-endian unsigned 64-bit int."""
    # BLAKE2b is the fastest well-distributed hash in the stdlib: built into CPython, so no
    # OpenSSL dispatch (md5, sha1 and sha256 cost 30-45% more per call here), and fixed by
    # RFC 7693, so every process and version, in any language, puts a key on the same
    # member. zlib.crc32 is ~4x cheaper but 32 bits and linear: crc("a#7") ^ crc("b#7") is
    # the same constant for every one-digit index (another for two digits), so two members'
    # points would be XOR-shifted copies of each other; mixing it in Python costs what
    # BLAKE2b does. The builtin hash() of bytes is salted per process. The default 64-byte
    # digest is cut to 8 bytes rather than asking for digest_size=8: the keyword alone
    # costs ~0.1 µs a call, a tenth of the pick() budget, and the result is as well spread.
    value: int = _FIRST_U64(blake2b(data).digest())[0]
    return value


class EmptyRingError(LookupError):
    """A key was looked up on a ring without members."""


@dataclass(frozen=True, slots=True)
class Member:
    """One owner on the ring; it gets `weight` times as many points, so as large a share."""

    name: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("member name must be a non-empty string")
        if self.weight < 1:
            raise ValueError(f"member {self.name!r}: weight must be >= 1, got {self.weight}")


# How points are named, and why not by ring size
# ------------------------------------------------
# Each member owns weight * vnodes_per_weight points; point i is the hash of f"{name}#{i}",
# which depends on nothing but that member. With vnodes_per_weight=2:
#
#     Member("a", 1) -> "a#0", "a#1"
#     Member("b", 2) -> "b#0", "b#1", "b#2", "b#3"
#
# A key belongs to the first point clockwise from its hash (wrapping past 2**64 - 1 to the
# start). Adding Member("c") inserts "c#0", "c#1" and moves nothing else, so each key either
# keeps its owner or moves to c: never from a to b. Removing c takes exactly its points away,
# so only c's keys move. (Names cannot collide across members: the text after the last "#"
# is the index, so f"{name}#{i}" spells out both.)
#
# Envoy's ring_hash (which gRPC's ring_hash follows) instead sizes each host by the whole
# ring: host points = scale * weight / total_weight, with scale chosen so the lightest host
# gets ceil(min_ring_size * its normalized weight). With the default min_ring_size of 1024,
# three equal hosts get 342 points each ("h_0" .. "h_341"), four get 256. Adding a fourth
# host therefore also deletes "h_256" .. "h_341" from the three hosts that did not change,
# and the keys behind those points fall to whatever point comes next, often another old
# host. Simulated with 100,000 keys: 33% of keys move instead of the ideal 25%, and 8.7%
# move between hosts that did not change (6% going from 10 hosts to 11). Envoy's retries
# step to the next *point* (the attempt number offsets the index), which may be the same
# host again; walk() below steps to the next distinct member.
#
# The groupcache ring (consistenthash.go) names points by index and name alone, as here,
# and adds the prefix table that makes most lookups O(1).


class HashRing:
    """An immutable ring of weighted members; membership changes build a new ring."""

    __slots__ = (
        "_by_name",
        "_hash_fn",
        "_head_table",
        "_heads",
        "_members",
        "_owners",
        "_points",
        "_points_by_name",
        "_shift",
        "_table",
        "_vnodes_per_weight",
    )

    # Members in the order they were given; with_member appends or replaces in place.
    _members: tuple[Member, ...]
    _by_name: dict[str, Member]
    _vnodes_per_weight: int
    _hash_fn: HashFunction
    # Each member's point hashes, kept so a derived ring rehashes only the changed member.
    _points_by_name: dict[str, tuple[int, ...]]
    # Distinct point hashes, ascending, then the sentinel 2**64, which is above every hash:
    # bisect_left never runs off the end, and neither does the scan in pick().
    _points: list[int]
    # _owners[i] owns _points[i]; the sentinel's owner is _owners[0], so a key hashing past
    # the last point wraps to the first without a branch. Empty for an empty ring.
    _owners: list[str]
    # _heads[i] is the head of a walk from _points[i] (see walk_head), sentinel included.
    _heads: list[Head]
    # Prefix table, after groupcache: slot (hash >> _shift) covers a 2**_shift wide range of
    # hashes. If they all have one owner the slot holds its name; if the range is split
    # between owners it holds the index of the range's first point, and pick() scans on from
    # there (one or two steps) instead of bisecting the whole ring, whose ints are scattered
    # in memory: at 50 members a bisect costs more than the hash.
    _table: list[str | int]
    _shift: int
    # The same table with heads for names, for walk_head(). Not one table of heads for both:
    # pick() would then read a name through a tuple, one of thousands (66,000 at 50
    # members) scattered in memory, and at 50 members cost 18% more.
    _head_table: list[Head | int]

    def __init__(
        self,
        members: Iterable[Member] = (),
        *,
        vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT,
        hash_fn: HashFunction = default_hash,
    ) -> None:
        if vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be >= 1, got {vnodes_per_weight}")
        given = tuple(members)
        seen: set[str] = set()
        for member in given:
            if member.name in seen:
                raise ValueError(f"duplicate member name {member.name!r}")
            seen.add(member.name)
        self._build(given, vnodes_per_weight, hash_fn, {})

    def _build(
        self,
        members: tuple[Member, ...],
        vnodes_per_weight: int,
        hash_fn: HashFunction,
        reusable: dict[str, tuple[int, ...]],
    ) -> None:
        """Fill every field; `reusable` holds already hashed points of unchanged members."""
        self._members = members
        self._by_name = {m.name: m for m in members}
        self._vnodes_per_weight = vnodes_per_weight
        self._hash_fn = hash_fn
        self._points_by_name = {
            m.name: reusable.get(m.name)
            or _member_points(m.name, 0, m.weight * vnodes_per_weight, hash_fn)
            for m in members
        }
        # Two points may share a hash (certain with a toy test hash, ~never with 64 bits):
        # the smallest name keeps it, whatever the order of members, so every ring with the
        # same members agrees. Updating in descending name order lets the smallest win.
        owner_of: dict[int, str] = {}
        for name in sorted(self._points_by_name, reverse=True):
            owner_of.update(zip(self._points_by_name[name], repeat(name)))
        points = sorted(owner_of)
        if points and (points[0] < 0 or points[-1] >= _HASH_LIMIT):
            raise ValueError("hash_fn must return ints in [0, 2**64)")
        self._owners = list(map(owner_of.__getitem__, points))
        self._heads = _heads(self._owners)
        self._table, self._head_table, self._shift = _prefix_tables(
            points, self._owners, self._heads
        )
        points.append(_HASH_LIMIT)
        self._points = points
        if self._owners:
            self._owners.append(self._owners[0])
            self._heads.append(self._heads[0])

    @classmethod
    def _derived(
        cls,
        members: tuple[Member, ...],
        vnodes_per_weight: int,
        hash_fn: HashFunction,
        reusable: dict[str, tuple[int, ...]],
    ) -> HashRing:
        ring = cls.__new__(cls)
        ring._build(members, vnodes_per_weight, hash_fn, reusable)
        return ring

    @property
    def members(self) -> tuple[Member, ...]:
        """The members, in the order they were added."""
        return self._members

    @property
    def vnodes_per_weight(self) -> int:
        """Points each unit of weight puts on the ring."""
        return self._vnodes_per_weight

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __repr__(self) -> str:
        members = ", ".join(f"{m.name}:{m.weight}" for m in self._members)
        return f"HashRing([{members}], vnodes_per_weight={self._vnodes_per_weight})"

    def pick(self, key: str | bytes) -> str:
        """The member that owns `key` (str keys are hashed as UTF-8)."""
        if isinstance(key, str):
            key = key.encode()
        # default_hash inlined: the extra Python call costs 5-10% of a pick.
        hashed: int = (
            _FIRST_U64(blake2b(key).digest())[0]
            if self._hash_fn is default_hash
            else self._hash_fn(key)
        )
        entry = self._table[hashed >> self._shift]
        if isinstance(entry, str):
            return entry
        owners = self._owners
        if not owners:
            raise EmptyRingError("cannot pick a member: the ring has no members")
        points = self._points
        while points[entry] < hashed:
            entry += 1
        return owners[entry]

    def walk_head(self, key: str | bytes) -> Head:
        """The first members walk(key) yields: the owner of `key`, then the two after it
        (fewer on a smaller ring).

        Costs about what pick() costs: the tuple comes from a prefix table like pick()'s,
        shared by every point with the same head, so nothing is built per call. A router
        that takes the owner, or else the next member with room, needs walk() only past
        the head.
        """
        if isinstance(key, str):
            key = key.encode()
        # pick(), returning the whole head; inlined, as pick() inlines default_hash.
        hashed: int = (
            _FIRST_U64(blake2b(key).digest())[0]
            if self._hash_fn is default_hash
            else self._hash_fn(key)
        )
        entry = self._head_table[hashed >> self._shift]
        if isinstance(entry, tuple):
            return entry
        if not self._owners:
            raise EmptyRingError("cannot walk the ring: it has no members")
        points = self._points
        while points[entry] < hashed:
            entry += 1
        return self._heads[entry]

    def walk(self, key: str | bytes) -> Iterator[str]:
        """The owner of `key`, then each other member once, in clockwise order.

        Used to retry on the next member, or to skip members that are busy or unhealthy:
        every caller skipping the same member sends its keys to the same successor.
        """
        if not self._owners:
            raise EmptyRingError("cannot walk the ring: it has no members")
        if isinstance(key, str):
            key = key.encode()
        start = bisect_left(self._points, self._hash_fn(key))
        return self._walk_from(start % (len(self._points) - 1))

    def _walk_from(self, start: int) -> Iterator[str]:
        owners, remaining = self._owners, len(self._members)
        seen: set[str] = set()
        for index in chain(range(start, len(self._points) - 1), range(start)):
            owner = owners[index]
            if owner not in seen:
                seen.add(owner)
                yield owner
                remaining -= 1
                if remaining == 0:
                    return

    def with_member(self, member: Member) -> HashRing:
        """A ring that also has `member`, or has it in place of the member of that name."""
        current = self._by_name.get(member.name)
        if current == member:
            return self
        if current is None:
            members = (*self._members, member)
        else:
            members = tuple(member if m.name == member.name else m for m in self._members)
        reusable = {n: p for n, p in self._points_by_name.items() if n != member.name}
        if current is not None:
            # Point i of a member is the same at any weight, so a new weight keeps the first
            # points and hashes only the extra ones: raising a weight only pulls keys in.
            old, count = self._points_by_name[member.name], member.weight * self._vnodes_per_weight
            extra = _member_points(member.name, len(old), count, self._hash_fn)
            reusable[member.name] = old[:count] + extra
        return HashRing._derived(members, self._vnodes_per_weight, self._hash_fn, reusable)

    def without_member(self, name: str) -> HashRing:
        """A ring without the member called `name`; KeyError if there is none."""
        if name not in self._by_name:
            raise KeyError(f"no member named {name!r} in the ring")
        members = tuple(m for m in self._members if m.name != name)
        return HashRing._derived(
            members, self._vnodes_per_weight, self._hash_fn, self._points_by_name
        )


def _member_points(name: str, start: int, stop: int, hash_fn: HashFunction) -> tuple[int, ...]:
    """Hashes of the points `start` .. `stop - 1` of the member called `name`."""
    return tuple(hash_fn(f"{name}#{i}".encode()) for i in range(start, stop))


def _heads(owners: list[str]) -> list[Head]:
    """Each point's walk head: its owner, then the next _HEAD_DEPTH - 1 other owners.

    With points 10 a, 30 b, 40 c, 50 a, 70 b, 90 c, point 90's head is ("c", "a", "b"),
    wrapping. Every point of a run of one owner has the same head, so the run shares one
    tuple, and equal heads of different runs share one too.
    """
    if not owners:
        return []
    following = owners[1:] + owners[:1]
    # The last point of each run: the next point clockwise has another owner.
    ends = list(compress(range(len(owners)), map(ne, owners, following)))
    if not ends:  # one member: nobody to go to next
        return [(owners[0],)] * len(owners)
    # Runs in clockwise order; the run before point 0 continues at the end of the list,
    # so run owners form a cycle in which neighbours differ, and a head is most often the
    # owners of the next _HEAD_DEPTH runs. Reading the cycle twice over never wraps.
    run_owners = [owners[end] for end in ends]
    count = len(run_owners)
    laps = run_owners + run_owners

    def first_distinct(j: int) -> Head:  # when a run's owner comes back within the head
        head = [laps[j]]
        for k in range(j + 1, j + count):  # by index: a slice would copy the whole lap
            if laps[k] not in head:
                head.append(laps[k])
                if len(head) == _HEAD_DEPTH:
                    break
        return tuple(head)

    # Built in C-speed passes, like the prefix table: at 50 members there are 98,000 runs.
    candidates = list(zip(*(laps[i : i + count] for i in range(_HEAD_DEPTH)), strict=True))
    for j in compress(range(count), map(ne, map(len, map(set, candidates)), repeat(_HEAD_DEPTH))):
        candidates[j] = first_distinct(j)
    shared: dict[Head, Head] = {}
    run_heads = list(map(shared.setdefault, candidates, candidates))
    run_lengths = [ends[0] + 1, *map(sub, ends[1:], ends[:-1])]
    heads = list(chain.from_iterable(map(repeat, run_heads, run_lengths)))
    # Points after the last end belong to the run that wraps around to point 0.
    heads.extend(repeat(heads[0], len(owners) - len(heads)))
    return heads


def _prefix_tables(
    points: list[int], owners: list[str], heads: list[Head]
) -> tuple[list[str | int], list[Head | int], int]:
    """The prefix tables over sorted `points` (no sentinel yet), of owners and of heads:
    (owner slots, head slots, shift)."""
    if not points:
        return [0], [0], 64  # every hash lands in slot 0, whose scan reports the empty ring
    bits = min(64, (len(points) * _TABLE_EXPANSION - 1).bit_length())
    shift = 64 - bits
    slots = [p >> shift for p in points]
    # Occupied slot -> index of its first point (going downwards, the lowest index wins).
    first = dict(zip(reversed(slots), range(len(slots) - 1, -1, -1), strict=True))
    # The lowest hash of a slot belongs to the first point at or after the slot's start:
    # its own first point if occupied, else the first point of the next occupied slot,
    # else (past the last point) the ring wraps to point 0. Built in C-speed runs.
    table: list[str | int] = []
    head_table: list[Head | int] = []
    for slot, index in reversed(first.items()):  # ascending slots
        run = slot + 1 - len(table)
        table.extend(repeat(owners[index], run))
        head_table.extend(repeat(heads[index], run))
    table.extend(repeat(owners[0], (1 << bits) - len(table)))
    head_table.extend(repeat(heads[0], (1 << bits) - len(head_table)))
    # A slot is split when one of its points is followed, clockwise, by another owner's
    # point: hashes on either side of that boundary differ. Such a slot holds the index of
    # its first point instead, where pick() starts scanning. (Heads differ exactly where
    # owners do, so the same slots are split in both tables.)
    following = owners[1:] + owners[:1]
    for j in compress(range(len(points)), map(ne, owners, following)):
        table[slots[j]] = head_table[slots[j]] = first[slots[j]]
    return table, head_table, shift
