"""Reading the site: one snapshot of every device, link state, natural draws and baseline, silent devices.

Each tick the loop reads the meter, the battery and the GPU fleet concurrently into one
``Snapshot``; a read that fails, or gives no possible reading, becomes a typed ``DeviceFault`` and
the loop plans without that device. A device's link going down, and coming back, is logged and
audited once per change. From readings of uncapped GPUs the reader keeps each one's natural
(uncapped) draw, and between events the facility baseline. A device that stops answering may
still hold what it was last commanded until its lease lapses: the reader estimates that too.
"""

from __future__ import annotations

import asyncio
from types import MappingProxyType

from gateway import planner, plausible
from gateway.allocation import it_shed_at_caps_w
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.dispatcher import Dispatcher
from gateway.errors import GatewayError, InvalidReading
from gateway.interfaces import FLEET_DEVICE_ID, AuditSink, Battery, GpuFleet, Meter
from gateway.logs import get_logger
from gateway.model import BatteryState, DeviceFault, GpuState, Role, Snapshot
from gateway.status import SiteView, StatusBoard

log = get_logger("gateway.control")

NATURAL_EWMA = 0.3  # weight of a new uncapped reading in each GPU's natural-draw estimate
BASELINE_EWMA = 0.3  # weight of a new facility reading in the baseline between events


