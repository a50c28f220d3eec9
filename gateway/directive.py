"""The directive: what the facility must do now, and when that next changes; pure functions.

The event book keeps every event version with its opt, randomized start and stop; from them this
module resolves, for any moment, the ``Directive`` the control loop follows: the winning event's
ask (limit or shed) scaled by its ramp, every known event's window, ramps and profile, and the
next step. Nothing here does I/O or keeps state; the book hands its entries in, the loop reads
the value out. OpenADR 2.0b rules followed here (profile 2.0b, spec revision 1.1):

- overlapping events: the highest priority wins (1 highest, 0 lowest); on a tie the event that
  started first keeps precedence (rule 18);
- ``startafter`` randomization shifts the start and the end alike (rule 30);
- before ``dtstart`` an event ramps in over ``x-eiRampUp``, after its end it ramps back over
  ``x-eiRecovery``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt, Signal, SignalName, Target, TargetKind
from gateway.shedprofile import full_limit_w, ramp_fraction, ramp_window_fraction

# When one event carries several signals, the most specific one that asks for something wins.
_SIGNAL_ORDER = {
    SignalName.LOAD_DISPATCH: 0,
    SignalName.LOAD_CONTROL: 1,
    SignalName.SIMPLE: 2,
    SignalName.ELECTRICITY_PRICE: 3,
    SignalName.ENERGY_PRICE: 4,
}

Ask = tuple[TargetKind, float]


@dataclass
class Entry:
    """The book's working record of one event: latest version, answer and timing (mutated by the book only)."""

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
        end = add_s(self.event.end, self.delay_s)
        return end if self.stop_at is None else min(end, self.stop_at)

    @property
    def over_at(self) -> datetime:
        """Return when the event no longer affects the directive (end plus recovery)."""
        return add_s(self.end, self.event.recovery_s)


@dataclass(frozen=True)
class Piece:
    """One stretch of an event's profile on its own (unrandomized) timeline, and what it asks."""

    start: datetime
    duration_s: float
    ask: Ask | None  # None: nothing asked over this stretch


@dataclass(frozen=True)
class Order:
    """One known event as the control loop needs it: identity, window, ramps and profile."""

    event_id: str
    modification_number: int
    opt: Opt
    cancelled: bool
    start: datetime  # the randomized start of the active period
    end: datetime  # the randomized end of the active period (a stop does not move it)
    start_delay_s: float  # the randomized offset drawn for it (``startafter``)
    ramp_up_s: float  # the event's own ramp-in (0: none given)
    recovery_s: float  # the event's own ramp-back (0: none given)
    pieces: tuple[Piece, ...]

    def profile_w(self, baseline_w: float) -> list[tuple[datetime, float, float]]:
        """Return the event's intervals as (start, duration_s, facility shed W) for a baseline."""
        return [(p.start, p.duration_s, shed_w(p.ask, baseline_w)) for p in self.pieces]


@dataclass(frozen=True)
class Step:
    """What one event under control is asked now: the share of its reduction, its target and phase."""

    goal: float  # share (0..1) of the event's reduction asked now
    target: Target | None  # what it asks (None: it asks nothing any more, ramp back)
    phase: str  # ramp_up | active | recovery


@dataclass(frozen=True)
class Directive:
    """What the facility must do at ``t``: the winning target, every known event, and the next step."""

    t: datetime
    target: Target | None  # the winning event's ask at ``t``, scaled during its ramps
    upcoming: tuple[Target, float] | None  # with no target: an event about to start and the ramp share now
    next_change: datetime | None  # the first moment after ``t`` where the directive steps
    orders: Mapping[str, Order]  # every known event by id

    @property
    def lead(self) -> Target | None:
        """Return the target that leads now: the one in force, else the one ramping in ahead of its start."""
        if self.target is not None:
            return self.target
        return self.upcoming[0] if self.upcoming is not None else None

    def order(self, event_id: str | None) -> Order | None:
        """Return a known event's order, or None."""
        return None if event_id is None else self.orders.get(event_id)

    def step_for(self, event_id: str) -> Step:
        """Return what the event under control is asked now (its ramp share, target and phase)."""
        target = self.target
        if target is not None and target.event_id == event_id:
            goal = ramp_fraction(target)
            order = self.orders.get(event_id)
            past_end = order is not None and self.t >= order.end
            return Step(goal, target, "active" if goal >= 1.0 else ("recovery" if past_end else "ramp_up"))
        if self.upcoming is not None and self.upcoming[0].event_id == event_id:
            return Step(self.upcoming[1], self.upcoming[0], "ramp_up")
        return Step(0.0, None, "recovery")


def resolve(
    entries: Sequence[Entry],
    t: datetime,
    cfg: OpenAdrConfig,
    default_ramp_up_s: float = 0.0,
    orders: Mapping[str, Order] | None = None,
) -> Directive:
    """Return the directive at ``t`` from the book's entries (``default_ramp_up_s`` ramps in events that give none).

    ``orders``: the entries' orders when the caller keeps them (they change only with a new version).
    """
    target = target_at(entries, t, cfg)
    upcoming = None if target is not None else _upcoming(entries, t, cfg, default_ramp_up_s)
    if orders is None:
        orders = {e.event.event_id: order_of(e, cfg) for e in entries}
    return Directive(t, target, upcoming, next_change_after(entries, t), orders)


def order_of(entry: Entry, cfg: OpenAdrConfig) -> Order:
    """Return one entry's order: identity, window, ramps and profile."""
    ev = entry.event
    return Order(
        event_id=ev.event_id,
        modification_number=ev.modification_number,
        opt=entry.opt,
        cancelled=ev.cancelled,
        start=entry.start,
        end=add_s(ev.end, entry.delay_s),
        start_delay_s=entry.delay_s,
        ramp_up_s=ev.ramp_up_s,
        recovery_s=ev.recovery_s,
        pieces=pieces(ev, cfg),
    )


