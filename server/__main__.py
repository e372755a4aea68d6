"""`python -m server` (or `taskring-server`): settings from the environment, run until
SIGTERM/SIGINT, then shut down gracefully. The only place that installs signal handlers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from . import process
from .app import App
from .backends.factory import BackendConfigError
from .config import ConfigError, Settings, is_loopback
from .model.errors import StoreError
from .tasktypes import TaskTypeConfigError
from .tls import serving

_log = logging.getLogger("taskring")


async def serve(settings: Settings) -> int:
    try:
        app = App(settings)
    except (TaskTypeConfigError, BackendConfigError) as exc:
        print(exc, file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except (StoreError, RuntimeError) as exc:  # grpc raises RuntimeError for a busy port
        _log.error("cannot start: %s", exc)
        await app.stop()
        return 1
    process.settle_heap()
    # Tests and scripts read this line to learn the port (TASKRING_LISTEN=127.0.0.1:0).
    print(f"taskring listening on {app.address}", flush=True)
    _log.info(
        "serving with store %s and backends %s", settings.store.display_url, ", ".join(app.backends)
    )
    _log.info("%s", serving(settings.server.tls))
    if settings.remote_tls is not None:
        _log.info("dialling remote executors over TLS, trusting %s", settings.remote_tls.ca_file)
    if settings.file.api_keys:
        _log.info("API keys required: %d configured", len(settings.file.api_keys))
    elif not is_loopback(settings.server.listen):
        _log.warning(
            "TASKRING_INSECURE: no API keys, and %s is reachable from other machines:"
            " anyone who reaches it may submit, read and cancel tasks",
            settings.server.listen,
        )
    try:
        await stop.wait()
    finally:
        _log.info("shutting down (grace %.1fs)", settings.server.shutdown_grace_s)
        await app.stop()
    return 0


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return process.run(serve(settings), settings.server.log_level, settings.server.log_format)


if __name__ == "__main__":
    sys.exit(main())
