"""A device is believed only within physics: which battery and facility readings are impossible, and why."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from gateway.model import BatteryState
from gateway.plausible import battery_fault, facility_fault

GOOD = BatteryState("b", 55.0, 2900.0, 3000.0, 3000.0, 3000.0, 40_000.0)


def test_a_possible_battery_reading_passes() -> None:
    assert battery_fault(GOOD) is None
    assert battery_fault(replace(GOOD, soc_pct=0.0, power_w=-3000.0)) is None
    assert battery_fault(replace(GOOD, soc_pct=100.0, power_w=3300.0)) is None  # briefly above its rating
    # A guard (a UPS) lowers the discharge limit to 0 while the battery still delivers: not impossible.
    assert battery_fault(replace(GOOD, max_discharge_w=0.0)) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"soc_pct": 6553.5}, "state of charge 6553.5 % is outside 0-100 %"),
        ({"soc_pct": -0.1}, "outside 0-100 %"),
        ({"soc_pct": math.nan}, "soc_pct is nan"),
        ({"power_w": math.inf}, "power_w is inf"),
        ({"setpoint_w": -math.inf}, "setpoint_w is -inf"),
        ({"power_w": 2_147_483_647.0}, "beyond the battery's rating 3000 W"),
        ({"power_w": -4000.0}, "beyond the battery's rating"),
        ({"max_charge_w": -1.0}, "negative rating"),
        ({"capacity_wh": 0.0}, "capacity 0 Wh"),
    ],
)
def test_an_impossible_battery_reading_is_named(changes: dict[str, float], reason: str) -> None:
    fault = battery_fault(replace(GOOD, **changes))
    assert fault is not None and fault.startswith("implausible reading") and reason in fault


@pytest.mark.parametrize(
    ("facility_w", "min_w", "max_w", "reason"),
    [
        (math.nan, None, None, "facility power is nan"),
        (-math.inf, None, None, "is -inf"),
        (-50_000.0, -5_000.0, None, "below the site's possible -5000 W"),
        (1e9, None, 2e8, "above the site's possible 2e+08 W"),
    ],
)
def test_an_impossible_facility_reading_is_named(
    facility_w: float, min_w: float | None, max_w: float | None, reason: str
) -> None:
    fault = facility_fault(facility_w, min_w, max_w)
    assert fault is not None and reason in fault


def test_a_possible_facility_reading_passes() -> None:
    assert facility_fault(-1000.0, None, None) is None  # export, where the site does not say it cannot
    assert facility_fault(-1000.0, -5000.0, 2e8) is None
    assert facility_fault(2e8, -5000.0, 2e8) is None
