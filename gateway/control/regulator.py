"""The regulator: the arithmetic of one control step, pure (no I/O, no clock, no devices).

Closed loop on the facility meter: the planner's model gives the feedforward (baseline minus
target), and a disturbance observer learns what the model misses (cooling, CPU load, a natural
draw that drifted, a device that dropped out) by comparing the meter with what the model predicts
for the setpoints really in force. Because the observer compares against the applied (ramp- and
limit-clamped) setpoints, it does not wind up while a ramp holds the plant back, and with a gain
in (0, 1] it converges without overshoot when the model is right.

Reductions and recoveries are ramps, never cliffs: a ramp fraction (0..1) of the event's
reduction moves at the event's (or config's) ramp-up and recovery rates, and the total planned
shed moves at most ``limits.facility_ramp_w_per_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.config import GatewayConfig
from gateway.model import BatteryState

RELEASE_BELOW_W = 1.0  # a recovery is done when the planned shed is below this
DELIVERY_MIN_W = 100.0  # below this discharge setpoint the battery's delivery is not measured


@dataclass(frozen=True)
class Tuning:
    """The regulator's settings: observer gain, the most shed allowed (W), and the facility ramp (W/s)."""

    gain: float
    max_shed_w: float
    facility_ramp_w_per_s: float

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> Tuning:
        """Return the tuning a gateway config gives."""
        return cls(cfg.control.gain, cfg.limits.max_shed_w, cfg.limits.facility_ramp_w_per_s)


@dataclass(frozen=True)
class Regulation:
    """The regulator's state from one tick to the next, for the event under control."""

    frac: float = 0.0  # share of the event's reduction asked now (ramps)
    bias_w: float = 0.0  # observer: facility power the model misses (W)
    required_shed_w: float = 0.0  # facility shed (W) planned this tick
    limit_w: float | None = None  # facility power the event allows now, ramped (W)
    limit_full_w: float | None = None  # facility power the event allows once fully ramped in (W)
    delivery: float = 1.0  # share of its discharge setpoint the battery really delivers (measured)


def observe_bias(bias_w: float, facility_w: float, baseline_w: float, applied_shed_w: float, gain: float) -> float:
    """Return the observer's new bias (W): move it by ``gain`` toward what the meter shows the model misses."""
    predicted = baseline_w + bias_w - applied_shed_w
    bias = bias_w + gain * (facility_w - predicted)
    return min(max(bias, -baseline_w), baseline_w)


def ramp_toward(frac: float, goal: float, dt_s: float, up_s: float, down_s: float) -> float:
    """Return the ramp fraction moved toward ``goal`` for ``dt_s``, at most 1/up_s up and 1/down_s down per s."""
    rise = dt_s / up_s if up_s > 0 else 1.0
    fall = dt_s / down_s if down_s > 0 else 1.0
    return min(1.0, max(0.0, frac + min(max(goal - frac, -fall), rise)))


def shed_step(prev_w: float, frac: float, nominal_w: float, bias_w: float, dt_s: float, tuning: Tuning) -> float:
    """Return the facility shed (W) to plan: the ramped reduction plus the bias, moved at most the facility ramp."""
    raw = min(max(frac * (nominal_w + bias_w), 0.0), tuning.max_shed_w)
    step = tuning.facility_ramp_w_per_s * max(dt_s, 0.0)
    return max(0.0, prev_w + min(max(raw - prev_w, -step), step))


def learn_delivery(delivery: float, battery: BatteryState, gain: float) -> float:
    """Return the battery's delivery share moved toward what this reading shows (a weak, derated or lying unit)."""
    if battery.setpoint_w < DELIVERY_MIN_W:
        return delivery  # no discharge asked: nothing to learn
    seen = min(1.0, max(0.0, battery.power_w / battery.setpoint_w))
    return delivery + gain * (seen - delivery)


def regulate(
    state: Regulation,
    tuning: Tuning,
    *,
    goal: float,
    dt_s: float,
    baseline_w: float,
    facility_w: float | None,
    applied_shed_w: float,
    battery: BatteryState | None,
    ramp_s: tuple[float, float],
    resume_at_goal: bool = False,
) -> Regulation:
    """Return the state after one tick: delivery and bias learnt, ramp moved toward ``goal``, shed and limit planned.

    ``state.limit_full_w`` must hold the event's full limit (W). ``resume_at_goal``: a restart
    found the devices holding the event's shed, so the ramp starts at ``goal``, not from nothing.
    """
    base = baseline_w
    full = state.limit_full_w if state.limit_full_w is not None else base
    delivery = learn_delivery(state.delivery, battery, tuning.gain) if battery is not None else state.delivery
    bias = state.bias_w
    if facility_w is not None:
        bias = observe_bias(bias, facility_w, base, applied_shed_w, tuning.gain)
    nominal = max(0.0, base - full)
    frac, required = state.frac, state.required_shed_w
    if resume_at_goal:
        frac, required = goal, min(goal * nominal, tuning.max_shed_w)
    frac = ramp_toward(frac, goal, dt_s, *ramp_s)
    required = shed_step(required, frac, nominal, bias, dt_s, tuning)
    return replace(
        state, frac=frac, bias_w=bias, required_shed_w=required, limit_w=base - frac * nominal, delivery=delivery
    )


def released(state: Regulation, phase: str) -> bool:
    """Return whether a recovery is done: nothing asked and the planned shed ramped down to (almost) nothing."""
    return phase == "recovery" and state.frac <= 0.0 and state.required_shed_w < RELEASE_BELOW_W
