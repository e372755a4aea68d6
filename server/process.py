"""What the router and executor commands share: logs and traces set up, then the event
loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Coroutine
from typing import Any

from server.observability import logs, tracing


def run(
    serve: Coroutine[Any, Any, int],
    log_level: str,
    log_format: str = "json",
    service_name: str = tracing.ROUTER_SERVICE,
) -> int:
    """Runs `serve` on uvloop (asyncio's own loop where uvloop is missing); its exit code.

    Logs go to stderr in `log_format`; traces go where the OTEL_* variables say (nowhere
    by default), as `service_name` unless OTEL_SERVICE_NAME names it."""
    logs.configure(log_level, log_format)
    logs.SECRETS.add_from_env(os.environ)
    try:
        provider = tracing.configure(os.environ, service_name)
    except tracing.TracingConfigError as exc:
        serve.close()  # never started
        logging.getLogger("taskring").error("%s", exc)
        return 2
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(serve)
        return uvloop.run(serve)
    finally:
        if provider is not None:
            provider.shutdown()  # exports the spans still batched


# Collect young objects once allocations outrun deallocations by this much. Above the
# default 700, which was measured at ~6% of a loaded server's time (b9778e5), but not the
# 20,000 used until 2026-11: grpcio's aio server leaves a six-object reference cycle
# behind every call (its _find_method_handler closure), so under a flood of calls, even
# refused ones, each collection freed ~16,000 objects in one 5-14 ms pause that every
# caller waited through. At 2,000 the longest young collection took 0.74 ms, and CPU per
# Submit at 600/s was the same within the noise (±10%) at 700, 2,000, 5,000 and 20,000.
YOUNG_GC_THRESHOLD = 2_000


def settle_heap() -> None:
    """Call once the process has started: everything built so far lives as long as the
    process, so keep it out of the collector's scans, and collect young objects less often
    than by default, but not so rarely that a collection is a long pause."""
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, 20, 20)
