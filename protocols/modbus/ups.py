"""A UPS read over Modbus TCP (telemetry only) and the guard it puts on battery discharge.

UPS register maps (``kind: ups``) report state of charge, runtime, on-battery and alarms.
They are never dispatched unless the map says ``dispatchable: true`` (a grid-interactive
UPS); ``ModbusBattery`` refuses them otherwise. What they do give the gateway is a guard:
while the UPS is on battery, raises an alarm, or holds less runtime or charge than the site
keeps in reserve, or cannot be read at all, no battery may discharge for demand response.
``UpsGuardedBattery`` applies that guard by lowering the battery's reported discharge limit
(so the safety limits clamp every setpoint) and by clamping setpoints itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.errors import DeviceError
from gateway.interfaces import Battery
from gateway.logs import get_logger
from gateway.model import BatteryState
from protocols.modbus.codec import Value
from protocols.modbus.device import ModbusDevice
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping

ROLES = ("soc_pct", "runtime_s", "on_battery", "alarms")

log = get_logger(__name__)


@dataclass(frozen=True)
class UpsState:
    """One reading of a UPS; None where the UPS reports a value as not available."""

    device_id: str
    soc_pct: float | None
    runtime_s: float | None
    on_battery: bool | None
    alarms: int | None


def discharge_allowance_w(state: UpsState | None, min_runtime_s: float, min_soc_pct: float) -> tuple[float, str]:
    """Return how much (W) batteries may discharge for demand response given the UPS, and why."""
    if state is None:
        return 0.0, "UPS state unknown"
    if state.on_battery is None or state.on_battery:
        return 0.0, "UPS on battery" if state.on_battery else "UPS on-battery state not available"
    if state.alarms is None or state.alarms:
        return 0.0, f"UPS alarms 0x{state.alarms:04x}" if state.alarms else "UPS alarms not available"
    if state.runtime_s is None or state.runtime_s < min_runtime_s:
        return 0.0, f"UPS runtime {state.runtime_s} s below reserve {min_runtime_s:g} s"
    if state.soc_pct is None or state.soc_pct < min_soc_pct:
        return 0.0, f"UPS charge {state.soc_pct} % below reserve {min_soc_pct:g} %"
    return math.inf, "UPS ready"


class ModbusUps(ModbusDevice):
    """Reads a UPS's telemetry from a register map with the roles in ``ROLES``."""

    KINDS = ("ups",)
    WRONG_KIND = "not a UPS map (kind: ups)"

    def __init__(
        self,
        device_id: str,
        endpoint: ModbusEndpoint,
        mapping: Mapping | str | Path = "ups_generic",
        clock: Clock | None = None,
    ) -> None:
        super().__init__(device_id, endpoint, mapping, clock)
        self._pts = self.mapping.require_roles(ROLES)

    async def read(self) -> UpsState:
        """Return state of charge, runtime, on-battery and alarms in one coalesced read."""
        names = [p.name for p in self._pts.values()]
        v = await self._link.call("read", lambda: self._transport.read_values(names))

        def num(role: str) -> float | None:
            x: Value = v[self._pts[role].name]
            return x if isinstance(x, float) else None

        on_batt, alarms = num("on_battery"), num("alarms")
        return UpsState(
            device_id=self.device_id,
            soc_pct=num("soc_pct"),
            runtime_s=num("runtime_s"),
            on_battery=None if on_batt is None else bool(on_batt),
            alarms=None if alarms is None else int(alarms),
        )


class UpsGuardedBattery:
    """A ``Battery`` whose discharge is held to what the UPS guard allows; the rest passes through."""

    def __init__(self, battery: Battery, ups: ModbusUps, min_runtime_s: float, min_soc_pct: float) -> None:
        self.inner = battery
        self.ups = ups
        self.device_id = battery.device_id
        self.min_runtime_s = min_runtime_s
        self.min_soc_pct = min_soc_pct
        self.allowance_w = 0.0
        self.reason = "UPS not read yet"

    def __getattr__(self, name: str) -> Any:
        """Pass anything else (connect, close, keep-alive) to the wrapped battery."""
        return getattr(self.inner, name)

    async def _guard(self) -> float:
        """Read the UPS and return the discharge allowance (W); log each change of reason once."""
        try:
            state: UpsState | None = await self.ups.read()
        except DeviceError:
            state = None  # an unreadable UPS guards like an outage: nothing is risked
        allowance, reason = discharge_allowance_w(state, self.min_runtime_s, self.min_soc_pct)
        if reason != self.reason:
            log.info("ups guard", device_id=self.ups.device_id, allowance_w=allowance, reason=reason)
        self.allowance_w, self.reason = allowance, reason
        return allowance

    async def read(self) -> BatteryState:
        """Return the battery's state with its discharge limit lowered to the UPS allowance."""
        state = await self.inner.read()
        allowance = await self._guard()
        return replace(state, max_discharge_w=min(state.max_discharge_w, allowance))

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Command at most the UPS allowance (charging is never held back); return the read-back."""
        allowance = await self._guard()
        return await self.inner.set_discharge_w(min(power_w, allowance), lease_s)

    async def release(self) -> None:
        """Release the wrapped battery."""
        await self.inner.release()
