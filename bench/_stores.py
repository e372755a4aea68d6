"""The stores stage: Submit throughput and end-to-end tasks/s on SQLite and on PostgreSQL
in one run, and on PostgreSQL with one and with several router replicas sharing it.

For each configuration a fresh store (a new SQLite file; a new PostgreSQL database, dropped
after it) and its routers, each with its own in-process local executors as the other stages
set them; then, with the other stages' client code:

  Submit  N calls, C in flight (the Submit stage's load), the workers spread over the
          routers in turn;
  e2e     Submit then Stream until SUCCEEDED, K in flight (the first K of
          --e2e-concurrency); with several routers each task is Streamed on another router
          than the one that took its Submit, so every event it waits for crossed replicas
          (PostgreSQL LISTEN/NOTIFY), as a client behind a load balancer would see it.

SQLite allows one process per file: it is measured with one router only. The module also
says what a Submit reply promises under a store (`durability`), for every stage's report.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from _console import log
from _load import chat_request, closed_loop, submit_and_wait_call, wait_until_idle
from _pg import bench_database
from _procs import Server, wait_for_quiet
from _replicas import FleetSample, interleaved_channels, routers
from _results import LoadResult, Report, StoreLoad, StoreRun
from _stages import Load, LoadSettings, submit_load

STORES = ("sqlite", "postgresql")


def durability(env: Mapping[str, str]) -> str:
    """What a Submit reply promises under this configuration (SQLite's from the server's
    setting; PostgreSQL's is read from the database server by _pg.bench_database)."""
    url = env["TASKRING_STORE"]
    if url.startswith("sqlite:"):
        sync = env.get("TASKRING_SQLITE_SYNCHRONOUS", "FULL").upper()
        if sync in ("FULL", "EXTRA"):
            return (
                f"each Submit reply follows a durable commit (SQLite synchronous={sync}, "
                "WAL, group commit: one fsync per group of concurrent Submits)"
            )
        return f"NOT durable: SQLite synchronous={sync}"
    return "durability as configured by the store"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """One configuration: a store kind and how many routers share it."""

    store: str  # one of STORES
    replicas: int

    @property
    def label(self) -> str:
        return "sqlite" if self.store == "sqlite" else f"postgresql x{self.replicas}"


def store_configs(stores: Sequence[str], replicas: Sequence[int]) -> list[StoreConfig]:
    """SQLite with one router; PostgreSQL with each router count, in the order given."""
    return [
        StoreConfig(store, count)
        for store in stores
        for count in ((1,) if store == "sqlite" else replicas)
    ]


async def no_processes() -> list[int] | None:
    """SQLite's database work runs in the router's own threads: nothing more to measure."""
    return None


@dataclass(frozen=True, slots=True)
class FreshStore:
    url: str  # TASKRING_STORE
    durability: str
    # PIDs of the database server's processes working for this store now (asked before and
    # after each load: the routers' pools grow), None when not measurable.
    db_processes: Callable[[], Awaitable[list[int] | None]] = no_processes


@contextlib.asynccontextmanager
async def fresh_store(
    config: StoreConfig, env: Mapping[str, str], workdir: Path, pg_admin_url: str
) -> AsyncIterator[FreshStore]:
    """A store no load has touched: a new SQLite file in the run's directory (removed with
    it), or a new PostgreSQL database dropped on leaving."""
    if config.store == "sqlite":
        url = f"sqlite:///{workdir / f'stores-{config.label}.db'}"
        yield FreshStore(url, durability({**env, "TASKRING_STORE": url}))
        return
    async with bench_database(pg_admin_url) as db:
        yield FreshStore(db.store_url, db.durability, db.processes)


async def stores_stage(
    settings: LoadSettings,
    env: Mapping[str, str],
    workdir: Path,
    configs: Sequence[StoreConfig],
    pg_admin_url: str,
    report: Report,
) -> None:
    """Each configuration in turn, one at a time, so they never compete for the CPU."""
    for config in configs:
        run = StoreRun(config.label, config.store, config.replicas)
        report.stores.append(run)
        log(f"stores: {config.label} ...")
        async with fresh_store(config, env, workdir, pg_admin_url) as store:
            run.durability = store.durability
            server_env = {**env, "TASKRING_STORE": store.url}
            async with (
                routers(config.label, config.replicas, server_env, workdir) as servers,
                interleaved_channels(servers, settings.channel_counts[0]) as channels,
            ):
                measure = functools.partial(
                    measure_fleet,
                    servers=servers,
                    db_processes=store.db_processes,
                    quiet=(settings.quiet_wait_s, settings.quiet_pct),
                    settle=functools.partial(wait_until_idle, channels[0]),
                )
                setting = f"C={settings.unary_concurrency} ch={len(channels)}"
                run.submit = await measure("Submit", setting, submit_load(settings, channels))
                # The submitted tasks still run after the load: not on the e2e load's time.
                await wait_until_idle(channels[0])
                k = settings.e2e_concurrency[0]
                # Several routers: Stream on the next channel, which is on another router.
                offset = 1 if config.replicas > 1 else 0
                call = submit_and_wait_call(channels, chat_request(), stream_offset=offset)
                load = Load(call, settings.e2e_n, k, min(settings.warmup_n, settings.e2e_n))
                run.e2e = await measure("e2e", f"K={k} ch={len(channels)}", load)


async def measure_fleet(
    stage: str,
    setting: str,
    load: Load,
    *,
    servers: Sequence[Server],
    db_processes: Callable[[], Awaitable[list[int] | None]],
    quiet: tuple[float, float],
    settle: Callable[[], Awaitable[None]],
) -> StoreLoad:
    """_stages.measure_closed for several routers: warm up, settle, wait for a quiet
    machine, run; CPU of every router and of the database server's processes."""
    if load.warmup_n:
        warm, _ = await closed_loop(load.call, load.warmup_n, load.concurrency)
        for error, count in warm.errors.items():
            log(f"  warm-up: {count} x {error}")
    await settle()
    await wait_for_quiet(*quiet)
    pids = [server.pid for server in servers]
    before = FleetSample.take(pids, await db_processes())
    outcomes, started = await closed_loop(load.call, load.n, load.concurrency)
    after = FleetSample.take(pids, await db_processes())
    use = after.use_since(before, len(outcomes.latencies_s))
    result = LoadResult.of(stage, setting, outcomes, started, use.cpu)
    log(
        f"  {stage} {setting}: {result.per_s:.0f}/s, p50 {result.latency.p50_ms:.2f} ms, "
        f"p99 {result.latency.p99_ms:.2f} ms, errors {sum(result.errors.values())}, "
        f"routers CPU {use.cpu.server_pct:.0f}% (busiest loop {use.cpu.server_loop_pct:.0f}%), "
        f"PostgreSQL CPU {use.db_pct:.0f}%, client CPU {use.cpu.client_pct:.0f}%, "
        f"other {use.cpu.other_pct:.0f}%"
    )
    return StoreLoad(result, use.db_pct, use.db_us_per_op)
