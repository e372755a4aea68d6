"""TLS from the user's side: the `Tls` value, and `taskring --cacert/--cert/--key` against
a real TLS router in this process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import pytest

from client import AsyncTaskringClient, Tls
from client._cli import EXIT_USAGE, main
from server.app import App
from tests.conftest import ROOT
from tests.tls import server_tls, tls_router
from tests.tls_certs import Pki


@pytest.fixture
async def mtls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[App]:
    async with tls_router(tmp_path / "tasks.db", server_tls(pki, mutual=True)) as app:
        yield app


async def taskring(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m client ARGS…` as a user runs it, with `env` added to the environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client", *args,
        cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def test_tls_wants_a_certificate_and_its_key_together(pki: Pki) -> None:
    """Half of a client identity is a mistake, caught before any connection."""
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        Tls.from_files(pki.ca, cert_file=pki.client_cert)
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        Tls(private_key=pki.client_key.read_bytes())


def test_a_file_of_the_wrong_kind_is_named_and_a_key_never_shown(pki: Pki) -> None:
    """A key given as the CA bundle is reported by its path; its content stays out."""
    expected = re.escape(f"CA file {pki.client_key} is not a PEM certificate")
    with pytest.raises(ValueError, match=expected) as caught:
        Tls.from_files(pki.client_key)
    assert pki.client_key.read_text().splitlines()[1] not in str(caught.value)
    assert pki.client_key.read_text().splitlines()[1] not in repr(
        Tls.from_files(pki.ca, pki.client_cert, pki.client_key)
    )


async def test_a_client_with_its_own_channel_takes_no_tls(pki: Pki) -> None:
    """`tls` describes the channel the client opens; with one passed in it would be ignored."""
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(ValueError, match="pass channel or tls"):
            AsyncTaskringClient(channel=channel, tls=Tls.from_files(pki.ca))


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--cert", "client.pem"], "--cert needs --key"),
        (["--key", "client.key"], "--key needs --cert"),
    ],
)
def test_cert_and_key_flags_come_together(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like grpcurl's: half a client identity exits 64 (bad usage) naming what is missing."""
    assert main([*flags, "get", "some-id"]) == EXIT_USAGE
    assert says in capsys.readouterr().err


def test_an_unreadable_cacert_is_a_usage_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in the path says which file, not a traceback nor a connection error."""
    missing = tmp_path / "ca.pem"
    assert main(["--cacert", str(missing), "get", "some-id"]) == EXIT_USAGE
    assert f"cannot read {missing}: No such file or directory" in capsys.readouterr().err


@pytest.mark.slow
async def test_cli_submits_and_gets_over_tls_with_cacert(tmp_path: Path, pki: Pki) -> None:
    """`taskring --cacert ca.pem` against a TLS router: submit prints an id, get the task."""
    async with tls_router(tmp_path / "tasks.db", server_tls(pki)) as app:
        target = ["--target", app.address, "--cacert", str(pki.ca)]
        code, out, err = await taskring(*target, "submit", "hello over TLS", "--watch")
        assert code == 0, err
        assert "[local-echo] hello over TLS" in out
        code, out, err = await taskring(*target, "submit", "and once more")
        assert code == 0, err
        code, out, err = await taskring(*target, "get", out.strip())
        assert code == 0, err
        assert json.loads(out)["output"]["chat"]["text"] == "[local-echo] and once more"
        code, _, err = await taskring("--target", app.address, "list")
        assert code == 3, "plaintext against a TLS router fails"
        assert "UNAVAILABLE" in err


@pytest.mark.slow
async def test_cli_takes_mutual_tls_files_from_flags_or_environment(
    mtls_server: App, pki: Pki
) -> None:
    """--cacert/--cert/--key, or TASKRING_CACERT/CERT/KEY as TASKRING_TARGET is read; the
    CA alone is refused by a mutual-TLS router."""
    flags = ["--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    code, out, err = await taskring("--target", mtls_server.address, *flags, "submit", "mtls")
    assert code == 0, err
    task_id = out.strip()
    env = {
        "TASKRING_TARGET": mtls_server.address,
        "TASKRING_CACERT": str(pki.ca),
        "TASKRING_CERT": str(pki.client_cert),
        "TASKRING_KEY": str(pki.client_key),
    }
    code, out, err = await taskring("watch", task_id, env=env)
    assert code == 0, err
    assert "[local-echo] mtls" in out
    code, out, err = await taskring("get", task_id, env={**env, "TASKRING_CERT": ""})
    assert code == EXIT_USAGE, "TASKRING_KEY without a certificate is half an identity"
    code, _, err = await taskring(
        "--target", mtls_server.address, "--cacert", str(pki.ca), "get", task_id
    )
    assert code == 3
    assert "UNAVAILABLE" in err
