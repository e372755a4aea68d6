"""The test suite's FakeOpenAI as a process of its own, for `bench/routing.py`.

    python bench/_fake_provider.py [--token-delay-s 0.002] [--max-seconds 600]

A process of its own so that the fake's event loop is neither the load generator's nor the
router's: a direct call and a routed call then meet the same provider, and neither pays for
the other's Python. It runs on uvloop, as the router does; it keeps no record of requests
(`record=False`: a list that would only grow over a benchmark).

Prints `fake-openai listening on http://127.0.0.1:PORT/v1` on stdout once serving; stops on
SIGTERM or SIGINT, and by itself after --max-seconds in case whoever started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as `python bench/_fake_provider.py` from the repo root, Python puts bench/ (not the
# root) on sys.path; put the root first so `tests.fakes` imports.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes import FakeOpenAI

READY_PREFIX = "fake-openai listening on"


async def serve(token_delay_s: float, max_seconds: float) -> int:
    """Serve until SIGTERM/SIGINT or max_seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeOpenAI(token_delay_s=token_delay_s, record=False) as fake:
        print(f"{READY_PREFIX} {fake.base_url}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=max_seconds)
        except TimeoutError:
            print("fake provider: --max-seconds reached, stopping", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--token-delay-s", type=float, default=0.002, help="pause before each streamed token"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="stop by itself after this long"
    )
    args = parser.parse_args(argv)
    import uvloop

    return int(uvloop.run(serve(args.token_delay_s, args.max_seconds)))


if __name__ == "__main__":
    sys.exit(main())