def _upcoming(
    entries: Sequence[Entry], t: datetime, cfg: OpenAdrConfig, default_ramp_up_s: float
) -> tuple[Target, float] | None:
    """Return the target of an opted-in event about to start whose ramp-up window covers ``t``, and the share."""
    best: tuple[datetime, Target, float] | None = None
    for e in entries:
        if e.opt is not Opt.IN or e.event.cancelled:
            continue
        frac = ramp_window_fraction(t, e.start, e.event.ramp_up_s or default_ramp_up_s)
        if frac is None:
            continue
        target = target_at(entries, e.start, cfg)
        if target is None or target.event_id != e.event.event_id:
            continue
        if best is None or e.start < best[0]:
            best = (e.start, target, frac)
    return (best[1], best[2]) if best else None


def target_at(entries: Sequence[Entry], t: datetime, cfg: OpenAdrConfig) -> Target | None:
    """Return the target in force at ``t``: the winning event's ask, scaled during ramps."""
    best: tuple[tuple[int, datetime, str], Target] | None = None
    for entry in entries:
        if not entry.active:
            continue
        target = target_of(entry, t, cfg)
        if target is None:
            continue
        # OpenADR priority: 1 is highest, larger numbers lower, 0 means none (lowest); on a
        # tie the event that started first keeps precedence (rule 18).
        rank = (entry.event.priority or 1 << 30, entry.start, entry.event.event_id)
        if best is None or rank < best[0]:
            best = (rank, target)
    return best[1] if best else None


def target_of(entry: Entry, t: datetime, cfg: OpenAdrConfig) -> Target | None:
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
    ask = ask_at(ev, at - timedelta(seconds=entry.delay_s), cfg)
    if ask is None:
        return None
    kind, value = ask
    return Target(kind, value, ev.event_id, ev.modification_number, ramp_fraction=min(1.0, fraction))


def ask_at(ev: DemandEvent, t: datetime, cfg: OpenAdrConfig) -> Ask | None:
    """Return what the event's signals ask at ``t`` on its own (unrandomized) timeline."""
    for sig in sorted(ev.signals, key=lambda s: _SIGNAL_ORDER.get(s.name, 9)):
        value = sig.value_at(t)
        if value is not None and (ask := ask_of(sig, value, cfg)) is not None:
            return ask
    return None


def ask_of(sig: Signal, value: float, cfg: OpenAdrConfig) -> Ask | None:
    """Translate one signal value into a target kind and value; None when it asks for nothing."""
    levels = cfg.simple_levels
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
        frac = levels.get(str(price_level(sig.signal_type, value, cfg)), 0.0)
    if frac is None or frac <= 0:
        return None
    return TargetKind.SHED_FRACTION, min(1.0, frac)


def price_level(signal_type: str, price: float, cfg: OpenAdrConfig) -> int:
    """Return the highest SIMPLE level whose configured price threshold ``price`` reaches."""
    thresholds = {
        "price": cfg.price_levels,
        "priceRelative": cfg.price_relative_levels,
        "priceMultiplier": cfg.price_multiplier_levels,
    }.get(signal_type, {})
    return max((int(lvl) for lvl, floor in thresholds.items() if price >= floor), default=0)


def required_shed_w(ev: DemandEvent, baseline_w: float, cfg: OpenAdrConfig) -> float:
    """Return the largest reduction (W) any interval of the event asks, given a baseline."""
    worst = 0.0
    for sig in ev.signals:
        for iv in sig.intervals:
            ask = ask_of(sig, iv.value, cfg)
            if ask is not None:
                worst = max(worst, baseline_w - Target(ask[0], ask[1], "", 0).facility_limit_w(baseline_w))
    return worst


def pieces(ev: DemandEvent, cfg: OpenAdrConfig) -> tuple[Piece, ...]:
    """Return the event cut at every interval edge inside its active period, with what each stretch asks."""
    bounds = {ev.start, ev.end}
    for sig in ev.signals:
        for iv in sig.intervals:
            for t in (iv.start, iv.end):
                if ev.start <= t <= ev.end:
                    bounds.add(t)
    edges = sorted(bounds)
    return tuple(Piece(a, (b - a).total_seconds(), ask_at(ev, a, cfg)) for a, b in zip(edges, edges[1:], strict=False))


def shed_w(ask: Ask | None, baseline_w: float) -> float:
    """Return the facility shed (W) an ask means for a baseline (0 for none)."""
    if ask is None:
        return 0.0
    return max(0.0, baseline_w - full_limit_w(Target(ask[0], ask[1], "", 0), baseline_w))


def active_event_ids(entries: Sequence[Entry], t: datetime) -> list[str]:
    """Return ids of acted-on events whose (randomized, possibly stopped) active period covers ``t``."""
    return [e.event.event_id for e in entries if e.active and e.start <= t < e.end]


def next_change_after(entries: Sequence[Entry], t: datetime) -> datetime | None:
    """Return the first moment after ``t`` where the directive steps (an acted-on event's ramp-up
    start, start, interval start, end or end of recovery), or None; the control loop wakes then."""
    first: datetime | None = None
    for e in entries:
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


def add_s(t: datetime, seconds: float) -> datetime:
    """Return ``t`` plus seconds, saturating at datetime.max for open-ended events."""
    try:
        return t + timedelta(seconds=seconds)
    except OverflowError:
        return datetime.max.replace(tzinfo=t.tzinfo)
