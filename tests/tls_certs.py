"""Throwaway certificates for the TLS tests: a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate it signed, and a second CA with a client of its own that the
first must refuse. Issued per run, so no private key ever lives in the repository."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of PEM files; each key beside its certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # Another CA, unrelated to `ca`, and a client certificate it signed.
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


@dataclass(frozen=True, slots=True)
class _Issuer:
    """A CA: what it signs with, and the certificate clients and servers trust it by."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def issue_pki(directory: Path) -> Pki:
    """Writes a fresh set of certificates and keys into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _new_ca("taskring test CA")
    other = _new_ca("unrelated test CA")
    server_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    files = {
        "ca": _ca_pem(ca),
        "other_ca": _ca_pem(other),
        **_leaf("server", ca, "taskring server", ExtendedKeyUsageOID.SERVER_AUTH, server_sans),
        **_leaf("client", ca, "team-a", ExtendedKeyUsageOID.CLIENT_AUTH),
        **_leaf("other_client", other, "intruder", ExtendedKeyUsageOID.CLIENT_AUTH),
    }
    paths = {}
    for name, pem in files.items():
        path = directory / f"{name}.pem"
        path.write_bytes(pem)
        paths[name] = path
    return Pki(**paths)


def _new_ca(common_name: str) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _Issuer(key, certificate)


def _ca_pem(issuer: _Issuer) -> bytes:
    return issuer.certificate.public_bytes(serialization.Encoding.PEM)


def _leaf(
    prefix: str,
    issuer: _Issuer,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> dict[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(name, issuer.certificate.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    certificate = builder.sign(issuer.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        f"{prefix}_cert": certificate.public_bytes(serialization.Encoding.PEM),
        f"{prefix}_key": key_pem,
    }


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour back: a clock a little behind the issuer's still accepts it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
