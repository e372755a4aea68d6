"""TLS and mutual TLS: real handshakes on loopback with certificates issued for the run."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client import (
    AsyncTaskringClient,
    TaskringClient,
    TaskState,
    Tls,
    UnauthenticatedError,
    UnavailableError,
)
from client.healthcheck import HEALTHY, UNHEALTHY, check, main
from server.app import App
from server.config_file import ApiKey, FileConfig
from tests.tls import server_tls, tls_router
from tests.tls_certs import Pki

SUCCEEDED = TaskState.Value("TASK_STATE_SUCCEEDED")
READINESS = "taskring.v1.TaskService"


@pytest.fixture
async def tls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[App]:
    """A router serving TLS: it shows its certificate, asks for none."""
    async with tls_router(tmp_path / "tasks.db", server_tls(pki)) as app:
        yield app


@pytest.fixture
async def mtls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[App]:
    """A router serving mutual TLS: clients need a certificate signed by the test CA."""
    async with tls_router(tmp_path / "tasks.db", server_tls(pki, mutual=True)) as app:
        yield app


def trusting(pki: Pki) -> Tls:
    return Tls.from_files(pki.ca)


def with_certificate(pki: Pki) -> Tls:
    return Tls.from_files(pki.ca, pki.client_cert, pki.client_key)


async def submit_and_get(address: str, tls: Tls | None) -> str:
    """Submit a chat task, wait for it and Get it: the text it answered."""
    async with AsyncTaskringClient(address, tls=tls, timeout_s=10) as client:
        task = await client.submit_chat("over TLS")
        await client.wait(task.id)
        final = await client.get(task.id)
    assert final.state == SUCCEEDED
    return final.output.chat.text


async def test_client_trusting_the_ca_submits_and_gets(tls_server: App, pki: Pki) -> None:
    """With the CA that signed the server's certificate, a task runs as over plaintext."""
    assert await submit_and_get(tls_server.address, trusting(pki)) == "[local-echo] over TLS"


async def test_blocking_client_speaks_tls_too(tls_server: App, pki: Pki) -> None:
    """TaskringClient takes the same `tls` and completes Submit and Get."""

    def use_sync_client() -> tuple[int, str]:
        with TaskringClient(tls_server.address, tls=trusting(pki), timeout_s=10) as client:
            final = client.wait(client.submit_chat("blocking").id)
            return client.get(final.id).state, final.output.chat.text

    state, text = await asyncio.to_thread(use_sync_client)
    assert (state, text) == (SUCCEEDED, "[local-echo] blocking")


async def test_plaintext_client_is_refused_and_the_server_keeps_serving(
    tls_server: App, pki: Pki
) -> None:
    """A client that does not speak TLS gets UNAVAILABLE; TLS clients are served after it."""
    async with AsyncTaskringClient(tls_server.address, timeout_s=10) as plaintext:
        with pytest.raises(UnavailableError):
            await plaintext.submit_chat("in the clear")
    assert await submit_and_get(tls_server.address, trusting(pki)) == "[local-echo] over TLS"


async def test_client_trusting_another_ca_refuses_the_server(tls_server: App, pki: Pki) -> None:
    """The server's certificate is checked: signed by a CA the client does not trust, the
    call never reaches it."""
    async with AsyncTaskringClient(
        tls_server.address, tls=Tls.from_files(pki.other_ca), timeout_s=10
    ) as client:
        with pytest.raises(UnavailableError):
            await client.submit_chat("to an impostor?")
    async with AsyncTaskringClient(tls_server.address, tls=trusting(pki)) as client:
        assert [task async for task in client.list_all()] == []


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_server: App, pki: Pki
) -> None:
    """With a client CA configured, trusting the server is not enough."""
    async with AsyncTaskringClient(mtls_server.address, tls=trusting(pki), timeout_s=10) as client:
        with pytest.raises(UnavailableError):
            await client.submit_chat("no certificate")


async def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_server: App, pki: Pki) -> None:
    """A well-formed client certificate signed by an unrelated CA is refused."""
    intruder = Tls.from_files(pki.ca, pki.other_client_cert, pki.other_client_key)
    async with AsyncTaskringClient(mtls_server.address, tls=intruder, timeout_s=10) as client:
        with pytest.raises(UnavailableError):
            await client.submit_chat("let me in")


async def test_mutual_tls_serves_a_client_with_its_certificate(mtls_server: App, pki: Pki) -> None:
    """The client certificate the CA signed completes Submit, Stream and Get."""
    answer = await submit_and_get(mtls_server.address, with_certificate(pki))
    assert answer == "[local-echo] over TLS"


async def test_health_checks_answer_over_mutual_tls(mtls_server: App, pki: Pki) -> None:
    """The container probe reaches a mutual-TLS router with the CA and a client certificate,
    and reports unhealthy (never healthy) without them."""
    tls = with_certificate(pki)
    for service in ("", READINESS):
        result = await asyncio.to_thread(check, mtls_server.address, service, 5.0, tls)
        assert result.is_serving, result
    files = ["--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    command = [*files, "--service", READINESS, mtls_server.address]
    assert await asyncio.to_thread(main, command) == HEALTHY
    assert await asyncio.to_thread(main, [mtls_server.address]) == UNHEALTHY
    plaintext = await asyncio.to_thread(check, mtls_server.address)
    assert plaintext.status == "UNAVAILABLE"


async def test_tls_does_not_stand_in_for_api_keys(tmp_path: Path, pki: Pki) -> None:
    """A server with API keys still wants one from a client with a good certificate."""
    key = "trk_tls-test-key"
    keys = FileConfig(api_keys=(ApiKey("team-a", hashlib.sha256(key.encode()).hexdigest()),))
    tls = server_tls(pki, mutual=True)
    async with tls_router(tmp_path / "tasks.db", tls, keys) as app:
        async with AsyncTaskringClient(app.address, tls=with_certificate(pki)) as client:
            with pytest.raises(UnauthenticatedError):
                await client.submit_chat("certificate only")
        async with AsyncTaskringClient(
            app.address, tls=with_certificate(pki), api_key=key
        ) as client:
            task = await client.submit_chat("certificate and key")
            assert (await client.wait(task.id)).state == SUCCEEDED
