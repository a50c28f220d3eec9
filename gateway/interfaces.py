"""The few capability interfaces every device backend implements.

Power in watts, positive battery power means discharge (see ``gateway.model``).
A method that cannot reach its device raises ``DeviceUnavailable``; one whose
device refuses raises ``DeviceRejected``. None of them returns None on error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from gateway.model import BatteryState, GpuState


class Meter(Protocol):
    """Reads the facility (or feeder) power."""

    device_id: str

    async def read_facility_w(self) -> float:
        """Return facility import power in W."""
        ...


class Battery(Protocol):
    """A battery or grid-interactive UPS that can be dispatched."""

    device_id: str

    async def read(self) -> BatteryState:
        """Return the battery's state of charge, power and limits."""
        ...

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Command discharge power (W, + discharge), leased for ``lease_s``; return the read-back setpoint."""
        ...

    async def release(self) -> None:
        """Return the battery to its normal (undispatched) mode."""
        ...


class GpuFleet(Protocol):
    """A set of GPUs, local or remote, whose power caps can be set."""

    async def read(self) -> tuple[GpuState, ...]:
        """Return every GPU's power, cap, limits and job."""
        ...

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Set many caps (W) leased for ``lease_s``; return the enforced cap of each GPU set."""
        ...

    async def release(self) -> None:
        """Restore every GPU's default power limit."""
        ...


class AuditSink(Protocol):
    """Where every stage records what it decided or did."""

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append one record; return its sequence number once durably committed."""
        ...


@runtime_checkable
class TransactionalAuditSink(Protocol):
    """An audit sink that commits a record together with other writes to its own database."""

    async def append_with(
        self,
        kind: str,
        data: Mapping[str, Any],
        statements: Sequence[Any],
        *,
        engine: Any,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append one record and run ``statements`` (on ``engine``, the sink's own) in one transaction."""
        ...


class WriteFence(Protocol):
    """Lets a write commit only while this node holds the active lease (hot standby, ``gateway.standby``)."""

    @property
    def token(self) -> int | None:
        """Return the fencing token this node's writes carry now; None while it may not write."""
        ...

    async def check(self, conn: Any, token: int | None) -> None:
        """Raise FencedOff unless ``token`` still holds the lease; keep it held until ``conn``'s transaction ends."""
        ...
