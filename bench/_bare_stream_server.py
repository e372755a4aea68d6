"""A bare grpc.aio TaskService whose Stream sends "tick " every TICK_S to each watcher of a
task id, and does nothing else: no store, no hub, no conversion. bench/stream_cost.py
runs the same watchers against it and against taskring, so that taskring's cost per
message is read beside what grpc.aio itself costs for one.

    python bench/_bare_stream_server.py

prints `listening ADDRESS` once it serves, and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvloop

# Run as a script, Python puts bench/ on sys.path: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client._proto.taskring.v1 import tasks_pb2 as pb
from tests.faults._watchers import TICK_S


class TickingTasks:
    """TaskService's Stream alone. Every watcher of a task id gets the same tick at the same
    moment: one future per task id, replaced at each tick, which all its watchers await."""

    def __init__(self) -> None:
        self._ticks: dict[str, asyncio.Future[None]] = {}

    def _next_tick(self, task_id: str) -> asyncio.Future[None]:
        tick = self._ticks.get(task_id)
        if tick is None or tick.done():
            loop = asyncio.get_running_loop()
            tick = self._ticks[task_id] = loop.create_future()
            loop.call_later(TICK_S, tick.set_result, None)
        return tick

    async def stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamResponse]:
        sequence = 0
        while True:
            await self._next_tick(request.task_id)
            sequence += 1
            yield pb.StreamResponse(sequence=sequence, output_delta=pb.OutputDelta(text="tick "))


async def serve() -> None:
    server = grpc.aio.server()
    stream = grpc.unary_stream_rpc_method_handler(
        TickingTasks().stream,
        request_deserializer=pb.StreamRequest.FromString,
        response_serializer=pb.StreamResponse.SerializeToString,
    )
    handler = grpc.method_handlers_generic_handler("taskring.v1.TaskService", {"Stream": stream})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"listening 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    uvloop.run(serve())
