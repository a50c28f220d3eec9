"""Settlement baselines and per-event performance: pure functions over measured facility power.

Two baseline methods, each returning its inputs with the result so an auditor can redo the sum:
- ``meter-before-after``: the mean facility power over a window just before the event (before
  its ramp-up); the mean over a window after its recovery is reported beside it (did load return?).
- ``X-of-Y`` like days: the Y most recent like days (same day type, weekday or weekend, in the
  site's time zone) before the event day that had no event and have data in the event's window;
  of those, the X with the highest mean load over the window; per interval, the mean over those
  X days of that interval's mean at the same time of day. Fewer than X days: those there are,
  with a note; none: meter-before-after, with the reason.
Power in W, energy in Wh, facility import positive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from gateway.audit.chain import format_ts
from gateway.model import DemandEvent, SignalName

DEFAULT_SIMPLE_LEVELS = {"0": 0.0, "1": 0.10, "2": 0.20, "3": 0.30}
DEFAULT_WINDOW_S = 3600.0
Samples = Sequence[tuple[datetime, float]]


@dataclass(frozen=True)
class Method:
    """A baseline method: ``meter-before-after`` or X-of-Y like days."""

    name: str  # "meter-before-after" | "like-days"
    x: int = 0
    y: int = 0

    @classmethod
    def parse(cls, spec: str) -> Method:
        """Parse ``meter-before-after`` or ``X-of-Y`` (e.g. ``10-of-10``, ``5-of-10``)."""
        if spec == "meter-before-after":
            return cls("meter-before-after")
        m = re.fullmatch(r"(\d+)-of-(\d+)", spec)
        if not m or not 1 <= int(m[1]) <= int(m[2]) <= 99:
            raise ValueError(f"baseline {spec!r}: use meter-before-after or X-of-Y with 1 <= X <= Y <= 99")
        return cls("like-days", int(m[1]), int(m[2]))

    def __str__(self) -> str:
        """Return the spec form."""
        return self.name if self.name == "meter-before-after" else f"{self.x}-of-{self.y}"


@dataclass(frozen=True)
class Period:
    """One interval of an event: [start, end) and the reduction committed in it (W)."""

    start: datetime
    end: datetime
    committed_w: float | None  # None when it depends on the baseline and that is unknown
    shed_fraction: float | None = None  # SIMPLE levels commit a fraction of the baseline
    setpoint_w: float | None = None  # setpoint signals commit "baseline down to this"

    def committed_for(self, baseline_w: float | None) -> float | None:
        """Return the committed reduction (W) given the interval's baseline."""
        if self.shed_fraction is not None:
            return None if baseline_w is None else self.shed_fraction * baseline_w
        if self.setpoint_w is not None:
            return None if baseline_w is None else max(0.0, baseline_w - self.setpoint_w)
        return self.committed_w


@dataclass(frozen=True)
class Baseline:
    """A baseline per period, with the method and every input used."""

    method: str
    per_period_w: list[float | None]
    inputs: dict[str, Any] = field(default_factory=dict)


def mean_in(samples: Samples, start: datetime, end: datetime) -> tuple[float | None, int]:
    """Return the mean of samples with start <= t < end and how many there were."""
    vals = [v for t, v in samples if start <= t < end]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def periods_of(
    ev: DemandEvent, simple_levels: Mapping[str, float] | None = None, until: datetime | None = None
) -> list[Period]:
    """Return the event's intervals with their commitments, cut at ``until`` (a cancellation)."""
    levels = simple_levels or DEFAULT_SIMPLE_LEVELS
    sig = next((s for s in ev.signals if s.name in (SignalName.SIMPLE, SignalName.LOAD_DISPATCH)), None)
    if sig is None:
        sig = ev.signals[0] if ev.signals else None
    out: list[Period] = []
    ivs = sig.intervals if sig else ()
    if not ivs:
        return [Period(ev.start, min(ev.end, until) if until else ev.end, None)]
    for iv in ivs:
        end = min(iv.end, until) if until else iv.end
        if end <= iv.start:
            continue
        if sig is not None and sig.name is SignalName.SIMPLE:
            out.append(Period(iv.start, end, None, levels.get(str(int(iv.value)), 0.0)))
        elif sig is not None and sig.signal_type == "setpoint":
            out.append(Period(iv.start, end, None, setpoint_w=float(iv.value)))
        else:
            out.append(Period(iv.start, end, float(iv.value)))
    return out


def meter_before_after(
    samples: Samples, ev: DemandEvent, window_s: float = DEFAULT_WINDOW_S, periods: Sequence[Period] = ()
) -> Baseline:
    """Return the meter-before baseline (one value for every period), with the after window beside it."""
    first = ev.start - timedelta(seconds=ev.ramp_up_s)
    before = (first - timedelta(seconds=window_s), first)
    after_start = ev.end + timedelta(seconds=ev.recovery_s)
    after = (after_start, after_start + timedelta(seconds=window_s))
    b, nb = mean_in(samples, *before)
    a, na = mean_in(samples, *after)
    inputs = {
        "method": "meter-before-after",
        "window_s": window_s,
        "before": {"from": format_ts(before[0]), "to": format_ts(before[1]), "mean_w": _r(b), "samples": nb},
        "after": {"from": format_ts(after[0]), "to": format_ts(after[1]), "mean_w": _r(a), "samples": na},
        "rule": "baseline = mean facility power over the window before the event (before ramp-up)",
    }
    n = max(1, len(periods))
    return Baseline("meter-before-after", [b] * n, inputs)


