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


def settle_heap() -> None:
    """Call once the process has started: everything built so far lives as long as the
    process, so keep it out of the collector's scans, and collect young objects less often
    (a task allocates many short-lived ones; at the default threshold of 700 the collector
    took ~6% of a loaded server's time)."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
