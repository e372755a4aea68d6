"""A stand-in OpenTelemetry collector for `bench/submit.py`: takes OTLP/HTTP trace exports
on POST /v1/traces and answers as a collector does, keeping nothing.

    python bench/_otlp_sink.py [--max-seconds 900]

A process of its own, like a real collector beside the router: the router pays for
building, batching, encoding and sending its spans, as it would in production. Prints
`otlp-sink listening on http://127.0.0.1:PORT` on stdout once serving (the value of
OTEL_EXPORTER_OTLP_ENDPOINT); stops on SIGTERM or SIGINT, or after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

READY_PREFIX = "otlp-sink listening on"
ACCEPTED = ExportTraceServiceResponse().SerializeToString()


async def traces(request: web.Request) -> web.Response:
    await request.read()  # the whole export, as a collector reads it
    return web.Response(body=ACCEPTED, content_type="application/x-protobuf")


async def serve(max_seconds: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.post("/v1/traces", traces)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"{READY_PREFIX} http://127.0.0.1:{port}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    finally:
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--max-seconds", type=float, default=900.0)
    args = p.parse_args(argv)
    return asyncio.run(serve(args.max_seconds))


if __name__ == "__main__":
    sys.exit(main())
