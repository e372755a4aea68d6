"""A bare grpc.aio unary echo server: the yardstick `bench/submit.py` holds Submit against.

    python bench/echo_server.py [--listen 127.0.0.1:0] [--max-seconds 600]

It answers `/bench.Echo/Echo` with the request's bytes: no protobuf, no codegen, no work,
so what it costs is what gRPC itself costs per call on this machine. It runs on uvloop, as
the taskring server does, so the two servers differ only in what their handlers do.

Prints `echo listening on HOST:PORT` on stdout once serving; stops on SIGTERM or SIGINT,
and by itself after --max-seconds in case whoever started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

SERVICE = "bench.Echo"
METHOD = "Echo"
# The full method name a client calls: /bench.Echo/Echo.
FULL_METHOD = f"/{SERVICE}/{METHOD}"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """No (de)serializers are set, so the request arrives as bytes and leaves unchanged."""
    return request


def build_server() -> grpc.aio.Server:
    """An echo server with the same SO_REUSEPORT setting as taskring's."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    return server


async def serve_until_stopped(
    build: Callable[[], grpc.aio.Server], listen: str, name: str, max_seconds: float
) -> int:
    """Serve what `build` makes (called here: a grpc.aio server belongs to the loop it is
    made on) on `listen`, print `<name> listening on HOST:PORT`, and stop with a short grace
    on SIGTERM/SIGINT or after max_seconds. Shared by the bare servers in bench/."""
    server = build()
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = listen.rpartition(":")[0]
    print(f"{name} listening on {host}:{port}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    except TimeoutError:
        print(f"{name} server: --max-seconds reached, stopping", file=sys.stderr)
    finally:
        await server.stop(1.0)
    return 0


async def serve(listen: str, max_seconds: float) -> int:
    return await serve_until_stopped(build_server, listen, "echo", max_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (default 127.0.0.1:0)")
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="stop by itself after this long"
    )
    args = parser.parse_args(argv)
    import uvloop

    return int(uvloop.run(serve(args.listen, args.max_seconds)))


if __name__ == "__main__":
    sys.exit(main())
