"""A facility or feeder meter read over Modbus TCP, driven by a register map.

The map's ``facility_w`` role is the facility's import power (W, positive importing); a map
whose meter counts export as positive says so with a negative ``scale``. Other points are
telemetry for the probe and the audit log. Reads go through the link's backoff, so a meter
that stops answering is not hammered and its outage and recovery are logged once each.
"""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock, SystemClock
from gateway.errors import ConfigError, DeviceRejected
from protocols.modbus.codec import Value
from protocols.modbus.link import Link
from protocols.modbus.mapping import Mapping, load_mapping
from protocols.modbus.poller import GroupPoller
from protocols.modbus.transport import ModbusTransport

ROLE = "facility_w"


class ModbusMeter:
    """Implements ``gateway.interfaces.Meter`` for a Modbus meter described by a mapping."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        unit: int,
        mapping: Mapping | str | Path = "meter_facility",
        timeout_s: float = 1.0,
        clock: Clock | None = None,
        *,
        retries: int = 0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.device_id = device_id
        self.mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        if self.mapping.kind not in ("meter", "generic"):
            raise ConfigError(
                self.mapping.source or self.mapping.model, "kind", f"a {self.mapping.kind} map is not a meter"
            )
        self._point = self.mapping.require_roles((ROLE,))[ROLE]
        self._transport = ModbusTransport(
            device_id, host, port, unit, self.mapping, timeout_s=timeout_s, retries=retries
        )
        clock = clock or SystemClock()
        self._poller = GroupPoller(self._transport, clock)
        self._link = Link(
            device_id,
            clock,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            logger=__name__,
        )

    async def connect(self) -> None:
        """Open the connection; raise DeviceUnavailable if the meter does not answer."""
        await self._link.call("connect", self._transport.connect)

    async def close(self) -> None:
        """Close the connection."""
        self._transport.close()

    async def read_facility_w(self) -> float:
        """Return facility import power in W; raise DeviceRejected if the meter reports it not available."""
        name = self._point.name
        values = await self._link.call("read", lambda: self._transport.read_values([name]))
        value = values[name]
        if not isinstance(value, float):
            raise DeviceRejected(self.device_id, f"{name}: the meter reports it as not available")
        return value

    async def read_group(self, group: str) -> dict[str, Value]:
        """Return every point of one polling group (telemetry), None where not available."""
        names = [p.name for p in self.mapping.points.values() if p.group == group]
        return await self._link.call(f"read {group}", lambda: self._transport.read_values(names))

    async def telemetry(self) -> dict[str, Value]:
        """Return every point's latest value, each polling group read at its own period."""
        return await self._link.call("poll", self._poller.poll)
