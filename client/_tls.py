"""`Tls`: how a client checks the server's certificate and, for mutual TLS, shows its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
# PKCS#8 ("BEGIN PRIVATE KEY"), and the older RSA and EC forms, all end the same way.
_PRIVATE_KEY = b"PRIVATE KEY-----"


@dataclass(frozen=True, slots=True)
class Tls:
    """PEM bytes for a TLS channel; `Tls()` trusts gRPC's bundled public roots.

    `root_certificates` is the CA bundle that signed the server's certificate (a private
    CA: the file the server's operator hands out). `certificate_chain` and `private_key`
    are the client's own certificate and key, for a server that requires them (mutual TLS):
    both or neither. `Tls.from_files` reads them from paths.
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key (or neither)")
        _require_pem("root_certificates", self.root_certificates, _CERTIFICATE)
        _require_pem("certificate_chain", self.certificate_chain, _CERTIFICATE)
        _require_pem("private_key", self.private_key, _PRIVATE_KEY)

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> Self:
        """Reads PEM files: the CA bundle (`ca_file`; None: public roots) and, for mutual
        TLS, the client's certificate and key. OSError if one cannot be read; ValueError
        naming the file if it is not PEM of its kind."""
        if (cert_file is None) != (key_file is None):
            raise ValueError("mutual TLS needs both cert_file and key_file (or neither)")
        ca, cert, key = (_read(path) for path in (ca_file, cert_file, key_file))
        _require_pem(f"CA file {ca_file}", ca, _CERTIFICATE)
        _require_pem(f"certificate file {cert_file}", cert, _CERTIFICATE)
        _require_pem(f"key file {key_file}", key, _PRIVATE_KEY)
        return cls(ca, cert, key)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _require_pem(name: str, value: bytes | None, marker: bytes) -> None:
    if value is not None and marker not in value:
        kind = "certificate" if marker == _CERTIFICATE else "private key"
        # Never the value itself in the message: it may be a private key.
        raise ValueError(f"{name} is not a PEM {kind} ({marker.decode()!r} missing)")
