"""Benchmark Submit and end-to-end task processing against a bare gRPC echo and Celery + Redis.

    .venv/bin/python bench/submit.py [--quick] [--channels 1,2] [--json-out FILE] ...

In one run, on loopback, with the same load client (grpc.aio on uvloop, one process):

  echo    a bare grpc.aio unary echo server (bench/echo_server.py, uvloop like taskring):
          N calls with C in flight; what a gRPC call costs here, nothing else;
  submit  taskring's Submit, called exactly like the echo (raw bytes in and out, so the
          client side is identical); each reply follows a durable commit;
  e2e     submit N tasks and Stream each until SUCCEEDED with K tasks in flight, for each K
          of a sweep; tasks/s from the first Submit to the last SUCCEEDED seen;
  rate    one Submit every 1/rate s (open loop: send times computed from the start), each
          followed by a Stream until SUCCEEDED; latency from just before Submit to SUCCEEDED;
          (e2e and rate: with --e2e-call submit-and-stream, one SubmitAndStream call per
          task instead, as a client that waits for its result would call)
  observ  Submit as above without, then with, metrics and tracing (OTLP to bench/_otlp_sink.py,
          default sampling), a fresh server each, in turns; goal: on / off >= 0.9;
  celery  ../shared/bench/celery_baseline.py (Celery + Redis, no-op task) run by a Python
          that has celery and redis, on the same machine after taskring has stopped;
  stores  (only when asked for: --stages stores) Submit and e2e as above on SQLite, on
          PostgreSQL with one router and with two routers sharing it (--stores,
          --replicas), a fresh store each; the ratios PostgreSQL x1 / SQLite and
          PostgreSQL x2 / x1 are reported as figures, with no goal.

Ratios are printed beside their goals (Submit/echo calls/s >= 0.6; taskring e2e tasks/s >=
2x Celery's best pool; taskring e2e p99 at 200/s <= 0.5x Celery's best pool; Submit with
metrics and tracing at least 0.9x without). `--stages observability` runs only that one.

Every server is a child in its own process group on 127.0.0.1:0, taskring with a fresh
store in a temporary directory; each is stopped by PID (SIGTERM, then SIGKILL of its group)
also on error, Ctrl-C, SIGTERM or when --max-seconds runs out. A table goes to stderr and
one JSON line is printed last on stdout. Exit status: 0 when every goal is met, 1 when a
goal is missed or the run stopped early, 2 when it failed before measuring taskring.

The work is split over the modules beside this script (bench/ is a folder of scripts, not a
package); this one parses the options and runs the stages in order:

  _stages.py   the stages: echo, Submit, e2e sweep, fixed rate
  _stores.py   the stores stage: SQLite and PostgreSQL, one and two routers
  _replicas.py several routers as one: started together, channels interleaved, their CPU
  _pg.py       a throwaway PostgreSQL database per configuration, dropped after it
  _load.py     the load client: closed and open loops, unary and Submit + Stream operations
  _procs.py    CPU use from /proc, the quiet-machine wait, server children and their groups
  _celery.py   the Celery + Redis baseline
  _profile.py  py-spy recordings and their hot spots
  _results.py  what a run measured and the ratios against their goals
  _report.py   the table on stderr and the JSON line
  _stats.py    latency percentiles
  _console.py  progress on stderr and BenchError
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as `python bench/submit.py` from the repo root, Python puts bench/ (not the root) on
# sys.path; put the root first so the generated stubs import. bench/ is put there too (run
# as a script it already is) so the modules beside this one import by their plain names.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _celery import (
    CELERY_VENV,
    DEFAULT_CELERY_SCRIPT,
    celery_argv,
    celery_stage,
    ensure_celery_python,
)
from _console import BenchError, log
from _procs import LOOPBACK, ROOT, bounded_run
from _profile import Profiler, hot_spots, read_text
from _report import print_table, summary_json
from _results import Report
from _stages import LoadSettings, echo_stage, observability_stage, taskring_stages
from _stores import STORES, durability, store_configs, stores_stage

# --------------------------------------------------------------------------- orchestration


def store_url(store: str, workdir: Path) -> str:
    """TASKRING_STORE for the run: `sqlite` is a fresh file in the run's temporary
    directory; a URL (e.g. postgresql://... once the server has that store) passes as is."""
    if store == "sqlite":
        return f"sqlite:///{workdir / 'taskring.db'}"
    if "://" in store:
        return store
    raise BenchError(f"--store {store!r}: expected sqlite or a store URL")


def server_env(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """The taskring server's environment: this one plus the run's settings."""
    env = dict(os.environ)
    env.update(
        {
            "TASKRING_LISTEN": f"{LOOPBACK}:0",
            # Metrics on, as deployed, on a free port; --server-env
            # TASKRING_METRICS_LISTEN=off measures without them.
            "TASKRING_METRICS_LISTEN": f"{LOOPBACK}:0",
            "TASKRING_STORE": store_url(args.store, workdir),
            "TASKRING_LOCAL_TOKEN_DELAY_S": "0",
            "TASKRING_LOCAL_EXECUTORS": "3",
            "TASKRING_LOCAL_MAX_CONCURRENCY": "32",
            "TASKRING_SQLITE_SYNCHRONOUS": "FULL",
        }
    )
    for assignment in args.server_env:
        name, sep, value = assignment.partition("=")
        if not sep:
            raise BenchError(f"--server-env {assignment!r}: expected NAME=VALUE")
        env[name] = value
    return env


def environment() -> dict[str, Any]:
    """Versions and the source tree, so figures can be matched to what produced them."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "uvloop": version("uvloop"),
        "git": git.stdout.strip() or "unknown",
    }


@dataclass(frozen=True, slots=True)
class Run:
    """What every stage of one run shares."""

    args: argparse.Namespace
    settings: LoadSettings
    workdir: Path  # the run's temporary directory: store, logs
    server_env: dict[str, str]
    celery_python: Path | None  # None: the baseline is not run, for celery_note's reason
    celery_note: str
    profiler: Profiler
    budget_end: float  # time.monotonic() at which --max-seconds runs out


def find_celery_python(args: argparse.Namespace, budget_end: float) -> tuple[Path | None, str]:
    """The Python for the baseline, found or created before any server starts (so a pip
    install never runs beside a measurement); or None and why."""
    if args.no_celery:
        return None, "--no-celery"
    if "celery" not in args.stages:  # no venv created for a run that will not use it
        return None, "not among --stages"
    if not Path(args.celery_script).exists():
        return None, f"{args.celery_script} not found"
    try:
        return ensure_celery_python(args.celery_python, budget_end - time.monotonic()), ""
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        return None, f"no Python with celery: {exc}"


async def run_celery(run: Run, report: Report) -> None:
    """The baseline, last, when taskring has stopped, with what is left of the budget."""
    if run.celery_python is None:
        report.celery_note = run.celery_note
        return
    left = run.budget_end - time.monotonic()
    if left < run.args.celery_min_seconds:
        report.celery_note = f"only {left:.0f} s left of --max-seconds"
        return
    log("Celery + Redis baseline ...")
    argv = celery_argv(
        run.celery_python,
        Path(run.args.celery_script),
        run.settings,
        run.args,
        max_seconds=left - 20,
    )
    try:
        report.celery = await celery_stage(argv, run.workdir, timeout_s=left - 5)
    except (BenchError, ValueError, KeyError) as exc:
        report.celery_note = str(exc)


async def run_all(run: Run, report: Report) -> None:
    """The chosen stages in order; one server at a time, so they never compete for the CPU."""
    stages = run.args.stages
    if "echo" in stages:
        await echo_stage(run.settings, run.workdir, report)
    if "taskring" in stages:
        await taskring_stages(run.settings, run.server_env, run.workdir, run.profiler, report)
    if "observability" in stages:
        rounds = run.args.observability_rounds
        await observability_stage(run.settings, run.server_env, run.workdir, report, rounds)
    if "stores" in stages:
        configs = store_configs(run.args.stores, run.args.replicas)
        await stores_stage(
            run.settings, run.server_env, run.workdir, configs, run.args.postgresql_url, report
        )
    if "celery" in stages:
        await run_celery(run, report)


async def main_async(run: Run, report: Report) -> None:
    """Runs every stage within the budget. A failure, SIGTERM or Ctrl-C is recorded in the
    report (whose figures so far are still printed) after every child has been stopped."""
    left_s = run.budget_end - time.monotonic()
    if failure := await bounded_run(run_all(run, report), run.args.max_seconds, left_s):
        report.failure = failure
    for label, path in run.profiler.files.items():
        report.profiles[label] = hot_spots(read_text(path), run.args.profile_top)


STAGES = ("echo", "taskring", "observability", "stores", "celery")
# What a run without --stages measures: the stores stage needs a PostgreSQL server and
# answers another question (which store, how many routers), so it runs only when asked for.
DEFAULT_STAGES = ("echo", "taskring", "observability", "celery")


def name_set(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated subset of `choices`, in the order given."""

    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        if not chosen or set(chosen) - set(choices):
            raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}: {text!r}")
        return chosen

    return parse


def int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2: {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=5000, help="echo and Submit calls per load")
    p.add_argument("--concurrency", type=int, default=16, help="echo/Submit calls in flight")
    p.add_argument(
        "--channels",
        type=int_list,
        default=(1,),
        help="channel counts to measure echo and Submit with, e.g. 1,2; the "
        "first is used for the e2e and rate stages",
    )
    p.add_argument("--warmup-n", type=int, default=500, help="unrecorded calls before a load")
    p.add_argument("--e2e-n", type=int, default=2000, help="tasks per e2e throughput load")
    p.add_argument(
        "--e2e-concurrency",
        type=int_list,
        default=(64, 128, 256),
        help="tasks in flight: each value is measured, the best is reported",
    )
    p.add_argument(
        "--e2e-call",
        choices=("submit-stream", "submit-and-stream"),
        default="submit-stream",
        help="how the e2e and rate stages submit and wait for each task: a Submit then a "
        "Stream, or one SubmitAndStream call",
    )
    p.add_argument("--rate", type=float, default=200.0, help="fixed Submit rate, tasks/s")
    p.add_argument("--rate-duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--rate-warmup", type=float, default=1.0, help="unrecorded seconds first")
    p.add_argument(
        "--echo-bytes",
        type=int,
        default=128,
        help="echo request and reply size (a Submit reply is ~130 bytes)",
    )
    p.add_argument(
        "--store", default="sqlite", help="sqlite (a fresh file per run) or a TASKRING_STORE URL"
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the taskring server (repeatable)",
    )
    p.add_argument(
        "--celery-python",
        help=f"a Python with celery and redis (default: a venv created once at {CELERY_VENV})",
    )
    p.add_argument("--celery-script", default=str(DEFAULT_CELERY_SCRIPT))
    p.add_argument("--celery-pools", default="solo:1,prefork:2")
    p.add_argument(
        "--celery-repeat", type=int, default=1, help="baseline runs per pool (medians if > 1)"
    )
    p.add_argument(
        "--celery-min-seconds",
        type=float,
        default=60.0,
        help="skip Celery when less than this is left of --max-seconds",
    )
    p.add_argument("--no-celery", action="store_true", help="skip the Celery baseline")
    p.add_argument(
        "--stages",
        type=name_set(STAGES),
        default=DEFAULT_STAGES,
        help="which stages to run, of " + ",".join(STAGES),
    )
    p.add_argument(
        "--stores",
        type=name_set(STORES),
        default=STORES,
        help="stores the stores stage compares (SQLite with one router only)",
    )
    p.add_argument(
        "--replicas",
        type=int_list,
        default=(1, 2),
        help="router counts the stores stage runs on PostgreSQL; the e2e load uses the "
        "first K of --e2e-concurrency and --channels' first count per router",
    )
    p.add_argument(
        "--postgresql-url",
        default="postgresql://127.0.0.1:5432/test",
        help="a database to connect to on the PostgreSQL server the stores stage uses: it "
        "creates (and drops) a database of its own beside it for each configuration",
    )
    p.add_argument(
        "--observability-rounds",
        type=int,
        default=2,
        help="Submit loads without, then with, metrics + tracing (each round one of each)",
    )
    p.add_argument("--quick", action="store_true", help="small loads: a smoke run")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each load, wait up to this long for an idle machine",
    )
    p.add_argument(
        "--quiet-pct", type=float, default=15.0, help="idle: busy CPU below this %% of one core"
    )
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run")
    p.add_argument("--json-out", help="also write the JSON summary to this file")
    p.add_argument(
        "--py-spy",
        help="py-spy binary: profile the taskring server during its "
        "loads (figures of such a run are slowed by the sampling)",
    )
    p.add_argument(
        "--py-spy-args", default="--rate 100", help="extra py-spy record arguments, e.g. '--native'"
    )
    p.add_argument("--profile-dir", help="keep the raw py-spy stacks here")
    p.add_argument("--profile-top", type=int, default=15, help="hot spots listed per kind")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.warmup_n, args.e2e_n = 500, 100, 300
        args.e2e_concurrency, args.rate_duration, args.quiet_wait = (64,), 2.0, 2.0
    return args


