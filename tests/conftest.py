"""Fixtures that start real servers on 127.0.0.1:0 with real SQLite files, and clean up."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from client._proto.taskring.v1 import tasks_pb2 as pb
from client._proto.taskring.v1 import tasks_pb2_grpc
from server.app import App
from server.backends.base import Backend, BackendEvent
from server.backends.local import LocalBackend, LocalModelSettings, builtin_handlers
from server.config import (
    LocalExecutorSettings,
    ServerSettings,
    Settings,
    StoreSettings,
)
from server.dispatch.dispatcher import DispatchSettings
from server.dispatch.retry import RetryPolicies, RetryPolicy
from server.model.task import Task
from tests.pg import RunDatabase
from tests.tls_certs import Pki, issue_pki

ROOT = Path(__file__).resolve().parent.parent
Handler = Callable[[Task], "AsyncIterator[BackendEvent]"]


def unused_port() -> int:
    """A loopback port nothing listens on now (bound, then released): a connection to it
    is refused, and a server may take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_settings(
    db: Path, store_check_interval_s: float = 2.0, store_url: str | None = None, **local: float
) -> Settings:
    """`store_url` replaces the SQLite file `db` (a PostgreSQL schema, say)."""
    return Settings(
        server=ServerSettings(
            listen="127.0.0.1:0",
            shutdown_grace_s=0.5,
            store_check_interval_s=store_check_interval_s,
            metrics_listen="127.0.0.1:0",  # a free port each: servers run side by side
        ),
        store=StoreSettings(url=store_url or f"sqlite:///{db}", lease_s=2.0),
        local=LocalExecutorSettings(
            count=int(local.get("count", 3)),
            max_concurrency=int(local.get("max_concurrency", 8)),
            token_delay_s=float(local.get("token_delay_s", 0.0)),
        ),
    )


def local_backends(
    count: int = 3,
    max_concurrency: int = 8,
    token_delay_s: float = 0.0,
    extra: Mapping[str, Handler] | None = None,
) -> dict[str, Backend]:
    """The built-in offline types plus test handlers (real implementations, no mocks)."""
    handlers = {
        **builtin_handlers(LocalModelSettings(token_delay_s=token_delay_s)),
        **(extra or {}),
    }
    return {
        f"local-{i}": LocalBackend(f"local-{i}", handlers, max_concurrency)
        for i in range(1, count + 1)
    }


@dataclass
class Running:
    """An in-process server and a channel to it."""

    app: App
    channel: grpc.aio.Channel
    stub: tasks_pb2_grpc.TaskServiceAsyncStub


FAST_RETRY = DispatchSettings(poll_interval_s=0.05, retry=RetryPolicies(RetryPolicy(0.01, 0.05)))


StartServer = Callable[..., Awaitable[Running]]


# The store and service suites run against both stores; the rest against SQLite only.
BOTH_STORES = ("tests/api/", "tests/store/", "tests/client/")
STORE_KINDS: tuple[str, ...] = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: reads or damages the SQLite file itself; not run on PostgreSQL"
    )
    config.addinivalue_line(
        "markers", "postgresql_only: several processes sharing one store (SQLite has one)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`store_kind`, which `store_url` (and so every server fixture) depends on."""
    if "store_kind" not in metafunc.fixturenames:
        return
    marked = metafunc.definition.get_closest_marker
    path = Path(metafunc.definition.path).relative_to(ROOT).as_posix()
    if marked("postgresql_only"):
        kinds = STORE_KINDS[1:]
    elif path.startswith(BOTH_STORES) and not marked("sqlite_only"):
        kinds = STORE_KINDS
    else:
        kinds = STORE_KINDS[:1]
    metafunc.parametrize("store_kind", kinds)


@pytest.fixture(scope="session")
def postgres() -> Iterator[RunDatabase]:
    """This run's own database on the machine's PostgreSQL, dropped at the end."""
    database = RunDatabase()
    database.create()
    yield database
    database.drop()


StoreUrl = Callable[[Path], str]


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest) -> StoreUrl:
    """The store URL standing in for a SQLite file path, in the test's store kind."""
    if store_kind == "postgresql":
        database: RunDatabase = request.getfixturevalue("postgres")
        return database.url_for
    return lambda path: f"sqlite:///{path}"


@pytest.fixture
async def start_server(tmp_path: Path, store_url: StoreUrl) -> AsyncIterator[StartServer]:
    """`await start_server(backends=..., db=...)` starts an App; all are stopped after."""
    started: list[Running] = []

    async def start(
        backends: Mapping[str, Backend] | None = None,
        db: Path | None = None,
        dispatch: DispatchSettings = FAST_RETRY,
        store_check_interval_s: float = 2.0,
        **local: float,
    ) -> Running:
        db = db or tmp_path / "tasks.db"
        settings = make_settings(db, store_check_interval_s, store_url(db), **local)
        if backends is None:
            backends = local_backends(
                count=settings.local.count,
                max_concurrency=settings.local.max_concurrency,
                token_delay_s=settings.local.token_delay_s,
            )
        app = App(settings, backends=backends, dispatch=dispatch)
        await app.start()
        channel = grpc.aio.insecure_channel(app.address)
        running = Running(app, channel, tasks_pb2_grpc.TaskServiceStub(channel))
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.channel.close()
        await running.app.stop()


