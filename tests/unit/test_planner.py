"""The pure planner: battery by policy, GPU caps within tiers at least weighted loss, feasibility."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway import gpumodel, planner
from gateway.model import BatteryState, GpuState

CTX = planner.PlanContext(
    tier_max_loss={"flex0": 0.0, "flex1": 0.10, "flex2": 0.25, "flex3": 0.5},
    cooling_overhead=0.25,
    soc_floor_pct=20.0,
)


def _gpu(i: int, job: str = "training", tier: str = "flex1") -> GpuState:
    nat = gpumodel.job_class(job).natural_w(700.0)
    return GpuState(
        gpu_id=f"g{i}",
        power_w=nat,
        cap_w=700.0,
        min_cap_w=200.0,
        max_cap_w=700.0,
        default_cap_w=700.0,
        job_class=job,
        tier=tier,
    )


def _battery(soc: float = 80.0, max_w: float = 5000.0, cap_wh: float = 20_000.0) -> BatteryState:
    return BatteryState(
        "b",
        soc_pct=soc,
        power_w=0.0,
        setpoint_w=0.0,
        max_discharge_w=max_w,
        max_charge_w=max_w,
        capacity_wh=cap_wh,
    )


def _natural(gpus: tuple[GpuState, ...]) -> dict[str, float]:
    return {g.gpu_id: g.power_w for g in gpus}


def test_battery_covers_small_shed_alone() -> None:
    gpus = (_gpu(0), _gpu(1))
    p = planner.plan(3000.0, _battery(), gpus, _natural(gpus), CTX, remaining_s=3600)
    assert p.battery_w == pytest.approx(3000.0)
    assert all(c == 700.0 for c in p.gpu_caps_w.values())
    assert p.shortfall_w == 0.0


def test_gpus_take_the_rest_after_battery() -> None:
    gpus = tuple(_gpu(i) for i in range(8))
    p = planner.plan(5500.0, _battery(max_w=5000.0), gpus, _natural(gpus), CTX, remaining_s=3600)
    assert p.battery_w == pytest.approx(5000.0)
    assert p.gpu_facility_shed_w >= 500.0 - 1e-6
    assert any(c < 700.0 for c in p.gpu_caps_w.values())


def test_gpus_are_planned_for_what_a_weak_battery_will_not_deliver() -> None:
    """A battery measured to deliver half its setpoint: the GPUs carry the need less what it really gives."""
    gpus = tuple(_gpu(i, tier="flex2") for i in range(16))
    full = planner.plan(3000.0, _battery(max_w=2000.0), gpus, _natural(gpus), CTX, remaining_s=3600)
    half = planner.plan(
        3000.0, _battery(max_w=2000.0), gpus, _natural(gpus), CTX, remaining_s=3600, battery_delivery=0.5
    )
    assert full.battery_w == half.battery_w == pytest.approx(2000.0)  # the setpoint is what it is asked
    assert full.gpu_facility_shed_w == pytest.approx(1000.0, rel=1e-3)
    assert half.battery_shed_w == pytest.approx(1000.0)
    assert half.gpu_facility_shed_w == pytest.approx(2000.0, rel=1e-3)
    assert half.expected_shed_w == pytest.approx(3000.0, rel=1e-3) and half.shortfall_w == pytest.approx(0.0, abs=1)


def test_battery_energy_limits_its_share() -> None:
    # 20 kWh at 80 % with a 20 % floor leaves 12 kWh: over 4 h that is 3 kW, not 5 kW.
    p = planner.plan(5000.0, _battery(), (), {}, CTX, remaining_s=4 * 3600)
    assert p.battery_w == pytest.approx(3000.0)
    assert p.shortfall_w == pytest.approx(2000.0)


def test_battery_at_floor_gives_nothing() -> None:
    p = planner.plan(1000.0, _battery(soc=20.0), (), {}, CTX, remaining_s=600)
    assert p.battery_w == 0.0
    assert p.shortfall_w == pytest.approx(1000.0)


def test_flex0_and_decode_never_capped_below_natural_loss() -> None:
    gpus = (_gpu(0, tier="flex0"), _gpu(1, job="decode", tier="flex3"), _gpu(2, tier="flex2"))
    p = planner.plan(1e6, None, gpus, _natural(gpus), CTX, remaining_s=600)
    assert p.gpu_caps_w["g0"] == 700.0  # no loss allowed
    for g in gpus:
        nat = g.power_w
        beta = gpumodel.job_class(g.job_class).beta
        kept = gpumodel.throughput_fraction_at_cap(p.gpu_caps_w[g.gpu_id], nat, beta)
        assert kept >= 1.0 - CTX.tier_max_loss[g.tier] - 1e-6
        assert g.min_cap_w <= p.gpu_caps_w[g.gpu_id] <= g.max_cap_w


def test_tier_weights_decide_who_sheds_first() -> None:
    gpus = (_gpu(0, tier="flex1"), _gpu(1, tier="flex3"))
    weighted = replace(CTX, tier_weight={"flex1": 10.0, "flex3": 1.0})
    p = planner.plan(150.0, None, gpus, _natural(gpus), weighted, remaining_s=600)
    assert p.gpu_caps_w["g1"] < 700.0
    assert p.gpu_caps_w["g0"] == 700.0
    # With equal weights (the default) identical jobs share the shed: the least total loss.
    even = planner.plan(150.0, None, gpus, _natural(gpus), CTX, remaining_s=600)
    assert even.gpu_caps_w["g0"] == pytest.approx(even.gpu_caps_w["g1"])


@pytest.mark.parametrize("need", [500.0, 1500.0, 3000.0, 6000.0])
def test_deeper_target_sheds_at_least_as_much(need: float) -> None:
    gpus = tuple(_gpu(i, tier=t) for i, t in enumerate(["flex1", "flex2", "flex3"] * 4))
    shallow = planner.plan(need / 2, None, gpus, _natural(gpus), CTX, remaining_s=600)
    deep = planner.plan(need, None, gpus, _natural(gpus), CTX, remaining_s=600)
    assert deep.gpu_facility_shed_w >= shallow.gpu_facility_shed_w


def test_max_shed_matches_plan_at_infinite_need() -> None:
    gpus = tuple(_gpu(i, tier="flex2") for i in range(4))
    most = planner.max_shed_w(_battery(), gpus, _natural(gpus), CTX, duration_s=3600)
    p = planner.plan(1e9, _battery(), gpus, _natural(gpus), CTX, remaining_s=3600)
    assert p.expected_shed_w == pytest.approx(most, rel=1e-6)


def test_allowance_overrides_the_tier_for_this_tick() -> None:
    gpus = tuple(_gpu(i, tier="flex2") for i in range(4))
    full = planner.plan(1e6, None, gpus, _natural(gpus), CTX, remaining_s=600)
    spent = planner.plan(1e6, None, gpus, _natural(gpus), CTX, remaining_s=600, allowance={"g0": 0.0, "g1": 0.05})
    assert spent.gpu_caps_w["g0"] == 700.0
    kept1 = gpumodel.throughput_fraction_at_cap(spent.gpu_caps_w["g1"], gpus[1].power_w, 1.0)
    assert kept1 == pytest.approx(0.95, abs=1e-9)
    assert spent.gpu_facility_shed_w < full.gpu_facility_shed_w


def test_min_cap_fraction_is_respected_by_the_plan() -> None:
    gpus = tuple(_gpu(i, tier="flex3") for i in range(2))
    ctx = replace(CTX, min_cap_fraction=0.8)
    p = planner.plan(1e6, None, gpus, _natural(gpus), ctx, remaining_s=600)
    assert all(c >= 560.0 - 1e-9 for c in p.gpu_caps_w.values())


def test_deepest_policy_keeps_battery_energy_for_the_deeper_interval() -> None:
    # 6 kWh usable, 5 kW max: an hour at 2 kW now, then an hour at 6 kW. Water-filling gives the
    # GPUs the same 1 kW in both hours (battery 1 kW now, 5 kW later); spreading gives 2 kW, then 4 kW.
    batt = _battery(max_w=5000.0, cap_wh=10_000.0)
    gpus = tuple(_gpu(i, tier="flex3") for i in range(40))
    nat = _natural(gpus)
    later = [(3600.0, 6000.0)]
    deep = planner.plan(2000.0, batt, gpus, nat, CTX, remaining_s=7200, horizon=later)
    spread = planner.plan(2000.0, batt, gpus, nat, replace(CTX, battery_policy="spread"), 7200, horizon=later)
    assert deep.battery_w < spread.battery_w
    sched = planner.battery_schedule([(3600.0, 2000.0), (3600.0, 6000.0)], 5000.0, 6000.0, 1e9, "deepest")
    assert sched[0] == pytest.approx(1000.0, abs=1.0) and sched[1] == pytest.approx(5000.0, abs=1.0)
    assert 2000.0 - sched[0] == pytest.approx(6000.0 - sched[1], abs=1.0)
    flat = planner.battery_schedule([(3600.0, 2000.0), (3600.0, 6000.0)], 5000.0, 6000.0, 1e9, "spread")
    assert flat == pytest.approx([2000.0, 4000.0], abs=1.0)


def test_battery_covers_what_the_gpus_cannot_before_anything_else() -> None:
    # GPUs can give 3 kW; the second hour needs 7 kW: 4 kW of it must come from the battery.
    sched = planner.battery_schedule([(3600.0, 2500.0), (3600.0, 7000.0)], 5000.0, 4500.0, 3000.0, "spread")
    assert sched == pytest.approx([500.0, 4000.0], abs=1.0)
    # Not even that much energy: shave the worst shortfall.
    short = planner.battery_schedule([(3600.0, 5000.0), (3600.0, 7000.0)], 5000.0, 3000.0, 3000.0, "deepest")
    assert short[1] > short[0] and sum(short) == pytest.approx(3000.0, abs=1.0)


def test_feasibility_answers_for_the_whole_profile_with_the_shortfall() -> None:
    gpus = tuple(_gpu(i, tier="flex2") for i in range(16))
    nat = _natural(gpus)
    gpu_w = planner.gpu_flex_w(gpus, nat, CTX) * 1.25
    batt = _battery(max_w=5000.0, cap_wh=20_000.0)  # 12 kWh usable
    ok = planner.feasibility([(3600.0, gpu_w + 4000.0)], batt, gpus, nat, CTX)
    assert ok.feasible and ok.shortfall_w == 0.0 and "feasible" in ok.reason(3600)
    # Three hours at +5 kW need 15 kWh: short by 3 kWh, i.e. 1 kW all along.
    no = planner.feasibility([(3 * 3600.0, gpu_w + 5000.0)], batt, gpus, nat, CTX)
    assert not no.feasible
    assert no.shortfall_w == pytest.approx(1000.0, rel=1e-3)
    assert no.shortfall_wh == pytest.approx(3000.0, rel=1e-3)
    assert "shortfall" in no.reason(3 * 3600)
    # A short deep interval is fine when the battery is kept for it.
    peak = planner.feasibility([(3000.0, gpu_w), (600.0, gpu_w + 5000.0)], batt, gpus, nat, CTX)
    assert peak.feasible and peak.required_w == pytest.approx(gpu_w + 5000.0)
