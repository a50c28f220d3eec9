"""The control loop: take the directive, read the site, regulate, plan (pure), limit (pure), dispatch.

It ticks every ``control.tick_s``, at once when the event book's directive may have changed, and
just after the directive's next step (an event's start or end). Each tick: the site is read
(``site.SiteReader``), the book's ``Directive`` says what the event under control asks now, the
regulator (``regulator``, pure) moves the ramp and the observer, the planner and the limits (pure)
give setpoints, the dispatcher writes them, and the tick is audited (``control.tick``). Devices
are released when the recovery ramp is done; the event's accounting is the ledger's (``ledger``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from gateway import loads, planner, shedprofile
from gateway.accounting import EventAccount
from gateway.accountstore import AccountStore
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.control.ledger import EventLedger
from gateway.control.regulator import Regulation, Tuning, regulate, released
from gateway.control.site import SiteReader
from gateway.directive import Directive, Order
from gateway.dispatcher import Dispatcher
from gateway.errors import AuditError, GatewayError
from gateway.interfaces import AuditSink, Battery, DirectiveSource, GpuFleet, Meter
from gateway.limits import limit
from gateway.logs import get_logger
from gateway.model import Snapshot, Target
from gateway.status import ControlStatus, LinkDown, StatusBoard, TickRecord, roles_of

log = get_logger("gateway.control")

BASELINE_HOLD_S = 60.0  # after a release the site takes a while to return to normal: keep the baseline
STEP_WAKE_S = 0.001  # tick this long after a step of the directive (an event's start or end), not a tick later
RECORDS_MAX = 100_000  # tick records kept (the oldest half dropped past this)


@dataclass(frozen=True, slots=True)
class _StartRow:
    """An event's ``event.start`` row still to write, and the baseline to keep in its transaction (None: kept)."""

    data: dict[str, Any]
    event_id: str
    keep_baseline_w: float | None


