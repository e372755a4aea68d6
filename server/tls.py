"""TLS material, read and checked at start and turned into gRPC credentials: what a router
or an executor serves with, and what a router dials its remote executors with.

    TASKRING_TLS_CERT + TASKRING_TLS_KEY      TLS: clients verify the server
    ... + TASKRING_TLS_CLIENT_CA              mutual TLS: the server also requires a client
                                              certificate signed by this CA
    TASKRING_REMOTE_TLS_CA                    a router dials `remote` executors over TLS,
                                              verifying them against this CA
    ... + TASKRING_REMOTE_TLS_CERT + _KEY     and presents this client certificate (for
                                              executors serving mutual TLS)

Files are checked with the standard library's `ssl` (OpenSSL) before gRPC sees them, so a
wrong path, a file that is not PEM or a key that belongs to another certificate stops the
start with the variable and path named; gRPC itself would say only "Failed to bind to
address". Errors name files, never their content: one of them is a private key.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

CERT_VAR = "TASKRING_TLS_CERT"
KEY_VAR = "TASKRING_TLS_KEY"
CLIENT_CA_VAR = "TASKRING_TLS_CLIENT_CA"
REMOTE_CA_VAR = "TASKRING_REMOTE_TLS_CA"
REMOTE_CERT_VAR = "TASKRING_REMOTE_TLS_CERT"
REMOTE_KEY_VAR = "TASKRING_REMOTE_TLS_KEY"
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True, slots=True)
class ServerTls:
    """PEM bytes: the certificate chain the server presents and its private key, and for
    mutual TLS the CA bundle client certificates must chain to."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None
    # Where each came from, for the start-up log.
    cert_file: str = ""
    client_ca_file: str = ""

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            # With a client CA, a handshake without a certificate it signed is refused.
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True, slots=True)
class ChannelTls:
    """PEM bytes a router dials its remote executors with: the CA bundle their certificates
    chain to, and for executors that require mutual TLS its own certificate and key."""

    root_certificates: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    ca_file: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def add_port(server: grpc.aio.Server, listen: str, tls: ServerTls | None) -> int:
    """Binds `listen` on `server`, with TLS when `tls` is given; the port bound."""
    if tls is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, tls.credentials())


def serving(tls: ServerTls | None) -> str:
    """How a process serves, for its start-up log."""
    if tls is None:
        return f"serving plaintext: {CERT_VAR} and {KEY_VAR} turn on TLS"
    if tls.client_ca is None:
        return f"serving TLS with the certificate {tls.cert_file}"
    return (
        f"serving mutual TLS with the certificate {tls.cert_file}: clients need a"
        f" certificate signed by a CA in {tls.client_ca_file}"
    )


def read_server_tls(env: Mapping[str, str]) -> tuple[ServerTls | None, list[str]]:
    """The TLS settings in `env` (None: plaintext) and every problem with them."""
    cert_file = env.get(CERT_VAR, "").strip()
    key_file = env.get(KEY_VAR, "").strip()
    client_ca_file = env.get(CLIENT_CA_VAR, "").strip()
    if not (cert_file or key_file or client_ca_file):
        return None, []
    if not (cert_file and key_file):
        named = _named(cert_file, key_file, client_ca_file)
        given = " and ".join(name for name, value in named if value)
        missing = " and ".join(name for name, value in named[:2] if not value)
        return None, [
            f"{given} set but not {missing}: TLS needs both {CERT_VAR} (the server's"
            f" certificate chain) and {KEY_VAR} (its private key), as PEM files"
        ]
    problems: list[str] = []
    certificate_chain = _read(CERT_VAR, cert_file, problems)
    private_key = _read(KEY_VAR, key_file, problems)
    if certificate_chain is not None and private_key is not None:
        _check_pair(CERT_VAR, cert_file, KEY_VAR, key_file, certificate_chain, problems)
    client_ca = None
    if client_ca_file:
        client_ca = _read(CLIENT_CA_VAR, client_ca_file, problems)
        if client_ca is not None:
            _check_ca(CLIENT_CA_VAR, client_ca, client_ca_file, problems)
    if certificate_chain is None or private_key is None or problems:
        return None, problems
    tls = ServerTls(certificate_chain, private_key, client_ca, cert_file, client_ca_file)
    return tls, []


