"""TASKRING_TLS_* and TASKRING_REMOTE_TLS_*: read at start, and every mistake stops the
start naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ConfigError, Settings
from tests.conftest import ROOT
from tests.tls import remote_env, server_env
from tests.tls_certs import Pki


def problems_of(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert len(caught.value.problems) == 1, caught.value.problems
    return caught.value.problems[0]


def test_no_tls_variables_serve_plaintext() -> None:
    """The embedded default stays plaintext on loopback."""
    assert Settings.from_env({}).server.tls is None


def test_cert_and_key_serve_tls_and_a_client_ca_makes_it_mutual(pki: Pki) -> None:
    """The files are read at start; the client CA is what turns on client verification."""
    tls = Settings.from_env(server_env(pki)).server.tls
    assert tls is not None
    assert tls.certificate_chain == pki.server_cert.read_bytes()
    assert tls.client_ca is None
    mutual = Settings.from_env(server_env(pki, mutual=True)).server.tls
    assert mutual is not None
    assert mutual.client_ca == pki.ca.read_bytes()


def test_the_private_key_stays_out_of_the_settings_repr(pki: Pki) -> None:
    """Settings may be printed while debugging; the key is not part of what shows."""
    settings = Settings.from_env(server_env(pki))
    key_body = pki.server_key.read_text().splitlines()[1]
    assert key_body not in repr(settings)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"TASKRING_TLS_CERT"}, ("TASKRING_TLS_CERT", "TASKRING_TLS_KEY")),
        ({"TASKRING_TLS_KEY"}, ("TASKRING_TLS_KEY", "TASKRING_TLS_CERT")),
        (
            {"TASKRING_TLS_CLIENT_CA"},
            ("TASKRING_TLS_CLIENT_CA", "TASKRING_TLS_CERT", "TASKRING_TLS_KEY"),
        ),
    ],
)
def test_half_a_tls_setup_is_refused_naming_what_is_missing(
    pki: Pki, given: set[str], named: tuple[str, ...]
) -> None:
    """A certificate without its key, or a client CA without a server certificate, would
    leave the server in the clear without saying so: the start stops instead."""
    env = {name: path for name, path in server_env(pki, mutual=True).items() if name in given}
    problem = problems_of(env)
    for name in named:
        assert name in problem


@pytest.mark.parametrize(
    "variable", ["TASKRING_TLS_CERT", "TASKRING_TLS_KEY", "TASKRING_TLS_CLIENT_CA"]
)
def test_a_missing_file_names_the_variable_and_the_path(
    pki: Pki, tmp_path: Path, variable: str
) -> None:
    """A typo in a path is reported as such, with the path as given."""
    missing = tmp_path / "nowhere.pem"
    env = {**server_env(pki, mutual=True), variable: str(missing)}
    problem = problems_of(env)
    assert problem.startswith(f"{variable}={missing}: cannot read")
    assert "No such file" in problem


def test_a_key_of_another_certificate_is_refused(pki: Pki) -> None:
    """A key that does not belong to the certificate would fail every handshake."""
    env = {**server_env(pki), "TASKRING_TLS_KEY": str(pki.client_key)}
    problem = problems_of(env)
    assert "TASKRING_TLS_KEY" in problem
    assert "is not the private key of TASKRING_TLS_CERT" in problem


@pytest.mark.parametrize(
    ("variable", "wrong_file", "says"),
    [
        ("TASKRING_TLS_CERT", "server_key", "not a PEM certificate"),
        ("TASKRING_TLS_KEY", "server_cert", "not an unencrypted PEM private key"),
        ("TASKRING_TLS_CLIENT_CA", "client_key", "no PEM CA certificate"),
    ],
)
def test_a_file_of_the_wrong_kind_is_named_without_its_content(
    pki: Pki, variable: str, wrong_file: str, says: str
) -> None:
    """Swapped files are caught at start; the message names the path and never prints what
    is inside (here a private key, in two of the cases)."""
    path: Path = getattr(pki, wrong_file)
    env = {**server_env(pki, mutual=True), variable: str(path)}
    problem = problems_of(env)
    assert problem.startswith(f"{variable}={path}: {says}")
    for line in path.read_text().splitlines()[1:-1]:
        assert line not in problem


def test_tls_does_not_lift_the_rule_about_api_keys(pki: Pki) -> None:
    """Open to other machines without API keys is still refused: a certificate says who may
    connect, not whose tasks are whose."""
    env = {**server_env(pki, mutual=True), "TASKRING_LISTEN": "0.0.0.0:50051"}
    assert "no API keys are configured" in problems_of(env)


@pytest.mark.slow
def test_the_server_command_exits_2_naming_a_bad_tls_file(tmp_path: Path, pki: Pki) -> None:
    """`python -m server` with a missing certificate stops before serving anything."""
    missing = tmp_path / "server.pem"
    env = {**server_env(pki), "TASKRING_TLS_CERT": str(missing)}
    result = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"TASKRING_TLS_CERT={missing}: cannot read" in result.stderr
    assert "listening" not in result.stdout


def test_remote_tls_settings_are_read_and_checked_at_start(pki: Pki) -> None:
    remote = Settings.from_env(remote_env(pki)).remote_tls
    assert remote is not None
    assert remote.root_certificates == pki.ca.read_bytes()
    assert remote.certificate_chain == pki.client_cert.read_bytes()
    assert "PRIVATE KEY" not in repr(remote)
    assert Settings.from_env({}).remote_tls is None  # plaintext by default


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"TASKRING_REMOTE_TLS_CA": ""}, "need TASKRING_REMOTE_TLS_CA"),
        ({"TASKRING_REMOTE_TLS_KEY": ""}, "needs both TASKRING_REMOTE_TLS_CERT"),
        ({"TASKRING_REMOTE_TLS_CA": "{client_key}"}, "TASKRING_REMOTE_TLS_CA="),
        ({"TASKRING_REMOTE_TLS_KEY": "{other_client_key}"}, "is not the private key of"),
        ({"TASKRING_REMOTE_TLS_CERT": "/nonexistent.pem"}, "cannot read"),
    ],
)
def test_a_wrong_remote_tls_setting_stops_the_start_naming_it(
    pki: Pki, change: dict[str, str], named: str
) -> None:
    files = {"client_key": pki.client_key, "other_client_key": pki.other_client_key}
    env = remote_env(pki)
    env.update({name: value.format(**files) for name, value in change.items()})
    problem = problems_of(env)
    assert named in problem
    assert "PRIVATE KEY" not in problem  # names files, never their content
