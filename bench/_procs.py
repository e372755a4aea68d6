"""This machine and the children run on it: CPU use read from /proc, the wait for a
quiet machine, and server children started in their own process groups and stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from _console import BenchError, log

ROOT = Path(__file__).resolve().parent.parent  # the repository root: children run there
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- CPU use


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """User+system CPU seconds of one process (all its threads) or of one of its threads,
    from /proc; NaN if gone."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path, encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU over a measured span, in % of one core and in microseconds per operation;
    other_pct is what the rest of the machine used meanwhile (noise when well above ~5)."""

    server_pct: float
    # The server's main thread: its event loop, where all its Python code but the SQLite
    # writer and readers runs. Near 100 it, not the machine, is the bottleneck.
    server_loop_pct: float
    client_pct: float
    other_pct: float
    server_us_per_op: float
    client_us_per_op: float


@dataclass(frozen=True, slots=True)
class CpuSample:
    at_s: float
    server_s: float
    server_loop_s: float
    client_s: float
    machine_s: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSample:
        return cls(
            at_s=time.perf_counter(),
            server_s=process_cpu_s(server_pid),
            server_loop_s=process_cpu_s(server_pid, thread=server_pid),
            client_s=time.process_time(),
            machine_s=machine_busy_s(),
        )

    def use_since(self, before: CpuSample, ops: int) -> CpuUse:
        wall = max(self.at_s - before.at_s, 1e-9)
        server = self.server_s - before.server_s
        client = self.client_s - before.client_s
        other = self.machine_s - before.machine_s - server - client
        per_op = 1e6 / max(ops, 1)
        return CpuUse(
            server_pct=100.0 * server / wall,
            server_loop_pct=100.0 * (self.server_loop_s - before.server_loop_s) / wall,
            client_pct=100.0 * client / wall,
            other_pct=100.0 * other / wall,
            server_us_per_op=server * per_op,
            client_us_per_op=client * per_op,
        )


async def wait_for_quiet(max_wait_s: float, busy_pct: float) -> float:
    """Wait (at most max_wait_s) until the machine's busy CPU over half a second is below
    busy_pct % of one core: on 2 cores any other program skews the figures. Returns the
    last busy percentage seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        await asyncio.sleep(0.5)
        used = 100.0 * (machine_busy_s() - before) / 0.5
        if used < busy_pct or time.monotonic() >= deadline:
            if used >= busy_pct:
                log(f"  machine still busy ({used:.0f}% of a core); measuring anyway")
            return used


# --------------------------------------------------------------------------- child processes


def die_with_parent() -> None:
    """preexec_fn: the kernel sends the child SIGTERM if this process dies (Linux)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def spawn(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    stdout: int = subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start a child in its own process group (so its own children can be killed with it),
    stderr to log_path."""
    with open_log(log_path) as log_file:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdout=stdout,
            stderr=log_file,
            env=dict(env) if env is not None else None,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


async def stop_child(
    proc: asyncio.subprocess.Process, first: int = signal.SIGTERM, grace_s: float = 15.0
) -> None:
    """Send `first` to the child by PID; if it has not exited within grace_s, SIGKILL its
    whole process group (it is still the group's leader, so the group id is still its)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            log(f"  pid {proc.pid} did not stop within {grace_s:.0f} s: SIGKILL to its group")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@dataclass(frozen=True, slots=True)
class Server:
    """A started server child: its process, the address it printed and its log."""

    name: str
    proc: asyncio.subprocess.Process
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.asynccontextmanager
async def server_child(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    log_path: Path,
    ready_prefix: str,
    ready_timeout_s: float = 30.0,
) -> AsyncIterator[Server]:
    """Start a server that prints `<ready_prefix> HOST:PORT` on stdout once serving; stop it
    (SIGTERM, graceful) on leaving, whatever happened."""
    proc = await spawn(argv, log_path, env)
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ready_timeout_s)
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith(ready_prefix):
            raise BenchError(
                f"{name} did not start (stdout {text!r}); its log:\n{log_tail(log_path)}"
            )
        address = text.removeprefix(ready_prefix).strip()
        log(f"{name} pid {proc.pid} listening on {address}")
        yield Server(name, proc, address, log_path)
    finally:
        await stop_child(proc)
        if proc.returncode not in (0, None):
            log(f"  {name} exited with {proc.returncode}; its log:\n{log_tail(log_path)}")


async def bounded_run(
    work: Awaitable[None], max_seconds: float, left_s: float | None = None
) -> str:
    """Runs `work` within the run's --max-seconds (`left_s` of it, when some was spent
    already), SIGINT and SIGTERM cancelling it; returns why it stopped early ("" if it did
    not). Children it started are stopped by their own context managers on the way out."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    # Ours, not asyncio.Runner's: it skips SIGINT when started with SIGINT ignored (`cmd &`).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, current.cancel)
    try:
        async with asyncio.timeout(max_seconds if left_s is None else left_s):
            await work
    except TimeoutError:
        return f"--max-seconds ({max_seconds:g}) reached"
    except asyncio.CancelledError:
        return "interrupted"
    except (BenchError, grpc.aio.AioRpcError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""
