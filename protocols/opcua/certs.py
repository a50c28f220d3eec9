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
