"""taskring's admission alone on a bare grpc.aio server: the floor under `bench/admission.py`'s
p99 ratio.

    python bench/floor_server.py --config taskring.toml [--listen 127.0.0.1:0]

It answers `/taskring.v1.TaskService/Submit` as taskring admits a call (the same Gate: API
key, then the client's token bucket) and refuses it the same way (RESOURCE_EXHAUSTED with
its RetryInfo), but an admitted Submit gets a reply encoded once at start: nothing is
checked, stored or run. What a noisy client's flood does to a good client's p99 here is
what it does to any grpc.aio server on this machine; taskring's ratio can be read against it.
It runs on uvloop, as taskring does.

Prints `floor listening on HOST:PORT` on stdout once serving; stops on SIGTERM or SIGINT,
and by itself after --max-seconds in case whoever started it is gone.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

# Run as a script from the repo root: Python puts bench/ on sys.path, not the root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echo_server import serve_until_stopped

from client._proto.taskring.v1 import tasks_pb2 as pb
from server.admission.auth import Authenticator
from server.admission.gate import Gate
from server.admission.limits import ClientLimiter
from server.api.status import to_status
from server.config_file import read_file_config
from server.model.errors import TaskringError

NAME = "floor"
READY_PREFIX = f"{NAME} listening on"  # what serve_until_stopped prints
SERVICE = "taskring.v1.TaskService"


def build_server(gate: Gate) -> grpc.aio.Server:
    """A server with Submit only, as bytes in and out (no request is parsed)."""
    reply = pb.SubmitResponse(
        task=pb.Task(id="floor", state=pb.TASK_STATE_QUEUED), created=True
    ).SerializeToString()

    async def submit(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            await gate.admit(context)
        except TaskringError as exc:  # as taskring's _refuse: the status, no reply
            status = to_status(exc)
            context.set_code(status.code)
            context.set_details(status.details)
            context.set_trailing_metadata(status.trailing_metadata)
            return b""
        return reply

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Submit": grpc.unary_unary_rpc_method_handler(submit)}
    )
    server.add_generic_rpc_handlers((handler,))
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", required=True, help="a TASKRING_CONFIG file: keys, limits")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (default 127.0.0.1:0)")
    parser.add_argument(
        "--max-seconds", type=float, default=600.0, help="stop by itself after this long"
    )
    args = parser.parse_args(argv)
    config, problems = read_file_config(args.config)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    gate = Gate(Authenticator(config.api_keys), ClientLimiter(config.limits))
    import uvloop

    build = functools.partial(build_server, gate)
    serving = serve_until_stopped(build, args.listen, NAME, args.max_seconds)
    return int(uvloop.run(serving))


if __name__ == "__main__":
    sys.exit(main())
