"""The event book: stores events by (id, modification number), decides opt, resolves the directive.

It answers the utility quickly and never drives equipment; the control loop asks it,
each tick, which target applies now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from gateway.config import OpenAdrConfig
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import DemandEvent, Opt, SignalName, Target, TargetKind

log = get_logger("gateway.events")


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
    async def put(self, ev: DemandEvent, opt: Opt, reason: str) -> bool: ...
    async def open_events(self, now: datetime) -> list[Any]: ...


FeasibilityFn = Callable[[DemandEvent, "EventBook"], Feasibility]


class EventBook:
    """Holds every event version the VEN has answered and resolves them into one target."""

    def __init__(
        self,
        config: OpenAdrConfig,
        store: EventStoreLike,
        audit: AuditSink,
        feasibility: FeasibilityFn | None = None,
    ) -> None:
        self._cfg = config
        self._store = store
        self._audit = audit
        self._feasibility = feasibility
        self._events: dict[str, tuple[DemandEvent, Opt]] = {}
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()

    async def load(self, now: datetime) -> int:
        """Load events still open at ``now`` from the store (restart recovery); return how many."""
        for stored in await self._store.open_events(now):
            self._events[stored.event.event_id] = (stored.event, stored.opt)
        if self._events:
            self.changed.set()
        return len(self._events)

    def events(self) -> list[tuple[DemandEvent, Opt]]:
        """Return the latest version of every known event with its opt."""
        return list(self._events.values())

    async def on_event(self, ev: DemandEvent) -> Opt:
        """Record one event version from the utility and return the opt to send; never actuates."""
        async with self._lock:
            same = await self._store.get(ev.event_id, ev.modification_number)
            if same is not None:
                # A repeat (VTN re-send, or a restart): answer as before, act on nothing new.
                await self._audit.append(
                    "event.repeat",
                    {"modification_number": ev.modification_number, "opt": same.opt.value},
                    actor="utility",
                    event_id=ev.event_id,
                )
                return Opt(same.opt)
            latest = await self._store.latest(ev.event_id)
            if latest is not None and latest.event.modification_number > ev.modification_number:
                await self._audit.append(
                    "event.stale",
                    {
                        "modification_number": ev.modification_number,
                        "known_modification_number": latest.event.modification_number,
                    },
                    actor="utility",
                    event_id=ev.event_id,
                )
                log.warning(
                    "stale modification number",
                    event_id=ev.event_id,
                    modification_number=ev.modification_number,
                )
                return Opt(latest.opt)
            opt, reason = self._decide(ev)
            await self._store.put(ev, opt, reason)
            await self._audit.append(
                "opt.decided",
                {
                    "modification_number": ev.modification_number,
                    "opt": opt.value,
                    "reason": reason,
                    "status": ev.status,
                },
                actor="policy",
                event_id=ev.event_id,
            )
            self._events[ev.event_id] = (ev, opt)
            log.info(
                "event recorded",
                event_id=ev.event_id,
                modification_number=ev.modification_number,
                opt=opt.value,
                reason=reason,
                status=ev.status,
            )
            self.changed.set()
            return opt

    def _decide(self, ev: DemandEvent) -> tuple[Opt, str]:
        """Decide optIn/optOut for one event version, with the reason."""
        if ev.cancelled:
            return Opt.IN, "cancellation acknowledged"
        if ev.test_event and not self._cfg.act_on_test_events:
            return Opt.IN, "test event: acknowledged, not acted on"
        if self._cfg.opt_policy == "never":
            return Opt.OUT, "policy: never participate"
        if self._cfg.opt_policy == "always":
            return Opt.IN, "policy: always participate"
        if self._feasibility is None:
            return Opt.IN, "no feasibility estimate available; policy feasible defaults to optIn"
        fz = self._feasibility(ev, self)
        return (Opt.IN if fz.feasible else Opt.OUT), fz.reason

    def target_at(self, t: datetime) -> Target | None:
        """Return the target in force at ``t`` (highest priority active opted-in event), or None."""
        best: tuple[int, DemandEvent, Target] | None = None
        for ev, opt in self._events.values():
            if opt is not Opt.IN or ev.cancelled:
                continue
            if ev.test_event and not self._cfg.act_on_test_events:
                continue
            target = self._target_of(ev, t)
            if target is None:
                continue
            # OpenADR priority: 1 is highest, larger numbers lower; 0 means "no priority" (lowest).
            rank = ev.priority if ev.priority > 0 else 1 << 30
            if best is None or rank < best[0]:
                best = (rank, ev, target)
        return best[2] if best else None

    def _target_of(self, ev: DemandEvent, t: datetime) -> Target | None:
        """Return the target one event asks for at ``t``, or None outside its active period."""
        start = ev.start + timedelta(seconds=ev.start_after_s)
        if not (start <= t < ev.end):
            return None
        for sig in ev.signals:
            value = sig.value_at(t)
            if value is None:
                continue
            if sig.name is SignalName.SIMPLE:
                frac = self._cfg.simple_levels.get(str(int(value)), 0.0)
                if frac <= 0:
                    continue
                return Target(TargetKind.SHED_FRACTION, frac, ev.event_id, ev.modification_number)
            if sig.name is SignalName.LOAD_DISPATCH:
                kind = TargetKind.CAP_W if sig.signal_type == "setpoint" else TargetKind.SHED_W
                if kind is TargetKind.SHED_W and value <= 0:
                    continue
                return Target(kind, value, ev.event_id, ev.modification_number)
        return None

    def active_event_ids(self, t: datetime) -> list[str]:
        """Return ids of opted-in events whose active period covers ``t``."""
        return [
            ev.event_id
            for ev, opt in self._events.values()
            if opt is Opt.IN and not ev.cancelled and ev.start <= t < ev.end
        ]
