"""Safety limits win over any plan."""

from __future__ import annotations

from gateway.config import LimitsConfig
from gateway.limits import limit
from gateway.model import BatteryState, GpuState

GPU = GpuState("g0", power_w=600, cap_w=700, min_cap_w=200, max_cap_w=700, default_cap_w=700)


def _battery(soc: float) -> BatteryState:
    return BatteryState(
        "b", soc_pct=soc, power_w=0, setpoint_w=0, max_discharge_w=5000, max_charge_w=4000, capacity_wh=10_000
    )


def test_battery_clamped_to_device_range() -> None:
    out = limit(9000.0, {}, _battery(80), (), None, {}, LimitsConfig(), 1.0)
    assert out.battery_w == 5000.0
    assert any("device range" in n for n in out.notes)


def test_soc_floor_plus_ups_reserve_stops_discharge() -> None:
    cfg = LimitsConfig(soc_floor_pct=20, ups_reserve_pct=10)
    out = limit(1000.0, {}, _battery(29.9), (), None, {}, cfg, 1.0)
    assert out.battery_w == 0.0
    assert limit(1000.0, {}, _battery(30.1), (), None, {}, cfg, 1.0).battery_w == 1000.0


def test_battery_ramp_rate() -> None:
    cfg = LimitsConfig(battery_ramp_w_per_s=100.0)
    out = limit(3000.0, {}, _battery(80), (), 0.0, {}, cfg, 2.0)
    assert out.battery_w == 200.0


def test_gpu_cap_clamped_to_device_and_min_fraction() -> None:
    cfg = LimitsConfig(gpu_min_cap_fraction=0.5)
    out = limit(None, {"g0": 100.0}, None, (GPU,), None, {}, cfg, 1.0)
    assert out.gpu_caps_w["g0"] == 350.0
    out = limit(None, {"g0": 900.0}, None, (GPU,), None, {}, LimitsConfig(), 1.0)
    assert out.gpu_caps_w["g0"] == 700.0


def test_gpu_ramp_and_unknown_gpu_dropped() -> None:
    cfg = LimitsConfig(gpu_ramp_w_per_s=50.0)
    out = limit(None, {"g0": 300.0, "nope": 300.0}, None, (GPU,), None, {"g0": 700.0}, cfg, 1.0)
    assert out.gpu_caps_w == {"g0": 650.0}
    assert any("unknown GPU nope" in n for n in out.notes)


def test_a_change_below_the_units_step_keeps_what_it_holds() -> None:
    feed = GpuState("f0", power_w=20_000, cap_w=20_000, min_cap_w=10_000, max_cap_w=25_000,
                    default_cap_w=25_000, cap_step_w=125.0)  # fmt: skip
    cfg = LimitsConfig(gpu_ramp_w_per_s=1e9)

    def caps(planned: float, held: float) -> float:
        return limit(None, {"f0": planned}, None, (feed,), None, {"f0": held}, cfg, 1.0).gpu_caps_w["f0"]

    assert caps(20_050.0, 20_000.0) == 20_000.0  # 50 W: not worth a new target
    assert caps(19_900.0, 20_000.0) == 20_000.0
    assert caps(19_800.0, 20_000.0) == 19_800.0  # 200 W: sent
    assert caps(25_000.0, 24_950.0) == 25_000.0  # a release to max_cap_w always goes
    assert caps(10_000.0, 9_950.0) == 10_000.0  # a held value below the minimum is never kept
    plain = GpuState("g", power_w=600, cap_w=600, min_cap_w=200, max_cap_w=700, default_cap_w=700)
    out = limit(None, {"g": 601.0}, None, (plain,), None, {"g": 600.0}, cfg, 1.0)
    assert out.gpu_caps_w["g"] == 601.0  # no step: every change
