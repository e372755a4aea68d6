"""`python -m server` (or `taskring-server`): settings from the environment, run until
SIGTERM/SIGINT, then shut down gracefully. The only place that installs signal handlers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from .app import App
from .config import ConfigError, Settings

_log = logging.getLogger("taskring")


async def serve(settings: Settings) -> None:
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    # Tests and scripts read this line to learn the port (TASKRING_LISTEN=127.0.0.1:0).
    print(f"taskring listening on {app.address}", flush=True)
    _log.info("serving with store %s and backends %s", settings.store.url, ", ".join(app.backends))
    try:
        await stop.wait()
    finally:
        _log.info("shutting down (grace %.1fs)", settings.server.shutdown_grace_s)
        await app.stop()


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.server.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
