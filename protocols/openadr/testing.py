"""Test doubles for the VEN: an in-memory audit sink, VEN state and evidence, and a throwaway PKI.

The PKI is generated at test time with ``cryptography`` (no private key is ever committed): a
CA, a VTN server certificate for 127.0.0.1 and localhost, and a VEN client certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.openadr.tls import fingerprint_of_der


class RecordingAudit:
    """An AuditSink that keeps rows in a list."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Record one row; return its sequence number."""
        self.rows.append({"kind": kind, "data": dict(data), "actor": actor, "event_id": event_id})
        return len(self.rows)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        """Return the rows of one kind."""
        return [r for r in self.rows if r["kind"] == kind]


class MemoryState:
    """The VEN state (get_state/set_state) in a dict."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get_state(self, key: str) -> str | None:
        """Return a value or None."""
        return self.values.get(key)

    async def set_state(self, key: str, value: str) -> None:
        """Store a value."""
        self.values[key] = value


class MemoryEvidence:
    """An evidence sink keeping bodies by SHA-256."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def __call__(self, sha256: str, body: bytes) -> None:
        """Keep one body."""
        self.blobs[sha256] = body


async def until(pred: Callable[[], Any], timeout_s: float = 5.0) -> None:
    """Wait until ``pred()`` holds, failing after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not pred():  # noqa: ASYNC110 - polls state owned by other tasks; no event to wait on
            await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Pki:
    """Paths of a throwaway CA, server and client certificate set, with fingerprints."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    server_fingerprint: str
    client_fingerprint: str


def make_pki(directory: Path, ecdsa_server: bool = False) -> Pki:
    """Write a CA, a VTN certificate (127.0.0.1, localhost) and a VEN certificate into ``directory``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drgw test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, server: bool, use_ec: bool) -> tuple[bytes, bytes, str]:
        key: Any = ec.generate_private_key(ec.SECP256R1()) if use_ec else rsa.generate_private_key(65537, 2048)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, fingerprint_of_der(der)

    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("ca.pem", "vtn.pem", "vtn.key", "ven.pem", "ven.key")}
    paths["ca.pem"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    s_cert, s_key, s_fp = leaf("vtn.test", True, ecdsa_server)
    c_cert, c_key, c_fp = leaf("ven.test", False, False)
    paths["vtn.pem"].write_bytes(s_cert)
    paths["vtn.key"].write_bytes(s_key)
    paths["ven.pem"].write_bytes(c_cert)
    paths["ven.key"].write_bytes(c_key)
    for key_path in ("vtn.key", "ven.key"):
        paths[key_path].chmod(0o600)
    return Pki(paths["ca.pem"], paths["vtn.pem"], paths["vtn.key"], paths["ven.pem"], paths["ven.key"], s_fp, c_fp)
