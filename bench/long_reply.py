"""Benchmark what long streamed replies cost the router's store: bytes written to disk.

    .venv/bin/python bench/long_reply.py                 # about 30 s
    .venv/bin/python bench/long_reply.py --replies 20 --words 500 --json-out out.json

One client (this process) sends --replies chat tasks at once (SubmitAndStream), each a
--words-word prompt that the built-in `local-echo` model streams back word by word,
--token-delay-ms apart. It runs the same load against two routers in turn, each with a
fresh SQLite store (synchronous=FULL):

  per-commit  TASKRING_OUTPUT_STORE_INTERVAL_S=0: the output is stored again as soon as
              its previous write committed, the pace at which it was stored before
              2026-11-24 (at a provider's token rate, about one write per token): the
              baseline;
  default     the router as shipped (0.25 s).

For each it prints the bytes the router wrote to disk (/proc/PID/io write_bytes: the WAL,
and the checkpoints into the database file) per reply, and as a multiple of the reply's
payload (its prompt plus its text, the least any store holds of it); the router's CPU per
reply; the output deltas a watcher received per reply; the wall time. Then the default's
bytes and CPU as ratios of the baseline's. A figure without a goal: the exit status is 0
unless the run failed (2).

Every child runs in its own process group on 127.0.0.1:0 and is stopped by PID also on
error, Ctrl-C or when --max-seconds runs out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _console import BenchError, log
from _load import open_channels
from _procs import LOOPBACK, bounded_run, process_cpu_s, server_child

from client._proto.taskring.v1 import tasks_pb2, tasks_pb2_grpc

ROUTERS = (("per-commit", "0"), ("default", None))


@dataclass(frozen=True, slots=True)
class Figures:
    router: str
    store_interval_s: str
    replies: int
    payload_bytes_per_reply: float
    disk_bytes_per_reply: float
    amplification: float  # disk bytes / payload bytes
    cpu_ms_per_reply: float
    deltas_per_reply: float
    wall_s: float


def write_bytes(pid: int) -> int:
    """Bytes the process has caused to be written to storage (its threads included)."""
    with open(f"/proc/{pid}/io", encoding="ascii") as io:
        for line in io:
            name, _, value = line.partition(":")
            if name == "write_bytes":
                return int(value)
    raise BenchError(f"/proc/{pid}/io has no write_bytes")


def router_env(
    workdir: Path, name: str, interval: str | None, token_delay_s: float
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TASKRING_LISTEN": f"{LOOPBACK}:0",
            "TASKRING_METRICS_LISTEN": "off",
            "TASKRING_STORE": f"sqlite:///{workdir / f'{name}.db'}",
            "TASKRING_SQLITE_SYNCHRONOUS": "FULL",
            "TASKRING_LOCAL_TOKEN_DELAY_S": str(token_delay_s),
        }
    )
    if interval is not None:
        env["TASKRING_OUTPUT_STORE_INTERVAL_S"] = interval
    return env


async def one_reply(stub: tasks_pb2_grpc.TaskServiceAsyncStub, prompt: str) -> tuple[int, str]:
    """Runs one task to its end; its output deltas and final text."""
    message = tasks_pb2.ChatMessage(role="user", content=prompt)
    spec = tasks_pb2.TaskSpec(chat=tasks_pb2.ChatInput(model="local-echo", messages=[message]))
    deltas, final = 0, None
    async for reply in stub.SubmitAndStream(tasks_pb2.SubmitAndStreamRequest(task=spec)):
        event = reply.event
        if event.HasField("output_delta"):
            deltas += 1
        elif event.HasField("state_changed"):
            final = event.state_changed.task
        elif event.HasField("snapshot"):
            final = event.snapshot
    if final is None or final.state != tasks_pb2.TASK_STATE_SUCCEEDED:
        raise BenchError(f"a reply did not succeed: {final}")
    return deltas, final.output.chat.text


async def measure(args: argparse.Namespace, workdir: Path, figures: list[Figures]) -> None:
    prompt = " ".join(f"word{i}" for i in range(args.words))
    for name, interval in ROUTERS:
        env = router_env(workdir, name, interval, args.token_delay_ms / 1000)
        argv = [sys.executable, "-m", "server"]
        log_path = workdir / f"{name}.log"
        async with (
            server_child(name, argv, env, log_path, "taskring listening on") as router,
            open_channels(router.address, 1) as (channel,),
        ):
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            await one_reply(stub, "warm up")
            bytes_before, cpu_before = write_bytes(router.pid), process_cpu_s(router.pid)
            started = time.perf_counter()
            done = await asyncio.gather(*(one_reply(stub, prompt) for _ in range(args.replies)))
            wall_s = time.perf_counter() - started
            written = write_bytes(router.pid) - bytes_before
            cpu_s = process_cpu_s(router.pid) - cpu_before
        payload = len(prompt.encode()) + len(done[0][1].encode())
        per_reply = written / args.replies
        figures.append(
            Figures(
                router=name,
                store_interval_s=interval or "0.25 (default)",
                replies=args.replies,
                payload_bytes_per_reply=payload,
                disk_bytes_per_reply=per_reply,
                amplification=per_reply / payload,
                cpu_ms_per_reply=cpu_s * 1000 / args.replies,
                deltas_per_reply=sum(deltas for deltas, _ in done) / args.replies,
                wall_s=wall_s,
            )
        )
        log(f"  {name}: {per_reply / 1e6:.2f} MB written per reply")


def report(figures: Sequence[Figures]) -> None:
    print(
        f"{'router':<11} {'interval s':<15} {'payload KB':>10} {'disk MB':>8} {'x payload':>9}"
        f" {'CPU ms':>7} {'deltas':>7} {'wall s':>7}"
    )
    for f in figures:
        print(
            f"{f.router:<11} {f.store_interval_s:<15} {f.payload_bytes_per_reply / 1e3:>10.1f}"
            f" {f.disk_bytes_per_reply / 1e6:>8.2f} {f.amplification:>9.1f}"
            f" {f.cpu_ms_per_reply:>7.1f} {f.deltas_per_reply:>7.0f} {f.wall_s:>7.2f}"
        )
    print("(per reply: disk bytes the router wrote, CPU, output deltas a watcher received)")
    if len(figures) == 2:
        base, new = figures
        print(
            "default / per-commit: disk bytes"
            f" {new.disk_bytes_per_reply / base.disk_bytes_per_reply:.3f},"
            f" CPU {new.cpu_ms_per_reply / base.cpu_ms_per_reply:.3f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--replies", type=int, default=50, help="replies streamed at once")
    p.add_argument("--words", type=int, default=2000, help="words in each prompt (and reply)")
    p.add_argument("--token-delay-ms", type=float, default=2.0, help="local-echo's delay per word")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run")
    p.add_argument("--json-out", help="also write the figures as JSON to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    figures: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="taskring-long-reply-") as tmp:
        failure = asyncio.run(bounded_run(measure(args, Path(tmp), figures), args.max_seconds))
    report(figures)
    line = json.dumps({"bench": "long_reply", "figures": [asdict(f) for f in figures]})
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    if failure:
        log(f"stopped early: {failure}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
