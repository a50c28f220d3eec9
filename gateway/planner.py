"""Pure planning: split a required facility shed between the battery and per-GPU caps.

No I/O, no clock: every input arrives as a value, so the same function answers the
control loop ("what now?") and the opt decision ("could we deliver this?").
Battery first (within its state-of-charge floor and energy over the event), then GPU
caps chosen greedily by the least weighted throughput lost per watt shed, never past a
job's flexibility tier.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway import gpumodel
from gateway.model import BatteryState, GpuState

CAP_STEPS = 16  # cap levels tried per GPU between its natural draw and its tier's lowest cap


@dataclass(frozen=True)
class PlanContext:
    """Site constants the planner needs besides the snapshot."""

    tier_max_loss: Mapping[str, float]
    cooling_overhead: float = 0.0
    soc_floor_pct: float = 20.0  # state-of-charge floor including any UPS ride-through reserve


@dataclass(frozen=True)
class Plan:
    """The planner's answer: setpoints and the shed each part is expected to deliver."""

    battery_w: float
    gpu_caps_w: dict[str, float] = field(default_factory=dict)
    battery_shed_w: float = 0.0
    gpu_facility_shed_w: float = 0.0
    shortfall_w: float = 0.0

    @property
    def expected_shed_w(self) -> float:
        """Return the facility shed (W) this plan expects."""
        return self.battery_shed_w + self.gpu_facility_shed_w


def battery_available_w(battery: BatteryState | None, floor_pct: float, remaining_s: float) -> float:
    """Return the discharge (W) the battery can hold for ``remaining_s`` above its SoC floor."""
    if battery is None or not battery.online:
        return 0.0
    usable_wh = max(0.0, (battery.soc_pct - floor_pct) / 100.0 * battery.capacity_wh)
    energy_limited_w = usable_wh * 3600.0 / max(remaining_s, 1.0)
    return max(0.0, min(battery.max_discharge_w, energy_limited_w))


def _tier_floor_cap(gpu: GpuState, natural_w: float, max_loss: float) -> float:
    """Return the lowest cap (W) that keeps this GPU's job within its tier."""
    beta = gpumodel.job_class(gpu.job_class).beta
    floor = gpumodel.cap_for_throughput(1.0 - max_loss, natural_w, beta) if max_loss < 1 else gpu.min_cap_w
    return min(max(floor, gpu.min_cap_w), gpu.max_cap_w)


def gpu_flex_w(gpus: tuple[GpuState, ...], natural_w: Mapping[str, float], ctx: PlanContext) -> float:
    """Return the most IT power (W) the GPUs can shed within their tiers."""
    total = 0.0
    for g in gpus:
        nat = natural_w.get(g.gpu_id, g.power_w)
        floor = _tier_floor_cap(g, nat, ctx.tier_max_loss.get(g.tier, 0.0))
        total += max(0.0, nat - gpumodel.power_at_cap(floor, nat))
    return total


def allocate_gpu_caps(
    gpus: tuple[GpuState, ...],
    natural_w: Mapping[str, float],
    ctx: PlanContext,
    shed_it_w: float,
) -> tuple[dict[str, float], float]:
    """Choose caps shedding ``shed_it_w`` of IT power at least weighted loss; return (caps, shed)."""
    caps = {g.gpu_id: g.max_cap_w for g in gpus}
    if shed_it_w <= 0 or not gpus:
        return caps, 0.0
    heap: list[tuple[float, int, int]] = []
    ladders: list[list[tuple[float, float, float]]] = []  # per GPU: (cap, shed_w, loss)
    for i, g in enumerate(gpus):
        nat = natural_w.get(g.gpu_id, g.power_w)
        max_loss = ctx.tier_max_loss.get(g.tier, 0.0)
        beta = gpumodel.job_class(g.job_class).beta
        floor = _tier_floor_cap(g, nat, max_loss)
        top = min(nat, g.max_cap_w)
        ladder: list[tuple[float, float, float]] = [(g.max_cap_w, 0.0, 0.0)]
        if top > floor:
            weight = 1.0 / max(max_loss, 1e-3)  # less flexible jobs pay more per unit lost
            for k in range(1, CAP_STEPS + 1):
                cap = top - (top - floor) * k / CAP_STEPS
                shed = nat - gpumodel.power_at_cap(cap, nat)
                loss = weight * (1.0 - gpumodel.throughput_fraction_at_cap(cap, nat, beta))
                ladder.append((cap, shed, loss))
        ladders.append(ladder)
        _push_next(heap, ladders, i, 0)
    pos = [0] * len(gpus)
    shed = 0.0
    while heap and shed < shed_it_w:
        _, i, k = heapq.heappop(heap)
        if k != pos[i] + 1:
            continue
        shed += ladders[i][k][1] - ladders[i][pos[i]][1]
        pos[i] = k
        caps[gpus[i].gpu_id] = ladders[i][k][0]
        _push_next(heap, ladders, i, k)
    return caps, shed


def _push_next(
    heap: list[tuple[float, int, int]], ladders: list[list[tuple[float, float, float]]], i: int, k: int
) -> None:
    """Push GPU ``i``'s next ladder step with its marginal loss per watt."""
    ladder = ladders[i]
    if k + 1 >= len(ladder):
        return
    d_shed = ladder[k + 1][1] - ladder[k][1]
    d_loss = ladder[k + 1][2] - ladder[k][2]
    cost = d_loss / d_shed if d_shed > 1e-9 else float("inf")
    heapq.heappush(heap, (cost, i, k + 1))


def plan(
    required_shed_w: float,
    battery: BatteryState | None,
    gpus: tuple[GpuState, ...],
    natural_w: Mapping[str, float],
    ctx: PlanContext,
    remaining_s: float,
) -> Plan:
    """Split ``required_shed_w`` of facility power: battery first, then GPU caps."""
    need = max(0.0, required_shed_w)
    batt = min(need, battery_available_w(battery, ctx.soc_floor_pct, remaining_s))
    rest_facility = need - batt
    it_needed = rest_facility / (1.0 + ctx.cooling_overhead)
    caps, it_shed = allocate_gpu_caps(gpus, natural_w, ctx, it_needed)
    gpu_facility = it_shed * (1.0 + ctx.cooling_overhead)
    shortfall = max(0.0, need - batt - gpu_facility)
    return Plan(
        battery_w=batt if battery is not None else 0.0,
        gpu_caps_w=caps,
        battery_shed_w=batt,
        gpu_facility_shed_w=gpu_facility,
        shortfall_w=shortfall,
    )


def max_shed_w(
    battery: BatteryState | None,
    gpus: tuple[GpuState, ...],
    natural_w: Mapping[str, float],
    ctx: PlanContext,
    duration_s: float,
) -> float:
    """Return the most facility power (W) the site can shed for ``duration_s``."""
    return battery_available_w(battery, ctx.soc_floor_pct, duration_s) + gpu_flex_w(gpus, natural_w, ctx) * (
        1.0 + ctx.cooling_overhead
    )
