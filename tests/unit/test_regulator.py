"""The regulator's arithmetic, pure: observer, ramps, the facility ramp on the planned shed, release."""

from __future__ import annotations

import pytest

from gateway.control.regulator import (
    Regulation,
    Tuning,
    learn_delivery,
    observe_bias,
    ramp_toward,
    regulate,
    released,
    shed_step,
)
from gateway.model import BatteryState

TUNING = Tuning(gain=0.5, max_shed_w=50_000.0, facility_ramp_w_per_s=1_000.0)


def _battery(power_w: float, setpoint_w: float) -> BatteryState:
    return BatteryState("bess1", 80.0, power_w, setpoint_w, 8000.0, 8000.0, 40_000.0)


def test_the_observer_learns_what_the_model_misses_and_stays_bounded() -> None:
    # Baseline 100 kW, 10 kW shed applied: the model predicts 90 kW; the meter shows 92 kW.
    assert observe_bias(0.0, 92_000.0, 100_000.0, 10_000.0, 0.5) == pytest.approx(1_000.0)
    bias = 0.0
    for _ in range(40):  # repeated, it converges on the 2 kW the model misses, without overshoot
        bias = observe_bias(bias, 92_000.0, 100_000.0, 10_000.0, 0.5)
        assert bias <= 2_000.0 + 1e-6
    assert bias == pytest.approx(2_000.0)
    assert observe_bias(0.0, 1e9, 100_000.0, 0.0, 1.0) == 100_000.0  # never beyond the baseline


def test_the_ramp_moves_at_its_rates_both_ways() -> None:
    assert ramp_toward(0.0, 1.0, 5.0, 50.0, 100.0) == pytest.approx(0.1)
    assert ramp_toward(1.0, 0.0, 5.0, 50.0, 100.0) == pytest.approx(0.95)
    assert ramp_toward(0.0, 1.0, 5.0, 0.0, 0.0) == 1.0  # no ramp: a step
    assert ramp_toward(0.4, 0.5, 5.0, 10.0, 10.0) == pytest.approx(0.5)  # never past the goal


def test_the_planned_shed_moves_at_most_the_facility_ramp_and_never_past_the_limit() -> None:
    assert shed_step(0.0, 1.0, 20_000.0, 0.0, 5.0, TUNING) == pytest.approx(5_000.0)
    assert shed_step(18_000.0, 1.0, 20_000.0, 500.0, 5.0, TUNING) == pytest.approx(20_500.0)
    assert shed_step(0.0, 1.0, 90_000.0, 0.0, 1e6, TUNING) == TUNING.max_shed_w
    assert shed_step(3_000.0, 0.0, 20_000.0, 0.0, 5.0, TUNING) == 0.0


def test_the_battery_delivery_is_learnt_only_while_it_discharges() -> None:
    assert learn_delivery(1.0, _battery(50.0, 60.0), 0.5) == 1.0  # too small a setpoint to learn from
    assert learn_delivery(1.0, _battery(4_000.0, 8_000.0), 0.5) == pytest.approx(0.75)


def test_a_tick_ramps_in_and_a_recovery_releases_at_the_end() -> None:
    state = Regulation(limit_full_w=80_000.0, limit_w=100_000.0)
    state = regulate(
        state, TUNING, goal=1.0, dt_s=5.0, baseline_w=100_000.0, facility_w=100_000.0, applied_shed_w=0.0,
        battery=None, ramp_s=(20.0, 20.0),
    )  # fmt: skip
    assert state.frac == pytest.approx(0.25) and state.limit_w == pytest.approx(95_000.0)
    assert state.required_shed_w == pytest.approx(5_000.0)  # 25 % of 20 kW
    resumed = regulate(
        Regulation(limit_full_w=80_000.0), TUNING, goal=1.0, dt_s=5.0, baseline_w=100_000.0, facility_w=None,
        applied_shed_w=0.0, battery=None, ramp_s=(20.0, 20.0), resume_at_goal=True,
    )  # fmt: skip
    assert resumed.frac == 1.0 and resumed.required_shed_w == pytest.approx(20_000.0)  # no new ramp
    assert not released(resumed, "recovery")
    done = Regulation(frac=0.0, required_shed_w=0.5)
    assert released(done, "recovery") and not released(done, "active")