class ControlLoop:
    """Runs the site toward the directive, tick by tick."""

    def __init__(
        self,
        cfg: GatewayConfig,
        book: DirectiveSource,
        meter: Meter | None,
        battery: Battery | None,
        fleet: GpuFleet | None,
        dispatcher: Dispatcher,
        audit: AuditSink,
        clock: Clock,
        *,
        accounts: AccountStore | None = None,
        status: StatusBoard | None = None,
    ) -> None:
        self.cfg = cfg
        self.book = book  # the directive's source (the event book): read, never written
        self.dispatcher = dispatcher
        self.audit = audit
        self.clock = clock
        self.status = status if status is not None else StatusBoard()
        self.site = SiteReader(cfg, meter, battery, fleet, dispatcher, audit, clock, self.status)
        self.ctx = self.site.ctx
        self.ledger = EventLedger(cfg, self.ctx, accounts if accounts is not None else AccountStore(), audit, clock)
        self.tuning = Tuning.from_config(cfg)
        self.reg = Regulation()
        self.last_plan: planner.Plan | None = None
        self.records: list[TickRecord] = []
        self.phase = ""  # ramp_up | active | recovery while an event is under control
        self._event_id: str | None = None
        self._last_tick_mono: float | None = None
        # Called instead of the release when the audit log refuses a tick (a standby pair: the
        # active gives its term up and leaves the devices on their leases for the next active).
        self.on_audit_refused: Callable[[], Awaitable[None]] | None = None
        self._resume_at_goal = False  # a restart found the devices holding the event's shed: no new ramp
        self._directive: Directive | None = None  # the directive this tick follows
        self._roles = roles_of(meter, battery, fleet)
        # The event's start row, written with its first tick's row in one commit (see _start_event).
        self._start_row: _StartRow | None = None

    @property
    def fleet(self) -> GpuFleet | None:
        """Return the GPU fleet (or feeds) the loop drives."""
        return self.site.fleet

    @property
    def active_event_id(self) -> str | None:
        """The event being delivered now (set before its first command, not at the next tick record)."""
        return self._event_id

    @property
    def limit_w(self) -> float | None:
        """The facility power the active event allows now (ramped), or None when idle."""
        return self.reg.limit_w if self._event_id is not None else None

    @property
    def baseline_w(self) -> float | None:
        """The facility baseline (W): measured between events, frozen while one runs."""
        return self.site.baseline_w

    @property
    def last(self) -> Snapshot | None:
        """The latest snapshot of the site, or None before the first read."""
        return self.site.last

    @property
    def account(self) -> EventAccount | None:
        """The running accounting of the event under control, or None."""
        return self.ledger.account

    # -- the tick ---------------------------------------------------------------------------------

    async def tick(self) -> TickRecord:
        """Run one control cycle and return what it saw and did."""
        snap = await self.site.read(self._event_id)
        now = snap.t
        mono = self.clock.monotonic()
        dt = self.cfg.control.tick_s if self._last_tick_mono is None else mono - self._last_tick_mono
        self._last_tick_mono = mono
        d = self._directive = self.book.directive_at(now, self.cfg.control.ramp_up_s)
        lead = d.lead
        can_start = snap.facility_w is not None or self.site.baseline_w is not None
        if not self.ledger.orphan_checked:
            await self.ledger.close_orphan(lead.event_id if lead else None, lambda e: d.order(e) is not None, now)
        if lead is not None and lead.event_id != self._event_id and can_start:
            if self._event_id is not None:
                await self.ledger.close(self._event_id, f"superseded by {lead.event_id}")
            await self._start_event(lead, snap)
        if self._event_id is not None:
            step = d.step_for(self._event_id)
            self.phase = step.phase
            done = await self._control(step.target, snap, dt, step.goal)
            await self._write_start_row()  # a tick that ended before its row (recovery done) still writes it
            if done:
                await self._end_event(self._end_reason())
        return self._record(snap)

    def _order(self, event_id: str | None) -> Order | None:
        """Return the directive's order for an event (its window, ramps and profile), or None if unknown."""
        return self._directive.order(event_id) if self._directive is not None else None

    def _ramp_s(self) -> tuple[float, float]:
        """Return the (ramp-up, recovery) durations (s) for the event under control."""
        ev = self._order(self._event_id)
        up = (ev.ramp_up_s if ev is not None else 0.0) or self.cfg.control.ramp_up_s
        down = (ev.recovery_s if ev is not None else 0.0) or self.cfg.control.recovery_s
        return up, down

    def _end_reason(self) -> str:
        """Return why the event under control ended."""
        ev = self._order(self._event_id)
        if ev is not None and ev.cancelled:
            return "event cancelled"
        return "event ended or cancelled"

    async def _start_event(self, target: Target, snap: Snapshot) -> None:
        """Freeze the baseline (the one kept from before a restart, if any), open the accounting, audit the start."""
        # A process restarted mid-event must not re-measure: right after its startup release the
        # devices have not settled yet, and a low baseline would over-shed for the rest of the event.
        kept = await self.ledger.kept_baseline_w(target.event_id)  # from memory once reconcile loaded them
        measured = self.site.baseline_w if self.site.baseline_w is not None else (snap.facility_w or 0.0)
        base = kept if kept is not None else measured
        self.site.baseline_w = base
        self.site.publish(snap)  # the opt decision reads the baseline frozen now
        self._event_id = target.event_id
        full = shedprofile.full_limit_w(target, base)
        self.reg = replace(self.reg, limit_full_w=full, limit_w=base)
        ev = self._order(target.event_id)
        up, down = self._ramp_s()
        start, end = (ev.start, ev.end) if ev is not None else (snap.t, snap.t + timedelta(hours=1))
        account = self.ledger.account = self.ledger.new_account(target.event_id, start, end, base, down)
        resumed = await self.ledger.resume(account, snap.t) if kept is not None else False
        if resumed:
            self._restore_natural(account, snap)
        # Not committed on its own: it goes with the first tick's row, in the same transaction and
        # before it, so that both are durable before the event's first command (one commit instead of
        # two on the way from the event's arrival to its first actuation). Any other row first
        # (a release, the event's end) writes it before itself. A baseline measured now is kept in
        # that same transaction (not in one of its own before it): durable before the first command
        # all the same, and a restart mid-event resumes with it instead of measuring under caps.
        self._start_row = _StartRow(
            {
                "baseline_w": round(base, 1),
                "baseline_kept": kept is not None,
                "accounting_resumed": resumed,
                "limit_w": round(full, 1),
                "target": target.kind.value,
                "value": target.value,
                "modification_number": target.modification_number,
                "ramp_up_s": up,
                "recovery_s": down,
                "battery_policy": self.ctx.battery_policy,
                "tier_budget": self.cfg.planning.tier_budget,
            },
            target.event_id,
            None if kept is not None else base,
        )
        log.info("event active", event_id=target.event_id, baseline_w=round(base), limit_w=round(full))
        self._publish()  # readers see the event before its first commands, not at the tick's end

    def _restore_natural(self, account: EventAccount, snap: Snapshot) -> None:
        """Take the uncapped draw of GPUs still capped at a restart from the event's kept accounting.

        This process never saw them uncapped; their capped draw would make the planner cap them deeper.
        """
        for g in snap.gpus:
            tally = account.gpus.get(g.gpu_id)
            if tally is not None and g.gpu_id in self.dispatcher.caps_w and tally.natural_w0 > 0:
                self.site.natural_w[g.gpu_id] = tally.natural_w0
                if tally.natural_tput0:
                    self.site.natural_tput[g.gpu_id] = tally.natural_tput0

    async def reconcile(self) -> None:
        """Reconcile the devices with the directive at start: keep what an event in force has, release the rest.

        A restart mid-event finds the battery and GPU caps still holding what the last process
        commanded (their leases outlive it): they are adopted, and the first tick moves them to the
        plan with no release in between (a release would notch the meter the utility reads). With
        no event in force, everything is released; a battery whose reading is not possible is too.
        """
        await self.ledger.load_baselines()  # an event's start then reads its kept baseline from memory
        snap = await self.site.read(self._event_id)
        self._directive = self.book.directive_at(snap.t, self.cfg.control.ramp_up_s)
        lead = self._directive.lead
        if lead is None:
            await self.dispatcher.release("startup reconcile")
            self._publish()
            return
        if self.site.battery_untrusted:
            self.site.battery_stopped = True
            await self.dispatcher.release_battery("startup reconcile: battery reading not possible", lead.event_id)
        kept = self.dispatcher.adopt(snap.battery, snap.gpus)
        await self.audit.append("reconcile.kept", {"reason": "startup reconcile", **kept}, event_id=lead.event_id)
        log.info("devices kept for the event in force", event_id=lead.event_id, kept=sorted(kept))
        self._resume_at_goal = bool(kept)
        self._publish()

    async def _control(self, target: Target | None, snap: Snapshot, dt: float, goal: float) -> bool:
        """Update the observer and the ramp, plan, limit and dispatch; return True when recovery is done."""
        site = self.site
        base = site.baseline_w or 0.0
        if target is not None:
            self.reg = replace(self.reg, limit_full_w=shedprofile.full_limit_w(target, base))
        site.note_answers(snap)
        applied_w = site.applied_shed_w(snap) if snap.facility_w is not None else 0.0  # for the observer
        account = self.ledger.account
        if account is not None:
            ev = self._order(self._event_id)
            if ev is not None:  # a modification may move or stretch the event: budgets follow it
                account.start, account.end = ev.start, ev.end
            account.add(snap, dt, site.natural_w, site.natural_tput, set(self.dispatcher.caps_w))
        live = self.cfg.control.mode == "live"
        resume, self._resume_at_goal = self._resume_at_goal, False  # the devices still hold the last process's
        self.reg = reg = regulate(
            self.reg,
            self.tuning,
            goal=goal,
            dt_s=dt,
            baseline_w=base,
            facility_w=snap.facility_w if live else None,  # shadow mode: the meter never sees the plan
            applied_shed_w=applied_w,
            battery=snap.battery,
            ramp_s=self._ramp_s(),
            resume_at_goal=resume,
        )
        if released(reg, self.phase):
            return True
        notes: list[str] = []
        if site.battery_untrusted and not site.battery_stopped and self.dispatcher.battery_w is not None:
            await self._write_start_row()
            # Its state of charge cannot be known: nothing may go on discharging (or charging) it. Released
            # before planning, so the GPUs are planned without it this very tick.
            site.battery_stopped = True
            notes.append("battery released: its reading is not a possible one")
            await self.dispatcher.release_battery("battery reading not possible", self._event_id)
        p = self._plan(snap, base)
        lim = limit(
            p.battery_w if snap.battery else None,
            p.gpu_caps_w,
            snap.battery,
            snap.gpus,
            self.dispatcher.battery_w,
            site.current_caps(snap),
            self.cfg.limits,
            dt,
        )
        notes += [*lim.notes, *([f"feeds {p.breach_w:.0f} W over target: battery leaned on"] if p.breach_w else [])]
        await self._write_start_row(
            self.audit.append(
                "control.tick",
                {
                    "phase": self.phase,
                    "facility_w": None if snap.facility_w is None else round(snap.facility_w, 1),
                    "limit_w": round(reg.limit_w or 0.0, 1),
                    "ramp_fraction": round(reg.frac, 4),
                    "bias_w": round(reg.bias_w, 1),
                    "required_shed_w": round(reg.required_shed_w, 1),
                    "battery_w": None if lim.battery_w is None else round(lim.battery_w, 1),
                    "gpus_capped": sum(1 for g in snap.gpus if lim.gpu_caps_w.get(g.gpu_id, g.max_cap_w) < g.max_cap_w),
                    "planned_throughput_kept": round(p.throughput_kept_fraction, 4),
                    "shortfall_w": round(p.shortfall_w, 1),
                    "limit_notes": notes,
                    "faults": [str(f) for f in snap.faults],
                },
                event_id=self._event_id,
            )
        )
        defaults = {g.gpu_id: g.default_cap_w for g in snap.gpus}
        await self.dispatcher.apply(lim.battery_w, lim.gpu_caps_w, self._event_id, defaults)
        await self.ledger.keep(snap.t)  # after the commands: never in the way of an event's first one
        return False

    def _plan(self, snap: Snapshot, base: float) -> planner.Plan:
        """Plan this tick's setpoints: budgets from the account, the rest of the event for the battery."""
        now = snap.t
        ev = self._order(self._event_id)
        remaining, horizon = 60.0, []
        if ev is not None:
            _, down_s = self._ramp_s()
            remaining = max(1.0, (ev.end - now).total_seconds()) if now < ev.end else max(1.0, down_s)
            if self.phase == "active":
                on_own_clock = now - timedelta(seconds=ev.start_delay_s)  # the profile is unrandomized
                horizon = shedprofile.horizon_after(ev.profile_w(base), on_own_clock, self.reg.bias_w)
        account = self.ledger.account
        allowance = account.allowances(snap.gpus, now) if account is not None else None
        # A device that stopped answering may still hold its setpoint until its lease lapses: not ours to plan.
        out_of_reach = self.site.battery_out_of_reach_w(snap) + self.site.gpus_out_of_reach_w(snap)
        p = planner.plan(
            max(0.0, self.reg.required_shed_w - out_of_reach),
            snap.battery,
            snap.gpus,
            self.site.natural_w,
            self.ctx,
            remaining,
            allowance=allowance,
            horizon=horizon,
            battery_delivery=self.reg.delivery,
            breach_w=loads.breach_excess_w(self.fleet),  # feeds over target: the battery leans harder
        )
        self.last_plan = p
        return p

    # -- ending -----------------------------------------------------------------------------------

    async def _write_start_row(self, then: Coroutine[Any, Any, int] | None = None) -> None:
        """Append the event's start row, if still to write, and ``then``'s row after it, in one commit.

        Both are queued to the audit writer before either is awaited, in this order, so its next batch
        (one transaction) takes both; raise the first AuditError, as two appends in a row would.
        """
        start, self._start_row = self._start_row, None
        if start is None:
            if then is not None:
                await then
            return
        first = self.ledger.append_start(start.data, start.event_id, start.keep_baseline_w)
        results = await asyncio.gather(first, *([then] if then is not None else []), return_exceptions=True)
        if isinstance(results[0], BaseException) and self._start_row is None:
            # Not committed (nor the baseline with it): written again before the next row, so that the
            # event's first command still follows both.
            self._start_row = start
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def _end_event(self, reason: str, *, interrupted: bool = False) -> None:
        """Release everything for the event that just ended (or that this process leaves) and audit its accounting."""
        await self._write_start_row()
        await self.dispatcher.release(reason, self._event_id)
        self.site.baseline_hold_until = self.clock.monotonic() + max(BASELINE_HOLD_S, 3 * self.cfg.control.tick_s)
        await self.ledger.close(self._event_id, reason, interrupted=interrupted)
        self._event_id = None
        self.phase = ""
        self.reg = Regulation()
        self._publish()

    def accounting(self, event_id: str | None) -> dict[str, Any]:
        """Return one event's accounting totals (energy shed, battery energy, throughput kept, ...)."""
        return self.ledger.accounting(event_id)

    def _record(self, snap: Snapshot) -> TickRecord:
        """Keep a bounded history of ticks and hand the record to every observer."""
        natural_w, natural_tput = self.site.natural_w, self.site.natural_tput
        rec = TickRecord(
            t=snap.t,
            event_id=self._event_id,
            limit_w=self.reg.limit_w,
            facility_w=snap.facility_w,
            battery_w=snap.battery.power_w if snap.battery else 0.0,
            gpu_w=sum(g.power_w for g in snap.gpus),
            throughput=sum(g.throughput or 0.0 for g in snap.gpus),
            natural_throughput=sum(natural_tput.get(g.gpu_id, g.throughput or 0.0) for g in snap.gpus),
            phase=self.phase,
            gpu_natural_w=sum(natural_w.get(g.gpu_id, g.power_w) for g in snap.gpus) if snap.gpus else None,
        )
        self.records.append(rec)
        if len(self.records) > RECORDS_MAX:
            del self.records[: RECORDS_MAX // 2]
        self._publish(rec)
        return rec

    def _publish(self, record: TickRecord | None = None) -> None:
        """Publish the loop's state as one typed status (metrics, BMS face, telemetry, /readyz read it)."""
        status = self.status
        down = tuple(LinkDown(fault, since) for fault, since in self.site.down.values())
        status.publish(
            ControlStatus(
                seq=status.next_seq(),
                site=status.latest_site(),
                record=record,
                event_id=self._event_id,
                phase=self.phase,
                limit_w=self.limit_w,
                roles=self._roles,
                down=down,
                account=self.ledger.account,
            )
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; a tick that fails is logged and the loop goes on.

        A tick the audit log refused leaves every device released (the safe state): nothing is
        actuated un-audited, and the next tick the log takes re-applies the event. In a standby
        pair (``on_audit_refused`` set) the active instead stops acting and hands the term on: a
        release it could not audit would be a notch the next active has to undo, and the devices'
        own leases make the site safe if nobody takes over.
        """
        while not stop.is_set():
            try:
                await self.tick()
            except AuditError as err:
                log.error("tick failed", error=str(err))
                if self.on_audit_refused is not None:
                    log.error("audit log refuses records; giving the term up", event_id=self._event_id)
                    await self.on_audit_refused()
                elif self.dispatcher.active:
                    log.error("audit log refuses records; releasing every device", event_id=self._event_id)
                    await self.dispatcher.release("audit log unavailable", self._event_id)
            except GatewayError as err:
                log.error("tick failed", error=str(err))
            self.book.changed.clear()
            waiter = asyncio.ensure_future(self.book.changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            sleeper = asyncio.ensure_future(self.clock.sleep(self.wait_s()))
            await asyncio.wait({waiter, stopper, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            for f in (waiter, stopper, sleeper):
                f.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await f

    def wait_s(self) -> float:
        """Return how long to wait for the next tick: ``tick_s``, or until just after the directive's next step."""
        tick_s = self.cfg.control.tick_s
        now = self.clock.now()
        at = self.book.directive_at(now, self.cfg.control.ramp_up_s).next_change
        if at is None:
            return tick_s
        return min(tick_s, max(0.0, (at - now).total_seconds()) + STEP_WAKE_S)

    async def shutdown(self, reason: str) -> None:
        """Release everything on the way out (no recovery ramp: the process is going away)."""
        if self._event_id is not None:
            # Still running (not in its recovery): the next process resumes it and its accounting.
            await self._end_event(reason, interrupted=self.phase in ("active", "ramp_up"))
        elif self.dispatcher.active:
            await self.dispatcher.release(reason)
        self._publish()