def day_type(d: date) -> str:
    """Return ``weekday`` or ``weekend`` for a date."""
    return "weekend" if d.weekday() >= 5 else "weekday"


def candidate_days(event_day: date, lookback_days: int) -> list[date]:
    """Return the like days before ``event_day``, most recent first, within the lookback."""
    kind = day_type(event_day)
    days = (event_day - timedelta(days=i) for i in range(1, lookback_days + 1))
    return [d for d in days if day_type(d) == kind]


def like_days(
    windows: Mapping[date, Samples],
    event_start: datetime,
    periods: Sequence[Period],
    method: Method,
    tz: ZoneInfo,
    event_days: set[date],
    lookback_days: int,
) -> Baseline | None:
    """Return the X-of-Y like-days baseline from per-day samples of the event's window; None if no day qualifies.

    ``windows`` maps each candidate date to its samples (already shifted to the event day).
    """
    event_day = event_start.astimezone(tz).date()
    used: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    for d in candidate_days(event_day, lookback_days):
        if len(used) >= method.y:
            break
        if d in event_days:
            excluded.append({"date": d.isoformat(), "reason": "demand-response event that day"})
            continue
        samples = windows.get(d, ())
        per = [mean_in(samples, p.start, p.end)[0] for p in periods]
        if not samples or any(v is None for v in per):
            excluded.append({"date": d.isoformat(), "reason": "no measurements in every interval of the window"})
            continue
        vals = [v for v in per if v is not None]
        used.append({"date": d.isoformat(), "window_mean_w": _r(sum(vals) / len(vals)), "per_period_w": per})
    if not used:
        return None
    chosen = sorted(used, key=lambda u: -float(u["window_mean_w"]))[: method.x]
    per_period: list[float | None] = []
    for i in range(len(periods)):
        vals = [float(u["per_period_w"][i]) for u in chosen]
        per_period.append(sum(vals) / len(vals))
    notes = []
    if len(used) < method.y:
        notes.append(f"only {len(used)} of {method.y} like days had data within {lookback_days} days")
    if len(chosen) < method.x:
        notes.append(f"averaged {len(chosen)} days, fewer than X={method.x}")
    inputs = {
        "method": str(method),
        "x": method.x,
        "y": method.y,
        "time_zone": str(tz),
        "day_type": day_type(event_day),
        "lookback_days": lookback_days,
        "candidates": [{"date": u["date"], "window_mean_w": u["window_mean_w"]} for u in used],
        "selected": sorted(u["date"] for u in chosen),
        "excluded": excluded,
        "notes": notes,
        "rule": "per interval: mean over the X highest-load of the Y most recent like non-event days",
    }
    return Baseline(str(method), per_period, inputs)


def performance(periods: Sequence[Period], baseline: Baseline, facility: Samples) -> dict[str, Any]:
    """Return baseline against actual per period, energy delivered and percent of commitment."""
    rows = []
    e_del = e_com = 0.0
    for i, p in enumerate(periods):
        base = baseline.per_period_w[i] if i < len(baseline.per_period_w) else None
        actual, n = mean_in(facility, p.start, p.end)
        committed = p.committed_for(base)
        hours = (p.end - p.start).total_seconds() / 3600.0
        delivered = None if base is None or actual is None else base - actual
        energy = None if delivered is None else delivered * hours
        committed_wh = None if committed is None else committed * hours
        if energy is not None and committed_wh is not None:
            e_del += energy
            e_com += committed_wh
        rows.append(
            {
                "start": format_ts(p.start),
                "end": format_ts(p.end),
                "baseline_w": _r(base),
                "actual_w": _r(actual),
                "samples": n,
                "committed_w": _r(committed),
                "delivered_w": _r(delivered),
                "energy_wh": _r(energy),
                "committed_wh": _r(committed_wh),
                "percent": _pct(delivered, committed),
            }
        )
    return {
        "baseline": {"method": baseline.method, "inputs": baseline.inputs},
        "intervals": rows,
        "energy_delivered_wh": _r(e_del),
        "energy_committed_wh": _r(e_com),
        "percent_of_commitment": _pct(e_del, e_com),
    }


def _r(v: float | None) -> float | None:
    """Round a watt or watt-hour figure to 0.1 for reports."""
    return None if v is None else round(float(v), 1)


def _pct(part: float | None, whole: float | None) -> float | None:
    """Return part/whole in percent, or None when undefined."""
    if part is None or whole is None or whole <= 0:
        return None
    return round(100.0 * part / whole, 1)
