"""The control loop: snapshot -> plan (pure) -> limits (pure) -> dispatch, once a tick.

It ticks every ``control.tick_s`` and at once when the event book changes. Closed loop on
the facility meter: the planner's model gives the feedforward, an integral term on the
meter error corrects for what the model does not know (cooling, CPU load, lag).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime

from gateway import planner
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.dispatcher import Dispatcher
from gateway.errors import GatewayError
from gateway.events import EventBook, Feasibility
from gateway.interfaces import AuditSink, Battery, GpuFleet, Meter
from gateway.limits import limit
from gateway.logs import get_logger
from gateway.model import BatteryState, DemandEvent, GpuState, SignalName, Snapshot, Target, TargetKind

log = get_logger("gateway.control")

NATURAL_EWMA = 0.3  # weight of a new uncapped reading in each GPU's natural-draw estimate


@dataclass(frozen=True)
class TickRecord:
    """What one tick saw and did; kept for the demo summary and accounting."""

    t: datetime
    event_id: str | None
    limit_w: float | None
    facility_w: float | None
    battery_w: float
    gpu_w: float
    throughput: float
    natural_throughput: float


class ControlLoop:
    """Runs the site toward the event book's target, tick by tick."""

    def __init__(
        self,
        cfg: GatewayConfig,
        book: EventBook,
        meter: Meter | None,
        battery: Battery | None,
        fleet: GpuFleet | None,
        dispatcher: Dispatcher,
        audit: AuditSink,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self.book = book
        self.meter = meter
        self.battery = battery
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.audit = audit
        self.clock = clock
        self.ctx = planner.PlanContext(
            tier_max_loss={k: t.max_loss_fraction for k, t in cfg.gpus.tiers.items()},
            cooling_overhead=cfg.site.cooling_overhead,
            soc_floor_pct=cfg.limits.soc_floor_pct + cfg.limits.ups_reserve_pct,
        )
        self.natural_w: dict[str, float] = {}
        self.natural_tput: dict[str, float] = {}
        self.baseline_w: float | None = None
        self.last: Snapshot | None = None
        self.records: list[TickRecord] = []
        self._event_id: str | None = None
        self._required_shed_w = 0.0
        self._last_tick_mono: float | None = None
        self._limit_w: float | None = None
        self._fresh = False
        self._down: dict[str, tuple[str, str]] = {}  # role -> (error, down since)

    async def snapshot(self) -> Snapshot:
        """Read every device concurrently into one snapshot; a failed read becomes a fault."""
        faults: list[str] = []

        async def meter() -> float | None:
            if self.meter is None:
                return None
            try:
                return await self.meter.read_facility_w()
            except GatewayError as err:
                faults.append(f"meter: {err}")
                return None

        async def battery() -> BatteryState | None:
            if self.battery is None:
                return None
            try:
                return await self.battery.read()
            except GatewayError as err:
                faults.append(f"battery: {err}")
                return None

        async def gpus() -> tuple[GpuState, ...]:
            if self.fleet is None:
                return ()
            try:
                return await self.fleet.read()
            except GatewayError as err:
                faults.append(f"gpus: {err}")
                return ()

        f, b, g = await asyncio.gather(meter(), battery(), gpus())
        snap = Snapshot(t=self.clock.now(), facility_w=f, battery=b, gpus=g, faults=tuple(faults))
        await self._track_links(faults)
        self._calibrate(snap)
        self.last = snap
        return snap

    async def _track_links(self, faults: list[str]) -> None:
        """Audit and log a device read failing, and its recovery, once per change of state."""
        now_down = {f.split(":", 1)[0]: f.split(":", 1)[1].strip() for f in faults}
        for dev, err in now_down.items():
            if dev not in self._down:
                log.warning("device not answering; planning without it", device=dev, error=err)
                await self.audit.append(
                    "fault.device",
                    {"action": "read", "error": err},
                    event_id=self._event_id,
                    device_id=self._device_id(dev),
                )
        for dev in set(self._down) - set(now_down):
            log.info("device answering again", device=dev)
            await self.audit.append(
                "device.recovered",
                {"down_since": self._down[dev][1]},
                event_id=self._event_id,
                device_id=self._device_id(dev),
            )
        self._down = {d: (e, self._down.get(d, (e, self.clock.now().isoformat()))[1]) for d, e in now_down.items()}

    def _device_id(self, role: str) -> str:
        """Return the device id behind a snapshot role (meter, battery, gpus)."""
        dev = {"meter": self.meter, "battery": self.battery}.get(role)
        return str(getattr(dev, "device_id", role))

    def _calibrate(self, snap: Snapshot) -> None:
        """Update each GPU's natural draw from readings taken while it was uncapped."""
        for g in snap.gpus:
            uncapped = g.cap_w >= g.default_cap_w - 1.0 and g.gpu_id not in self.dispatcher.caps_w
            if uncapped or g.gpu_id not in self.natural_w:
                old = self.natural_w.get(g.gpu_id)
                self.natural_w[g.gpu_id] = g.power_w if old is None else (old + NATURAL_EWMA * (g.power_w - old))
                if g.throughput is not None:
                    self.natural_tput[g.gpu_id] = g.throughput
        if self._event_id is None and snap.facility_w is not None:
            b = self.baseline_w
            self.baseline_w = snap.facility_w if b is None else b + 0.3 * (snap.facility_w - b)

    def feasibility(self, ev: DemandEvent, book: EventBook) -> Feasibility:
        """Estimate whether the site can deliver this event, from the latest snapshot."""
        snap = self.last
        base = self.baseline_w or (snap.facility_w if snap and snap.facility_w else 0.0)
        required = 0.0
        for sig in ev.signals:
            peak = max((iv.value for iv in sig.intervals), default=0.0)
            if sig.name is SignalName.SIMPLE:
                required = max(required, self.cfg.openadr.simple_levels.get(str(int(peak)), 0.0) * base)
            elif sig.signal_type == "setpoint":
                low = min((iv.value for iv in sig.intervals), default=base)
                required = max(required, base - low)
            else:
                required = max(required, peak)
        if snap is None:
            return Feasibility(True, required, float("nan"), "no site snapshot yet: opting in")
        avail = planner.max_shed_w(snap.battery, snap.gpus, self.natural_w, self.ctx, ev.duration_s)
        ok = avail >= required
        reason = (
            f"feasible: need {required:.0f} W, can shed {avail:.0f} W for {ev.duration_s:.0f} s"
            if ok
            else f"infeasible: need {required:.0f} W, can shed only {avail:.0f} W "
            f"for {ev.duration_s:.0f} s (shortfall {required - avail:.0f} W)"
        )
        return Feasibility(ok, required, avail, reason)

    async def tick(self) -> TickRecord:
        """Run one control cycle and return what it saw and did."""
        snap = await self.snapshot()
        now = snap.t
        mono = self.clock.monotonic()
        dt = self.cfg.control.tick_s if self._last_tick_mono is None else mono - self._last_tick_mono
        self._last_tick_mono = mono
        target = self.book.target_at(now)
        if target is None or snap.facility_w is None and self._event_id is None:
            if self._event_id is not None:
                await self._end_event("event ended or cancelled")
        else:
            if self._event_id != target.event_id:
                if self._event_id is not None:
                    await self._end_event(f"superseded by {target.event_id}")
                await self._start_event(target, snap)
            await self._control(target, snap, dt)
        rec = self._record(snap)
        return rec

    async def _start_event(self, target: Target, snap: Snapshot) -> None:
        """Freeze the baseline and seed the shed integrator for a newly active event."""
        base = self.baseline_w if self.baseline_w is not None else (snap.facility_w or 0.0)
        self._event_id = target.event_id
        self._limit_w = target.facility_limit_w(base)
        self._required_shed_w = max(0.0, base - self._limit_w)
        self._fresh = True  # this tick's meter reading predates the first dispatch
        await self.audit.append(
            "event.start",
            {
                "baseline_w": round(base, 1),
                "limit_w": round(self._limit_w, 1),
                "target": target.kind.value,
                "value": target.value,
                "modification_number": target.modification_number,
            },
            event_id=target.event_id,
        )
        log.info("event active", event_id=target.event_id, baseline_w=round(base), limit_w=round(self._limit_w))

    async def _control(self, target: Target, snap: Snapshot, dt: float) -> None:
        """Correct the required shed from the meter, plan, limit and dispatch."""
        base = self.baseline_w or 0.0
        limit_w = target.facility_limit_w(base) if target.kind is not TargetKind.CAP_W else target.value
        self._limit_w = limit_w
        remaining = self._remaining_s(target)
        ceiling = planner.max_shed_w(snap.battery, snap.gpus, self.natural_w, self.ctx, remaining)
        ceiling = min(ceiling, self.cfg.limits.max_shed_w)
        if snap.facility_w is not None and not self._fresh:
            self._required_shed_w += self.cfg.control.gain * (snap.facility_w - limit_w)
        self._fresh = False
        self._required_shed_w = min(max(self._required_shed_w, 0.0), ceiling)
        p = planner.plan(self._required_shed_w, snap.battery, snap.gpus, self.natural_w, self.ctx, remaining)
        lim = limit(
            p.battery_w if snap.battery else None,
            p.gpu_caps_w,
            snap.battery,
            snap.gpus,
            self.dispatcher.battery_w,
            self._current_caps(snap),
            self.cfg.limits,
            dt,
        )
        await self.audit.append(
            "control.tick",
            {
                "facility_w": None if snap.facility_w is None else round(snap.facility_w, 1),
                "limit_w": round(limit_w, 1),
                "required_shed_w": round(self._required_shed_w, 1),
                "battery_w": None if lim.battery_w is None else round(lim.battery_w, 1),
                "gpus_capped": sum(1 for g in snap.gpus if lim.gpu_caps_w.get(g.gpu_id, g.max_cap_w) < g.max_cap_w),
                "shortfall_w": round(p.shortfall_w, 1),
                "limit_notes": list(lim.notes),
                "faults": list(snap.faults),
            },
            event_id=target.event_id,
        )
        defaults = {g.gpu_id: g.default_cap_w for g in snap.gpus}
        await self.dispatcher.apply(lim.battery_w, lim.gpu_caps_w, target.event_id, defaults)

    def _current_caps(self, snap: Snapshot) -> dict[str, float]:
        """Return the caps last commanded (or read) per GPU, for ramp limiting."""
        return {g.gpu_id: self.dispatcher.caps_w.get(g.gpu_id, g.cap_w) for g in snap.gpus}

    def _remaining_s(self, target: Target) -> float:
        """Return seconds left in the target's event."""
        for ev, _ in self.book.events():
            if ev.event_id == target.event_id:
                return max(1.0, (ev.end - self.clock.now()).total_seconds())
        return 3600.0

    async def _end_event(self, reason: str) -> None:
        """Release everything for the event that just ended and audit its accounting."""
        ev_id = self._event_id
        await self.dispatcher.release(reason, ev_id)
        await self.audit.append("event.end", {"reason": reason, **self.accounting(ev_id)}, event_id=ev_id)
        self._event_id = None
        self._limit_w = None
        self._required_shed_w = 0.0

    def accounting(self, event_id: str | None) -> dict[str, float]:
        """Return energy shed, battery energy and throughput kept over one event's ticks."""
        recs = [r for r in self.records if r.event_id == event_id and r.event_id is not None]
        if len(recs) < 2:
            return {}
        e_batt = e_shed = tput = nat = 0.0
        base = self.baseline_w or 0.0
        for a, b in zip(recs, recs[1:], strict=False):
            h = (b.t - a.t).total_seconds() / 3600.0
            e_batt += a.battery_w * h
            if a.facility_w is not None:
                e_shed += (base - a.facility_w) * h
            tput += a.throughput * h
            nat += a.natural_throughput * h
        return {
            "battery_energy_wh": round(e_batt, 1),
            "facility_energy_shed_wh": round(e_shed, 1),
            "throughput_kept_fraction": round(tput / nat, 4) if nat else 1.0,
        }

    def _record(self, snap: Snapshot) -> TickRecord:
        """Keep a bounded history of ticks."""
        tput = sum(g.throughput or 0.0 for g in snap.gpus)
        nat = sum(self.natural_tput.get(g.gpu_id, g.throughput or 0.0) for g in snap.gpus)
        rec = TickRecord(
            t=snap.t,
            event_id=self._event_id,
            limit_w=self._limit_w,
            facility_w=snap.facility_w,
            battery_w=snap.battery.power_w if snap.battery else 0.0,
            gpu_w=sum(g.power_w for g in snap.gpus),
            throughput=tput,
            natural_throughput=nat,
        )
        self.records.append(rec)
        if len(self.records) > 100_000:
            del self.records[:50_000]
        return rec

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; a tick that fails is logged and the loop goes on."""
        while not stop.is_set():
            try:
                await self.tick()
            except GatewayError as err:
                log.error("tick failed", error=str(err))
            self.book.changed.clear()
            waiter = asyncio.ensure_future(self.book.changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            sleeper = asyncio.ensure_future(self.clock.sleep(self.cfg.control.tick_s))
            await asyncio.wait({waiter, stopper, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            for f in (waiter, stopper, sleeper):
                f.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await f

    async def shutdown(self, reason: str) -> None:
        """Release everything on the way out."""
        if self._event_id is not None or self.dispatcher.active:
            await self._end_event(reason) if self._event_id else await self.dispatcher.release(reason)
