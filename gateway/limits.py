"""Pure safety limits, applied after planning to every setpoint, whoever asked.

An ordered chain: device limits, state-of-charge floor and UPS reserve, the most any
event may shed, then ramp rates. Each clamp that changes a value is reported, so the
audit log shows what the limits overrode and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config import LimitsConfig
from gateway.model import BatteryState, GpuState


@dataclass(frozen=True)
class Limited:
    """Setpoints after the safety limits, with a note for each clamp applied."""

    battery_w: float | None
    gpu_caps_w: dict[str, float]
    notes: tuple[str, ...] = field(default_factory=tuple)


def limit(
    battery_w: float | None,
    gpu_caps_w: Mapping[str, float],
    battery: BatteryState | None,
    gpus: tuple[GpuState, ...],
    prev_battery_w: float | None,
    prev_caps_w: Mapping[str, float],
    cfg: LimitsConfig,
    dt_s: float,
) -> Limited:
    """Clamp planned setpoints to device limits, SoC floor, max shed and ramp rates."""
    notes: list[str] = []
    b = battery_w
    if b is not None and battery is not None:
        hi, lo = battery.max_discharge_w, -battery.max_charge_w
        if b > hi or b < lo:
            notes.append(f"battery {b:.0f} W clamped to device range [{lo:.0f}, {hi:.0f}]")
            b = min(hi, max(lo, b))
        floor = cfg.soc_floor_pct + cfg.ups_reserve_pct
        if b > 0 and battery.soc_pct <= floor:
            notes.append(f"battery discharge stopped: SoC {battery.soc_pct:.1f} % at floor {floor:.1f} %")
            b = 0.0
        if b > cfg.max_shed_w:
            notes.append(f"battery {b:.0f} W clamped to max shed {cfg.max_shed_w:.0f} W")
            b = cfg.max_shed_w
        prev = prev_battery_w if prev_battery_w is not None else battery.setpoint_w
        step = cfg.battery_ramp_w_per_s * max(dt_s, 0.0)
        if abs(b - prev) > step:
            b = prev + step if b > prev else prev - step
            notes.append(f"battery ramp-limited to {b:.0f} W")
    elif b is not None and battery is None:
        notes.append("battery setpoint dropped: battery unavailable")
        b = None

    caps: dict[str, float] = {}
    by_id = {g.gpu_id: g for g in gpus}
    ramp = cfg.gpu_ramp_w_per_s * max(dt_s, 0.0)
    for gpu_id, cap in gpu_caps_w.items():
        g = by_id.get(gpu_id)
        if g is None:
            notes.append(f"cap for unknown GPU {gpu_id} dropped")
            continue
        lo = max(g.min_cap_w, cfg.gpu_min_cap_fraction * g.max_cap_w)
        c = min(g.max_cap_w, max(lo, cap))
        if c != cap:
            notes.append(f"{gpu_id} cap {cap:.0f} W clamped to [{lo:.0f}, {g.max_cap_w:.0f}]")
        prev_cap = prev_caps_w.get(gpu_id, g.cap_w)
        if abs(c - prev_cap) > ramp:
            c = prev_cap - ramp if c < prev_cap else prev_cap + ramp
        if g.cap_step_w > 0 and abs(c - prev_cap) < g.cap_step_w and c < g.max_cap_w and lo <= prev_cap:
            c = prev_cap  # below the unit's step: keep what it holds (a release to max_cap_w always goes)
        caps[gpu_id] = c
    return Limited(battery_w=b, gpu_caps_w=caps, notes=tuple(notes))
