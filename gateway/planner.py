"""Pure planning: split a required facility shed between the battery and per-GPU caps.

No I/O, no clock: every input arrives as a value, so the same functions answer the control
loop ("what now?") and the opt decision ("could we deliver this?").

- The battery sheds at no cost to AI work, so it goes first, within its power limit and the
  energy above its state-of-charge floor (which includes the UPS ride-through reserve). When
  that energy cannot cover the whole event, the policy decides where it goes: ``deepest``
  shaves the deepest intervals (water-filling: the GPUs then carry the same shed in every
  interval, which minimises their total loss because loss is convex in shed), ``spread``
  gives the same power in every interval.
- The GPUs carry the rest, at the least weighted throughput loss (``gateway.allocation``),
  each within its allowance: its tier's loss, or what is left of its budget for the event.
  "The rest" is what the battery will really deliver: a battery measured to give only part of
  its setpoint (``battery_delivery``) leaves the GPUs the residual, not the setpoint's promise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from gateway import allocation, gpumodel
from gateway.model import BatteryState, GpuState

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

BatteryPolicy = Literal["deepest", "spread"]
Horizon = Sequence[tuple[float, float]]  # future intervals after the current one: (duration_s, shed_w)


@dataclass(frozen=True)
class PlanContext:
    """Site constants the planner needs besides the snapshot."""

    tier_max_loss: Mapping[str, float]
    cooling_overhead: float = 0.0
    soc_floor_pct: float = 20.0  # state-of-charge floor including any UPS ride-through reserve
    tier_weight: Mapping[str, float] = field(default_factory=dict)  # value per tier (default 1)
    min_cap_fraction: float = 0.0  # never plan a cap below this fraction of the max cap (limits agree)
    battery_policy: BatteryPolicy = "deepest"


def context_from_config(cfg: GatewayConfig) -> PlanContext:
    """Return the planning context a gateway config describes."""
    return PlanContext(
        tier_max_loss={k: t.max_loss_fraction for k, t in cfg.gpus.tiers.items()},
        cooling_overhead=cfg.site.cooling_overhead,
        soc_floor_pct=cfg.limits.soc_floor_pct + cfg.limits.ups_reserve_pct,
        tier_weight={k: t.weight for k, t in cfg.gpus.tiers.items()},
        min_cap_fraction=cfg.limits.gpu_min_cap_fraction,
        battery_policy=cfg.planning.battery_policy,
    )


@dataclass(frozen=True)
class Plan:
    """The planner's answer: setpoints and the shed each part is expected to deliver."""

    battery_w: float
    gpu_caps_w: dict[str, float] = field(default_factory=dict)
    battery_shed_w: float = 0.0
    gpu_facility_shed_w: float = 0.0
    shortfall_w: float = 0.0
    gpus_capped: int = 0
    weighted_loss: float = 0.0  # sum over GPUs of weight x throughput fraction lost
    throughput_kept_fraction: float = 1.0  # mean over GPUs of the throughput fraction kept
    marginal_loss_per_w: float = 0.0  # lambda: weighted loss per IT watt of the last watt shed
    breach_w: float = 0.0  # IT power (W) feeds in breach draw above their targets: the battery covers it first

    @property
    def expected_shed_w(self) -> float:
        """Return the facility shed (W) this plan expects."""
        return self.battery_shed_w + self.gpu_facility_shed_w


def battery_energy_wh(battery: BatteryState | None, floor_pct: float) -> float:
    """Return the energy (Wh) the battery may still give above its state-of-charge floor."""
    if battery is None or not battery.online:
        return 0.0
    return max(0.0, (battery.soc_pct - floor_pct) / 100.0 * battery.capacity_wh)


def battery_available_w(battery: BatteryState | None, floor_pct: float, remaining_s: float) -> float:
    """Return the discharge (W) the battery can hold for ``remaining_s`` above its SoC floor."""
    if battery is None or not battery.online:
        return 0.0
    energy_limited_w = battery_energy_wh(battery, floor_pct) * 3600.0 / max(remaining_s, 1.0)
    return max(0.0, min(battery.max_discharge_w, energy_limited_w))


def fleet_arrays(
    gpus: Sequence[GpuState],
    natural_w: Mapping[str, float],
    ctx: PlanContext,
    allowance: Mapping[str, float] | None = None,
) -> allocation.FleetArrays:
    """Build the allocation problem: each GPU's model, weight, and clock bounds (tier or allowance)."""
    betas = {name: jc.beta for name, jc in gpumodel.JOB_CLASSES.items()}
    tiers, weights = ctx.tier_max_loss, ctx.tier_weight
    allow = allowance or {}
    ids = [g.gpu_id for g in gpus]
    max_cap = [g.max_cap_w for g in gpus]
    return allocation.build(
        ids,
        natural_w=[natural_w.get(g.gpu_id, g.power_w) for g in gpus],
        beta=[betas.get(g.job_class, 1.0) for g in gpus],
        weight=[weights.get(g.tier, 1.0) for g in gpus],
        max_loss=[allow.get(g.gpu_id, tiers.get(g.tier, 0.0)) for g in gpus],
        min_cap_w=[max(g.min_cap_w, ctx.min_cap_fraction * g.max_cap_w) for g in gpus],
        max_cap_w=max_cap,
    )


