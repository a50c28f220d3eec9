"""Pure checks that a device reading is physically possible: a device is believed only within physics.

Whatever a driver decoded, a reading that no battery or meter can give (a state of charge
outside 0-100 %, power far beyond the battery's own rating, NaN or infinity, a facility power
outside the site's configured range) is not a value: the control loop treats the device as
unreadable for that tick, plans nothing on it and audits the fault once per transition.
"""

from __future__ import annotations

import math

from gateway.model import BatteryState

RATING_TOLERANCE = 0.10  # a battery may exceed its rated power briefly by this share
RATING_SLACK_W = 100.0  # and by this much at any rating (meter resolution, a small unit)


def battery_fault(b: BatteryState) -> str | None:
    """Return why a battery reading is impossible, or None if it is physically possible."""
    numbers = {
        "soc_pct": b.soc_pct,
        "power_w": b.power_w,
        "setpoint_w": b.setpoint_w,
        "max_discharge_w": b.max_discharge_w,
        "max_charge_w": b.max_charge_w,
        "capacity_wh": b.capacity_wh,
    }
    for name, value in numbers.items():
        if not math.isfinite(value):
            return f"implausible reading: {name} is {value}"
    if not 0.0 <= b.soc_pct <= 100.0:
        return f"implausible reading: state of charge {b.soc_pct:g} % is outside 0-100 %"
    if b.max_discharge_w < 0 or b.max_charge_w < 0:
        return f"implausible reading: negative rating (discharge {b.max_discharge_w:g} W, charge {b.max_charge_w:g} W)"
    if b.capacity_wh <= 0:
        return f"implausible reading: capacity {b.capacity_wh:g} Wh"
    # Symmetric: a guard (a UPS) may lower the discharge limit while the battery still delivers.
    rated_w = max(b.max_discharge_w, b.max_charge_w)
    most_w = rated_w * (1.0 + RATING_TOLERANCE) + RATING_SLACK_W
    if abs(b.power_w) > most_w:
        return f"implausible reading: power {b.power_w:g} W beyond the battery's rating {rated_w:g} W"
    return None


def facility_fault(facility_w: float, min_w: float | None, max_w: float | None) -> str | None:
    """Return why a facility power reading (W) is impossible for the site, or None if it is possible."""
    if not math.isfinite(facility_w):
        return f"implausible reading: facility power is {facility_w}"
    if min_w is not None and facility_w < min_w:
        return f"implausible reading: facility power {facility_w:g} W below the site's possible {min_w:g} W"
    if max_w is not None and facility_w > max_w:
        return f"implausible reading: facility power {facility_w:g} W above the site's possible {max_w:g} W"
    return None
