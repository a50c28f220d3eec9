"""Event accounting and tier budgets; event shed profiles; the allocation benchmark's command."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from gateway import shedprofile
from gateway.accounting import EventAccount, job_key
from gateway.cli import main
from gateway.model import (
    BatteryState,
    DemandEvent,
    GpuState,
    Interval,
    Signal,
    SignalName,
    Snapshot,
    Target,
    TargetKind,
)

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
TIERS = {"flex0": 0.0, "flex1": 0.10, "flex2": 0.25}


def _gpu(gid: str, tier: str, power: float, cap: float, tput: float | None, host: str = "a") -> GpuState:
    return GpuState(gid, power, cap, 200.0, 700.0, 700.0, "training", tier, host=host, throughput=tput)


def _battery(power_w: float) -> BatteryState:
    return BatteryState("b", 70.0, power_w, power_w, 5000.0, 5000.0, 20_000.0)


def test_totals_and_per_job_rows_from_known_ticks() -> None:
    acct = EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS, cooling_overhead=0.25)
    natural, ntput = {"g0": 600.0, "g1": 600.0, "g2": 300.0}, {"g0": 1000.0, "g1": 1000.0, "g2": 500.0}
    before = (
        _gpu("g0", "flex1", 600, 700, 1000),
        _gpu("g1", "flex1", 600, 700, 1000),
        _gpu("g2", "flex0", 300, 700, 500),
    )
    acct.add(Snapshot(T0, 50_000.0, _battery(0.0), before), 0.0, natural, ntput, set())
    # One hour with g0 and g1 capped to 500 W keeping 90 % of throughput, the battery at 2 kW, meter at 46 kW.
    during = (
        _gpu("g0", "flex1", 500, 500, 900),
        _gpu("g1", "flex1", 500, 500, 900),
        _gpu("g2", "flex0", 300, 700, 500),
    )
    acct.add(
        Snapshot(T0 + timedelta(hours=1), 46_000.0, _battery(2000.0), during), 3600.0, natural, ntput, {"g0", "g1"}
    )
    s = acct.summary()
    assert s["facility_energy_shed_wh"] == pytest.approx(4000.0)
    assert s["battery_energy_wh"] == pytest.approx(2000.0)
    assert s["gpu_energy_shed_wh"] == pytest.approx(200.0 * 1.25)
    assert s["throughput_kept_fraction"] == pytest.approx(2300.0 / 2500.0, abs=1e-4)
    assert s["tokens_per_s_per_w_before"] == pytest.approx(2500.0 / 1500.0, abs=1e-4)
    assert s["tokens_per_s_per_w_during"] == pytest.approx(2300.0 / 1300.0, abs=1e-4)
    assert s["tier_violations"] == 0
    (flex0,) = [j for j in s["jobs"] if j["tier"] == "flex0"]
    (flex1,) = [j for j in s["jobs"] if j["tier"] == "flex1"]
    assert flex1["gpus"] == 2 and flex1["job"] == "a/training/flex1"
    assert flex1["throughput_lost_fraction"] == pytest.approx(0.10)
    assert flex1["budget_used_fraction"] == pytest.approx(1.0)
    assert flex1["it_energy_shed_wh"] == pytest.approx(200.0)
    assert flex0["throughput_lost_fraction"] == 0.0 and flex0["budget_used_fraction"] == 0.0
    json.dumps(s)  # goes to the audit log as it is


def test_a_job_over_its_budget_is_reported() -> None:
    acct = EventAccount("E", T0, T0 + timedelta(hours=1), 1.0, TIERS)
    g = _gpu("g0", "flex1", 400, 400, 700)
    acct.add(Snapshot(T0, None, None, (g,)), 0.0, {"g0": 600.0}, {"g0": 1000.0}, {"g0"})
    acct.add(Snapshot(T0 + timedelta(hours=1), None, None, (g,)), 3600.0, {"g0": 600.0}, {"g0": 1000.0}, {"g0"})
    s = acct.summary()
    assert s["tier_violations"] == 1 and not s["jobs"][0]["within_budget"]


def test_allowance_spreads_what_is_left_and_is_bounded_by_the_burst() -> None:
    acct = EventAccount("E", T0, T0 + timedelta(hours=1), 1.0, TIERS, burst=2.0, margin=0.0)
    g = _gpu("g0", "flex1", 600, 700, 1000)
    acct.add(Snapshot(T0, None, None, (g,)), 0.0, {"g0": 600.0}, {"g0": 1000.0}, set())
    assert acct.allowances([g], T0) == {"g0": pytest.approx(0.10)}
    # Nothing lost in the first half: the second half may lose 20 % (and no more: burst 2x).
    assert acct.allowances([g], T0 + timedelta(minutes=30)) == {"g0": pytest.approx(0.20)}
    assert acct.allowances([g], T0 + timedelta(minutes=50)) == {"g0": pytest.approx(0.20)}
    # Lost 20 % for half an hour: the budget is spent.
    lossy = _gpu("g0", "flex1", 500, 500, 800)
    acct.add(Snapshot(T0 + timedelta(minutes=30), None, None, (lossy,)), 1800.0, {"g0": 600.0}, {"g0": 1000.0}, {"g0"})
    assert acct.allowances([g], T0 + timedelta(minutes=30)) == {"g0": pytest.approx(0.0)}
    assert EventAccount("E", T0, T0, 1.0, TIERS, mode="instant").allowances([g], T0) is None


def test_job_key_falls_back_to_the_gpu_group() -> None:
    g = _gpu("g0", "flex1", 600, 700, None, host="rack-7")
    assert job_key(g) == "rack-7/training/flex1"


def test_event_profile_from_signals_and_from_the_books_answer() -> None:
    ivs = (Interval(T0, 600.0, 1.0), Interval(T0 + timedelta(seconds=600), 1200.0, 3.0))
    ev = DemandEvent("E", 0, "far", T0, 1800.0, (Signal(SignalName.SIMPLE, "level", ivs),))
    levels = {"1": 0.1, "3": 0.3}
    prof = shedprofile.event_profile(ev, 100_000.0, levels)
    assert [(d, round(s)) for _, d, s in prof] == [(600.0, 10_000), (1200.0, 30_000)]
    via_book = shedprofile.event_profile(ev, 100_000.0, levels, lambda e, t: (TargetKind.CAP_W, 95_000.0))
    assert [round(s) for _, _, s in via_book] == [5_000, 5_000]
    later = shedprofile.horizon_after(prof, T0 + timedelta(seconds=60), 500.0)
    assert later == [(1200.0, 30_500.0)]
    ramped = Target(TargetKind.SHED_W, 4000.0, "E", 0)
    assert shedprofile.full_limit_w(ramped, 10_000.0) == 6000.0
    assert shedprofile.ramp_window_fraction(T0 - timedelta(seconds=30), T0, 120.0) == pytest.approx(0.75)
    assert shedprofile.ramp_window_fraction(T0 - timedelta(seconds=300), T0, 120.0) is None


def test_bench_allocation_quick_json_meets_its_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "allocation", "--quick", "--json", "--gpus", "2000"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in (
        "cases",
        "planner_vs_reference_min",
        "uniform_vs_reference_mean",
        "tier_violations",
        "plan_ms_10k_gpus",
    ):
        assert key in res
    assert res["planner_vs_reference_min"] >= 0.99
    assert res["tier_violations"] == 0
    assert res["uniform_tier_violations"] > 0  # the naive baseline does break tiers
    assert len(res["cases"]) >= 5


def test_bench_allocation_says_clearly_when_scipy_is_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from drgw_tools.bench import planning as planning_bench

    monkeypatch.setattr(planning_bench, "scipy_available", lambda: False)
    assert main(["bench", "allocation", "--quick", "--json", "--gpus", "500"]) == 1
    out = capsys.readouterr()
    assert "scipy is not installed" in out.err
    res = json.loads(out.out)
    assert res["reference"] is None and res["planner_vs_reference_min"] is None and res["tier_violations"] == 0


def test_accounting_kept_across_a_restart_continues_with_the_gap_unaccounted() -> None:
    """state() -> JSON -> resume() in a new account gives the same totals and budgets, plus the gap."""
    natural, ntput = {"g0": 600.0}, {"g0": 1000.0}
    acct = EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS, recovery_s=60.0)
    capped = (_gpu("g0", "flex1", 500, 500, 900),)
    acct.add(Snapshot(T0 + timedelta(minutes=10), 46_000.0, _battery(2000.0), capped), 600.0, natural, ntput, {"g0"})
    saved = json.loads(json.dumps(acct.state(T0 + timedelta(minutes=10))))
    # A new process, 5 minutes later.
    again = EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS, recovery_s=60.0)
    again.resume(saved, T0 + timedelta(minutes=15))
    assert again.summary() == {**acct.summary(), "unaccounted_s": 300.0}
    now = T0 + timedelta(minutes=15)
    assert again.allowances(capped, now) == acct.allowances(capped, now)  # the budget spent stays spent
    fresh = EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS, recovery_s=60.0)
    assert fresh.allowances(capped, now)["g0"] > again.allowances(capped, now)["g0"]
    # A gap that runs past the event's end and recovery counts only up to it.
    late = EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS, recovery_s=60.0)
    late.resume(saved, T0 + timedelta(hours=3))
    assert late.unaccounted_s == pytest.approx(50 * 60 + 60)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda s: s.update(event_id="OTHER"), "for event 'OTHER', not 'E'"),
        (lambda s: s.pop("dispatch_s"), "malformed"),
        (lambda s: s["gpus"]["g0"].update(first_seen="yesterday"), "malformed"),
        (lambda s: s["gpus"]["g0"].update(bogus=1), "malformed"),
    ],
)
def test_resume_refuses_a_kept_state_that_is_not_this_events_and_changes_nothing(mutate, error) -> None:  # type: ignore[no-untyped-def]
    acct = EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS)
    acct.add(Snapshot(T0, 46_000.0, _battery(0.0), (_gpu("g0", "flex1", 500, 500, 900),)), 60.0, {}, {}, {"g0"})
    state = json.loads(json.dumps(acct.state(T0)))
    mutate(state)
    target = EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS)
    with pytest.raises(ValueError, match=error):
        target.resume(state, T0 + timedelta(minutes=1))
    assert target.summary() == EventAccount("E", T0, T0 + timedelta(hours=1), 50_000.0, TIERS).summary()
