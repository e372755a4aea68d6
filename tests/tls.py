"""Routers that serve TLS, for the tests: in this process, with the certificates of
tests/tls_certs.py read the way `python -m server` reads them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from server.app import App
from server.config_file import FileConfig
from server.tls import ServerTls, read_server_tls
from tests.conftest import FAST_RETRY, local_backends, make_settings
from tests.tls_certs import Pki


def server_env(pki: Pki, *, mutual: bool = False) -> dict[str, str]:
    """The TASKRING_TLS_* variables of a router serving TLS (mutual TLS with `mutual`)."""
    env = {"TASKRING_TLS_CERT": str(pki.server_cert), "TASKRING_TLS_KEY": str(pki.server_key)}
    if mutual:
        env["TASKRING_TLS_CLIENT_CA"] = str(pki.ca)
    return env


def remote_env(pki: Pki, *, client_cert: bool = True) -> dict[str, str]:
    """A router's TASKRING_REMOTE_TLS_*: trust the test CA, and present its client
    certificate unless told not to."""
    env = {"TASKRING_REMOTE_TLS_CA": str(pki.ca)}
    if client_cert:
        env["TASKRING_REMOTE_TLS_CERT"] = str(pki.client_cert)
        env["TASKRING_REMOTE_TLS_KEY"] = str(pki.client_key)
    return env


def server_tls(pki: Pki, *, mutual: bool = False) -> ServerTls:
    """The settings a router reads from `server_env`, read the way it reads them."""
    tls, problems = read_server_tls(server_env(pki, mutual=mutual))
    assert tls is not None, problems
    return tls


@contextlib.asynccontextmanager
async def tls_router(
    db: Path, tls: ServerTls, file: FileConfig | None = None
) -> AsyncIterator[App]:
    """A router in this process serving `tls` on 127.0.0.1 (SQLite `db`, local executors):
    TLS is the port's business, the same on every store."""
    settings = make_settings(db)
    settings = replace(settings, server=replace(settings.server, tls=tls))
    if file is not None:
        settings = replace(settings, file=file)
    async with App(settings, backends=local_backends(), dispatch=FAST_RETRY) as app:
        yield app
