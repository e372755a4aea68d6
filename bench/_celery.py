"""The Celery + Redis baseline: a Python that has celery and redis (created once if
need be), the baseline's command line, and its run as a child whose JSON line is parsed."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from _console import BenchError, log
from _procs import ROOT, log_tail, spawn, stop_child
from _results import CeleryPool, CeleryResult
from _stages import LoadSettings

DEFAULT_CELERY_SCRIPT = ROOT.parent / "shared" / "bench" / "celery_baseline.py"

CELERY_VENV = Path("/tmp/taskring-celery-venv")
CELERY_PACKAGES = ("celery", "redis", "packaging")


def has_celery(python: Path) -> bool:
    """Whether `python` can import celery and redis."""
    check = subprocess.run(
        [str(python), "-c", "import celery, redis"], capture_output=True, check=False, timeout=60
    )
    return check.returncode == 0


def ensure_celery_python(explicit: str | None, timeout_s: float) -> Path:
    """The Python to run the Celery baseline with: --celery-python, or a venv created once
    at /tmp/taskring-celery-venv (outside the project; Celery is a yardstick, not a
    dependency)."""
    if explicit:
        python = Path(explicit)
        if not has_celery(python):
            raise BenchError(f"{python} cannot import celery and redis")
        return python
    python = CELERY_VENV / "bin" / "python"
    if python.exists() and has_celery(python):
        return python
    log(f"creating {CELERY_VENV} with {', '.join(CELERY_PACKAGES)} (once)")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(CELERY_VENV)], check=True, timeout=120)
    left = max(timeout_s - (time.monotonic() - started), 10.0)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *CELERY_PACKAGES],
        check=True,
        timeout=left,
        stdout=sys.stderr,
    )
    return python


def celery_argv(
    python: Path, script: Path, settings: LoadSettings, args: argparse.Namespace, max_seconds: float
) -> list[str]:
    """The baseline run with the same task count and rate settings as taskring's stages."""
    argv = [
        str(python),
        str(script),
        "--pools",
        args.celery_pools,
        "--repeat",
        str(args.celery_repeat),
        "--throughput-n",
        str(settings.e2e_n),
        "--rate",
        f"{settings.rate:g}",
        "--rate-duration",
        f"{settings.rate_duration_s:g}",
        "--rate-warmup",
        f"{settings.rate_warmup_s:g}",
        "--quiet-wait",
        f"{settings.quiet_wait_s:g}",
        "--max-seconds",
        f"{max_seconds:.0f}",
    ]
    if args.quick:
        argv += ["--submit-n", "200", "--warmup-n", "50"]
    return argv


def parse_celery(stdout: bytes) -> CeleryResult:
    """Figures from the last JSON line celery_baseline.py prints (medians per pool)."""
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise BenchError("the Celery baseline printed nothing on stdout")
    data = json.loads(lines[-1])

    def median(pool: Mapping[str, Any], key: str) -> float:
        figure = pool.get(key, {})
        return float(figure["median"]) if figure.get("n") else math.nan

    pools = [
        CeleryPool(
            label,
            median(fig, "throughput_tasks_per_s"),
            median(fig, "e2e_p50_ms"),
            median(fig, "e2e_p99_ms"),
            median(fig, "submit_p50_ms"),
        )
        for label, fig in data["summary"].items()
    ]
    return CeleryResult(pools, list(data.get("failures", [])), dict(data.get("versions", {})))


async def celery_stage(argv: Sequence[str], workdir: Path, timeout_s: float) -> CeleryResult:
    """Run the baseline as a child; its table and progress go to its log, its JSON line is
    parsed. On timeout or Ctrl-C it gets SIGINT (it stops its redis and workers in its
    finally blocks), then SIGKILL of its group."""
    log_path = workdir / "celery.log"
    proc = await spawn(argv, log_path)
    try:
        assert proc.stdout is not None
        stdout = await asyncio.wait_for(proc.stdout.read(), timeout_s)
        await proc.wait()
    finally:
        await stop_child(proc, signal.SIGINT, grace_s=30.0)
    log(log_tail(log_path, 16))
    if proc.returncode != 0:
        raise BenchError(f"Celery baseline exited with {proc.returncode}")
    return parse_celery(stdout)
