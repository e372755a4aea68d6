"""The server bench/watchers.py measures, in a process of its own and run the way `python -m
server` runs (server.process: uvloop, the collector settled after start), with three local
executors whose chat handler also runs the background models of tests/faults/_watchers.py.

    python bench/_watch_server.py DB_PATH

prints `listening ADDRESS METRICS_PORT` once it serves, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

# Run as a script, Python puts bench/ on sys.path: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import process
from server.app import App
from tests.conftest import FAST_RETRY, local_backends, make_settings
from tests.faults._watchers import crowd_chat


async def serve(db: Path) -> int:
    settings = make_settings(db, max_concurrency=64)
    backends = local_backends(count=3, max_concurrency=64, extra={"chat": crowd_chat()})
    app = App(settings, backends=backends, dispatch=FAST_RETRY)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await app.start()
    process.settle_heap()
    print(f"listening {app.address} {app.metrics_port}", flush=True)
    try:
        await stop.wait()
    finally:
        await app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(process.run(serve(Path(sys.argv[1])), "WARNING"))
