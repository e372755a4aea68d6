"""TokenBudget: each client's budget of model tokens per minute, as a token bucket on the
injected clock. A task is charged its estimate when it is admitted (never after it ran,
or many concurrent requests would all pass before any is counted) and the charge is
corrected when it ends: the unused part given back, an overshoot taken.

A token bucket rather than a sliding window: one level and one time per client, a
correction is one addition to the level, and the wait until a charge fits is exact
(what is missing / the refill rate). The bucket holds `tokens_per_minute` and refills
tokens_per_minute / 60 a second, so a client may spend a whole minute's budget at once,
then as fast as it refills. An overshoot may take the level below zero: the client then
waits until the debt is paid. Worked example, 6,000 tokens per minute (100 a second):

    t=0   full, 6000      charge 4000 → 2000 left
    t=0   charge 3000     refused: 1000 missing, retry after 10 s
    t=10  3000 left       charge 3000 → 0 left
    t=10  the first ends having used 500: 3500 given back → 3500 left
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.clock import Clock

# Full buckets dropped per charge, at most: bounded work per call, and faster than
# clients arrive (each charge adds at most one bucket).
_EVICT_PER_CALL = 4


@dataclass(slots=True)
class _Bucket:
    capacity: int
    # Tokens left at `at` (clock seconds); below zero after an overshoot.
    level: float
    at: float

    def refill(self, now: float) -> float:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + max(0.0, now - self.at) * rate)
        self.at = now
        return self.level


class TokenBudget:
    """Per-client token buckets. Only the event loop's thread touches them; each call reads
    the clock once, so a check and its charge see the same level."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        # Least recently charged first: the front is the first to have refilled.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """Buckets held now (full ones not yet dropped included)."""
        return len(self._buckets)

    def take(self, client_id: str, tokens: int, per_minute: int) -> float | None:
        """Charges `tokens` to the client's budget of `per_minute`: None when they fitted,
        else the seconds after which they will (nothing charged)."""
        now = self._clock.now()
        bucket = self._bucket(client_id, per_minute, now)
        level = bucket.refill(now)
        if level < tokens:
            return (tokens - level) * 60.0 / per_minute
        bucket.level -= tokens
        self._evict_full(now)
        return None

    def give_back(self, client_id: str, tokens: int, per_minute: int) -> None:
        """Corrects a charge: `tokens` back to the budget (never above its size), or taken
        from it when negative (a task used more than it was charged)."""
        if tokens == 0 or (tokens > 0 and client_id not in self._buckets):
            return  # no bucket is a full one
        now = self._clock.now()
        bucket = self._bucket(client_id, per_minute, now)
        bucket.refill(now)
        bucket.level = min(float(bucket.capacity), bucket.level + tokens)

    def left(self, client_id: str, per_minute: int) -> float:
        """Tokens the client may spend now (what a refusal's message reports)."""
        bucket = self._buckets.get(client_id)
        return per_minute if bucket is None else bucket.refill(self._clock.now())

    def _bucket(self, client_id: str, per_minute: int, now: float) -> _Bucket:
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = _Bucket(per_minute, float(per_minute), now)
        else:
            self._buckets.move_to_end(client_id)
        return bucket

    def _evict_full(self, now: float) -> None:
        for _ in range(_EVICT_PER_CALL):
            oldest = next(iter(self._buckets.items()), None)
            # A full bucket is a new one: nothing to remember about this client.
            if oldest is None or oldest[1].refill(now) < oldest[1].capacity:
                return
            del self._buckets[oldest[0]]
