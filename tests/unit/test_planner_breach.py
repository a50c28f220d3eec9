"""A feed in breach (DSX Flex) makes the planner lean on an energy-limited battery harder now."""

from __future__ import annotations

from gateway import planner
from gateway.model import BatteryState, GpuState


def _battery() -> BatteryState:
    # 10 kW of power but only 2 kWh above the 20 % floor: energy-limited over a one-hour event.
    return BatteryState(
        "bess",
        soc_pct=25.0,
        power_w=0.0,
        setpoint_w=0.0,
        max_discharge_w=10_000.0,
        max_charge_w=10_000.0,
        capacity_wh=40_000.0,
        online=True,
    )


def _feeds() -> tuple[GpuState, ...]:
    # two feeds that can shed 9 kW together within their tier
    return tuple(
        GpuState(f"feed:{t}", 50_000.0, 50_000.0, 1_000.0, 50_000.0, 50_000.0, tier="flex3") for t in ("a", "b")
    )


def test_breach_moves_battery_energy_to_now() -> None:
    ctx = planner.PlanContext(tier_max_loss={"flex3": 0.5}, battery_policy="spread")
    natural = {g.gpu_id: g.power_w for g in _feeds()}
    flex_w = planner.gpu_flex_w(_feeds(), natural, ctx)
    need = flex_w + 1_000.0  # the feeds alone fall 1 kW short in every interval
    kw = {"allowance": None, "horizon": [(3000.0, need)]}
    calm = planner.plan(need, _battery(), _feeds(), natural, ctx, 3600.0, **kw)
    breach = planner.plan(need, _battery(), _feeds(), natural, ctx, 3600.0, breach_w=5_000.0, **kw)
    assert calm.breach_w == 0.0 and breach.breach_w == 5_000.0
    assert calm.battery_w < 2_500.0  # spread: the 2 kWh over the hour
    assert breach.battery_w >= 6_000.0 - 1e-6  # the 5 kW the feeds miss now, and the 1 kW they always miss
    assert planner.plan(need, None, _feeds(), natural, ctx, 3600.0, breach_w=5_000.0).battery_w == 0.0