def read_remote_tls(env: Mapping[str, str]) -> tuple[ChannelTls | None, list[str]]:
    """How `env` says a router dials its remote executors (None: plaintext), and every
    problem with it."""
    ca_file = env.get(REMOTE_CA_VAR, "").strip()
    cert_file = env.get(REMOTE_CERT_VAR, "").strip()
    key_file = env.get(REMOTE_KEY_VAR, "").strip()
    if not (ca_file or cert_file or key_file):
        return None, []
    problems: list[str] = []
    if not ca_file:
        problems.append(
            f"{REMOTE_CERT_VAR} and {REMOTE_KEY_VAR} need {REMOTE_CA_VAR}: the CA the"
            " executors' certificates chain to, which turns on TLS to them"
        )
    if bool(cert_file) != bool(key_file):
        problems.append(
            f"mutual TLS to executors needs both {REMOTE_CERT_VAR} (the router's client"
            f" certificate chain) and {REMOTE_KEY_VAR} (its private key), as PEM files"
        )
    if problems:
        return None, problems
    root = _read(REMOTE_CA_VAR, ca_file, problems)
    if root is not None:
        _check_ca(REMOTE_CA_VAR, root, ca_file, problems)
    chain = key = None
    if cert_file:
        chain = _read(REMOTE_CERT_VAR, cert_file, problems)
        key = _read(REMOTE_KEY_VAR, key_file, problems)
        if chain is not None and key is not None:
            _check_pair(REMOTE_CERT_VAR, cert_file, REMOTE_KEY_VAR, key_file, chain, problems)
    if root is None or problems:
        return None, problems
    return ChannelTls(root, chain, key, ca_file), []


def _named(cert: str, key: str, client_ca: str) -> list[tuple[str, str]]:
    return [(CERT_VAR, cert), (KEY_VAR, key), (CLIENT_CA_VAR, client_ca)]


def _read(name: str, path: str, problems: list[str]) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        problems.append(f"{name}={path}: cannot read: {exc.strerror or exc}")
        return None


def _check_pair(
    cert_var: str,
    cert_file: str,
    key_var: str,
    key_file: str,
    certificate_chain: bytes,
    problems: list[str],
) -> None:
    """OpenSSL loads the pair as gRPC would: both PEM, the key the certificate's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback that gives none: an encrypted key fails here instead of
        # prompting on the terminal (gRPC cannot use one either).
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        cert, key = f"{cert_var}={cert_file}", f"{key_var}={key_file}"
        problems.append(_pair_problem(cert, key, certificate_chain, exc))


def _pair_problem(cert: str, key: str, certificate_chain: bytes, exc: ssl.SSLError) -> str:
    """`cert` and `key` are the settings as VARIABLE=path."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return (
            f"{key} is not the private key of {cert}: give the key the certificate was issued for"
        )
    # OpenSSL says "PEM lib" for either file: tell which one is not what it should be.
    if _PEM_CERTIFICATE not in certificate_chain:
        return f"{cert}: not a PEM certificate ({_PEM_CERTIFICATE.decode()})"
    return (
        f"{key}: not an unencrypted PEM private key"
        " (-----BEGIN PRIVATE KEY-----, or its RSA or EC form)"
    )


def _check_ca(name: str, ca: bytes, ca_file: str, problems: list[str]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError):  # ValueError: nothing in it at all
        problems.append(
            f"{name}={ca_file}: no PEM CA certificate in it ({_PEM_CERTIFICATE.decode()})"
        )
