"""A grid-interactive battery dispatched over Modbus TCP, driven by a register map.

The map names each register's ``role``; this driver needs the roles in ``ROLES``. Every
setpoint is written together with remote mode, the device's revert timer (``watchdog_s``,
the lease or the configured revert period, whichever is shorter) and a heartbeat, then read
back. If the gateway stops refreshing, the device reverts to 0 W on its own.

Before commanding, the device's local/remote switch (optional role ``remote_enabled``) is
checked: in local control a setpoint is refused with ``DeviceRejected`` and nothing is sent.
A map's ``control.max_ramp_w_per_s`` limits how fast the commanded setpoint moves. A UPS
map is refused unless it says ``dispatchable: true``; a meter map always.

A device that does not answer is backed off (``protocols.modbus.link``): every call fails
fast with ``DeviceUnavailable`` until the backoff window has passed, and the driver logs
"unavailable" once and "recovered" once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway.clock import Clock, SystemClock
from gateway.errors import ConfigError, DeviceRejected, InputRejected, ReadbackMismatch
from gateway.model import BatteryState
from protocols.modbus import codec
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.lease import LeasedDevice
from protocols.modbus.link import Link
from protocols.modbus.mapping import Mapping, load_mapping
from protocols.modbus.transport import ModbusTransport

ROLES = (
    "soc_pct",
    "power_w",
    "setpoint_w",
    "max_discharge_w",
    "max_charge_w",
    "capacity_wh",
    "watchdog_s",
    "heartbeat",
    "control_mode",
    "status",
)
READ_ROLES = ("soc_pct", "power_w", "setpoint_w", "max_discharge_w", "max_charge_w", "capacity_wh", "status")
MODE_LOCAL = 0
MODE_REMOTE = 1
STATUS_ONLINE = 1 << 0
STATUS_FAULT = 1 << 1
STATUS_WATCHDOG_EXPIRED = 1 << 2
REMOTE_CHECK_MAX_AGE_S = 10.0  # a local/remote reading older than this is re-read before commanding

T = TypeVar("T")


class ModbusBattery(LeasedDevice):
    """Implements ``gateway.interfaces.Battery`` for a Modbus battery described by a mapping."""

    def __init__(
        self,
        device_id: str,
        endpoint: ModbusEndpoint,
        mapping: Mapping | str | Path,
        revert_s: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        self.device_id = device_id
        self.mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        if not self.mapping.is_dispatchable:
            raise ConfigError(
                self.mapping.source or self.mapping.model,
                "dispatchable",
                f"a {self.mapping.kind} map is telemetry only; it cannot drive a battery",
            )
        self._pts = self.mapping.require_roles(ROLES)
        self._remote = self.mapping.by_role("remote_enabled")
        super().__init__(clock or SystemClock(), revert_s)
        self._transport = ModbusTransport(device_id, endpoint, self.mapping)
        self._link = Link(
            device_id,
            self._clock,
            backoff_initial_s=endpoint.backoff_initial_s,
            backoff_max_s=endpoint.backoff_max_s,
            logger=__name__,
        )
        self._remote_seen: tuple[float, bool] | None = None  # (monotonic, remote accepted) as last read
        self._lock = asyncio.Lock()
        self._heartbeat = 0

    def _name(self, role: str) -> str:
        """Return the mapping's point name for ``role``."""
        return self._pts[role].name

    async def connect(self) -> None:
        """Open the connection; raise DeviceUnavailable if the device does not answer."""
        async with self._lock:
            await self._guarded("connect", self._transport.connect)

    async def close(self) -> None:
        """Stop the keep-alive task and close the connection (does not release)."""
        await self.stop_keepalive()
        self._transport.close()

    async def read(self) -> BatteryState:
        """Return state of charge, power, setpoint and limits in one coalesced read."""
        names = [self._name(r) for r in READ_ROLES]
        if self._remote is not None:
            names.append(self._remote.name)
        async with self._lock:
            v = await self._guarded("read", lambda: self._transport.read(names))
            if self._remote is not None:
                self._remote_seen = (self._clock.monotonic(), self._is_remote(v[self._remote.name]))
        status = int(v[self._name("status")])
        self._seen_holding(v[self._name("setpoint_w")])
        return BatteryState(
            device_id=self.device_id,
            soc_pct=v[self._name("soc_pct")],
            power_w=v[self._name("power_w")],
            setpoint_w=v[self._name("setpoint_w")],
            max_discharge_w=v[self._name("max_discharge_w")],
            max_charge_w=v[self._name("max_charge_w")],
            capacity_wh=v[self._name("capacity_wh")],
            online=bool(status & STATUS_ONLINE) and not status & STATUS_FAULT,
        )

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Command ``power_w`` (W, + discharge) in remote mode for ``lease_s``; return the read-back."""
        if not lease_s > 0:
            raise InputRejected(f"{self.device_id}: lease_s must be positive, got {lease_s}")
        sp = self._name("setpoint_w")
        self._transport.check_write({sp: power_w})  # refuse a bad setpoint before any traffic
        async with self._lock:
            await self._check_remote()
            power_w = self._ramped(power_w, self.mapping.control.max_ramp_w_per_s)
            watchdog_s = self._watchdog_value(min(self.revert_s, lease_s))
            values = {
                self._name("control_mode"): float(MODE_REMOTE),
                self._name("watchdog_s"): watchdog_s,
                self._name("heartbeat"): self._next_heartbeat(),
                sp: power_w,
            }
            await self._guarded("set_discharge_w", lambda: self._transport.write(values))
            self._leased(lease_s, power_w, watchdog_s)
            reported = (await self._guarded("read back", lambda: self._transport.read([sp])))[sp]
        if abs(reported - power_w) > codec.lsb(self._pts["setpoint_w"]) * (1 + 1e-9):
            raise ReadbackMismatch(self.device_id, sp, power_w, reported)
        return reported

    def _is_remote(self, value: float) -> bool:
        """Return whether a local/remote reading means remote commands are accepted."""
        return int(value) == self.mapping.control.remote_value

    async def _check_remote(self) -> None:
        """Refuse to command a device whose local/remote switch is on local (re-read if stale)."""
        if self._remote is None:
            return
        seen = self._remote_seen
        if seen is None or self._clock.monotonic() - seen[0] > REMOTE_CHECK_MAX_AGE_S:
            name = self._remote.name
            v = await self._guarded("read remote state", lambda: self._transport.read([name]))
            seen = self._remote_seen = (self._clock.monotonic(), self._is_remote(v[name]))
        if not seen[1]:
            raise DeviceRejected(self.device_id, "device is in local control; remote setpoints are refused")

    async def release(self) -> None:
        """Write setpoint 0 and local mode, end the lease, and verify both by read-back."""
        sp, mode = self._name("setpoint_w"), self._name("control_mode")
        async with self._lock:
            await self._guarded("release", lambda: self._transport.write({sp: 0.0, mode: float(MODE_LOCAL)}))
            self._released()
            back = await self._guarded("read back", lambda: self._transport.read([sp, mode]))
        if abs(back[sp]) > codec.lsb(self._pts["setpoint_w"]) * (1 + 1e-9):
            raise ReadbackMismatch(self.device_id, sp, 0.0, back[sp])
        if int(back[mode]) != MODE_LOCAL:
            raise ReadbackMismatch(self.device_id, mode, float(MODE_LOCAL), back[mode])

    async def refresh(self, lease_s: float | None = None) -> bool:
        """Re-arm the revert timer and bump the heartbeat; ``lease_s`` first extends the lease from now.

        Undispatched, only the heartbeat is written. Once the lease has lapsed nothing is
        written, so the device's own timer reverts it; returns whether anything was written.
        """
        async with self._lock:
            now = self._clock.monotonic()
            if lease_s is not None and self._lease_until is not None and now < self._lease_until:
                self._lease_until = now + lease_s
            values = {self._name("heartbeat"): self._next_heartbeat()}
            if self._lease_until is not None:
                remaining = self._lease_until - now
                if remaining <= 0:
                    return False
                self._watchdog_s = self._watchdog_value(min(self.revert_s, remaining))
                values[self._name("watchdog_s")] = self._watchdog_s
            await self._guarded("refresh", lambda: self._transport.write(values))
            return True

    def _watchdog_value(self, seconds: float) -> float:
        """Return the revert timer to write for ``seconds``: rounded up a step, within the map's limits."""
        p = self._pts["watchdog_s"]
        step = codec.lsb(p)
        value = max(step, math.ceil(seconds / step - 1e-9) * step)  # never 0: 0 disables many timers
        lim = self.mapping.limits.get(p.name)
        if lim is not None:
            value = min(max(value, lim.min), lim.max)
        lo, hi = codec.value_range(p)
        return min(max(value, lo), hi)

    def _next_heartbeat(self) -> float:
        """Return the next heartbeat counter value, wrapping within the point's range."""
        _lo, hi = codec.value_range(self._pts["heartbeat"])
        self._heartbeat = (self._heartbeat + 1) % (int(hi) + 1)
        return float(self._heartbeat)

    async def _guarded(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one device operation under the link's backoff rules."""
        return await self._link.call(what, op)