def load_settings(args: argparse.Namespace) -> LoadSettings:
    return LoadSettings(
        unary_n=args.n,
        unary_concurrency=args.concurrency,
        warmup_n=args.warmup_n,
        channel_counts=args.channels,
        e2e_n=args.e2e_n,
        e2e_concurrency=args.e2e_concurrency,
        rate=args.rate,
        rate_duration_s=args.rate_duration,
        rate_warmup_s=args.rate_warmup,
        echo_bytes=args.echo_bytes,
        quiet_wait_s=args.quiet_wait,
        quiet_pct=args.quiet_pct,
        e2e_call=args.e2e_call,
    )


def write_json_out(path: str, line: str) -> None:
    Path(path).write_text(line + "\n")


def exit_status(report: Report) -> int:
    """2: the run failed before measuring taskring; 1: a goal missed or the run stopped
    early; 0 otherwise (a ratio that could not be measured, e.g. --no-celery, is N/A)."""
    measured_stores = any(run.submit or run.e2e for run in report.stores)
    if report.failure and not (report.submit or report.e2e or measured_stores):
        return 2
    missed = any(c.passed is False for c in report.checks())
    return 1 if missed or report.failure else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget_end = time.monotonic() + args.max_seconds
    settings = load_settings(args)
    with tempfile.TemporaryDirectory(prefix="taskring-bench-") as tmp:
        workdir = Path(tmp)
        try:
            env = server_env(args, workdir)
        except BenchError as exc:
            log(str(exc))
            return 2
        config = {k: v for k, v in vars(args).items() if k != "func"}
        config.update(store_url=env["TASKRING_STORE"], durability=durability(env))
        report = Report(config=config, environment=environment())
        celery_python, celery_note = find_celery_python(args, budget_end)
        profile_dir = Path(args.profile_dir) if args.profile_dir else workdir
        profile_dir.mkdir(parents=True, exist_ok=True)
        profiler = Profiler(args.py_spy, profile_dir, args.py_spy_args.split())
        run = Run(args, settings, workdir, env, celery_python, celery_note, profiler, budget_end)
        import uvloop

        uvloop.run(main_async(run, report))
    print_table(report)
    line = summary_json(report)
    if args.json_out:
        write_json_out(args.json_out, line)
    print(line, flush=True)
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
