"""What the control loop and the planner are told: [site], [control], [limits] and [planning]."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.config.section import _Section


class SiteConfig(_Section):
    name: str = "site"
    non_gpu_it_w: float = Field(20_000.0, ge=0)
    cooling_overhead: float = Field(0.25, ge=0, le=2)


class ControlConfig(_Section):
    # live: the gateway commands the devices. shadow: it hears events, decides and plans every tick,
    # and audits what it would command (kinds shadow.*), but writes to no device (gateway.shadow).
    mode: Literal["live", "shadow"] = "live"
    tick_s: float = Field(1.0, gt=0, le=60)
    lease_s: float = Field(30.0, gt=0, le=3600)
    gain: float = Field(0.6, gt=0, le=1)
    ramp_up_s: float = Field(0.0, ge=0, le=86_400)  # default ramp into an event that names none (ends at start)
    recovery_s: float = Field(0.0, ge=0, le=86_400)  # default ramp back to normal after an event that names none


class LimitsConfig(_Section):
    soc_floor_pct: float = Field(20.0, ge=0, le=100)
    ups_reserve_pct: float = Field(0.0, ge=0, le=100)
    max_shed_w: float = Field(1e12, gt=0)
    battery_ramp_w_per_s: float = Field(1e12, gt=0)
    gpu_ramp_w_per_s: float = Field(1e12, gt=0)
    gpu_min_cap_fraction: float = Field(0.0, ge=0, le=1)
    facility_ramp_w_per_s: float = Field(1e12, gt=0)  # fastest change of the total planned shed


class PlanningConfig(_Section):
    battery_policy: Literal["deepest", "spread"] = "deepest"
    tier_budget: Literal["event", "instant"] = "event"
    tier_burst_factor: float = Field(2.0, ge=1, le=100)
    tier_budget_margin: float = Field(0.02, ge=0, lt=1)
