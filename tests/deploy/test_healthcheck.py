"""`python -m client.healthcheck`, the image's HEALTHCHECK, against real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.healthcheck import HEALTHY, UNHEALTHY, check, main
from server.backends.local import LocalModelSettings, builtin_handlers
from server.config import ExecutorSettings
from server.executor.app import ExecutorApp
from tests.conftest import ROOT, StartServer, unused_port

READINESS = "taskring.v1.TaskService"
EXECUTOR_READINESS = "taskring.v1.ExecutorService"


async def test_command_exits_0_while_the_router_is_ready(start_server: StartServer) -> None:
    """The exact command the Dockerfile's HEALTHCHECK runs passes against a ready router."""
    server = await start_server()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.healthcheck",
        "--service",
        READINESS,
        server.app.address,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await process.communicate()
    assert process.returncode == HEALTHY
    assert stdout.decode().strip().endswith("SERVING")


async def test_liveness_and_readiness_are_serving(start_server: StartServer) -> None:
    """Both names a probe asks for are SERVING on a running router."""
    server = await start_server()
    liveness = await asyncio.to_thread(check, server.app.address)
    readiness = await asyncio.to_thread(check, server.app.address, READINESS)
    assert (liveness.status, readiness.status) == ("SERVING", "SERVING")
    assert liveness.is_serving
    assert readiness.is_serving


async def test_fails_when_readiness_is_not_serving(
    start_server: StartServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A router whose store stopped answering is unhealthy for readiness, alive for liveness."""
    server = await start_server(store_check_interval_s=0.02)
    await server.app.store.close()
    watch = health_pb2_grpc.HealthStub(server.channel).Watch(
        health_pb2.HealthCheckRequest(service=READINESS)
    )
    async for response in watch:
        if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
    watch.cancel()
    code = await asyncio.to_thread(main, ["--service", READINESS, server.app.address])
    assert code == UNHEALTHY
    assert "NOT_SERVING" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [server.app.address]) == HEALTHY


async def test_fails_for_a_service_the_server_does_not_know(start_server: StartServer) -> None:
    """A misspelled service name is unhealthy (NOT_FOUND), never silently healthy."""
    server = await start_server()
    result = await asyncio.to_thread(check, server.app.address, "taskring.v1.NoSuchService")
    assert result.status == "NOT_FOUND"
    code = await asyncio.to_thread(
        main, ["--service", "taskring.v1.NoSuchService", server.app.address]
    )
    assert code == UNHEALTHY


@pytest.fixture
async def executor() -> AsyncIterator[ExecutorApp]:
    app = ExecutorApp(
        ExecutorSettings(listen="127.0.0.1:0", shutdown_grace_s=0.1),
        handlers=builtin_handlers(LocalModelSettings(token_delay_s=0)),
    )
    await app.start()
    yield app
    await app.stop()


async def test_executor_readiness_is_serving(executor: ExecutorApp) -> None:
    """The name compose's executor healthcheck and the executor readiness probe ask for."""
    result = await asyncio.to_thread(check, executor.address, EXECUTOR_READINESS)
    assert result.status == "SERVING"


def test_fails_fast_when_nothing_listens() -> None:
    """A refused connection is an answer: unhealthy at once, not after the timeout."""
    address = f"127.0.0.1:{unused_port()}"
    started = time.monotonic()
    result = check(address, timeout_s=5.0)
    assert result.status == "UNAVAILABLE"
    assert time.monotonic() - started < 2.5


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) but never speaks HTTP/2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_gives_up_after_its_timeout_on_a_hung_server(silent_port: int) -> None:
    """A server that never answers makes the check fail within its timeout, not hang."""
    started = time.monotonic()
    result = check(f"127.0.0.1:{silent_port}", timeout_s=0.3)
    assert not result.is_serving
    assert result.status in {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("argv", [["--bogus"], ["--timeout", "0"], ["--timeout", "soon"]])
def test_bad_command_line_exits_1_not_2(argv: list[str]) -> None:
    """Docker reserves exit code 2; a misconfigured HEALTHCHECK still reads as unhealthy."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == UNHEALTHY
