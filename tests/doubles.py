"""Test doubles shared by the tests: the in-memory audit sink and event store, evidence, a throwaway PKI.

The PKI is generated at test time with ``cryptography`` (no private key is ever committed): a
CA, a VTN server certificate for 127.0.0.1 and localhost, and a VEN client certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.clock import ManualClock
from gateway.errors import AuditError, DeviceUnavailable
from gateway.model import BatteryState, DemandEvent, Opt
from protocols.openadr.tls import fingerprint_of_der


class RecordingAudit:
    """The one in-memory audit sink for tests: keeps every row as plain data; ``broken`` makes it refuse."""

    def __init__(self, broken: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.broken = broken

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Record one row and return its sequence number; raise AuditError (a full disk, say) when broken."""
        if self.broken:
            raise AuditError(f"audit commit of {kind} failed: disk full")
        row = {"kind": kind, "data": dict(data), "actor": actor, "event_id": event_id, "device_id": device_id}
        self.rows.append(row)
        return len(self.rows)

    def kinds(self) -> list[str]:
        """Return the kind of every row, in order."""
        return [r["kind"] for r in self.rows]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Return the rows of one kind, oldest first."""
        return [r for r in self.rows if r["kind"] == kind]

    def data_of(self, kind: str) -> list[dict[str, Any]]:
        """Return the data of the rows of one kind, oldest first."""
        return [r["data"] for r in self.of_kind(kind)]

    def last(self, kind: str) -> dict[str, Any]:
        """Return the data of the newest row of one kind."""
        return self.data_of(kind)[-1]

    def of(self, kind: str, device_id: str) -> list[dict[str, Any]]:
        """Return the data of every ``kind`` row about ``device_id``, oldest first."""
        return [r["data"] for r in self.of_kind(kind) if r["device_id"] == device_id]


class MemoryStore:
    """The one in-memory event store for tests: event versions with their opt decision, and the VEN's state."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], Any] = {}
        self.values: dict[str, str] = {}

    async def get(self, event_id: str, modification_number: int) -> Any:
        """Return a stored version (``.event``, ``.opt``) or None."""
        return self.rows.get((event_id, modification_number))

    async def latest(self, event_id: str) -> Any:
        """Return the newest stored version of an event, or None."""
        mine = [v for (e, _), v in self.rows.items() if e == event_id]
        return max(mine, key=lambda v: v.event.modification_number) if mine else None

    async def put(self, ev: DemandEvent, opt: Opt, reason: str, **_: Any) -> bool:
        """Store one version with its decision."""
        self.rows[(ev.event_id, ev.modification_number)] = SimpleNamespace(event=ev, opt=opt)
        return True

    async def open_events(self, now: datetime) -> list[Any]:
        """Return the events left open (none: a test store starts empty)."""
        return []

    async def get_state(self, key: str) -> str | None:
        """Return a state value or None."""
        return self.values.get(key)

    async def get_states(self, prefix: str) -> dict[str, str]:
        """Return every state value whose key starts with ``prefix``, by key."""
        return {k: v for k, v in self.values.items() if k.startswith(prefix)}

    async def set_state(self, key: str, value: str) -> None:
        """Store a state value."""
        self.values[key] = value

    async def put_audited(self, ev: DemandEvent, opt: Opt, reason: str, audit: Any, record: Any, **_: Any) -> None:
        """Append the decision's audit row, then store the version (what EventStore does in one transaction)."""
        await audit.append(record.kind, record.data, actor=record.actor, event_id=record.event_id)
        await self.put(ev, opt, reason)

    async def set_state_audited(self, state: Mapping[str, str], audit: Any, record: Any) -> None:
        """Append the audit row, then store the state values."""
        await audit.append(record.kind, record.data, actor=record.actor, event_id=record.event_id)
        self.values.update(state)


MemoryState = MemoryStore  # the VEN's state store: the event store's get_state/set_state


class MemoryBattery:
    """The one in-memory battery for tests on a manual clock: its output follows its setpoint, reverts by
    itself when the lease lapses, and can stop answering (``offline``). Protocol tests use the Modbus
    ``BatterySimulator`` instead."""

    device_id = "bess1"

    def __init__(self, clock: ManualClock, max_w: float = 8000.0, capacity_wh: float = 40_000.0) -> None:
        self.clock = clock
        self.max_w, self.capacity_wh = max_w, capacity_wh
        self.soc_pct = 80.0
        self.setpoint_w = 0.0
        self.revert_at = 0.0
        self.offline = False
        self._t = clock.monotonic()

    def power_w(self) -> float:
        """Return the output now (W): the setpoint until its revert timer lapses."""
        now = self.clock.monotonic()
        self.soc_pct -= self.setpoint_w * (now - self._t) / 3600.0 / self.capacity_wh * 100.0
        self._t = now
        if now >= self.revert_at:
            self.setpoint_w = 0.0
        return self.setpoint_w

    async def read(self) -> BatteryState:
        if self.offline:
            raise DeviceUnavailable("bess1", "no answer")
        p = self.power_w()
        return BatteryState("bess1", self.soc_pct, p, self.setpoint_w, self.max_w, self.max_w, self.capacity_wh)

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        if self.offline:
            raise DeviceUnavailable("bess1", "no answer")
        self.power_w()
        self.setpoint_w = min(max(power_w, -self.max_w), self.max_w)
        self.revert_at = self.clock.monotonic() + lease_s
        return self.setpoint_w

    async def release(self) -> None:
        if self.offline:
            raise DeviceUnavailable("bess1", "no answer")
        self.setpoint_w = 0.0


class MemoryEvidence:
    """An evidence sink keeping bodies by SHA-256."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def __call__(self, sha256: str, body: bytes) -> None:
        """Keep one body."""
        self.blobs[sha256] = body


async def until(pred: Callable[[], Any], timeout_s: float = 15.0) -> None:
    """Wait until ``pred()`` holds, failing after ``timeout_s``.

    The default is generous on purpose: it returns as soon as ``pred()`` holds, and the parallel
    suite on a shared 2-core machine has made 5 s waits miss (a check that something does *not*
    happen passes its own, shorter timeout)."""
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
