"""The event book: stores events by (id, modification number), decides opt, resolves the directive.

It answers the utility quickly and never drives equipment; the control loop asks it, each tick,
which target applies now. What OpenADR 2.0b leaves to the VEN is done here:

- a lower modification number is rejected (rule 58), the same one is answered as before without
  acting again, a higher one replaces the event and replans at once (rule 57);
- ``startafter`` randomization is drawn once per event, kept across modifications unless
  ``startafter`` itself changes (rule 30), persisted with the version, and also delays the end;
- a cancellation, explicit or implied (missing from a later distribution, rule 61), stops the
  event at once, or at the same random offset when ``startafter`` is set (rule 65), and the
  facility then ramps back over ``x-eiRecovery``; before ``dtstart`` it ramps in over ``x-eiRampUp``;
- overlapping events: the highest priority wins (1 highest, 0 lowest); equal priorities go to
  the one that started first (rule 18);
- events for another market context or whose eiTarget does not match are answered and ignored
  (rules 22 and 48); test events are acknowledged and audited, acted on only if configured;
- opt decisions come from an override (operator or BMS, per event or standing), then the clock
  check (optOut while the VTN's clock is too far from ours), config policy and the feasibility
  estimate, each with its reason audited;
- a decision is stored together with its ``opt.decided`` row (one transaction) before the book, the
  control loop or the answer to the VTN follow it; when it cannot be stored nothing changes and
  the caller answers nothing (the VEN asks for the event again later).
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from gateway.clock import Clock, SystemClock
from gateway.config import OpenAdrConfig
from gateway.errors import AuditError, InputRejected
from gateway.eventstore import Record
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import DemandEvent, Opt, Signal, SignalName, Target, TargetKind

log = get_logger("gateway.events")

OVERRIDE_ACTORS = frozenset({"operator", "bms"})
_STANDING = "override:*"
_ACCOUNT = "account:open"  # the running accounting of the event under control
# When one event carries several signals, the most specific one that asks for something wins.
_SIGNAL_ORDER = {
    SignalName.LOAD_DISPATCH: 0,
    SignalName.LOAD_CONTROL: 1,
    SignalName.SIMPLE: 2,
    SignalName.ELECTRICITY_PRICE: 3,
    SignalName.ENERGY_PRICE: 4,
}


class Outcome(enum.StrEnum):
    """What the book made of one event version (the VEN maps it to a 2.0b response code)."""

    NEW = "new"
    UPDATED = "updated"
    REPEAT = "repeat"  # same version again: answered as before, nothing done
    STALE = "stale"  # lower modification number than one already known: rejected
    CANCELLED = "cancelled"
    NOT_TARGETED = "not_targeted"  # eiTarget names neither this VEN nor its resources or groups
    WRONG_MARKET = "wrong_market_context"


@dataclass(frozen=True)
class Answer:
    """The opt for one event version, what happened to it, and why."""

    opt: Opt
    outcome: Outcome
    reason: str


@dataclass(frozen=True)
class Feasibility:
    """Whether the site can deliver a shed (W) for a duration, and the expected shortfall."""

    feasible: bool
    required_w: float
    available_w: float
    reason: str

    @property
    def shortfall_w(self) -> float:
        """Return how many watts the site is expected to miss by (0 when feasible)."""
        return max(0.0, self.required_w - self.available_w)


class EventStoreLike(Protocol):
    """What the event book needs from its persistent store."""

    async def get(self, event_id: str, modification_number: int) -> Any: ...
    async def latest(self, event_id: str) -> Any: ...
    async def put_audited(
        self,
        ev: DemandEvent,
        opt: Opt,
        reason: str,
        audit: AuditSink,
        record: Record,
        *,
        start_delay_s: float = 0.0,
        state: Mapping[str, str] | None = None,
    ) -> None: ...
    async def set_state_audited(self, state: Mapping[str, str], audit: AuditSink, record: Record) -> None: ...
    async def open_events(self, now: datetime) -> list[Any]: ...
    async def get_state(self, key: str) -> str | None: ...
    async def set_state(self, key: str, value: str) -> None: ...


FeasibilityFn = Callable[[DemandEvent, "EventBook"], Feasibility]


@dataclass
class _Entry:
    """The book's working record of one event: latest version, answer and timing."""

    event: DemandEvent
    opt: Opt  # the answer in force (an override changes it)
    delay_s: float  # the randomized start (and end) offset
    active: bool  # the gateway acts on it (opted in, not a test, ours)
    stop_at: datetime | None = None  # cancelled or opted out: when it stops (then recovers)

    @property
    def start(self) -> datetime:
        """Return the randomized start of the active period."""
        return self.event.start + timedelta(seconds=self.delay_s)

    @property
    def end(self) -> datetime:
        """Return when the event stops asking for the full reduction."""
        end = _add(self.event.end, self.delay_s)
        return end if self.stop_at is None else min(end, self.stop_at)

    @property
    def over_at(self) -> datetime:
        """Return when the event no longer affects the directive (end plus recovery)."""
        return _add(self.end, self.event.recovery_s)


