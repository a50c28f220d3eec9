"""An event as the planner sees it: facility shed (W) per interval, and ramp fractions.

Pure helpers for the control loop and the opt decision. Where the event book can say what an
event asks at a moment (``EventBook.ask_at``), its answer is used, so that every signal the
book understands is planned the same way; otherwise SIMPLE levels and LOAD_DISPATCH (delta and
setpoint) are read here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from gateway.model import DemandEvent, SignalName, Target, TargetKind

AskAt = Callable[[DemandEvent, datetime], "tuple[TargetKind, float] | None"]


def full_limit_w(target: Target, baseline_w: float) -> float:
    """Return the facility limit (W) a target asks once fully ramped in, whatever its ramp fraction."""
    if target.kind is TargetKind.CAP_W:
        return target.value
    if target.kind is TargetKind.SHED_W:
        return max(0.0, baseline_w - target.value)
    return max(0.0, baseline_w * (1.0 - target.value))


def ramp_fraction(target: Target) -> float:
    """Return the share (0..1) of its reduction a target asks now (the book's ramp-up and recovery)."""
    return min(1.0, max(0.0, float(target.ramp_fraction)))


def _local_shed_w(ev: DemandEvent, t: datetime, baseline_w: float, simple_levels: Mapping[str, float]) -> float:
    """Return the facility shed (W) an event asks at ``t`` from its SIMPLE or LOAD_DISPATCH signal."""
    for sig in ev.signals:
        value = sig.value_at(t)
        if value is None:
            continue
        if sig.name is SignalName.SIMPLE:
            return simple_levels.get(str(int(value)), 0.0) * baseline_w
        if sig.name is SignalName.LOAD_DISPATCH:
            return max(0.0, baseline_w - value) if sig.signal_type == "setpoint" else max(0.0, value)
    return 0.0


def event_profile(
    ev: DemandEvent,
    baseline_w: float,
    simple_levels: Mapping[str, float],
    ask_at: AskAt | None = None,
) -> list[tuple[datetime, float, float]]:
    """Return the event's intervals as (start, duration_s, facility shed W), in time order."""
    bounds = {ev.start, ev.end}
    for sig in ev.signals:
        for iv in sig.intervals:
            for t in (iv.start, iv.end):
                if ev.start <= t <= ev.end:
                    bounds.add(t)
    edges = sorted(bounds)
    out: list[tuple[datetime, float, float]] = []
    for a, b in zip(edges, edges[1:], strict=False):
        if ask_at is None:
            shed = _local_shed_w(ev, a, baseline_w, simple_levels)
        else:
            ask = ask_at(ev, a)
            target = None if ask is None else Target(ask[0], ask[1], ev.event_id, ev.modification_number)
            shed = 0.0 if target is None else max(0.0, baseline_w - full_limit_w(target, baseline_w))
        out.append((a, (b - a).total_seconds(), shed))
    return out


def horizon_after(
    profile: list[tuple[datetime, float, float]], now: datetime, bias_w: float
) -> list[tuple[float, float]]:
    """Return the intervals that start after ``now`` as (duration_s, shed W + bias), for the battery policy."""
    return [(d, max(0.0, shed + bias_w)) for start, d, shed in profile if start > now and d > 0]


def ramp_window_fraction(now: datetime, start: datetime, ramp_s: float) -> float | None:
    """Return how far (0..1) into a ramp of ``ramp_s`` that ends at ``start`` we are, or None outside it."""
    if ramp_s <= 0 or not (start - timedelta(seconds=ramp_s) <= now < start):
        return None
    return 1.0 - (start - now).total_seconds() / ramp_s
