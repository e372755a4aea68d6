"""`python -m server.executor` (or `taskring-executor`): serve ExecutorService until
SIGTERM/SIGINT, then stop gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from server import process
from server.config import ConfigError, ExecutorSettings
from server.observability import tracing
from server.tasktypes import TaskTypeConfigError
from server.tls import serving

from .app import ExecutorApp

_log = logging.getLogger("taskring.executor")


async def serve(settings: ExecutorSettings) -> int:
    try:
        app = ExecutorApp(settings)
    except TaskTypeConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except RuntimeError as exc:  # grpc raises RuntimeError for a busy port
        _log.error("cannot start: %s", exc)
        return 1
    process.settle_heap()
    # Tests and scripts read this line to learn the port (TASKRING_EXECUTOR_LISTEN=...:0).
    print(f"taskring executor listening on {app.address}", flush=True)
    _log.info("running task types %s", ", ".join(sorted(app.backend.task_types)))
    _log.info("%s", serving(settings.tls))
    try:
        await stop.wait()
    finally:
        _log.info("shutting down (grace %.1fs)", settings.shutdown_grace_s)
        await app.stop()
    return 0


def main() -> int:
    try:
        settings = ExecutorSettings.from_env(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return process.run(
        serve(settings), settings.log_level, settings.log_format, tracing.EXECUTOR_SERVICE
    )


if __name__ == "__main__":
    sys.exit(main())
