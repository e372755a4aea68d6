"""What the run tells its user as it goes: progress lines on stderr, and BenchError, the
failure that stops it (its message ends up in the report)."""

from __future__ import annotations

import sys


class BenchError(Exception):
    """The benchmark cannot go on (a server did not start, a stage cannot be set up)."""


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds the JSON line alone."""
    print(message, file=sys.stderr, flush=True)
