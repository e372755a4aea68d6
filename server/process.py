"""What the router and executor commands share: logging set up, then the event loop."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any


def run(serve: Coroutine[Any, Any, int], log_level: str) -> int:
    """Runs `serve` on uvloop (asyncio's own loop where uvloop is missing); its exit code."""
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve)
    return uvloop.run(serve)
