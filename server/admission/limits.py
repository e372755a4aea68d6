"""Per-client token buckets (aiolimiter's leaky bucket): a call over its client's limit is
refused at once with the time after which one more would pass, never queued in the server.
Per-task-type buckets (TypeLimiter) do the same for Submits of a type, across all clients.

Buckets live only while they hold something: one that has drained is the same as a new
one, so it is dropped. Memory then follows the clients active within a bucket's drain time
(burst / rate), not every client ever seen.

A call that costs one token per item (SubmitBatch: per task) takes what the bucket holds,
up to what it wants (`admit_up_to`): its first items pass, the rest are refused."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from server.config_file import Limits, RateLimit
from server.model.errors import RateLimitedError

# Drained buckets dropped per admitted call, at most: bounded work on the hot path, and
# still faster than clients can arrive (each call adds at most one bucket).
_EVICT_PER_CALL = 4


@dataclass(frozen=True, slots=True)
class Grant:
    """What `admit_up_to` let through: the first `taken` of the tokens asked for; the rest
    are refused with `refusal` (None when none was)."""

    taken: int
    refusal: RateLimitedError | None = None


class ClientLimiter:
    """Admits each client's calls within its RateLimit (Limits.clients, else the default;
    unlimited when neither applies)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        # Least recently used first: the front is the first to have drained.
        self._buckets: OrderedDict[str, AsyncLimiter] = OrderedDict()

    def __len__(self) -> int:
        """Buckets held now (drained ones not yet dropped included)."""
        return len(self._buckets)

    async def admit(self, client_id: str) -> None:
        """Takes one token of `client_id`'s bucket, or raises RateLimitedError."""
        limit = self._limit_of(client_id)
        if limit is None:
            return
        bucket = self._bucket(client_id, limit)
        if not bucket.has_capacity():
            # The bucket is full to within one token, which leaks out in 1 / rate seconds
            # at most: an upper bound that a retry at that time meets.
            raise RateLimitedError(
                f"{_over_limit(client_id, limit)}; retry after the delay in RetryInfo",
                1.0 / limit.rate,
                "rate",
            )
        await bucket.acquire()  # has capacity: returns without waiting
        self._evict_drained()

    async def admit_up_to(self, client_id: str, count: int) -> Grant:
        """Takes as many of `count` tokens as `client_id`'s bucket holds, never waiting.

        With rate 5 and burst 3, a full bucket and count 5: 3 are taken, and the other 2
        are refused with a retry delay of 2 / 5 s, after which the bucket has room for them.
        """
        limit = self._limit_of(client_id)
        if limit is None or count <= 0:
            return Grant(max(count, 0))
        bucket = self._bucket(client_id, limit)
        taken = _room(bucket, count)
        if taken:
            await bucket.acquire(taken)  # has room: returns without waiting
        self._evict_drained()
        refused = count - taken
        if not refused:
            return Grant(taken)
        # The bucket is full to within one token now: `refused` more leak out within
        # refused / rate seconds, and never more than a burst fits at once.
        return Grant(
            taken,
            RateLimitedError(
                f"{_over_limit(client_id, limit)}, each task of a batch counting as one:"
                f" {refused} of this batch's tasks were refused; submit them again after"
                " retry_delay",
                min(refused, limit.burst) / limit.rate,
                "rate",
            ),
        )

    def _limit_of(self, client_id: str) -> RateLimit | None:
        """The client's own limit, else the default; None: unlimited."""
        return self._limits.clients.get(client_id, self._limits.default)

    def _bucket(self, client_id: str, limit: RateLimit) -> AsyncLimiter:
        """The client's bucket, made on first use, now the most recently used."""
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = _bucket(limit)
        else:
            self._buckets.move_to_end(client_id)
        return bucket

    def _evict_drained(self) -> None:
        for _ in range(_EVICT_PER_CALL):
            oldest = next(iter(self._buckets.items()), None)
            # Empty when a whole bucket's worth fits: nothing to remember about this client.
            if oldest is None or not oldest[1].has_capacity(oldest[1].max_rate):
                return
            del self._buckets[oldest[0]]


class TypeLimiter:
    """Admits the tasks of each type in [quotas.types] within its RateLimit, whichever
    client submits them; types not named there are unlimited. One bucket per configured
    type, made up front: their number is the file's, so none is ever dropped."""

    def __init__(self, rates: Mapping[str, RateLimit]) -> None:
        self._limits = dict(rates)
        self._buckets = {name: _bucket(limit) for name, limit in rates.items()}

    async def admit(self, task_type: str) -> None:
        """Takes one token of `task_type`'s bucket, or raises RateLimitedError."""
        bucket = self._buckets.get(task_type)
        if bucket is None:
            return
        if not bucket.has_capacity():
            limit = self._limits[task_type]
            # As ClientLimiter.admit: one token leaks out within 1 / rate seconds.
            raise RateLimitedError(
                f"task type {task_type!r} is over its limit of {limit.rate:g} tasks per"
                f" second across all clients (burst {limit.burst}, [quotas.types]); retry"
                " after the delay in RetryInfo",
                1.0 / limit.rate,
                "type_rate",
            )
        await bucket.acquire()  # has capacity: returns without waiting


def _over_limit(client_id: str, limit: RateLimit) -> str:
    return (
        f"client {client_id!r} is over its limit of {limit.rate:g} calls per second"
        f" (burst {limit.burst})"
    )


def _room(bucket: AsyncLimiter, most: int) -> int:
    """How many tokens, up to `most`, the bucket can give now: a binary search over
    has_capacity (aiolimiter's only public view of its level), ten looks for a thousand."""
    low, high = 0, most  # the bucket has room for `low` tokens, and none beyond `high`
    while low < high:
        middle = (low + high + 1) // 2
        if bucket.has_capacity(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _bucket(limit: RateLimit) -> AsyncLimiter:
    # aiolimiter lets max_rate through per time_period in a burst, then leaks at
    # max_rate / time_period: a bucket of `burst` filled at `rate` a second.
    return AsyncLimiter(limit.burst, limit.burst / limit.rate)
