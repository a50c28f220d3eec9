"""Settlement baselines (meter-before/after, X-of-Y like days) and per-event performance."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway.audit import baseline as bl
from gateway.model import DemandEvent, Interval, Signal, SignalName

UTC_TZ = ZoneInfo("UTC")
# Wednesday 2026-07-01, 14:00-16:00 UTC, two one-hour intervals.
T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


def event(signal: Signal | None = None, ramp_up_s: float = 0.0, recovery_s: float = 0.0) -> DemandEvent:
    sig = signal or Signal(
        SignalName.SIMPLE, "level", (Interval(T0, 3600.0, 1.0), Interval(T0 + timedelta(hours=1), 3600.0, 2.0))
    )
    return DemandEvent("E1", 0, "far", T0, 7200.0, (sig,), ramp_up_s=ramp_up_s, recovery_s=recovery_s)


def flat(start: datetime, end: datetime, w: float, step_s: float = 60.0) -> list[tuple[datetime, float]]:
    out = []
    t = start
    while t < end:
        out.append((t, w))
        t += timedelta(seconds=step_s)
    return out


def test_method_parse() -> None:
    assert bl.Method.parse("10-of-10") == bl.Method("like-days", 10, 10)
    assert str(bl.Method.parse("5-of-10")) == "5-of-10"
    assert bl.Method.parse("meter-before-after").name == "meter-before-after"
    for bad in ("11-of-10", "0-of-3", "ten-of-ten", ""):
        with pytest.raises(ValueError):
            bl.Method.parse(bad)


def test_periods_commit_by_signal_kind_and_stop_at_cancellation() -> None:
    simple = bl.periods_of(event())
    assert [p.shed_fraction for p in simple] == [0.10, 0.20]
    assert simple[1].committed_for(100_000.0) == pytest.approx(20_000.0)
    delta = bl.periods_of(event(Signal(SignalName.LOAD_DISPATCH, "delta", (Interval(T0, 7200.0, 15_000.0),))))
    assert delta[0].committed_for(None) == 15_000.0
    setpoint = bl.periods_of(event(Signal(SignalName.LOAD_DISPATCH, "setpoint", (Interval(T0, 7200.0, 70_000.0),))))
    assert setpoint[0].committed_for(100_000.0) == 30_000.0
    cut = bl.periods_of(event(), until=T0 + timedelta(minutes=90))
    assert [p.end for p in cut] == [T0 + timedelta(hours=1), T0 + timedelta(minutes=90)]
    assert bl.periods_of(event(), until=T0 + timedelta(minutes=30))[-1].end == T0 + timedelta(minutes=30)


def test_meter_before_uses_the_window_before_ramp_up_and_reports_after() -> None:
    ev = event(ramp_up_s=600.0, recovery_s=900.0)
    samples = (
        flat(T0 - timedelta(hours=2), T0 - timedelta(minutes=70), 1.0)  # outside the window
        + flat(T0 - timedelta(minutes=70), T0 - timedelta(minutes=10), 100_000.0)  # the hour before ramp-up
        + flat(T0 - timedelta(minutes=10), T0, 50.0)  # ramp-up: excluded
        + flat(ev.end + timedelta(minutes=15), ev.end + timedelta(minutes=75), 98_000.0)
    )
    b = bl.meter_before_after(samples, ev, 3600.0, bl.periods_of(ev))
    assert b.per_period_w == [100_000.0, 100_000.0]
    assert b.inputs["before"]["samples"] == 60 and b.inputs["before"]["to"] == "2026-07-01T13:50:00.000000Z"
    assert b.inputs["after"]["mean_w"] == 98_000.0


def windows_for(days: dict[date, float], periods: list[bl.Period]) -> dict[date, list[tuple[datetime, float]]]:
    """Per-day samples, already shifted onto the event day, one level per day."""
    lo, hi = periods[0].start, periods[-1].end
    return {d: flat(lo, hi, w) for d, w in days.items()}


def test_x_of_y_takes_the_highest_x_of_the_most_recent_y_like_days() -> None:
    ev = event()
    periods = bl.periods_of(ev)
    day = T0.date()  # Wednesday
    weekdays = bl.candidate_days(day, 20)
    assert all(d.weekday() < 5 for d in weekdays) and weekdays[0] == day - timedelta(days=1)
    levels = {d: 90_000.0 + 1000.0 * i for i, d in enumerate(weekdays)}  # older days draw more
    event_day = weekdays[1]
    res = bl.like_days(windows_for(levels, periods), ev.start, periods, bl.Method("like-days", 2, 4), UTC_TZ,
                       {event_day}, 20)  # fmt: skip
    assert res is not None
    used = [weekdays[i] for i in (0, 2, 3, 4)]  # the 4 most recent non-event like days
    assert [c["date"] for c in res.inputs["candidates"]] == [d.isoformat() for d in used]
    assert res.inputs["selected"] == sorted(d.isoformat() for d in used[2:])  # the 2 highest
    assert res.per_period_w == [pytest.approx((levels[used[2]] + levels[used[3]]) / 2)] * 2
    assert res.inputs["excluded"] == [{"date": event_day.isoformat(), "reason": "demand-response event that day"}]


def test_like_days_skip_days_without_data_and_say_so() -> None:
    ev = event()
    periods = bl.periods_of(ev)
    days = bl.candidate_days(T0.date(), 10)
    partial = {days[0]: flat(periods[0].start, periods[0].end, 1.0)}  # only the first interval covered
    full = windows_for({days[1]: 95_000.0}, periods)
    res = bl.like_days({**partial, **full}, ev.start, periods, bl.Method("like-days", 10, 10), UTC_TZ, set(), 10)
    assert res is not None and res.per_period_w == [95_000.0, 95_000.0]
    assert "no measurements in every interval" in res.inputs["excluded"][0]["reason"]
    assert any("only 1 of 10" in n for n in res.inputs["notes"])
    assert bl.like_days({}, ev.start, periods, bl.Method("like-days", 1, 1), UTC_TZ, set(), 10) is None


def test_weekend_events_compare_with_weekends_in_the_site_zone() -> None:
    saturday = date(2026, 7, 4)
    assert bl.day_type(saturday) == "weekend"
    assert all(d.weekday() >= 5 for d in bl.candidate_days(saturday, 15))
    # 23:30 UTC on Friday is already Saturday in Tokyo.
    late = datetime(2026, 7, 3, 23, 30, tzinfo=UTC)
    assert bl.day_type(late.astimezone(ZoneInfo("Asia/Tokyo")).date()) == "weekend"


def test_performance_per_interval_energy_and_percent() -> None:
    ev = event()
    periods = bl.periods_of(ev)
    base = bl.Baseline("meter-before-after", [100_000.0, 100_000.0], {"method": "meter-before-after"})
    facility = flat(periods[0].start, periods[0].end, 90_000.0) + flat(periods[1].start, periods[1].end, 85_000.0)
    perf = bl.performance(periods, base, facility)
    first, second = perf["intervals"]
    assert (first["committed_w"], first["delivered_w"], first["energy_wh"], first["percent"]) == (
        10_000.0, 10_000.0, 10_000.0, 100.0)  # fmt: skip
    assert (second["committed_w"], second["delivered_w"], second["percent"]) == (20_000.0, 15_000.0, 75.0)
    assert perf["energy_delivered_wh"] == 25_000.0 and perf["energy_committed_wh"] == 30_000.0
    assert perf["percent_of_commitment"] == pytest.approx(83.3)
    assert perf["baseline"]["method"] == "meter-before-after"
    empty = bl.performance(periods, bl.Baseline("x", [None, None]), [])
    assert empty["percent_of_commitment"] is None and empty["intervals"][0]["delivered_w"] is None
