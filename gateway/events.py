"""The event book: stores events by (id, modification number), decides opt, hands out the directive.

It answers the utility quickly and never drives equipment; each tick the control loop takes the
``Directive`` it hands out (resolved by the pure ``gateway.directive``). What OpenADR 2.0b leaves
to the VEN is done here:

- a lower modification number is rejected (rule 58), the same one is answered as before without
  acting again, a higher one replaces the event and replans at once (rule 57);
- ``startafter`` randomization is drawn once per event, kept across modifications unless
  ``startafter`` itself changes (rule 30), persisted with the version, and also delays the end;
- a cancellation, explicit or implied (missing from a later distribution, rule 61), stops the
  event at once, or at the same random offset when ``startafter`` is set (rule 65), and the
  facility then ramps back over ``x-eiRecovery``; before ``dtstart`` it ramps in over ``x-eiRampUp``;
- overlapping events: the highest priority wins (1 highest, 0 lowest); equal priorities go to
  the one that started first (rule 18; resolved in ``gateway.directive``);
- events for another market context or whose eiTarget does not match are answered and ignored
  (rules 22 and 48); test events are acknowledged and audited, acted on only if configured;
- opt decisions come from an override (operator or BMS, per event), then the clock check
  (optOut while the VTN's clock is too far from ours), config policy and the feasibility
  estimate (a function of the event the book is given when it is built), each with its reason
  audited;
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

from gateway import directive
from gateway.clock import Clock, SystemClock
from gateway.config import OpenAdrConfig
from gateway.directive import Directive, Entry, Order
from gateway.errors import AuditError, InputRejected
from gateway.eventstore import Record
from gateway.feasibility import FeasibilityFn
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import DemandEvent, Opt

log = get_logger("gateway.events")

OVERRIDE_ACTORS = frozenset({"operator", "bms"})


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
        self._events: dict[str, Entry] = {}
        self._overrides: dict[str, dict[str, str]] = {}  # event id -> {opt, actor, reason, at}
        self._orders: dict[str, tuple[DemandEvent, Opt, float, Order]] = {}  # by event id, with what it was built from
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()
        # Why event times cannot be trusted now (the VTN's clock is too far from ours), or None: new
        # versions are then answered optOut (docs/reliability.md, "Clock skew against the VTN").
        self.clock_doubt: Callable[[], str | None] | None = None

    # -- reading -------------------------------------------------------------------------------

    async def load(self, now: datetime) -> int:
        """Load events still open at ``now`` and overrides from the store (restart recovery)."""
        for stored in await self._store.open_events(now):
            ev = stored.event
            override = _loads(await self._store.get_state(f"override:{ev.event_id}"))
            stop = _loads(await self._store.get_state(f"stop:{ev.event_id}"))
            opt = Opt(stored.opt)
            if override and not ev.cancelled:
                opt = Opt(override["opt"])
                self._overrides[ev.event_id] = override
            active = opt is Opt.IN and not ev.cancelled and self._acts_on(ev)
            entry = Entry(ev, opt, float(stored.start_delay_s), active)
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

    # -- answering the utility ----------------------------------------------------------------

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
            entry = self._events[ev.event_id] = Entry(ev, opt, delay, False)
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
        override = self._overrides.get(ev.event_id)
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
        fz = self._feasibility(ev)
        return (Opt.IN if fz.feasible else Opt.OUT), fresh, fz.reason, "policy"

    def _delay_for(self, ev: DemandEvent, entry: Entry | None) -> float:
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

    async def _stop(self, entry: Entry, at: datetime, reason: str, actor: str = "utility") -> None:
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

    # -- the directive ------------------------------------------------------------------------

    def directive_at(self, t: datetime, default_ramp_up_s: float = 0.0) -> Directive:
        """Return what the facility must do at ``t`` and when that next changes (see ``gateway.directive``)."""
        entries = list(self._events.values())
        return directive.resolve(entries, t, self._cfg, default_ramp_up_s, self._current_orders(entries))

    def active_event_ids(self, t: datetime) -> list[str]:
        """Return the events being delivered at ``t`` (the event active indicator: BMS register, metrics)."""
        return directive.active_event_ids(list(self._events.values()), t)

    def _current_orders(self, entries: list[Entry]) -> dict[str, Order]:
        """Return every entry's order, built again only for an entry whose version or answer changed."""
        out: dict[str, Order] = {}
        for e in entries:
            kept = self._orders.get(e.event.event_id)
            if kept is None or kept[0] is not e.event or kept[1:3] != (e.opt, e.delay_s):
                kept = self._orders[e.event.event_id] = (e.event, e.opt, e.delay_s, directive.order_of(e, self._cfg))
            out[e.event.event_id] = kept[3]
        return out


def _loads(raw: str | None) -> dict[str, Any]:
    """Return a JSON object persisted in the VEN state (empty when unset or cleared)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