def battery_schedule(
    needs: Sequence[tuple[float, float]],
    power_w: float,
    energy_wh: float,
    gpu_max_w: float | Sequence[float],
    policy: BatteryPolicy,
) -> list[float]:
    """Return the battery discharge (W) for each (duration_s, shed_w) interval, within power and energy.

    ``gpu_max_w`` is the most facility shed the GPUs can give per interval (one figure for all, or
    one per interval): what they cannot cover is covered first (shaving the worst shortfalls); the
    rest goes by ``policy``.
    """
    if power_w <= 0 or energy_wh <= 0 or not needs:
        return [0.0] * len(needs)
    energy_j = energy_wh * 3600.0
    dur = np.array([max(d, 0.0) for d, _ in needs])
    need = np.array([max(r, 0.0) for _, r in needs])
    uncovered = np.minimum(np.maximum(need - np.asarray(gpu_max_w, dtype=float), 0.0), power_w)
    cap = np.minimum(need, power_w)
    top = float(need.max()) + power_w
    if float(np.sum(dur * uncovered)) >= energy_j:
        return _spend(lambda g: np.minimum(power_w, np.maximum(uncovered - g, 0.0)), top, dur, energy_j)
    if float(np.sum(dur * cap)) <= energy_j:
        return [float(x) for x in cap]
    if policy == "spread":  # the same power in every interval (less where less is needed)
        return _spend(lambda x: np.minimum(cap, np.maximum(power_w - x, uncovered)), power_w, dur, energy_j)
    # deepest: the GPUs carry the same shed h everywhere; the battery shaves what is above it
    return _spend(lambda h: np.minimum(cap, np.maximum(need - h, uncovered)), top, dur, energy_j)


def _spend(schedule: Callable[[float], Any], top: float, dur: Any, energy_j: float) -> list[float]:
    """Return ``schedule(x)`` for the smallest x in [0, top] (schedule falls with x) within ``energy_j``."""
    lo, hi = 0.0, top
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(np.sum(dur * schedule(mid))) > energy_j:
            lo = mid
        else:
            hi = mid
    return [float(x) for x in schedule(hi)]


def plan(
    required_shed_w: float,
    battery: BatteryState | None,
    gpus: tuple[GpuState, ...],
    natural_w: Mapping[str, float],
    ctx: PlanContext,
    remaining_s: float,
    *,
    allowance: Mapping[str, float] | None = None,
    horizon: Horizon = (),
    battery_delivery: float = 1.0,
    breach_w: float = 0.0,
) -> Plan:
    """Split ``required_shed_w`` of facility power: battery by policy, then GPU caps at least loss.

    ``remaining_s`` is the time left in the event; ``horizon`` lists the intervals after the
    current one as (duration_s, facility shed W); ``allowance`` is each GPU's allowed throughput
    loss now (0..1), default its tier's; ``battery_delivery`` is the share (0..1) of its setpoint
    the battery is measured to deliver: the GPUs are planned for what it will not. ``breach_w`` is
    IT power (W) the GPU side draws above what it was asked (feeds in breach at a DSX site): it
    does not count as GPU flexibility now, so an energy-limited battery covers it before saving
    energy for later intervals (the battery leans harder while the breach lasts).
    """
    need = max(0.0, required_shed_w)
    fleet = fleet_arrays(gpus, natural_w, ctx, allowance)
    k = 1.0 + ctx.cooling_overhead
    gpu_max_w = fleet.max_shed_w() * k
    gpu_now_w = max(0.0, fleet.max_shed_w() - max(0.0, breach_w)) * k  # feeds in breach give less now
    batt = 0.0
    if battery is not None and battery.online and need > 0:
        later = [(d, r) for d, r in horizon if d > 0]
        now_s = max(1.0, remaining_s - sum(d for d, _ in later))
        sched = battery_schedule(
            [(now_s, need), *later],
            battery.max_discharge_w,
            battery_energy_wh(battery, ctx.soc_floor_pct),
            [gpu_now_w] + [gpu_max_w] * len(later),
            ctx.battery_policy,
        )
        batt = min(need, sched[0])
    delivered = batt * min(1.0, max(0.0, battery_delivery))
    alloc = allocation.allocate(fleet, (need - delivered) / k)
    gpu_facility = alloc.shed_w * k
    caps = dict(zip(fleet.ids, alloc.caps_w.tolist(), strict=True))
    kept = fleet.kept(alloc.f)
    return Plan(
        battery_w=batt if battery is not None else 0.0,
        gpu_caps_w=caps,
        battery_shed_w=delivered,
        gpu_facility_shed_w=gpu_facility,
        shortfall_w=max(0.0, need - delivered - gpu_facility),
        gpus_capped=int(np.sum(alloc.caps_w < fleet.max_cap_w - 1e-9)),
        weighted_loss=alloc.weighted_loss,
        throughput_kept_fraction=float(np.mean(kept)) if len(fleet) else 1.0,
        marginal_loss_per_w=alloc.marginal_loss_per_w,
        breach_w=max(0.0, breach_w),
    )