@pytest.fixture
async def server(start_server: StartServer) -> Running:
    """A server with three zero-delay local executors."""
    return await start_server()


def chat_spec(text: str = "hello world", **fields: object) -> pb.TaskSpec:
    return pb.TaskSpec(
        chat=pb.ChatInput(model="local-echo", messages=[pb.ChatMessage(role="user", content=text)]),
        **fields,  # type: ignore[arg-type]
    )


async def submit(stub: tasks_pb2_grpc.TaskServiceAsyncStub, spec: pb.TaskSpec) -> pb.Task:
    response = await stub.Submit(pb.SubmitRequest(task=spec))
    return response.task


async def watch_all(
    stub: tasks_pb2_grpc.TaskServiceAsyncStub, task_id: str, after_sequence: int = 0
) -> list[pb.StreamResponse]:
    """Every event of one watch, until the server ends the stream."""
    call = stub.Stream(pb.StreamRequest(task_id=task_id, after_sequence=after_sequence))
    return [event async for event in call]


def watched_text(events: list[pb.StreamResponse]) -> str:
    """The chat text a watcher assembles: the snapshot's text so far (a watch may start
    after the first tokens went out), then every output delta."""
    start = events[0].snapshot.output.chat.text if events[0].HasField("snapshot") else ""
    return start + "".join(e.output_delta.text for e in events if e.HasField("output_delta"))


async def wait_terminal(stub: tasks_pb2_grpc.TaskServiceAsyncStub, task_id: str) -> pb.Task:
    """The task's final state, seen on Stream (no polling)."""
    return final_task(await watch_all(stub, task_id))


def final_task(events: list[pb.StreamResponse]) -> pb.Task:
    """The task as a whole Stream left it: its last state change, or the snapshot alone
    when the task had finished before the watch began (a fast executor can beat it)."""
    last = events[-1]
    return last.snapshot if last.HasField("snapshot") else last.state_changed.task


# ----------------------------------------------------------------- server subprocesses


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    address: str
    env: dict[str, str] = field(default_factory=dict)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_pipe()

    def terminate(self, timeout_s: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=timeout_s)
        self._close_pipe()
        return self.process.returncode

    def _close_pipe(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()


def spawn_server(db: Path, **env: str) -> ServerProcess:
    """`python -m server` on a free loopback port; waits for its 'listening on' line."""
    return spawn_server_logging(db, None, env)


def spawn_server_logging(db: Path, stderr: Path | None, env: Mapping[str, str]) -> ServerProcess:
    """`spawn_server`, with the server's log (its stderr) written to the file `stderr`."""
    full_env = {
        **os.environ,
        "TASKRING_LISTEN": "127.0.0.1:0",
        "TASKRING_STORE": f"sqlite:///{db}",
        "TASKRING_LOCAL_TOKEN_DELAY_S": "0",
        "TASKRING_METRICS_LISTEN": "127.0.0.1:0",
        **env,
    }
    return _spawn("server", full_env, stderr)


def spawn_executor(listen: str = "127.0.0.1:0", **env: str) -> ServerProcess:
    """`python -m server.executor` (zero token delay unless given); waits until it listens."""
    full_env = {
        **os.environ,
        "TASKRING_EXECUTOR_LISTEN": listen,
        "TASKRING_LOCAL_TOKEN_DELAY_S": "0",
        "TASKRING_SHUTDOWN_GRACE_S": "1",
        "TASKRING_METRICS_LISTEN": "127.0.0.1:0",
        **env,
    }
    return _spawn("server.executor", full_env)


def _spawn(module: str, env: dict[str, str], stderr: Path | None = None) -> ServerProcess:
    with contextlib.ExitStack() as files:
        log = files.enter_context(stderr.open("w")) if stderr is not None else None
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log or subprocess.DEVNULL,  # the child has its own copy of the file
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()  # bounded by the test's timeout
    if "listening on" not in line:
        process.kill()
        process.wait()
        process.stdout.close()
        raise RuntimeError(f"{module} did not start: {line!r}")
    return ServerProcess(process, line.rsplit(" ", 1)[-1].strip(), env)


@pytest.fixture
def server_processes() -> Iterator[list[ServerProcess]]:
    """Collects spawned servers and kills whatever is still running at the end."""
    processes: list[ServerProcess] = []
    yield processes
    for process in processes:
        process.kill()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, client certificates of that
    CA and of an unrelated one: issued once per run (tests/tls.py)."""
    return issue_pki(tmp_path_factory.mktemp("pki"))
