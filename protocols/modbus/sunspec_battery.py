"""A SunSpec storage inverter dispatched over Modbus TCP (models 1, 124, 704, 713, 715, 802).

On connect the driver finds "SunS" (40000, 0 or 50000, or where the map says), walks the
model chain, checks the map's required models are there, and lays out every point from
pysunspec2's definitions at the addresses found. Commands go through model 704 (WSet in W
with WSetEna, WSetMod = WATTS and the WSetRvrtTms reversion timer) or, for older inverters,
model 124 (StorCtl_Mod with OutWRte/InWRte in % of WChaMax and InOutWRte_RvrtTms). Each
setpoint carries the reversion timer and a controller heartbeat (802 CtrlHb or 715
ControllerHb) and is read back. 802/715 LocRemCtl must say REMOTE before anything is sent.
"Not implemented" values are never read as 0: a missing state of charge (or one outside 0-100 %,
or an enabled setpoint without a value) is an InvalidReading (a DeviceRejected).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway.clock import Clock, SystemClock
from gateway.errors import ConfigError, DeviceRejected, InputRejected, InvalidReading, ReadbackMismatch
from gateway.model import BatteryState
from protocols.modbus import codec, sunspec
from protocols.modbus.codec import Value
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.lease import LeasedDevice
from protocols.modbus.link import Link
from protocols.modbus.mapping import Mapping, load_mapping, replace_points
from protocols.modbus.transport import ModbusTransport

T = TypeVar("T")
REMOTE = 0  # LocRemCtl: 0 remote, 1 local
STATE_CONNECTED, STATE_FAULT = 3, 99
STOR_CHARGE, STOR_DISCHARGE = 1 << 0, 1 << 1
REMOTE_CHECK_MAX_AGE_S = 10.0
# First valid point wins, in this order.
SOC = ("802.SoC", "713.SoC", "124.ChaState")
SOC_BOUNDS_PCT = (0.0, 100.0)  # a state of charge outside is not a reading: the next model's, or a fault
MAX_DISCHARGE = ("802.WDisChaRteMax", "124.WChaMax")
MAX_CHARGE = ("802.WChaRteMax", "124.WChaMax")
CAPACITY = ("802.WHRtg", "713.WHRtg")
LOC_REM = ("802.LocRemCtl", "715.LocRemCtl")
HEARTBEAT = ("802.CtrlHb", "715.ControllerHb")
CONTROL_704 = ("704.WSetEna", "704.WSetMod", "704.WSet", "704.WSetRvrtTms")
CONTROL_124 = ("124.StorCtl_Mod", "124.OutWRte", "124.InWRte", "124.InOutWRte_RvrtTms", "124.WChaMax")


class SunspecBattery(LeasedDevice):
    """Implements ``gateway.interfaces.Battery`` for a SunSpec storage inverter."""

    def __init__(
        self,
        device_id: str,
        endpoint: ModbusEndpoint,
        mapping: Mapping | str | Path = "sunspec_storage",
        revert_s: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        m = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        where = m.source or m.model
        if m.sunspec is None:
            raise ConfigError(where, "sunspec", "not a SunSpec map")
        if not m.is_dispatchable:
            raise ConfigError(where, "dispatchable", f"a {m.kind} map is telemetry only; it cannot drive a battery")
        if int(m.sunspec.control) not in m.sunspec.models:
            raise ConfigError(where, "sunspec.models", f"control: {m.sunspec.control} needs model {m.sunspec.control}")
        super().__init__(clock or SystemClock(), revert_s)
        self.device_id = device_id
        self.mapping = m
        self.spec = m.sunspec
        self.layout: sunspec.Layout | None = None
        self._transport = ModbusTransport(device_id, endpoint, m)
        self._link = Link(
            device_id,
            self._clock,
            backoff_initial_s=endpoint.backoff_initial_s,
            backoff_max_s=endpoint.backoff_max_s,
            logger=__name__,
        )
        self._lock = asyncio.Lock()
        self._remote_seen: tuple[float, bool] | None = None
        self._rate_w: float | None = None  # 124 WChaMax as last read
        self._heartbeat = 0

    async def connect(self) -> None:
        """Open the connection and discover the models; raise DeviceUnavailable or DeviceRejected."""
        async with self._lock:
            await self._guarded("connect", self._transport.connect)
            await self._discover()

    async def close(self) -> None:
        """Stop the keep-alive task and close the connection (does not release)."""
        await self.stop_keepalive()
        self._transport.close()

    async def _discover(self) -> None:
        """Find the model chain and lay the map's points out where the device has them."""
        bases = sunspec.BASES if self.spec.base == "auto" else (self.spec.base,)

        async def read(address: int, count: int) -> list[int]:
            return await self._transport.read_registers("holding", address, count)

        layout = await self._guarded("discover", lambda: sunspec.discover(read, bases, self.device_id))
        missing = [mid for mid in self.spec.models if layout.block(mid) is None]
        if missing:
            raise DeviceRejected(
                self.device_id, f"SunSpec models {missing} missing (device has {list(layout.model_ids)})"
            )
        self._transport.remap(replace_points(self.mapping, sunspec.layout_points(layout)))
        self.layout = layout

    async def _ready(self) -> None:
        """Discover the device first if that has not happened yet (it was down at start)."""
        if self.layout is None:
            await self._guarded("connect", self._transport.connect)
            await self._discover()

    def _has(self, name: str) -> bool:
        """Return whether the device has point ``name``."""
        return name in self._transport.mapping.points

    def _present(self, names: tuple[str, ...]) -> list[str]:
        """Return the names the device has."""
        return [n for n in names if self._has(n)]

    def _first(
        self, values: dict[str, Value], names: tuple[str, ...], what: str, bounds: tuple[float, float] | None = None
    ) -> float:
        """Return the first valid number among ``names`` (within ``bounds``); raise InvalidReading if none is."""
        for n in names:
            v = values.get(n)
            if isinstance(v, float) and (bounds is None or bounds[0] <= v <= bounds[1]):
                return v
        seen = ", ".join(f"{n} {values.get(n)}" for n in self._present(names)) or "no point"
        raise InvalidReading(self.device_id, f"{what}: not available or not a possible reading ({seen})")

    async def read(self) -> BatteryState:
        """Return state of charge, power, setpoint and limits from the battery and control models."""
        async with self._lock:
            await self._ready()
            names = self._present(
                (*SOC, *MAX_DISCHARGE, *MAX_CHARGE, *CAPACITY, *LOC_REM, "802.W", "802.State")
                + (CONTROL_704 if self.spec.control == "704" else CONTROL_124)
            )
            v = await self._guarded("read", lambda: self._transport.read_values(names))
            self._remember_remote(v)
        state = v.get("802.State")
        setpoint_w = self._setpoint_of(v)
        self._seen_holding(setpoint_w)
        return BatteryState(
            device_id=self.device_id,
            soc_pct=self._first(v, SOC, "state of charge", SOC_BOUNDS_PCT),
            power_w=self.spec.power_sign * self._first(v, ("802.W",), "battery power"),
            setpoint_w=setpoint_w,
            max_discharge_w=self._first(v, MAX_DISCHARGE, "max discharge rate"),
            max_charge_w=self._first(v, MAX_CHARGE, "max charge rate"),
            capacity_wh=self._first(v, CAPACITY, "capacity"),
            online=state is None or state == STATE_CONNECTED,
        )

    def _setpoint_of(self, v: dict[str, Value]) -> float:
        """Return the setpoint (W, + discharge) the control model holds; 0 when not enabled.

        An enabled control whose value is "not implemented" is no setpoint: InvalidReading, never 0 W.
        """
        if self.spec.control == "704":
            return self._number(v, "704.WSet") if v.get("704.WSetEna") == 1 else 0.0
        rate = v.get("124.WChaMax")
        if isinstance(rate, float):
            self._rate_w = rate
        mode = int(v.get("124.StorCtl_Mod") or 0)
        out = self._number(v, "124.OutWRte") if mode & STOR_DISCHARGE else 0.0
        into = self._number(v, "124.InWRte") if mode & STOR_CHARGE else 0.0
        return (out - into) / 100.0 * (self._rate_w or 0.0)

    def _number(self, v: dict[str, Value], name: str) -> float:
        """Return point ``name``'s number; raise InvalidReading when the device reports it not implemented."""
        x = v.get(name)
        if not isinstance(x, float):
            raise InvalidReading(self.device_id, f"{name}: in force but not available ({x!r})")
        return x

    def _remember_remote(self, v: dict[str, Value]) -> None:
        """Cache whether every local/remote point present says REMOTE."""
        states = [v[n] for n in LOC_REM if n in v]
        if states:
            self._remote_seen = (self._clock.monotonic(), all(s == REMOTE for s in states))

    async def _check_remote(self) -> None:
        """Refuse to command a device in local control (re-read if the last reading is stale)."""
        names = self._present(LOC_REM)
        if not names:
            return
        seen = self._remote_seen
        if seen is None or self._clock.monotonic() - seen[0] > REMOTE_CHECK_MAX_AGE_S:
            v = await self._guarded("read remote state", lambda: self._transport.read_values(names))
            self._remember_remote(v)
            seen = self._remote_seen
        if seen is None or not seen[1]:
            raise DeviceRejected(self.device_id, "device is in local control; remote setpoints are refused")

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Command ``power_w`` (W, + discharge) for ``lease_s`` with the reversion timer; return the read-back."""
        if not lease_s > 0:
            raise InputRejected(f"{self.device_id}: lease_s must be positive, got {lease_s}")
        if not math.isfinite(power_w):
            raise InputRejected(f"{self.device_id}: setpoint {power_w} is not a finite number")
        async with self._lock:
            await self._ready()
            await self._check_remote()
            power_w = self._ramped(power_w, self.mapping.control.max_ramp_w_per_s)
            watchdog_s = float(max(1, math.ceil(min(self.revert_s, lease_s) - 1e-9)))
            values = await self._command(power_w, watchdog_s)
            self._transport.check_write(values)
            await self._guarded("set_discharge_w", lambda: self._transport.write(values))
            self._leased(lease_s, power_w, watchdog_s)
            return await self._read_back(power_w)

    async def _command(self, power_w: float, watchdog_s: float) -> dict[str, float | str]:
        """Return the writes that command ``power_w`` through the configured control model."""
        values: dict[str, float | str] = {}
        if self.spec.control == "704":
            values.update({"704.WSetMod": 1.0, "704.WSetEna": 1.0, "704.WSetRvrtTms": watchdog_s, "704.WSet": power_w})
        else:
            rate = await self._rate()
            pct = abs(power_w) / rate * 100.0
            if pct > 100.0 + 1e-9:
                raise InputRejected(f"{self.device_id}: {power_w} W exceeds WChaMax {rate} W")
            mode = STOR_DISCHARGE if power_w >= 0 else STOR_CHARGE
            out, into = (pct, 0.0) if power_w >= 0 else (0.0, pct)
            values.update(
                {
                    "124.StorCtl_Mod": float(mode),
                    "124.OutWRte": out,
                    "124.InWRte": into,
                    "124.InOutWRte_RvrtTms": watchdog_s,
                }
            )
        hb = self._present(HEARTBEAT)
        if hb:
            values[hb[0]] = self._next_heartbeat(hb[0])
        return values

    async def _rate(self) -> float:
        """Return 124 WChaMax (W), reading it if not yet known; raise DeviceRejected if unavailable."""
        if self._rate_w is None:
            v = await self._guarded("read WChaMax", lambda: self._transport.read_values(["124.WChaMax"]))
            rate = v["124.WChaMax"]
            if not isinstance(rate, float) or rate <= 0:
                raise DeviceRejected(self.device_id, "124.WChaMax is not available")
            self._rate_w = rate
        return self._rate_w

    async def _read_back(self, power_w: float) -> float:
        """Read the control model back and compare it with what was written."""
        names = list(CONTROL_704[:3]) if self.spec.control == "704" else list(CONTROL_124[:3])
        v = await self._guarded("read back", lambda: self._transport.read_values(names))
        if self.spec.control == "704" and v.get("704.WSetEna") != 1:
            raise ReadbackMismatch(self.device_id, "704.WSetEna", 1.0, float(v.get("704.WSetEna") or math.nan))
        reported = self._setpoint_of(v)
        if self.spec.control == "704":
            tolerance = codec.lsb(self._transport.mapping.point("704.WSet"), self._transport.scale_of("704.WSet") or 0)
        else:
            tolerance = (self._rate_w or 0.0) * 0.01  # rates carry 0.1 %-ish resolution; allow one percent
        if abs(reported - power_w) > tolerance * (1 + 1e-9):
            raise ReadbackMismatch(self.device_id, names[2], power_w, reported)
        return reported

    async def release(self) -> None:
        """Disable the setpoint (WSetEna 0, or StorCtl_Mod 0) and verify it by read-back."""
        async with self._lock:
            await self._ready()
            if self.spec.control == "704":
                values: dict[str, float | str] = {"704.WSetEna": 0.0, "704.WSet": 0.0}
                check = "704.WSetEna"
            else:
                values = {"124.StorCtl_Mod": 0.0, "124.OutWRte": 0.0, "124.InWRte": 0.0}
                check = "124.StorCtl_Mod"
            await self._guarded("release", lambda: self._transport.write(values))
            self._released()
            back = await self._guarded("read back", lambda: self._transport.read_values([check]))
        if back[check] != 0:
            raise ReadbackMismatch(self.device_id, check, 0.0, float(back[check] or math.nan))

    async def refresh(self, lease_s: float | None = None) -> bool:
        """Re-arm the reversion timer and bump the heartbeat; nothing once the lease has lapsed."""
        async with self._lock:
            await self._ready()
            now = self._clock.monotonic()
            if lease_s is not None and self._lease_until is not None and now < self._lease_until:
                self._lease_until = now + lease_s
            values: dict[str, float | str] = {}
            hb = self._present(HEARTBEAT)
            if hb:
                values[hb[0]] = self._next_heartbeat(hb[0])
            if self._lease_until is not None:
                remaining = self._lease_until - now
                if remaining <= 0:
                    return False
                self._watchdog_s = float(max(1, math.ceil(min(self.revert_s, remaining) - 1e-9)))
                timer = "704.WSetRvrtTms" if self.spec.control == "704" else "124.InOutWRte_RvrtTms"
                values[timer] = self._watchdog_s
            if not values:
                return False
            await self._guarded("refresh", lambda: self._transport.write(values))
            return True

    def _next_heartbeat(self, name: str) -> float:
        """Return the next controller heartbeat, wrapping within the point's range."""
        _lo, hi = codec.value_range(self._transport.mapping.point(name))
        self._heartbeat = (self._heartbeat + 1) % int(hi)  # the top value is SunSpec's "not implemented"
        return float(self._heartbeat)

    async def _guarded(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one device operation under the link's backoff rules."""
        return await self._link.call(what, op)
