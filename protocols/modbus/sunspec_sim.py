"""A SunSpec storage inverter on loopback, served from pysunspec2's model definitions.

The register image is laid out by ``sunspec.nominal_layout`` from the same definitions the
driver decodes with: "SunS", then models 1, 124, 704, 713, 715 and 802 (or whichever the map
lists), then the end block. Every point starts "not implemented" (its sentinel); the device
fills in what a storage inverter reports. Physics: power follows 704 WSet (when WSetEna and
WSetMod = WATTS) or 124's charge/discharge rates, only in remote control; the reversion timer
(704 WSetRvrtTms, 124 InOutWRte_RvrtTms) drops the command when no controller write arrives
in time; state of charge integrates power.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from gateway.clock import Clock, SystemClock
from protocols.modbus import codec, sunspec
from protocols.modbus.mapping import Mapping, load_mapping, replace_points
from protocols.modbus.simulator import PhysicsDevice, PointServer

REMOTE, LOCAL = 0, 1  # LocRemCtl (802, 715)
STATE_CONNECTED = 3  # 802 State
CHA_ST = {"discharging": 3, "charging": 4, "holding": 6}  # 802/124 ChaSt
STOR_CHARGE, STOR_DISCHARGE = 1 << 0, 1 << 1  # 124 StorCtl_Mod bits
# Scale factors the simulated device reports (chosen so a few hundred kW fit 16-bit points).
SCALE_FACTORS = {
    "124.WChaMax_SF": 1,
    "124.WChaDisChaGra_SF": 0,
    "124.MinRsvPct_SF": -1,
    "124.ChaState_SF": -1,
    "124.InOutWRte_SF": -1,
    "704.WMaxLimPct_SF": -1,
    "704.WSet_SF": 0,
    "704.WSetPct_SF": -1,
    "713.WH_SF": 2,
    "713.Pct_SF": -1,
    "802.AHRtg_SF": 0,
    "802.WHRtg_SF": 2,
    "802.WChaDisChaMax_SF": 1,
    "802.SoC_SF": -1,
    "802.W_SF": 1,
}
KEEPALIVE = frozenset(
    {"704.WSet", "704.WSetRvrtTms", "704.WSetEna", "124.OutWRte", "124.InWRte", "124.InOutWRte_RvrtTms"}
    | {"124.StorCtl_Mod", "802.CtrlHb", "715.ControllerHb"}
)


def sunspec_map_at(mapping: Mapping, base: int) -> Mapping:
    """Return a SunSpec map laid out with its "SunS" marker at ``base`` instead of the nominal one."""
    assert mapping.sunspec is not None
    layout = sunspec.nominal_layout(base, (*mapping.sunspec.models, *mapping.sunspec.optional))
    return replace_points(mapping, sunspec.layout_points(layout))


class SunspecSimulator(PhysicsDevice):
    """A SunSpec storage inverter answering Modbus TCP, with state of charge and reversion timers."""

    TASK_NAME = "sunspec simulator"

    def __init__(
        self,
        mapping: Mapping | str | Path = "sunspec_storage",
        *,
        base: int | None = None,
        capacity_wh: float = 1_000_000.0,
        soc_pct: float = 80.0,
        max_discharge_w: float = 250_000.0,
        max_charge_w: float = 250_000.0,
        clock: Clock | None = None,
        unit: int = 1,
        tick_s: float = 0.1,
    ) -> None:
        m = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        if m.sunspec is None:
            raise ValueError(f"{m.source or m.model} is not a SunSpec map")
        self.mapping = sunspec_map_at(m, base) if base is not None else m
        models = (*m.sunspec.models, *m.sunspec.optional)
        self.layout = sunspec.nominal_layout(base if base is not None else self._base(m), models)
        self.server = PointServer(self.mapping, unit=unit, on_write=self._on_write)
        self._clock: Clock = clock or SystemClock()
        self.capacity_wh = capacity_wh
        self.max_discharge_w = max_discharge_w
        self.max_charge_w = max_charge_w
        self.tick_s = tick_s
        self._sign = m.sunspec.power_sign
        self._soc_pct = soc_pct
        self._power_w = 0.0
        self.reverted = False  # a reversion timer fired since the last command
        self.controller_writes = 0
        self._last_keepalive = self._last_step = self._clock.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._fill()

    @staticmethod
    def _base(m: Mapping) -> int:
        """Return the nominal base of a SunSpec map (where its "SunS" point sits)."""
        return m.point("SunS").address

    def _fill(self) -> None:
        """Mark every point not implemented, then set what a storage inverter reports."""
        for p in self.mapping.points.values():
            if p.invalid or not p.numeric or p.type.startswith("float"):
                self.server.set(p.name, None)
        values: dict[str, float | str] = {**sunspec.header_values(self.layout), **SCALE_FACTORS}
        values.update(
            {
                "1.Mn": "drgw",
                "1.Md": "SimStorage",
                "1.Vr": "1.0",
                "1.SN": "SIM-0001",
                "1.DA": 1.0,
                "124.WChaMax": self.max_charge_w,
                "124.StorCtl_Mod": 0.0,
                "124.OutWRte": 0.0,
                "124.InWRte": 0.0,
                "124.InOutWRte_RvrtTms": 0.0,
                "704.WSetEna": 0.0,
                "704.WSetMod": 1.0,
                "704.WSet": 0.0,
                "704.WSetRvrtTms": 0.0,
                "704.WSetRvrtRem": 0.0,
                "713.WHRtg": self.capacity_wh,
                "715.LocRemCtl": REMOTE,
                "715.DERHb": 0.0,
                "715.ControllerHb": 0.0,
                "802.WHRtg": self.capacity_wh,
                "802.WChaRteMax": self.max_charge_w,
                "802.WDisChaRteMax": self.max_discharge_w,
                "802.LocRemCtl": REMOTE,
                "802.Hb": 0.0,
                "802.CtrlHb": 0.0,
                "802.AlmRst": 0.0,
                "802.Typ": 4.0,  # lithium ion
                "802.State": STATE_CONNECTED,
                "802.Evt1": 0.0,
                "802.Evt2": 0.0,
                "802.EvtVnd1": 0.0,
                "802.EvtVnd2": 0.0,
                "802.SetOp": 1.0,
                "802.SetInvState": 3.0,
            }
        )
        for name, value in values.items():
            if name in self.mapping.points:
                self.server.set(name, value)
        self._publish()

    @property
    def port(self) -> int:
        """Return the TCP port the simulator listens on (0 before start)."""
        return self.server.port

    @property
    def soc_pct(self) -> float:
        """Return the state of charge (%)."""
        return self._soc_pct

    @property
    def power_w(self) -> float:
        """Return the AC power (W, + discharge)."""
        return self._power_w

    def get(self, name: str) -> codec.Value:
        """Return a point as a client would decode it (None: not implemented)."""
        return self.server.get_value(name)

    def set(self, name: str, value: float | str | None) -> None:
        """Set a point from inside the device (None: not implemented)."""
        self.server.set(name, value)

    def set_local(self, local: bool) -> None:
        """Turn the unit's control mode to local (remote commands ignored) or back to remote."""
        for name in ("802.LocRemCtl", "715.LocRemCtl"):
            if name in self.mapping.points:
                self.server.set(name, LOCAL if local else REMOTE)

    def _num(self, name: str) -> float:
        """Return a numeric point's value, 0 when absent or not implemented."""
        if name not in self.mapping.points:
            return 0.0
        v = self.server.get_value(name)
        return v if isinstance(v, float) else 0.0

    def target_w(self) -> float:
        """Return the power (W, + discharge) the current commands ask for."""
        if self._num("802.LocRemCtl") != REMOTE or self._num("715.LocRemCtl") != REMOTE:
            return 0.0
        if self._num("704.WSetEna") == 1 and self._num("704.WSetMod") == 1:
            return self._num("704.WSet")
        mode = int(self._num("124.StorCtl_Mod"))
        rate_w = self._num("124.WChaMax")
        out = self._num("124.OutWRte") / 100.0 * rate_w if mode & STOR_DISCHARGE else 0.0
        into = self._num("124.InWRte") / 100.0 * rate_w if mode & STOR_CHARGE else 0.0
        return out - into

    def step(self) -> None:
        """Advance to the clock's now: reversion timers, power, state of charge, heartbeat."""
        now = self._clock.monotonic()
        dt = max(0.0, now - self._last_step)
        self._last_step = now
        self._soc_pct -= self._power_w * dt / 3600.0 / self.capacity_wh * 100.0
        self._soc_pct = min(100.0, max(0.0, self._soc_pct))
        idle = now - self._last_keepalive
        for timer, enable in (("704.WSetRvrtTms", "704.WSetEna"), ("124.InOutWRte_RvrtTms", "124.StorCtl_Mod")):
            tms = self._num(timer)
            if tms > 0 and self._num(enable) != 0 and idle > tms:
                self.server.set(enable, 0.0)  # revert to the default: no setpoint
                self.reverted = True
        if "704.WSetRvrtRem" in self.mapping.points:
            tms = self._num("704.WSetRvrtTms")
            self.server.set("704.WSetRvrtRem", float(max(0, math.ceil(tms - idle))) if tms > 0 else 0.0)
        target = min(max(self.target_w(), -self.max_charge_w), self.max_discharge_w)
        if (target > 0 and self._soc_pct <= 0.0) or (target < 0 and self._soc_pct >= 100.0):
            target = 0.0
        self._power_w = target
        self._publish()
        for hb in ("802.Hb", "715.DERHb"):
            if hb in self.mapping.points:
                self.server.set(hb, float((int(self._num(hb)) + 1) % 65536))

    def _publish(self) -> None:
        """Write the measured values into the register image."""
        state = "discharging" if self._power_w > 0 else "charging" if self._power_w < 0 else "holding"
        values = {
            "802.SoC": self._soc_pct,
            "713.SoC": self._soc_pct,
            "124.ChaState": self._soc_pct,
            "713.WHAvail": self.capacity_wh * self._soc_pct / 100.0,
            "802.W": self._sign * self._power_w,
            "802.ChaSt": CHA_ST[state],
            "124.ChaSt": CHA_ST[state],
        }
        for name, value in values.items():
            if name in self.mapping.points:
                self.server.set(name, value)

    def _on_write(self, names: frozenset[str]) -> None:
        """Clip a written WSet to the ratings; re-arm the reversion timers on any controller write."""
        if "704.WSet" in names:
            asked = self._num("704.WSet")
            self.server.set("704.WSet", min(max(asked, -self.max_charge_w), self.max_discharge_w))
        if names & KEEPALIVE:
            self._last_keepalive = self._clock.monotonic()
            self.controller_writes += 1
            if names & {"704.WSetEna", "124.StorCtl_Mod"}:
                self.reverted = False
