"""The control loop: snapshot -> plan (pure) -> limits (pure) -> dispatch, once a tick.

It ticks every ``control.tick_s`` and at once when the event book changes. Closed loop on
the facility meter: the planner's model gives the feedforward (baseline minus target), and a
disturbance observer learns what the model misses (cooling, CPU load, a natural draw that
drifted, a device that dropped out) by comparing the meter with what the model predicts for
the setpoints really in force. Because the observer compares against the applied (ramp- and
limit-clamped) setpoints, it does not wind up while a ramp holds the plant back, and with a
gain in (0, 1] it converges without overshoot when the model is right.

Reductions and recoveries are ramps, never cliffs: a ramp fraction (0..1) of the event's
reduction moves at the event's (or config's) ramp-up and recovery rates, and the total planned
shed moves at most ``limits.facility_ramp_w_per_s``. Devices are released when the recovery
ramp is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway import planner, plausible, shedprofile
from gateway.accounting import EventAccount
from gateway.allocation import it_shed_at_caps_w
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.dispatcher import Dispatcher
from gateway.errors import AuditError, GatewayError, InvalidReading
from gateway.events import EventBook, Feasibility
from gateway.interfaces import AuditSink, Battery, GpuFleet, Meter
from gateway.limits import limit
from gateway.logs import get_logger
from gateway.model import BatteryState, DemandEvent, GpuState, Opt, Snapshot, Target

log = get_logger("gateway.control")

NATURAL_EWMA = 0.3  # weight of a new uncapped reading in each GPU's natural-draw estimate
RELEASE_BELOW_W = 1.0  # a recovery is done when the planned shed is below this
BASELINE_HOLD_S = 60.0  # after a release the site takes a while to return to normal: keep the baseline
ACCOUNT_KEEP_S = 5.0  # the running accounting of an event is kept in the store this often (restarts)
STEP_WAKE_S = 0.001  # tick this long after a step of the directive (an event's start or end), not a tick later
DELIVERY_MIN_W = 100.0  # below this discharge setpoint the battery's delivery is not measured


@dataclass(frozen=True)
class TickRecord:
    """What one tick saw and did; kept for the demo summary and metrics."""

    t: datetime
    event_id: str | None
    limit_w: float | None
    facility_w: float | None
    battery_w: float
    gpu_w: float
    throughput: float
    natural_throughput: float
    phase: str = ""  # ramp_up | active | recovery while an event is under control
    gpu_natural_w: float | None = None  # what the GPUs would draw uncapped (estimate), W


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
        self.ctx = planner.context_from_config(cfg)
        self.natural_w: dict[str, float] = {}
        self.natural_tput: dict[str, float] = {}
        self.baseline_w: float | None = None
        self.last: Snapshot | None = None
        self.last_plan: planner.Plan | None = None
        self.records: list[TickRecord] = []
        self.account: EventAccount | None = None
        self.accounts: dict[str, dict[str, Any]] = {}  # finished events' accounting by event id
        self._event_id: str | None = None
        self._phase = ""
        self._frac = 0.0  # share of the event's reduction asked now (ramps)
        self._bias_w = 0.0  # observer: facility power the model misses (W)
        self._required_shed_w = 0.0
        self._limit_full_w: float | None = None
        self._limit_w: float | None = None
        self._last_tick_mono: float | None = None
        self._battery_seen_mono: float | None = None  # when the battery last answered a read
        self._gpus_seen_mono: float | None = None  # when the GPU fleet last answered a read
        self._baseline_hold_until = -1e18  # monotonic time before which the baseline is not updated
        self._down: dict[str, tuple[str, str]] = {}  # role -> (error, down since)
        self._account_saved_mono = -1e18  # when the running accounting was last kept in the store
        self._orphan_checked = False  # whether an event left open by an earlier process was closed
        self._battery_untrusted = False  # the battery answered its last read with no possible reading
        self._battery_stopped = False  # it was released for that (once per such episode)
        self._battery_delivery = 1.0  # share of its discharge setpoint the battery really delivers (measured)
        self._resume_at_goal = False  # a restart found the devices holding the event's shed: no new ramp
        # What the facility BMS offers now from cooling or backup generation (W); None: no BMS face.
        self.bms_flex_w: Callable[[], float] | None = None
        # Called with every tick's record (measurement store, telemetry); must not block or raise.
        self.observers: list[Callable[[TickRecord], None]] = []

    @property
    def active_event_id(self) -> str | None:
        """The event being delivered now (set before its first command, not at the next tick record)."""
        return self._event_id

    @property
    def limit_w(self) -> float | None:
        """The facility power the active event allows now (ramped), or None when idle."""
        return self._limit_w if self._event_id is not None else None

    # -- reading the site -------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Read every device concurrently into one snapshot; a failed or impossible reading becomes a fault."""
        faults: list[str] = []
        untrusted: list[bool] = []  # the battery answered, with something that is not a possible reading

        async def meter() -> float | None:
            if self.meter is None:
                return None
            try:
                w = await self.meter.read_facility_w()
            except GatewayError as err:
                faults.append(f"meter: {err}")
                return None
            bad = plausible.facility_fault(w, self.cfg.meter.min_w, self.cfg.meter.max_w)
            if bad is not None:
                faults.append(f"meter: {self._device_id('meter')}: {bad}")
                return None
            return w

        async def battery() -> BatteryState | None:
            if self.battery is None:
                return None
            try:
                state = await self.battery.read()
            except InvalidReading as err:  # it answered, with a "not available" or out-of-bounds value
                untrusted.append(True)
                faults.append(f"battery: {err}")
                return None
            except GatewayError as err:
                faults.append(f"battery: {err}")
                return None
            bad = plausible.battery_fault(state)
            if bad is not None:
                untrusted.append(True)
                faults.append(f"battery: {state.device_id}: {bad}")
                return None
            return state

        async def gpus() -> tuple[GpuState, ...]:
            if self.fleet is None:
                return ()
            try:
                return await self.fleet.read()
            except GatewayError as err:
                faults.append(f"gpus: {err}")
                return ()

        f, b, g = await asyncio.gather(meter(), battery(), gpus())
        self._battery_untrusted = bool(untrusted)
        self._battery_stopped = self._battery_stopped and self._battery_untrusted  # a new episode may stop it again
        snap = Snapshot(t=self.clock.now(), facility_w=f, battery=b, gpus=g, faults=tuple(faults))
        await self._track_links(faults)
        self._calibrate(snap)
        self.last = snap
        return snap

    async def _track_links(self, faults: list[str]) -> None:
        """Audit and log a device read failing (or giving no possible reading), and its recovery, once per change."""
        now_down = {f.split(":", 1)[0]: f.split(":", 1)[1].strip() for f in faults}
        for dev, err in now_down.items():
            if dev not in self._down:
                log.warning("device unreadable; planning without it", device=dev, error=err)
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
        if (
            self._event_id is None
            and snap.facility_w is not None
            and self.clock.monotonic() >= self._baseline_hold_until
        ):
            b = self.baseline_w
            self.baseline_w = snap.facility_w if b is None else b + 0.3 * (snap.facility_w - b)

    # -- the opt decision -------------------------------------------------------------------------

    def profile(self, ev: DemandEvent, baseline_w: float) -> list[tuple[datetime, float, float]]:
        """Return the event's intervals as (start, duration_s, facility shed W)."""
        ask_at = getattr(self.book, "ask_at", None)
        return shedprofile.event_profile(
            ev, baseline_w, self.cfg.openadr.simple_levels, ask_at if callable(ask_at) else None
        )

    def feasibility(self, ev: DemandEvent, book: EventBook) -> Feasibility:
        """Estimate whether the site can deliver this event for its whole length, from the latest snapshot."""
        snap = self.last
        base = self.baseline_w or (snap.facility_w if snap and snap.facility_w else 0.0)
        prof = [(d, shed) for _, d, shed in self.profile(ev, base)]
        required = max((shed for _, shed in prof), default=0.0)
        if snap is None:
            return Feasibility(True, required, float("nan"), "no site snapshot yet: opting in")
        rep = planner.feasibility(prof, snap.battery, snap.gpus, self.natural_w, self.ctx)
        offered = self.bms_flex_w() if self.bms_flex_w is not None else 0.0
        if not rep.feasible and offered > 0 and rep.shortfall_w <= offered:
            # The BMS offers flexibility of its own (cooling setback, backup generation): it covers
            # the shortfall, and the meter loop sees its effect like any other disturbance.
            return Feasibility(
                required <= self.cfg.limits.max_shed_w,
                required,
                rep.available_w + offered,
                f"feasible with the BMS: need {required:.0f} W, the site can shed {rep.available_w:.0f} W "
                f"and the BMS offers {offered:.0f} W",
            )
        if rep.feasible and required > self.cfg.limits.max_shed_w:
            return Feasibility(
                False,
                required,
                self.cfg.limits.max_shed_w,
                f"infeasible: need {required:.0f} W, limits.max_shed_w allows {self.cfg.limits.max_shed_w:.0f} W "
                f"(shortfall {required - self.cfg.limits.max_shed_w:.0f} W)",
            )
        return Feasibility(rep.feasible, rep.required_w, rep.available_w, rep.reason(ev.duration_s))

    # -- the tick ---------------------------------------------------------------------------------

    async def tick(self) -> TickRecord:
        """Run one control cycle and return what it saw and did."""
        snap = await self.snapshot()
        now = snap.t
        mono = self.clock.monotonic()
        dt = self.cfg.control.tick_s if self._last_tick_mono is None else mono - self._last_tick_mono
        self._last_tick_mono = mono
        target = self.book.target_at(now)
        upcoming = self._upcoming(now) if target is None else None
        lead = target if target is not None else (upcoming[0] if upcoming else None)
        can_start = snap.facility_w is not None or self.baseline_w is not None
        if not self._orphan_checked:
            await self._close_orphan(lead, now)
        if lead is not None and lead.event_id != self._event_id and can_start:
            if self._event_id is not None:
                await self._close_event(f"superseded by {lead.event_id}")
            await self._start_event(lead, snap)
        if self._event_id is not None:
            if target is not None and target.event_id == self._event_id:
                goal, ours = shedprofile.ramp_fraction(target), target
                self._phase = "active" if goal >= 1.0 else ("recovery" if self._past_end(now) else "ramp_up")
            elif upcoming is not None and upcoming[0].event_id == self._event_id:
                goal, ours, self._phase = upcoming[1], upcoming[0], "ramp_up"
            else:
                goal, ours, self._phase = 0.0, None, "recovery"
            done = await self._control(ours, snap, dt, goal)
            if done:
                await self._end_event(self._end_reason())
        return self._record(snap)

    def _event(self, event_id: str | None) -> DemandEvent | None:
        """Return the latest version of an event from the book."""
        for ev, _ in self.book.events():
            if ev.event_id == event_id:
                return ev
        return None

    def _window(self, ev: DemandEvent) -> tuple[datetime, datetime]:
        """Return the event's active period, shifted by the randomized start the book drew."""
        delay = timedelta(seconds=self._start_delay_s(ev))
        return ev.start + delay, ev.end + delay

    def _past_end(self, now: datetime) -> bool:
        """Return whether the event under control has passed its end."""
        ev = self._event(self._event_id)
        return ev is not None and now >= self._window(ev)[1]

    def _upcoming(self, now: datetime) -> tuple[Target, float] | None:
        """Return the target of an opted-in event about to start whose ramp-up window covers ``now``."""
        best: tuple[datetime, Target, float] | None = None
        for ev, opt in self.book.events():
            if opt is not Opt.IN or ev.cancelled:
                continue
            start = ev.start + timedelta(seconds=self._start_delay_s(ev))
            frac = shedprofile.ramp_window_fraction(now, start, ev.ramp_up_s or self.cfg.control.ramp_up_s)
            if frac is None:
                continue
            target = self.book.target_at(start)
            if target is None or target.event_id != ev.event_id:
                continue
            if best is None or start < best[0]:
                best = (start, target, frac)
        return (best[1], best[2]) if best else None

    def _start_delay_s(self, ev: DemandEvent) -> float:
        """Return the randomized start delay (s) the book drew for an event (``startafter``)."""
        drawn = getattr(self.book, "start_delay_s", None)
        delay = drawn(ev.event_id) if callable(drawn) else None
        return float(delay) if delay is not None else ev.start_after_s

    def _ramp_s(self) -> tuple[float, float]:
        """Return the (ramp-up, recovery) durations (s) for the event under control."""
        ev = self._event(self._event_id)
        up = (ev.ramp_up_s if ev is not None else 0.0) or self.cfg.control.ramp_up_s
        down = (ev.recovery_s if ev is not None else 0.0) or self.cfg.control.recovery_s
        return up, down

    def _end_reason(self) -> str:
        """Return why the event under control ended."""
        ev = self._event(self._event_id)
        if ev is not None and ev.cancelled:
            return "event cancelled"
        return "event ended or cancelled"

    async def _start_event(self, target: Target, snap: Snapshot) -> None:
        """Freeze the baseline (the one kept from before a restart, if any), open the accounting, audit the start."""
        # A process restarted mid-event must not re-measure: right after its startup release the
        # devices have not settled yet, and a low baseline would over-shed for the rest of the event.
        kept = await self._kept_baseline_w(target.event_id)
        measured = self.baseline_w if self.baseline_w is not None else (snap.facility_w or 0.0)
        base = kept if kept is not None else measured
        if kept is None:
            await self._keep_baseline_w(target.event_id, base)
        self.baseline_w = base
        self._event_id = target.event_id
        self._limit_full_w = shedprofile.full_limit_w(target, base)
        self._limit_w = base
        ev = self._event(target.event_id)
        up, down = self._ramp_s()
        start, end = self._window(ev) if ev is not None else (snap.t, snap.t + timedelta(hours=1))
        self.account = self._new_account(target.event_id, start, end, base, down)
        resumed = await self._resume_account(self.account, snap.t) if kept is not None else False
        if resumed:
            self._restore_natural(self.account, snap)
        await self.audit.append(
            "event.start",
            {
                "baseline_w": round(base, 1),
                "baseline_kept": kept is not None,
                "accounting_resumed": resumed,
                "limit_w": round(self._limit_full_w, 1),
                "target": target.kind.value,
                "value": target.value,
                "modification_number": target.modification_number,
                "ramp_up_s": up,
                "recovery_s": down,
                "battery_policy": self.ctx.battery_policy,
                "tier_budget": self.cfg.planning.tier_budget,
            },
            event_id=target.event_id,
        )
        log.info("event active", event_id=target.event_id, baseline_w=round(base), limit_w=round(self._limit_full_w))

    def _restore_natural(self, account: EventAccount, snap: Snapshot) -> None:
        """Take the uncapped draw of GPUs still capped at a restart from the event's kept accounting.

        This process never saw them uncapped; their capped draw would make the planner cap them deeper.
        """
        for g in snap.gpus:
            tally = account.gpus.get(g.gpu_id)
            if tally is not None and g.gpu_id in self.dispatcher.caps_w and tally.natural_w0 > 0:
                self.natural_w[g.gpu_id] = tally.natural_w0
                if tally.natural_tput0:
                    self.natural_tput[g.gpu_id] = tally.natural_tput0

    async def reconcile(self) -> None:
        """Reconcile the devices with the event book at start: keep what an event in force has, release the rest.

        A restart mid-event finds the battery and GPU caps still holding what the last process
        commanded (their leases outlive it): they are adopted, and the first tick moves them to the
        plan with no release in between (a release would notch the meter the utility reads). With
        no event in force, everything is released; a battery whose reading is not possible is too.
        """
        snap = await self.snapshot()
        target = self.book.target_at(snap.t)
        upcoming = self._upcoming(snap.t) if target is None else None
        lead = target if target is not None else (upcoming[0] if upcoming else None)
        if lead is None:
            await self.dispatcher.release("startup reconcile")
            return
        if self._battery_untrusted:
            self._battery_stopped = True
            await self.dispatcher.release_battery("startup reconcile: battery reading not possible", lead.event_id)
        kept = self.dispatcher.adopt(snap.battery, snap.gpus)
        await self.audit.append("reconcile.kept", {"reason": "startup reconcile", **kept}, event_id=lead.event_id)
        log.info("devices kept for the event in force", event_id=lead.event_id, kept=sorted(kept))
        self._resume_at_goal = bool(kept)

    async def _kept_baseline_w(self, event_id: str) -> float | None:
        """Return the baseline kept for an event by an earlier start (or process); None if none or unreadable."""
        try:
            return await self.book.kept_baseline_w(event_id)
        except GatewayError as err:
            log.error("kept baseline not readable; measuring it again", event_id=event_id, error=str(err))
            return None

    async def _keep_baseline_w(self, event_id: str, baseline_w: float) -> None:
        """Persist an event's baseline; a failing store is logged, not allowed to stop the event."""
        try:
            await self.book.keep_baseline_w(event_id, baseline_w)
        except GatewayError as err:
            log.error("baseline not persisted", event_id=event_id, error=str(err))

    # -- accounting that survives a restart -----------------------------------------------------

    def _new_account(
        self, event_id: str, start: datetime, end: datetime, baseline_w: float, recovery_s: float
    ) -> EventAccount:
        """Return a fresh account for an event, with the tier budgets and policies from config."""
        return EventAccount(
            event_id,
            start,
            end,
            baseline_w,
            self.ctx.tier_max_loss,
            self.ctx.cooling_overhead,
            recovery_s=recovery_s,
            mode=self.cfg.planning.tier_budget,
            burst=self.cfg.planning.tier_burst_factor,
            margin=self.cfg.planning.tier_budget_margin,
        )

    async def _resume_account(self, account: EventAccount, now: datetime) -> bool:
        """Carry on the accounting an earlier process kept for this event; False if there is none to use."""
        try:
            state = await self.book.kept_account()
        except GatewayError as err:
            log.error("kept accounting not readable; accounting from now", event_id=account.event_id, error=str(err))
            return False
        if not state or state.get("event_id") != account.event_id:
            return False
        try:
            account.resume(state, now)
        except ValueError as err:
            log.error("kept accounting not usable; accounting from now", event_id=account.event_id, error=str(err))
            return False
        log.info("event accounting resumed", event_id=account.event_id, unaccounted_s=round(account.unaccounted_s, 1))
        return True

    async def _keep_account(self, now: datetime, *, force: bool = False) -> None:
        """Keep the running accounting in the store (every ``ACCOUNT_KEEP_S``); a failure is logged only."""
        mono = self.clock.monotonic()
        if self.account is None or (not force and mono - self._account_saved_mono < ACCOUNT_KEEP_S):
            return
        try:
            await self.book.keep_account(self.account.state(now))
            self._account_saved_mono = mono
        except GatewayError as err:
            log.error("event accounting not kept", event_id=self.account.event_id, error=str(err))

    async def _drop_account(self) -> None:
        """Forget the kept accounting once its event is closed; a failure is logged only."""
        try:
            await self.book.keep_account(None)
        except GatewayError as err:
            log.error("kept event accounting not dropped", error=str(err))
        self._account_saved_mono = -1e18

    async def _close_orphan(self, lead: Target | None, now: datetime) -> None:
        """Close an event an earlier process left open and this one will not resume (it ended meanwhile).

        Its ``event.end`` and ``event.accounting`` rows carry what that process tallied, with the
        time nobody measured as ``unaccounted_s``.
        """
        try:
            state = await self.book.kept_account()
        except GatewayError as err:  # tried again next tick
            log.error("kept accounting not readable", error=str(err))
            return
        if not state or (lead is not None and state.get("event_id") == lead.event_id):
            self._orphan_checked = True
            return
        event_id = str(state.get("event_id"))
        try:
            start = datetime.fromisoformat(str(state["start"]))
            end = datetime.fromisoformat(str(state["end"]))
            account = self._new_account(event_id, start, end, float(state["baseline_w"]), float(state["recovery_s"]))
            account.resume(state, now)
        except (KeyError, TypeError, ValueError) as err:
            log.error("kept accounting not usable; dropped", event_id=event_id, error=str(err))
            await self._drop_account()
            self._orphan_checked = True
            return
        ev = self._event(event_id)
        reason = "ended while the gateway was down"
        if ev is not None:
            reason = "not resumed after a restart (opt or target changed)"
        summary = {**account.summary(), "incomplete": True, "accounted_until": state.get("saved_at")}
        totals = {k: v for k, v in summary.items() if k != "jobs"}
        await self.audit.append("event.end", {"reason": reason, **totals}, event_id=event_id)
        await self.audit.append("event.accounting", summary, event_id=event_id)
        log.warning("event closed after restart", event_id=event_id, reason=reason)
        self.accounts[event_id] = summary
        await self._drop_account()
        self._orphan_checked = True

    async def _control(self, target: Target | None, snap: Snapshot, dt: float, goal: float) -> bool:
        """Update the observer and the ramp, plan, limit and dispatch; return True when recovery is done."""
        base = self.baseline_w or 0.0
        if target is not None:
            self._limit_full_w = shedprofile.full_limit_w(target, base)
        full = self._limit_full_w if self._limit_full_w is not None else base
        if snap.battery is not None:
            self._battery_seen_mono = self.clock.monotonic()
            self._measure_delivery(snap.battery)
        if snap.gpus:
            self._gpus_seen_mono = self.clock.monotonic()
        if snap.facility_w is not None:
            predicted = base + self._bias_w - self._applied_shed_w(snap)
            self._bias_w += self.cfg.control.gain * (snap.facility_w - predicted)
            self._bias_w = min(max(self._bias_w, -base), base)
        if self.account is not None:
            ev = self._event(self._event_id)
            if ev is not None:  # a modification may move or stretch the event: budgets follow it
                self.account.start, self.account.end = self._window(ev)
            self.account.add(snap, dt, self.natural_w, self.natural_tput, set(self.dispatcher.caps_w))
        if self._resume_at_goal:  # the devices still hold what the last process commanded: carry on, no new ramp
            self._resume_at_goal = False
            self._frac = goal
            self._required_shed_w = min(goal * max(0.0, base - full), self.cfg.limits.max_shed_w)
        up_s, down_s = self._ramp_s()
        rise = dt / up_s if up_s > 0 else 1.0
        fall = dt / down_s if down_s > 0 else 1.0
        self._frac = min(1.0, max(0.0, self._frac + min(max(goal - self._frac, -fall), rise)))
        nominal = max(0.0, base - full)
        raw = min(max(self._frac * (nominal + self._bias_w), 0.0), self.cfg.limits.max_shed_w)
        step = self.cfg.limits.facility_ramp_w_per_s * max(dt, 0.0)
        prev = self._required_shed_w
        self._required_shed_w = max(0.0, prev + min(max(raw - prev, -step), step))
        self._limit_w = base - self._frac * nominal
        if self._phase == "recovery" and self._frac <= 0.0 and self._required_shed_w < RELEASE_BELOW_W:
            return True
        notes: list[str] = []
        if self._battery_untrusted and not self._battery_stopped and self.dispatcher.battery_w is not None:
            # Its state of charge cannot be known: nothing may go on discharging (or charging) it. Released
            # before planning, so the GPUs are planned without it this very tick.
            self._battery_stopped = True
            notes.append("battery released: its reading is not a possible one")
            await self.dispatcher.release_battery("battery reading not possible", self._event_id)
        p = self._plan(snap, base)
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
        notes += lim.notes
        await self.audit.append(
            "control.tick",
            {
                "phase": self._phase,
                "facility_w": None if snap.facility_w is None else round(snap.facility_w, 1),
                "limit_w": round(self._limit_w, 1),
                "ramp_fraction": round(self._frac, 4),
                "bias_w": round(self._bias_w, 1),
                "required_shed_w": round(self._required_shed_w, 1),
                "battery_w": None if lim.battery_w is None else round(lim.battery_w, 1),
                "gpus_capped": sum(1 for g in snap.gpus if lim.gpu_caps_w.get(g.gpu_id, g.max_cap_w) < g.max_cap_w),
                "planned_throughput_kept": round(p.throughput_kept_fraction, 4),
                "shortfall_w": round(p.shortfall_w, 1),
                "limit_notes": notes,
                "faults": list(snap.faults),
            },
            event_id=self._event_id,
        )
        defaults = {g.gpu_id: g.default_cap_w for g in snap.gpus}
        await self.dispatcher.apply(lim.battery_w, lim.gpu_caps_w, self._event_id, defaults)
        await self._keep_account(snap.t)  # after the commands: never in the way of an event's first one
        return False

    def _plan(self, snap: Snapshot, base: float) -> planner.Plan:
        """Plan this tick's setpoints: budgets from the account, the rest of the event for the battery."""
        now = snap.t
        ev = self._event(self._event_id)
        remaining, horizon = 60.0, []
        if ev is not None:
            _, down_s = self._ramp_s()
            end = self._window(ev)[1]
            remaining = max(1.0, (end - now).total_seconds()) if now < end else max(1.0, down_s)
            if self._phase == "active":
                on_own_clock = now - timedelta(seconds=self._start_delay_s(ev))  # the profile is unrandomized
                horizon = shedprofile.horizon_after(self.profile(ev, base), on_own_clock, self._bias_w)
        allowance = self.account.allowances(snap.gpus, now) if self.account is not None else None
        # A device that stopped answering may still hold its setpoint until its lease lapses: not ours to plan.
        out_of_reach = self._battery_out_of_reach_w(snap) + self._gpus_out_of_reach_w(snap)
        p = planner.plan(
            max(0.0, self._required_shed_w - out_of_reach),
            snap.battery,
            snap.gpus,
            self.natural_w,
            self.ctx,
            remaining,
            allowance=allowance,
            horizon=horizon,
            battery_delivery=self._battery_delivery,
        )
        self.last_plan = p
        return p

    def _measure_delivery(self, b: BatteryState) -> None:
        """Learn what share of its discharge setpoint the battery delivers (a weak, derated or lying unit)."""
        if b.setpoint_w < DELIVERY_MIN_W:
            return  # no discharge asked: nothing to learn
        seen = min(1.0, max(0.0, b.power_w / b.setpoint_w))
        self._battery_delivery += self.cfg.control.gain * (seen - self._battery_delivery)

    def _battery_out_of_reach_w(self, snap: Snapshot) -> float:
        """Return what an unanswering battery is assumed to still discharge (W): its last setpoint, until its lease."""
        if snap.battery is not None or self._battery_seen_mono is None:
            return 0.0
        if self.clock.monotonic() - self._battery_seen_mono >= self.cfg.control.lease_s:
            return 0.0
        return self.dispatcher.battery_w or 0.0

    def _caps_shed_w(self) -> float:
        """Return the facility shed (W) the model expects from the GPU caps last confirmed."""
        caps = self.dispatcher.caps_w
        it = it_shed_at_caps_w([self.natural_w.get(g, 0.0) for g in caps], list(caps.values()))
        return it * (1.0 + self.ctx.cooling_overhead)

    def _gpus_out_of_reach_w(self, snap: Snapshot) -> float:
        """Return the shed (W) of caps on an unanswering fleet: they hold until their lease lapses."""
        if snap.gpus or self._gpus_seen_mono is None:
            return 0.0
        if self.clock.monotonic() - self._gpus_seen_mono >= self.cfg.control.lease_s:
            return 0.0
        return self._caps_shed_w()

    def _applied_shed_w(self, snap: Snapshot) -> float:
        """Return the facility shed (W) the model expects from the setpoints in force at ``snap``."""
        battery_w = snap.battery.power_w if snap.battery is not None else self._battery_out_of_reach_w(snap)
        gpus_w = self._caps_shed_w() if snap.gpus else self._gpus_out_of_reach_w(snap)
        return battery_w + gpus_w

    def _current_caps(self, snap: Snapshot) -> dict[str, float]:
        """Return the caps last commanded (or read) per GPU, for ramp limiting."""
        return {g.gpu_id: self.dispatcher.caps_w.get(g.gpu_id, g.cap_w) for g in snap.gpus}

    # -- ending -----------------------------------------------------------------------------------

    async def _close_event(self, reason: str, *, interrupted: bool = False) -> None:
        """Audit the event's end and its accounting (totals and per job); keep its summary.

        ``interrupted``: the process stops while the event still runs; the accounting so far is
        kept for the next process to carry on (its ``event.accounting`` row then covers the whole).
        """
        ev_id = self._event_id
        summary = self.account.summary() if self.account is not None else {}
        if summary and interrupted:
            summary["interrupted"] = True
        totals = {k: v for k, v in summary.items() if k != "jobs"}
        await self.audit.append("event.end", {"reason": reason, **totals}, event_id=ev_id)
        if summary:
            await self.audit.append("event.accounting", summary, event_id=ev_id)
            log.info(
                "event accounting",
                event_id=ev_id,
                facility_energy_shed_wh=summary["facility_energy_shed_wh"],
                battery_energy_wh=summary["battery_energy_wh"],
                throughput_kept_fraction=summary["throughput_kept_fraction"],
                tier_violations=summary["tier_violations"],
            )
        if ev_id is not None:
            self.accounts[ev_id] = summary
        if interrupted:
            await self._keep_account(self.clock.now(), force=True)
        else:
            await self._drop_account()
        self.account = None

    async def _end_event(self, reason: str, *, interrupted: bool = False) -> None:
        """Release everything for the event that just ended (or that this process leaves) and audit its accounting."""
        await self.dispatcher.release(reason, self._event_id)
        self._baseline_hold_until = self.clock.monotonic() + max(BASELINE_HOLD_S, 3 * self.cfg.control.tick_s)
        await self._close_event(reason, interrupted=interrupted)
        self._event_id = None
        self._phase = ""
        self._limit_w = self._limit_full_w = None
        self._required_shed_w = self._frac = self._bias_w = 0.0
        self._battery_delivery = 1.0

    def accounting(self, event_id: str | None) -> dict[str, Any]:
        """Return one event's accounting totals (energy shed, battery energy, throughput kept, ...)."""
        if event_id is None:
            return {}
        summary = self.accounts.get(event_id)
        if summary is None and self.account is not None and self.account.event_id == event_id:
            summary = self.account.summary()
        return dict(summary or {})

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
            phase=self._phase,
            gpu_natural_w=sum(self.natural_w.get(g.gpu_id, g.power_w) for g in snap.gpus) if snap.gpus else None,
        )
        self.records.append(rec)
        if len(self.records) > 100_000:
            del self.records[:50_000]
        for observe in self.observers:
            try:
                observe(rec)
            except Exception as err:  # an observer must never stop the control loop
                name = getattr(observe, "__qualname__", repr(observe))
                log.error("tick observer failed", observer=name, error=str(err))
        return rec

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; a tick that fails is logged and the loop goes on.

        A tick the audit log refused leaves every device released (the safe state): nothing is
        actuated un-audited, and the next tick the log takes re-applies the event.
        """
        while not stop.is_set():
            try:
                await self.tick()
            except AuditError as err:
                log.error("tick failed", error=str(err))
                if self.dispatcher.active:
                    log.error("audit log refuses records; releasing every device", event_id=self._event_id)
                    await self.dispatcher.release("audit log unavailable", self._event_id)
            except GatewayError as err:
                log.error("tick failed", error=str(err))
            self.book.changed.clear()
            waiter = asyncio.ensure_future(self.book.changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            sleeper = asyncio.ensure_future(self.clock.sleep(self._wait_s()))
            await asyncio.wait({waiter, stopper, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            for f in (waiter, stopper, sleeper):
                f.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await f

    def _wait_s(self) -> float:
        """Return how long to wait for the next tick: ``tick_s``, or until just after the directive's next step."""
        tick_s = self.cfg.control.tick_s
        next_change = getattr(self.book, "next_change_after", None)
        now = self.clock.now()
        at = next_change(now) if callable(next_change) else None
        if at is None:
            return tick_s
        return min(tick_s, max(0.0, (at - now).total_seconds()) + STEP_WAKE_S)

    async def shutdown(self, reason: str) -> None:
        """Release everything on the way out (no recovery ramp: the process is going away)."""
        if self._event_id is not None:
            # Still running (not in its recovery): the next process resumes it and its accounting.
            await self._end_event(reason, interrupted=self._phase in ("active", "ramp_up"))
        elif self.dispatcher.active:
            await self.dispatcher.release(reason)
