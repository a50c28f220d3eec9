"""The directive as a value: what the control loop reads from the event book, resolved by pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway import directive
from gateway.config import OpenAdrConfig, parse_config
from gateway.directive import Entry
from gateway.feasibility import estimate
from gateway.model import BatteryState, DemandEvent, Interval, Opt, Signal, SignalName, Snapshot, TargetKind
from gateway.planner import context_from_config
from gateway.status import SiteView

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
CFG = OpenAdrConfig()


def _entry(eid: str = "E1", *, start: datetime = T0, level: float = 2.0, delay_s: float = 0.0, **kw: float) -> Entry:
    sig = Signal(SignalName.SIMPLE, "level", (Interval(start, 600.0, level), Interval(start + 10 * MIN, 600.0, 1.0)))
    ev = DemandEvent(eid, 3, "far", start, 1200.0, (sig,), **kw)  # type: ignore[arg-type]
    return Entry(ev, Opt.IN, delay_s, True)


def test_the_directive_carries_the_window_ramps_and_profile_of_every_event() -> None:
    e = _entry(delay_s=30.0, ramp_up_s=120.0, recovery_s=60.0)
    d = directive.resolve([e], T0 - 5 * MIN, CFG)
    assert d.target is None and d.lead is None  # before the event's own ramp-up
    order = d.order("E1")
    assert order is not None and order.modification_number == 3
    assert (order.start, order.end) == (T0 + timedelta(seconds=30), T0 + 20 * MIN + timedelta(seconds=30))
    assert (order.ramp_up_s, order.recovery_s, order.start_delay_s) == (120.0, 60.0, 30.0)
    # SIMPLE 2 then 1 (config levels 20 % and 10 %) on the event's own timeline.
    assert order.profile_w(100_000.0) == [
        (T0, 600.0, pytest.approx(20_000.0)),
        (T0 + 10 * MIN, 600.0, pytest.approx(10_000.0)),
    ]
    assert d.next_change == T0 + timedelta(seconds=30) - timedelta(seconds=120)  # the ramp-up starts


def test_step_for_names_the_phase_and_the_share_asked() -> None:
    e = _entry(ramp_up_s=120.0, recovery_s=120.0)
    ramping = directive.resolve([e], T0 - MIN, CFG).step_for("E1")
    assert ramping.phase == "ramp_up" and ramping.goal == pytest.approx(0.5)
    assert ramping.target is not None and ramping.target.kind is TargetKind.SHED_FRACTION
    active = directive.resolve([e], T0 + MIN, CFG).step_for("E1")
    assert (active.phase, active.goal) == ("active", 1.0)
    recovering = directive.resolve([e], T0 + 21 * MIN, CFG).step_for("E1")
    assert recovering.phase == "recovery" and recovering.goal == pytest.approx(0.5)
    gone = directive.resolve([e], T0 + 30 * MIN, CFG).step_for("E1")
    assert (gone.phase, gone.goal, gone.target) == ("recovery", 0.0, None)


def test_an_event_with_no_ramp_of_its_own_ramps_in_over_the_default() -> None:
    e = _entry()
    assert directive.resolve([e], T0 - MIN, CFG).lead is None  # no default: nothing before the start
    d = directive.resolve([e], T0 - MIN, CFG, default_ramp_up_s=240.0)
    assert d.target is None and d.upcoming is not None
    target, share = d.upcoming
    assert target.event_id == "E1" and share == pytest.approx(0.75)
    assert d.lead is target and d.step_for("E1").phase == "ramp_up"


def test_the_higher_priority_event_leads() -> None:
    low, high = _entry("LOW", priority=5), _entry("HIGH", start=T0 + 5 * MIN, priority=1)
    d = directive.resolve([low, high], T0 + 6 * MIN, CFG)
    assert d.lead is not None and d.lead.event_id == "HIGH"
    assert d.step_for("LOW").phase == "recovery"  # what the loop ramps back from when superseded


def _site(soc_pct: float) -> SiteView:
    battery = BatteryState("bess1", soc_pct, 0.0, 0.0, 8000.0, 8000.0, 40_000.0)
    return SiteView(Snapshot(T0, 60_000.0, battery), 60_000.0, {}, {})


def test_feasibility_is_a_function_of_the_event_and_the_site_view() -> None:
    cfg = parse_config({"limits": {"soc_floor_pct": 20.0}}, "<test>")
    ctx = context_from_config(cfg)
    ev = _entry(level=1.0).event  # 10 % of 60 kW for 20 minutes: the battery alone covers it
    assert estimate(ev, None, cfg, ctx).reason == "no site snapshot yet: opting in"
    assert estimate(ev, _site(80.0), cfg, ctx).feasible
    empty = estimate(ev, _site(21.0), cfg, ctx)
    assert not empty.feasible and empty.shortfall_w > 0
    helped = estimate(ev, _site(21.0), cfg, ctx, offered_w=20_000.0)
    assert helped.feasible and "the BMS offers 20000 W" in helped.reason
