"""Self-signed OPC UA application certificates (X.509, RSA 2048, SHA-256), made with ``cryptography``.

OPC UA asks each application for its own certificate whose subjectAltName carries the
application URI. Operators make real ones with their PKI; tests and the simulated site make
throwaway ones at run time with ``make_certificate`` (never commit a private key).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID


@dataclass(frozen=True)
class CertFiles:
    """Where a certificate (DER) and its private key (PEM) were written, and its application URI."""

    certificate: Path
    private_key: Path
    application_uri: str


def make_certificate(directory: Path, name: str, application_uri: str, *, server: bool, days: int = 30) -> CertFiles:
    """Write ``<name>.der`` and ``<name>.pem`` (key, mode 0600) into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    hostname = socket.gethostname()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {"organizationName": "drgw"},
        [
            x509.UniformResourceIdentifier(application_uri),
            x509.DNSName(hostname),
            x509.DNSName("localhost"),
        ],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )
    cert_path = directory / f"{name}.der"
    key_path = directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.touch(mode=0o600)
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return CertFiles(cert_path, key_path, application_uri)


def _read(path: str) -> bytes:
    """Return a file's bytes; raise ValueError saying why it cannot be read."""
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from err


def load_certificate_file(path: str) -> x509.Certificate:
    """Load an X.509 certificate (DER or PEM); raise ValueError naming the file and the reason."""
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise ValueError(f"{path} is not an X.509 certificate (DER or PEM)") from err


def load_rsa_key_file(path: str) -> rsa.RSAPrivateKey:
    """Load an unencrypted RSA private key (PEM or DER); raise ValueError naming the file and the reason."""
    data = _read(path)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not an unencrypted private key (PEM or DER)") from err
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; Basic256Sha256 needs an RSA key")
    return key


def security_file_problems(
    certificate: str | None, private_key: str | None, server_certificate: str | None
) -> list[tuple[str, str]]:
    """Return (key, reason) for each security file that is missing, unreadable or does not fit its role."""
    problems: list[tuple[str, str]] = []
    cert = key = None
    for name, path, load in (
        ("certificate", certificate, load_certificate_file),
        ("private_key", private_key, load_rsa_key_file),
        ("server_certificate", server_certificate, load_certificate_file),
    ):
        if path is None:
            continue
        try:
            loaded = load(path)
        except ValueError as err:
            problems.append((name, str(err)))
            continue
        if name == "certificate":
            cert = loaded
        elif name == "private_key":
            key = loaded
    if cert is not None and key is not None and cert.public_key() != key.public_key():
        problems.append(("private_key", f"{private_key} is not the key of certificate {certificate}"))
    return problems