def gpu_flex_w(gpus: tuple[GpuState, ...], natural_w: Mapping[str, float], ctx: PlanContext) -> float:
    """Return the most IT power (W) the GPUs can shed within their tiers."""
    return fleet_arrays(gpus, natural_w, ctx).max_shed_w()


def max_shed_w(
    battery: BatteryState | None,
    gpus: tuple[GpuState, ...],
    natural_w: Mapping[str, float],
    ctx: PlanContext,
    duration_s: float,
) -> float:
    """Return the most facility power (W) the site can shed steadily for ``duration_s``."""
    gpu = gpu_flex_w(gpus, natural_w, ctx) * (1.0 + ctx.cooling_overhead)
    return battery_available_w(battery, ctx.soc_floor_pct, duration_s) + gpu


@dataclass(frozen=True)
class FeasibilityReport:
    """Can the site deliver an event's shed profile, and by how much would it miss."""

    feasible: bool
    required_w: float  # the deepest interval's facility shed
    available_w: float  # what the site can shed in that interval
    shortfall_w: float  # the worst interval's expected shortfall
    shortfall_wh: float  # expected energy missed over the whole event
    gpu_flex_w: float  # facility shed the GPUs can hold within their tiers
    battery_energy_wh: float  # battery energy above its floor

    def reason(self, duration_s: float) -> str:
        """Return a one-line explanation for the opt decision."""
        if self.feasible:
            return (
                f"feasible: need {self.required_w:.0f} W, can shed {self.available_w:.0f} W "
                f"for {duration_s:.0f} s (GPUs {self.gpu_flex_w:.0f} W, battery {self.battery_energy_wh:.0f} Wh)"
            )
        return (
            f"infeasible: need {self.required_w:.0f} W, can shed only {self.available_w:.0f} W "
            f"for {duration_s:.0f} s (shortfall {self.shortfall_w:.0f} W, {self.shortfall_wh:.0f} Wh)"
        )


def feasibility(
    profile: Sequence[tuple[float, float]],
    battery: BatteryState | None,
    gpus: tuple[GpuState, ...],
    natural_w: Mapping[str, float],
    ctx: PlanContext,
) -> FeasibilityReport:
    """Answer "can we deliver this?" for an event given as (duration_s, facility shed W) intervals.

    GPUs are counted at their tiers' steady loss (conservative: a job's budget could let it
    lose more in a short deep interval); the battery covers what they cannot, within its energy.
    """
    prof = [(max(d, 0.0), max(r, 0.0)) for d, r in profile]
    gpu = gpu_flex_w(gpus, natural_w, ctx) * (1.0 + ctx.cooling_overhead)
    energy = battery_energy_wh(battery, ctx.soc_floor_pct)
    power = battery.max_discharge_w if battery is not None and battery.online else 0.0
    residual = [(d, max(0.0, r - gpu)) for d, r in prof]
    sched = battery_schedule(residual, power, energy, 0.0, "deepest")
    short = [res - b for (_, res), b in zip(residual, sched, strict=True)]
    worst = max(range(len(prof)), key=lambda i: (short[i], prof[i][1]), default=None)
    if worst is None:
        return FeasibilityReport(True, 0.0, gpu + min(power, energy * 3600.0), 0.0, 0.0, gpu, energy)
    required = prof[worst][1]
    shortfall = max(0.0, short[worst])
    shortfall_wh = sum(d * max(0.0, s) for (d, _), s in zip(prof, short, strict=True)) / 3600.0
    tol = 1.0 + 1e-6 * required
    steady = min(power, energy * 3600.0 / max(sum(d for d, _ in prof), 1.0))
    return FeasibilityReport(
        feasible=shortfall <= tol,
        required_w=required,
        available_w=required - shortfall if shortfall > tol else max(required, gpu + steady),
        shortfall_w=shortfall if shortfall > tol else 0.0,
        shortfall_wh=shortfall_wh if shortfall > tol else 0.0,
        gpu_flex_w=gpu,
        battery_energy_wh=energy,
    )