class SiteReader:
    """Reads the site into snapshots and keeps what the readings teach: links, natural draws, baseline."""

    def __init__(
        self,
        cfg: GatewayConfig,
        meter: Meter | None,
        battery: Battery | None,
        fleet: GpuFleet | None,
        dispatcher: Dispatcher,
        audit: AuditSink,
        clock: Clock,
        status: StatusBoard,
    ) -> None:
        self.cfg = cfg
        self.meter = meter
        self.battery = battery
        self.fleet = fleet
        self.dispatcher = dispatcher  # read only: what was last commanded
        self.audit = audit
        self.clock = clock
        self.status = status
        self.ctx = planner.context_from_config(cfg)
        self.natural_w: dict[str, float] = {}
        self.natural_tput: dict[str, float] = {}
        self.baseline_w: float | None = None
        self.last: Snapshot | None = None
        self.down: dict[Role, tuple[DeviceFault, str]] = {}  # role -> (fault, down since, ISO time)
        self.baseline_hold_until = -1e18  # monotonic time before which the baseline is not updated
        self.battery_untrusted = False  # the battery answered its last read with no possible reading
        self.battery_stopped = False  # it was released for that (once per such episode)
        self.battery_seen_mono: float | None = None  # when the battery last answered a read under control
        self.gpus_seen_mono: float | None = None  # when the GPU fleet last answered a read under control

    async def read(self, event_id: str | None) -> Snapshot:
        """Read every device concurrently into one snapshot; a failed or impossible reading becomes a fault."""
        f, b, g = await asyncio.gather(self._meter(), self._battery(), self._gpus())
        faults = tuple(x for x in (f, b, g) if isinstance(x, DeviceFault))
        self.battery_untrusted = any(x.untrusted for x in faults if x.role is Role.BATTERY)
        self.battery_stopped = self.battery_stopped and self.battery_untrusted  # a new episode may stop it again
        snap = Snapshot(
            t=self.clock.now(),
            facility_w=None if isinstance(f, DeviceFault) else f,
            battery=None if isinstance(b, DeviceFault) else b,
            gpus=() if isinstance(g, DeviceFault) else g,
            faults=faults,
        )
        await self._track_links(faults, event_id)
        self._calibrate(snap, event_id)
        self.last = snap
        self.publish(snap)
        return snap

    def publish(self, snap: Snapshot) -> None:
        """Publish the site as now known (snapshot, baseline, natural draws) for the opt decision and readers."""
        natural_w, natural_tput = MappingProxyType(self.natural_w), MappingProxyType(self.natural_tput)
        self.status.publish_site(SiteView(snap, self.baseline_w, natural_w, natural_tput))

    async def _meter(self) -> float | DeviceFault | None:
        if self.meter is None:
            return None
        try:
            w = await self.meter.read_facility_w()
        except GatewayError as err:
            return DeviceFault(Role.METER, self.meter.device_id, str(err))
        bad = plausible.facility_fault(w, self.cfg.meter.min_w, self.cfg.meter.max_w)
        if bad is not None:
            return DeviceFault(Role.METER, self.meter.device_id, f"{self.meter.device_id}: {bad}")
        return w

    async def _battery(self) -> BatteryState | DeviceFault | None:
        if self.battery is None:
            return None
        try:
            state = await self.battery.read()
        except InvalidReading as err:  # it answered, with a "not available" or out-of-bounds value
            return DeviceFault(Role.BATTERY, self.battery.device_id, str(err), untrusted=True)
        except GatewayError as err:
            return DeviceFault(Role.BATTERY, self.battery.device_id, str(err))
        bad = plausible.battery_fault(state)
        if bad is not None:
            return DeviceFault(Role.BATTERY, self.battery.device_id, f"{state.device_id}: {bad}", untrusted=True)
        return state

    async def _gpus(self) -> tuple[GpuState, ...] | DeviceFault:
        if self.fleet is None:
            return ()
        try:
            return await self.fleet.read()
        except GatewayError as err:
            return DeviceFault(Role.GPUS, FLEET_DEVICE_ID, str(err))

    async def _track_links(self, faults: tuple[DeviceFault, ...], event_id: str | None) -> None:
        """Audit and log a device read failing (or giving no possible reading), and its recovery, once per change."""
        now_down = {f.role: f for f in faults}
        for role, fault in now_down.items():
            if role not in self.down:
                log.warning("device unreadable; planning without it", device=role.value, error=fault.error)
                await self.audit.append(
                    "fault.device",
                    {"action": "read", "error": fault.error},
                    event_id=event_id,
                    device_id=fault.device_id,
                )
        for role in set(self.down) - set(now_down):
            log.info("device answering again", device=role.value)
            await self.audit.append(
                "device.recovered",
                {"down_since": self.down[role][1]},
                event_id=event_id,
                device_id=self.down[role][0].device_id,
            )
        since = self.clock.now().isoformat()
        self.down = {r: (f, self.down[r][1] if r in self.down else since) for r, f in now_down.items()}

    def _calibrate(self, snap: Snapshot, event_id: str | None) -> None:
        """Update each GPU's natural draw from readings taken while it was uncapped; the baseline between events."""
        for g in snap.gpus:
            uncapped = g.cap_w >= g.default_cap_w - 1.0 and g.gpu_id not in self.dispatcher.caps_w
            if uncapped or g.gpu_id not in self.natural_w:
                old = self.natural_w.get(g.gpu_id)
                self.natural_w[g.gpu_id] = g.power_w if old is None else (old + NATURAL_EWMA * (g.power_w - old))
                if g.throughput is not None:
                    self.natural_tput[g.gpu_id] = g.throughput
        if event_id is None and snap.facility_w is not None and self.clock.monotonic() >= self.baseline_hold_until:
            b = self.baseline_w
            self.baseline_w = snap.facility_w if b is None else b + BASELINE_EWMA * (snap.facility_w - b)

    # -- what silent devices still do ------------------------------------------------------------

    def note_answers(self, snap: Snapshot) -> None:
        """Remember when the battery and the fleet last answered (while an event is under control)."""
        if snap.battery is not None:
            self.battery_seen_mono = self.clock.monotonic()
        if snap.gpus:
            self.gpus_seen_mono = self.clock.monotonic()

    def battery_out_of_reach_w(self, snap: Snapshot) -> float:
        """Return what an unanswering battery is assumed to still discharge (W): its last setpoint, until its lease."""
        if snap.battery is not None or self.battery_seen_mono is None:
            return 0.0
        if self.clock.monotonic() - self.battery_seen_mono >= self.cfg.control.lease_s:
            return 0.0
        return self.dispatcher.battery_w or 0.0

    def caps_shed_w(self) -> float:
        """Return the facility shed (W) the model expects from the GPU caps last confirmed."""
        caps = self.dispatcher.caps_w
        it = it_shed_at_caps_w([self.natural_w.get(g, 0.0) for g in caps], list(caps.values()))
        return it * (1.0 + self.ctx.cooling_overhead)

    def gpus_out_of_reach_w(self, snap: Snapshot) -> float:
        """Return the shed (W) of caps on an unanswering fleet: they hold until their lease lapses."""
        if snap.gpus or self.gpus_seen_mono is None:
            return 0.0
        if self.clock.monotonic() - self.gpus_seen_mono >= self.cfg.control.lease_s:
            return 0.0
        return self.caps_shed_w()

    def applied_shed_w(self, snap: Snapshot) -> float:
        """Return the facility shed (W) the model expects from the setpoints in force at ``snap``."""
        battery_w = snap.battery.power_w if snap.battery is not None else self.battery_out_of_reach_w(snap)
        gpus_w = self.caps_shed_w() if snap.gpus else self.gpus_out_of_reach_w(snap)
        return battery_w + gpus_w

    def current_caps(self, snap: Snapshot) -> dict[str, float]:
        """Return the caps last commanded (or read) per GPU, for ramp limiting."""
        return {g.gpu_id: self.dispatcher.caps_w.get(g.gpu_id, g.cap_w) for g in snap.gpus}
