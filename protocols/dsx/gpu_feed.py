"""A simulated feed whose load is simulated GPUs: what the DSX Flex Agent simulator stands in front of.

``GpuFeedLoad`` implements the agent simulator's ``FeedLoad``: the feed draws its GPUs (a
``SimGpuFleet``, the DVFS model) plus a fixed non-GPU load. Steering it toward a goal moves a
budget linearly at ``ramp_w_per_s`` (the DPS/BMC side of a real agent ramps too) and, at every
reading, water-fills equal power caps over its GPUs so that they draw the budget; the GPUs then
settle as simulated GPUs do. So a load constraint changes what the GPUs draw, and a meter that
reads the site model sees it. Its floor is the feed with every GPU at its minimum cap.
"""

from __future__ import annotations

from gateway import gpumodel
from gateway.clock import Clock
from gateway.model import GpuState
from gateway.simulation.gpus import SimGpuFleet
from protocols.dsx.agent_sim import RampFeed

CAP_LEASE_S = 1e9  # the feed holds its GPUs' caps itself: no lease lapse in between


class GpuFeedLoad:
    """A feed load made of simulated GPUs plus ``other_w`` of non-GPU load (W)."""

    def __init__(self, gpus: SimGpuFleet, other_w: float, ramp_w_per_s: float, clock: Clock) -> None:
        self.gpus = gpus
        self.other_w = other_w
        states = gpus.states()
        self._natural = gpus.natural_w()
        self._limits = {g.gpu_id: (g.min_cap_w, g.max_cap_w) for g in states}
        self.demand_w = other_w + sum(self._natural.values())
        self.floor_w = other_w + sum(gpumodel.power_at_cap(lo, self._natural[g]) for g, (lo, _) in self._limits.items())
        self._ramp = RampFeed(self.demand_w, self.floor_w, ramp_w_per_s, clock)
        self._budget_w: float | None = None  # the GPU budget the caps were last set for
        self.rogue = False  # jobs that ignore power management: steering leaves the feed at its demand

    def load_w(self) -> float:
        """Return the feed's load now (W), moving the GPU caps along the ramp first."""
        budget = self._ramp.load_w() - self.other_w
        if self._budget_w is None or abs(budget - self._budget_w) > 1e-6:
            self._budget_w = budget
            self.gpus.set_caps_now(self._caps_for(budget), CAP_LEASE_S)
        return self.other_w + self.gpus.total_power_w()

    def steer(self, goal_w: float) -> None:
        """Start moving the feed toward ``goal_w`` (W); a rogue feed moves back to its demand instead."""
        self._ramp.steer(self.demand_w if self.rogue else min(max(goal_w, self.floor_w), self.demand_w))

    def states(self) -> tuple[GpuState, ...]:
        """Return the GPUs behind the feed."""
        return self.gpus.states()

    def _caps_for(self, budget_w: float) -> dict[str, float]:
        """Return equal caps (each within its GPU's range) under which the GPUs draw ``budget_w``."""
        lo = min(low for low, _ in self._limits.values())
        hi = max(high for _, high in self._limits.values())

        def drawn(level: float) -> float:
            return sum(
                gpumodel.power_at_cap(min(max(level, a), b), self._natural[g]) for g, (a, b) in self._limits.items()
            )

        if drawn(hi) <= budget_w:
            level = hi
        else:
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if drawn(mid) < budget_w else (lo, mid)
            level = lo
        return {g: min(max(level, a), b) for g, (a, b) in self._limits.items()}
