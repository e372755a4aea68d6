"""Task ids: UUIDv7 strings (RFC 9562).

Time-ordered, so new rows append to the end of the primary-key index, and cheap: the 74
random bits come from a generator seeded once from os.urandom, not from a system call per
id (uuid4 costs ~30 µs here, most of a Submit's own budget). Ids must be unique, not
secret: who may read a task is decided by its client id, never by knowing its id.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable


class UuidV7Factory:
    """`factory()` returns a new id such as '0192f1c4-5e2b-7a3d-9c41-6f0b2d8e1a57'."""

    def __init__(
        self,
        rng: random.Random | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        # SystemRandom would make a system call per id; a seeded Mersenne Twister does not.
        self._rng = rng or random.Random(uuid.uuid4().int)
        self._clock_ms = clock_ms

    def __call__(self) -> str:
        millis = self._clock_ms() & ((1 << 48) - 1)
        bits = self._rng.getrandbits(74)
        value = (
            (millis << 80)
            | (0x7 << 76)  # version 7
            | ((bits >> 62) << 64)  # rand_a: 12 bits
            | (0b10 << 62)  # RFC 4122 variant
            | (bits & ((1 << 62) - 1))  # rand_b: 62 bits
        )
        digits = f"{value:032x}"
        return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
