"""Several taskring routers sharing one store, loaded as one: started together, their
channels interleaved so that a closed loop's workers spread over them, and the CPU of all
of them, and of the database server's processes, over a load."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from _load import open_channels
from _procs import CpuUse, Server, machine_busy_s, process_cpu_s, server_child

READY = "taskring listening on"


@contextlib.asynccontextmanager
async def routers(
    label: str, count: int, env: Mapping[str, str], workdir: Path
) -> AsyncIterator[list[Server]]:
    """`count` router processes on the same store, each a child in its own process group
    (server_child), all stopped on leaving whatever happened."""
    argv = [sys.executable, "-m", "server"]
    slug = label.replace(" ", "-")
    async with contextlib.AsyncExitStack() as stack:
        servers: list[Server] = []
        # One after the other: they would migrate the schema in turn anyway (an advisory
        # lock), and a start that fails then names the replica that failed.
        for i in range(1, count + 1):
            name = f"taskring {label} #{i}"
            log_path = workdir / f"taskring-{slug}-{i}.log"
            server = server_child(name, argv, env, log_path, READY)
            servers.append(await stack.enter_async_context(server))
        yield servers


@contextlib.asynccontextmanager
async def interleaved_channels(
    servers: Sequence[Server], per_server: int
) -> AsyncIterator[list[grpc.aio.Channel]]:
    """`per_server` channels to each router, ordered router by router in turn (A0 B0 A1
    B1 ...). A load's worker w uses channel w % len, so the workers alternate between the
    routers; and with several routers, channel i+1 (mod len) is always on another router
    than channel i, which is how the e2e load Streams a task elsewhere than it was submitted."""
    async with contextlib.AsyncExitStack() as stack:
        groups = [
            await stack.enter_async_context(open_channels(s.address, per_server)) for s in servers
        ]
        yield [channel for turn in zip(*groups, strict=True) for channel in turn]


@dataclass(frozen=True, slots=True)
class FleetUse:
    """CPU over a load: `cpu` sums the routers (server_pct, server_us_per_op; its
    server_loop_pct is the busiest router's event loop), db_* is the database server's."""

    cpu: CpuUse
    db_pct: float  # NaN: not measurable (SQLite, whose work is in the router; or remote)
    db_us_per_op: float


@dataclass(frozen=True, slots=True)
class FleetSample:
    """CPU seconds of the routers, the database server's processes, this client and the
    whole machine at one instant."""

    at_s: float
    routers_s: tuple[float, ...]
    loops_s: tuple[float, ...]  # each router's main thread: its event loop
    db_s: dict[int, float] | None  # by PID; None: not measurable (SQLite, or not local)
    client_s: float
    machine_s: float

    @classmethod
    def take(cls, router_pids: Sequence[int], db_pids: Sequence[int] | None) -> FleetSample:
        return cls(
            at_s=time.perf_counter(),
            routers_s=tuple(process_cpu_s(pid) for pid in router_pids),
            loops_s=tuple(process_cpu_s(pid, thread=pid) for pid in router_pids),
            db_s=None if db_pids is None else {pid: process_cpu_s(pid) for pid in db_pids},
            client_s=time.process_time(),
            machine_s=machine_busy_s(),
        )

    def use_since(self, before: FleetSample, ops: int) -> FleetUse:
        wall = max(self.at_s - before.at_s, 1e-9)
        routers = sum(self.routers_s) - sum(before.routers_s)
        loop = max((a - b for a, b in zip(self.loops_s, before.loops_s, strict=True)), default=0.0)
        # A backend started during the load (a pool growing) counts from zero; one that
        # ended during it is missed: the pools keep theirs, so few do. NaN: gone.
        db = 0.0
        if self.db_s is not None and before.db_s is not None:
            deltas = (cpu - before.db_s.get(pid, 0.0) for pid, cpu in self.db_s.items())
            db = sum(delta for delta in deltas if math.isfinite(delta))
        client = self.client_s - before.client_s
        other = self.machine_s - before.machine_s - routers - db - client
        per_op = 1e6 / max(ops, 1)
        cpu = CpuUse(
            server_pct=100.0 * routers / wall,
            server_loop_pct=100.0 * loop / wall,
            client_pct=100.0 * client / wall,
            other_pct=100.0 * other / wall,
            server_us_per_op=routers * per_op,
            client_us_per_op=client * per_op,
        )
        if self.db_s is None:
            return FleetUse(cpu, float("nan"), float("nan"))
        return FleetUse(cpu, 100.0 * db / wall, db * per_op)