def mismatch(ev: DemandEvent, cfg: OpenAdrConfig) -> tuple[Outcome, str] | None:
    """Return why an event is not this VEN's (market context, eiTarget), or None when it is."""
    if cfg.market_contexts and ev.market_context not in cfg.market_contexts:
        return Outcome.WRONG_MARKET, f"market context {ev.market_context!r} is not one of this VEN's"
    if not ev.targets:
        return None  # rule 22: no criteria means the recipient is the target
    ours = {("resource_id", r) for r in cfg.resource_ids} | {("party_id", p) for p in cfg.party_ids}
    ours |= {(kind, g) for g in cfg.group_ids for kind in ("group_id", "group_name")}
    if ev.ven_id:
        ours.add(("ven_id", ev.ven_id))
    if any(t in ours for t in ev.targets):
        return None
    names = ", ".join(f"{k}={v}" for k, v in ev.targets)
    return Outcome.NOT_TARGETED, f"eiTarget ({names}) matches neither this VEN nor its resources or groups"


class EventBook:
    """Holds every event version the VEN has answered and resolves them into one target."""

    def __init__(
        self,
        config: OpenAdrConfig,
        store: EventStoreLike,
        audit: AuditSink,
        feasibility: FeasibilityFn | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = config
        self._store = store
        self._audit = audit
        self._feasibility = feasibility
        self._clock = clock or SystemClock()
        self._rng = rng or random.SystemRandom()
        self._events: dict[str, _Entry] = {}
        self._overrides: dict[str, dict[str, str]] = {}  # event id -> {opt, actor, reason, at}
        self._standing: dict[str, str] | None = None
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()
        # Why event times cannot be trusted now (the VTN's clock is too far from ours), or None: new
        # versions are then answered optOut (docs/reliability.md, "Clock skew against the VTN").
        self.clock_doubt: Callable[[], str | None] | None = None

    # -- reading -------------------------------------------------------------------------------

    async def load(self, now: datetime) -> int:
        """Load events still open at ``now`` and overrides from the store (restart recovery)."""
        raw = await self._store.get_state(_STANDING)
        self._standing = _loads(raw) or None
        for stored in await self._store.open_events(now):
            ev = stored.event
            override = _loads(await self._store.get_state(f"override:{ev.event_id}"))
            stop = _loads(await self._store.get_state(f"stop:{ev.event_id}"))
            opt = Opt(stored.opt)
            if override and not ev.cancelled:
                opt = Opt(override["opt"])
                self._overrides[ev.event_id] = override
            active = opt is Opt.IN and not ev.cancelled and self._acts_on(ev)
            entry = _Entry(ev, opt, float(stored.start_delay_s), active)
            if stop:
                entry.active = bool(stop.get("active", active))
                entry.stop_at = datetime.fromisoformat(stop["at"])
            self._events[ev.event_id] = entry
        if self._events:
            self.changed.set()
        return len(self._events)

    def events(self) -> list[tuple[DemandEvent, Opt]]:
        """Return the latest version of every known event with the opt in force."""
        return [(e.event, e.opt) for e in self._events.values()]

    def start_delay_s(self, event_id: str) -> float | None:
        """Return the randomized start offset drawn for an event, or None if unknown."""
        entry = self._events.get(event_id)
        return None if entry is None else entry.delay_s

    async def kept_baseline_w(self, event_id: str) -> float | None:
        """Return the baseline (W) frozen when an event first started, kept across restarts; None if never."""
        value = _loads(await self._store.get_state(f"baseline:{event_id}")).get("w")
        return float(value) if isinstance(value, int | float) else None

    async def keep_baseline_w(self, event_id: str, baseline_w: float) -> None:
        """Persist the baseline (W) frozen for an event, so that a restart mid-event resumes with it."""
        await self._store.set_state(f"baseline:{event_id}", json.dumps({"w": baseline_w}))

    async def kept_account(self) -> dict[str, Any] | None:
        """Return the accounting state kept for the event under control, or None (see ``keep_account``)."""
        return _loads(await self._store.get_state(_ACCOUNT)) or None

    async def keep_account(self, state: Mapping[str, Any] | None) -> None:
        """Keep (or with None, drop) the running accounting of the event under control across restarts."""
        await self._store.set_state(_ACCOUNT, json.dumps(dict(state) if state is not None else {}))

    @property
    def standing_override(self) -> Opt | None:
        """Return the standing (all new events) override in force, if any."""
        return None if self._standing is None else Opt(self._standing["opt"])

    # -- answering the utility ----------------------------------------------------------------

    async def on_event(self, ev: DemandEvent) -> Opt:
        """Record one event version from the utility and return the opt to send; never actuates."""
        return (await self.answer(ev)).opt

    async def answer(self, ev: DemandEvent) -> Answer:
        """Record one event version and return the opt, what was done, and why."""
        async with self._lock:
            latest = await self._store.latest(ev.event_id)
            known = None if latest is None else latest.event.modification_number
            if known is not None and ev.modification_number <= known:
                return await self._repeat_or_stale(ev, latest, known)
            return await self._record(ev, updated=latest is not None)

    async def _repeat_or_stale(self, ev: DemandEvent, latest: Any, known: int) -> Answer:
        """Answer a version already seen (as stored) or an older one (rejected, rule 58); decide nothing.

        The answer is what the store holds, whether or not this repeat can be audited."""
        entry = self._events.get(ev.event_id)  # never behind the store: it follows only what was stored
        opt = entry.opt if entry is not None else self._opt_after_override(ev.event_id, latest)
        if ev.modification_number == known:
            await self._note(
                "event.repeat",
                {"modification_number": ev.modification_number, "opt": opt.value},
                "utility",
                ev.event_id,
            )
            return Answer(opt, Outcome.REPEAT, "same version as before: answered as before")
        reason = f"modification number {ev.modification_number} is lower than {known}, already received"
        await self._note(
            "event.stale",
            {"modification_number": ev.modification_number, "known_modification_number": known, "opt": opt.value},
            "utility",
            ev.event_id,
        )
        log.warning("stale modification number", event_id=ev.event_id, modification_number=ev.modification_number)
        return Answer(opt, Outcome.STALE, reason)

    def _opt_after_override(self, event_id: str, stored: Any) -> Opt:
        """Return the opt in force for a stored version no longer in memory."""
        override = self._overrides.get(event_id)
        if override and not stored.event.cancelled:
            return Opt(override["opt"])
        return Opt(stored.opt)

    async def _note(self, kind: str, data: dict[str, Any], actor: str, event_id: str) -> None:
        """Audit something that decides nothing; a log that cannot take it is logged, not raised."""
        try:
            await self._audit.append(kind, data, actor=actor, event_id=event_id)
        except AuditError as err:
            log.error("audit append failed", kind=kind, event_id=event_id, error=str(err))

    async def _record(self, ev: DemandEvent, updated: bool) -> Answer:
        """Decide a new or newer version, store it with its opt.decided row, then apply it and replan.

        The version, its ``opt.decided`` row and any stop it lifts are one transaction: when it fails
        this raises AuditError and the book is as before (nothing to answer, nothing to act on).
        """
        now = self._clock.now()
        entry = self._events.get(ev.event_id)
        opt, outcome, reason, actor = self._decide(ev, updated)
        delay = self._delay_for(ev, entry)
        was_active = entry is not None and entry.active
        state: dict[str, str] = {}
        if ev.cancelled:
            active = was_active
        else:
            active = opt is Opt.IN and outcome not in (Outcome.NOT_TARGETED, Outcome.WRONG_MARKET)
            active = active and self._acts_on(ev)
            override_out = ev.event_id in self._overrides and Opt(self._overrides[ev.event_id]["opt"]) is Opt.OUT
            if override_out:
                active = False
            elif entry is not None and entry.stop_at is not None:  # the VTN announced it again: it runs again
                state[f"stop:{ev.event_id}"] = "{}"
        data = {
            "modification_number": ev.modification_number,
            "opt": opt.value,
            "reason": reason,
            "outcome": outcome.value,
            "status": ev.status,
            "start_delay_s": round(delay, 3),
        }
        record = Record("opt.decided", data, actor, ev.event_id)
        await self._store.put_audited(ev, opt, reason, self._audit, record, start_delay_s=delay, state=state)
        # Stored and audited: only now does the book (and so the control loop and the answer) follow it.
        if entry is None:
            entry = self._events[ev.event_id] = _Entry(ev, opt, delay, False)
        entry.event, entry.opt, entry.delay_s, entry.active = ev, opt, delay, active
        if ev.cancelled and active and entry.stop_at is None:
            await self._stop(entry, now + timedelta(seconds=delay), "cancelled by the utility")
        elif state:
            entry.stop_at = None
        log.info("event recorded", event_id=ev.event_id, modification_number=ev.modification_number,
                 opt=opt.value, outcome=outcome.value, reason=reason)  # fmt: skip
        self.changed.set()
        return Answer(opt, outcome, reason)

    def _decide(self, ev: DemandEvent, updated: bool) -> tuple[Opt, Outcome, str, str]:
        """Decide the opt for a new version: (opt, outcome, reason, actor)."""
        fresh = Outcome.UPDATED if updated else Outcome.NEW
        if ev.cancelled:
            return Opt.IN, Outcome.CANCELLED, "cancellation acknowledged", "policy"
        wrong = mismatch(ev, self._cfg)
        if wrong is not None:
            return Opt.OUT, wrong[0], wrong[1], "policy"
        override = self._overrides.get(ev.event_id) or self._standing
        if override is not None:
            who = override["actor"]
            return Opt(override["opt"]), fresh, f"{who} override: {override['reason']}", who
        if ev.test_event and not self._cfg.act_on_test_events:
            return Opt.IN, fresh, "test event: acknowledged, not acted on", "policy"
        doubt = self.clock_doubt() if self.clock_doubt is not None else None
        if doubt is not None:
            return Opt.OUT, fresh, f"event times cannot be placed on this clock: {doubt}", "policy"
        if self._cfg.opt_policy == "never":
            return Opt.OUT, fresh, "policy: never participate", "policy"
        if self._cfg.opt_policy == "always":
            return Opt.IN, fresh, "policy: always participate", "policy"
        if self._feasibility is None:
            return Opt.IN, fresh, "no feasibility estimate available; policy feasible defaults to optIn", "policy"
        fz = self._feasibility(ev, self)
        return (Opt.IN if fz.feasible else Opt.OUT), fresh, fz.reason, "policy"

    def _delay_for(self, ev: DemandEvent, entry: _Entry | None) -> float:
        """Return the start offset: kept from earlier versions unless startafter changed (rule 30)."""
        if ev.start_after_s <= 0:
            return 0.0
        if entry is not None and entry.event.start_after_s == ev.start_after_s:
            return min(entry.delay_s, ev.start_after_s)
        return self._rng.uniform(0.0, ev.start_after_s)

    def _acts_on(self, ev: DemandEvent) -> bool:
        """Return whether the gateway acts on this event at all (test events only if configured)."""
        return not ev.test_event or self._cfg.act_on_test_events

    # -- cancellation and overrides ----------------------------------------------------------

    async def cancel(self, event_id: str, reason: str, actor: str = "utility") -> bool:
        """Stop an event without a readable new version (unreadable or implied cancellation)."""
        async with self._lock:
            entry = self._events.get(event_id)
            if entry is None or entry.stop_at is not None or entry.event.cancelled:
                return False
            await self._stop(entry, self._clock.now() + timedelta(seconds=entry.delay_s), reason, actor)
            return True

    async def on_distribution(self, vtn_id: str, event_ids: Collection[str]) -> list[str]:
        """Cancel this VTN's events that a full event distribution no longer lists (rule 61)."""
        now = self._clock.now()
        present = set(event_ids)
        gone = [
            e.event.event_id
            for e in self._events.values()
            if e.event.vtn_id in ("", vtn_id)
            and e.event.event_id not in present
            and not e.event.cancelled
            and e.stop_at is None
            and now < e.over_at
        ]
        for event_id in gone:
            await self.cancel(event_id, "implied cancellation: the VTN no longer lists the event")
        return gone

    async def _stop(self, entry: _Entry, at: datetime, reason: str, actor: str = "utility") -> None:
        """Stop an event at ``at`` (then recovery) at once, and persist and audit it in one transaction.

        Stopping is the safe direction: it applies even when the store cannot record it (logged)."""
        entry.stop_at = at
        log.info("event stopped", event_id=entry.event.event_id, reason=reason, stop_at=at.isoformat())
        self.changed.set()
        event_id = entry.event.event_id
        state = {f"stop:{event_id}": json.dumps({"at": at.isoformat(), "active": entry.active, "reason": reason})}
        data = {
            "stop_at": at.isoformat(),
            "reason": reason,
            "recovery_s": entry.event.recovery_s,
            "was_active": entry.active,
            "modification_number": entry.event.modification_number,
        }
        try:
            await self._store.set_state_audited(state, self._audit, Record("event.stopped", data, actor, event_id))
        except AuditError as err:
            log.error("event stop not recorded; stopped anyway", event_id=event_id, error=str(err))

    async def override_opt(self, event_id: str, opt: Opt, actor: str, reason: str) -> Answer:
        """Change the opt of a known event on an operator's or the BMS's word; applies at once.

        The override and its ``opt.override`` row are stored in one transaction before anything
        changes: an override the log cannot take is refused (AuditError) and changes nothing. Asking
        for the opt already in force by an override decides nothing (outcome REPEAT)."""
        opt = Opt(opt)
        if actor not in OVERRIDE_ACTORS:
            raise InputRejected(f"override actor {actor!r} is not one of {', '.join(sorted(OVERRIDE_ACTORS))}")
        if not reason.strip():
            raise InputRejected("an override needs a reason")
        async with self._lock:
            entry = self._events.get(event_id)
            if entry is None:
                raise InputRejected(f"event {event_id} is not known to this gateway")
            if entry.event.cancelled:
                raise InputRejected(f"event {event_id} was cancelled by the utility")
            held = self._overrides.get(event_id)
            if held is not None and Opt(held["opt"]) is opt and entry.opt is opt:
                return Answer(opt, Outcome.REPEAT, f"already overridden by {held['actor']}: {held['reason']}")
            now = self._clock.now()
            previous = entry.opt
            record = {"opt": opt.value, "actor": actor, "reason": reason, "at": now.isoformat()}
            state = {f"override:{event_id}": json.dumps(record)}
            resume = opt is Opt.IN and mismatch(entry.event, self._cfg) is None and self._acts_on(entry.event)
            if resume:
                state[f"stop:{event_id}"] = "{}"
            data = {"opt": opt.value, "previous_opt": previous.value, "reason": reason,
                    "modification_number": entry.event.modification_number}  # fmt: skip
            await self._store.set_state_audited(state, self._audit, Record("opt.override", data, actor, event_id))
            self._overrides[event_id] = record
            entry.opt = opt
            if opt is Opt.OUT and entry.active and entry.stop_at is None:
                await self._stop(entry, now, f"{actor} opted out: {reason}", actor)
            elif resume:
                entry.active, entry.stop_at = True, None
            log.warning("opt overridden", event_id=event_id, opt=opt.value, actor=actor, reason=reason)
            self.changed.set()
            return Answer(opt, Outcome.UPDATED, f"{actor} override: {reason}")

    async def set_standing_override(self, opt: Opt | None, actor: str, reason: str) -> None:
        """Answer every new event version with ``opt`` (None lifts it); events already answered keep theirs."""
        if actor not in OVERRIDE_ACTORS:
            raise InputRejected(f"override actor {actor!r} is not one of {', '.join(sorted(OVERRIDE_ACTORS))}")
        record = None if opt is None else {"opt": Opt(opt).value, "actor": actor, "reason": reason}
        data = {"opt": None if opt is None else Opt(opt).value, "reason": reason}
        await self._store.set_state_audited(
            {_STANDING: json.dumps(record or {})}, self._audit, Record("override.standing", data, actor)
        )
        self._standing = record

    # -- the directive ------------------------------------------------------------------------

    def target_at(self, t: datetime) -> Target | None:
        """Return the target in force at ``t``: the winning event's ask, scaled during ramps."""
        best: tuple[tuple[int, datetime, str], Target] | None = None
        for entry in self._events.values():
            if not entry.active:
                continue
            target = self._target_of(entry, t)
            if target is None:
                continue
            # OpenADR priority: 1 is highest, larger numbers lower, 0 means none (lowest); on a
            # tie the event that started first keeps precedence (rule 18).
            rank = (entry.event.priority or 1 << 30, entry.start, entry.event.event_id)
            if best is None or rank < best[0]:
                best = (rank, target)
        return best[1] if best else None

    def _target_of(self, entry: _Entry, t: datetime) -> Target | None:
        """Return what one event asks at ``t`` (None outside ramp-up, active period and recovery)."""
        ev, start, end = entry.event, entry.start, entry.end
        ramp_start = start - timedelta(seconds=ev.ramp_up_s)
        if t < ramp_start or end <= ramp_start or t >= entry.over_at:
            return None
        if t < end:
            fraction = _rise(t, start, ev.ramp_up_s)
            at = max(t, start)
        else:
            recovery = ev.recovery_s
            fraction = _rise(end, start, ev.ramp_up_s) * (1.0 - (t - end).total_seconds() / recovery)
            at = max(end - timedelta(microseconds=1), start)
        if fraction <= 0:
            return None
        ask = self.ask_at(ev, at - timedelta(seconds=entry.delay_s))
        if ask is None:
            return None
        kind, value = ask
        return Target(kind, value, ev.event_id, ev.modification_number, ramp_fraction=min(1.0, fraction))

    def ask_at(self, ev: DemandEvent, t: datetime) -> tuple[TargetKind, float] | None:
        """Return what the event's signals ask at ``t`` on its own (unrandomized) timeline."""
        for sig in sorted(ev.signals, key=lambda s: _SIGNAL_ORDER.get(s.name, 9)):
            value = sig.value_at(t)
            if value is not None and (ask := self._ask(sig, value)) is not None:
                return ask
        return None

    def _ask(self, sig: Signal, value: float) -> tuple[TargetKind, float] | None:
        """Translate one signal value into a target kind and value; None when it asks for nothing."""
        levels = self._cfg.simple_levels
        frac: float | None = None
        if sig.name is SignalName.SIMPLE:
            frac = levels.get(str(int(value)), 0.0)
        elif sig.signal_type in ("setpoint", "x-loadControlSetpoint"):
            return TargetKind.CAP_W, value
        elif sig.signal_type == "delta":
            return (TargetKind.SHED_W, value) if value > 0 else None
        elif sig.signal_type == "x-loadControlCapacity":
            frac = 1.0 - value
        elif sig.signal_type == "x-loadControlLevelOffset":
            frac = levels.get(str(min(3, int(value))), 0.0) if value > 0 else 0.0
        elif sig.signal_type == "x-loadControlPercentOffset":
            frac = -value / 100.0
        elif sig.name in (SignalName.ELECTRICITY_PRICE, SignalName.ENERGY_PRICE):
            frac = levels.get(str(self._price_level(sig.signal_type, value)), 0.0)
        if frac is None or frac <= 0:
            return None
        return TargetKind.SHED_FRACTION, min(1.0, frac)

    def _price_level(self, signal_type: str, price: float) -> int:
        """Return the highest SIMPLE level whose configured price threshold ``price`` reaches."""
        thresholds = {
            "price": self._cfg.price_levels,
            "priceRelative": self._cfg.price_relative_levels,
            "priceMultiplier": self._cfg.price_multiplier_levels,
        }.get(signal_type, {})
        return max((int(lvl) for lvl, floor in thresholds.items() if price >= floor), default=0)

    def required_shed_w(self, ev: DemandEvent, baseline_w: float) -> float:
        """Return the largest reduction (W) any interval of the event asks, given a baseline."""
        worst = 0.0
        for sig in ev.signals:
            for iv in sig.intervals:
                ask = self._ask(sig, iv.value)
                if ask is not None:
                    worst = max(worst, baseline_w - Target(ask[0], ask[1], "", 0).facility_limit_w(baseline_w))
        return worst

    def active_event_ids(self, t: datetime) -> list[str]:
        """Return ids of acted-on events whose (randomized) active period covers ``t``."""
        return [e.event.event_id for e in self._events.values() if e.active and e.start <= t < e.end]

    def next_change_after(self, t: datetime) -> datetime | None:
        """Return the first moment after ``t`` where the directive steps (an acted-on event's ramp-up
        start, start, interval start, end or end of recovery), or None; the control loop wakes then."""
        first: datetime | None = None
        for e in self._events.values():
            if not e.active or e.over_at <= t:
                continue
            shift = timedelta(seconds=e.delay_s)
            steps = [e.start - timedelta(seconds=e.event.ramp_up_s), e.start, e.end, e.over_at]
            steps += [iv.start + shift for sig in e.event.signals for iv in sig.intervals]
            for at in steps:
                if at > t and (first is None or at < first):
                    first = at
        return first


def _rise(t: datetime, start: datetime, ramp_up_s: float) -> float:
    """Return the share of the reduction asked at ``t`` on the way in (1 from ``start`` on)."""
    if t >= start or ramp_up_s <= 0:
        return 1.0
    return max(0.0, 1.0 - (start - t).total_seconds() / ramp_up_s)


def _add(t: datetime, seconds: float) -> datetime:
    """Return ``t`` plus seconds, saturating at datetime.max for open-ended events."""
    try:
        return t + timedelta(seconds=seconds)
    except OverflowError:
        return datetime.max.replace(tzinfo=t.tzinfo)


def _loads(raw: str | None) -> dict[str, Any]:
    """Return a JSON object persisted in the VEN state (empty when unset or cleared)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
