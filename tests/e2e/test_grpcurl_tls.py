"""The real server process over TLS and mutual TLS, driven by the real grpcurl binary."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, spawn_server_logging
from tests.e2e.test_grpcurl import grpcurl_binary
from tests.tls import server_env
from tests.tls_certs import Pki

pytestmark = pytest.mark.slow

SUBMIT = json.dumps(
    {"task": {"chat": {"model": "local-echo", "messages": [{"role": "user", "content": "hi"}]}}}
)


def grpcurl(address: str, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    """grpcurl with the given flags (its default is TLS against the system's roots)."""
    command = [grpcurl_binary(), *args[:-1]]
    if data is not None:
        command += ["-d", data]
    return subprocess.run(
        [*command, address, args[-1]], capture_output=True, text=True, timeout=30, check=False
    )


def refused(address: str, *flags: str) -> bool:
    """Whether `grpcurl FLAGS list` fails to connect. grpcurl keeps redialing a failed
    handshake until its connect timeout (10 s by default): 2 s is plenty on loopback."""
    result = grpcurl(address, "-connect-timeout", "2", *flags, "list")
    return result.returncode != 0 and "Failed to dial target host" in result.stderr


def start(tmp_path: Path, pki: Pki, *, mutual: bool) -> tuple[ServerProcess, str]:
    """`python -m server` with TASKRING_TLS_*; its address and start-up log."""
    log = tmp_path / "server.log"
    env = {**server_env(pki, mutual=mutual), "TASKRING_LOG_FORMAT": "text"}
    return spawn_server_logging(tmp_path / "tls.db", log, env), str(log)


def test_grpcurl_with_cacert_lists_and_submits(
    tmp_path: Path, pki: Pki, server_processes: list[ServerProcess]
) -> None:
    """`grpcurl -cacert ca.pem` reaches reflection and TaskService; -plaintext, or trusting
    another CA, does not."""
    process, log = start(tmp_path, pki, mutual=False)
    server_processes.append(process)
    listed = grpcurl(process.address, "-cacert", str(pki.ca), "list")
    assert listed.returncode == 0, listed.stderr
    assert "taskring.v1.TaskService" in listed.stdout.split()
    submitted = grpcurl(
        process.address, "-cacert", str(pki.ca), "taskring.v1.TaskService/Submit", data=SUBMIT
    )
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["task"]["id"]
    assert refused(process.address, "-plaintext")
    assert refused(process.address, "-cacert", str(pki.other_ca))
    assert f"serving TLS with the certificate {pki.server_cert}" in Path(log).read_text()


def test_grpcurl_needs_its_client_certificate_for_mutual_tls(
    tmp_path: Path, pki: Pki, server_processes: list[ServerProcess]
) -> None:
    """With TASKRING_TLS_CLIENT_CA: `-cacert -cert -key` works, `-cacert` alone is refused,
    and so is a certificate from another CA."""
    process, log = start(tmp_path, pki, mutual=True)
    server_processes.append(process)
    identity = ["-cert", str(pki.client_cert), "-key", str(pki.client_key)]
    ca = ["-cacert", str(pki.ca)]
    listed = grpcurl(process.address, *ca, *identity, "list")
    assert listed.returncode == 0, listed.stderr
    assert "grpc.health.v1.Health" in listed.stdout.split()
    health = grpcurl(process.address, *ca, *identity, "grpc.health.v1.Health/Check", data="{}")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "SERVING"
    submitted = grpcurl(
        process.address, *ca, *identity, "taskring.v1.TaskService/Submit", data=SUBMIT
    )
    assert submitted.returncode == 0, submitted.stderr

    assert refused(process.address, *ca)
    assert refused(
        process.address, *ca, "-cert", str(pki.other_client_cert), "-key", str(pki.other_client_key)
    )
    assert "serving mutual TLS" in Path(log).read_text()
