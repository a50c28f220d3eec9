"""A facility or feeder meter read over Modbus TCP, driven by a register map.

The map's ``facility_w`` role is the facility's import power (W, positive importing); a map
whose meter counts export as positive says so with a negative ``scale``. Other points are
telemetry for the probe and the audit log. A reading the meter marks not available, or one
outside the point's physical ``bounds``, is a ``DeviceRejected``, never a value. Reads go
through the link's backoff, so a meter that stops answering is not hammered and its outage
and recovery are logged once each.
"""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock
from protocols.modbus.codec import Value
from protocols.modbus.device import ModbusDevice
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping

ROLE = "facility_w"


class ModbusMeter(ModbusDevice):
    """Implements ``gateway.interfaces.Meter`` for a Modbus meter described by a mapping."""

    KINDS = ("meter", "generic")
    WRONG_KIND = "a {kind} map is not a meter"

    def __init__(
        self,
        device_id: str,
        endpoint: ModbusEndpoint,
        mapping: Mapping | str | Path = "meter_facility",
        clock: Clock | None = None,
    ) -> None:
        super().__init__(device_id, endpoint, mapping, clock)
        self._point = self.mapping.require_roles((ROLE,))[ROLE]

    async def read_facility_w(self) -> float:
        """Return facility import power in W; raise DeviceRejected if not available or outside its bounds."""
        name = self._point.name
        values = await self._link.call("read", lambda: self._transport.read([name]))
        return values[name]

    async def read_group(self, group: str) -> dict[str, Value]:
        """Return every point of one polling group (telemetry), None where not available."""
        names = [p.name for p in self.mapping.points.values() if p.group == group]
        return await self._link.call(f"read {group}", lambda: self._transport.read_values(names))
