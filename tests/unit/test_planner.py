"""The pure planner: battery first, GPU caps within tiers, least weighted loss."""

from __future__ import annotations

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


def test_more_flexible_jobs_shed_first() -> None:
    gpus = (_gpu(0, tier="flex1"), _gpu(1, tier="flex3"))
    p = planner.plan(150.0, None, gpus, _natural(gpus), CTX, remaining_s=600)
    assert p.gpu_caps_w["g1"] < 700.0
    assert p.gpu_caps_w["g0"] == 700.0


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
