"""py-spy integration: record the server during chosen loads, and sum each recording up
into hot spots per function."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from _console import log
from _procs import spawn, stop_child


class Profiler:
    """Records the server with `py-spy record --format raw` during chosen stages (when a
    py-spy binary is given) and summarises each recording into hot spots."""

    def __init__(self, binary: str | None, out_dir: Path, extra_args: Sequence[str]) -> None:
        self._binary = binary
        self._out_dir = out_dir  # raw collapsed stacks, one file per stage
        self._extra_args = list(extra_args)
        self.files: dict[str, Path] = {}

    @contextlib.asynccontextmanager
    async def record(self, pid: int, label: str) -> AsyncIterator[None]:
        if self._binary is None:
            yield
            return
        out = self._out_dir / f"{label}.txt"
        argv = [
            self._binary,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(out),
            *self._extra_args,
        ]
        proc = await spawn(argv, self._out_dir / f"{label}.py-spy.log", stdout=subprocess.DEVNULL)
        await asyncio.sleep(1.0)  # attached before the load starts
        try:
            yield
        finally:
            # SIGINT makes py-spy stop sampling and write its output.
            await stop_child(proc, signal.SIGINT, grace_s=30.0)
            if out.exists():
                self.files[label] = out
                log(f"  py-spy: {label} recorded to {out}")


def frame_name(frame: str) -> str:
    """`handler (server/api/servicer.py:57)` -> `handler (server/api/servicer.py)`, with
    the path cut to its last three parts, so samples add up per function."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if match is None:
        return frame.strip()
    name, path = match.groups()
    return f"{name} ({'/'.join(Path(path).parts[-3:])})"


@dataclass(frozen=True, slots=True)
class HotSpots:
    """The functions with the largest share of samples (in %) on top of the stack (self)
    and anywhere in it (total)."""

    samples: int
    self_pct: list[tuple[str, float]]
    total_pct: list[tuple[str, float]]


def hot_spots(collapsed: str, top: int) -> HotSpots:
    """Hot spots from py-spy's raw output: one `root;...;leaf count` line per stack."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # With --threads or --subprocesses py-spy puts the thread or process first.
        parts = [p for p in stack.split(";") if not p.startswith(("thread (", "process "))]
        frames = [frame_name(p) for p in parts]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * c / samples) for name, c in counter.most_common(top)]

    return HotSpots(samples, share(own), share(total))


def read_text(path: Path) -> str:
    return path.read_text(errors="replace")
