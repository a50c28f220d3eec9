"""Can the site deliver an event? A pure estimate from the latest site view, for the opt decision.

The event book is given a ``FeasibilityFn`` when it is built; ``site_feasibility`` makes one that
reads the site view the control loop publishes (``gateway.status.StatusBoard``), so the book never
reaches into the loop and the loop never into the book.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway import directive, planner
from gateway.config import GatewayConfig
from gateway.model import DemandEvent
from gateway.status import SiteView


@dataclass(frozen=True)
class Feasibility:
    """Whether the site can deliver a shed (W) for a duration, and the expected shortfall."""

    feasible: bool
    required_w: float
    available_w: float
    reason: str

    @property
    def shortfall_w(self) -> float:
        """Return how many watts the site is expected to miss by (0 when feasible)."""
        return max(0.0, self.required_w - self.available_w)


FeasibilityFn = Callable[[DemandEvent], Feasibility]


def estimate(
    ev: DemandEvent,
    site: SiteView | None,
    cfg: GatewayConfig,
    ctx: planner.PlanContext,
    offered_w: float = 0.0,
) -> Feasibility:
    """Estimate whether the site can deliver ``ev`` for its whole length; ``offered_w``: what the BMS offers (W)."""
    snap = site.snapshot if site is not None else None
    baseline = site.baseline_w if site is not None else None
    base = baseline or (snap.facility_w if snap and snap.facility_w else 0.0)
    prof = [(p.duration_s, directive.shed_w(p.ask, base)) for p in directive.pieces(ev, cfg.openadr)]
    required = max((shed for _, shed in prof), default=0.0)
    if site is None or snap is None:
        return Feasibility(True, required, float("nan"), "no site snapshot yet: opting in")
    rep = planner.feasibility(prof, snap.battery, snap.gpus, site.natural_w, ctx)
    max_shed_w = cfg.limits.max_shed_w
    if not rep.feasible and offered_w > 0 and rep.shortfall_w <= offered_w:
        # The BMS offers flexibility of its own (cooling setback, backup generation): it covers
        # the shortfall, and the meter loop sees its effect like any other disturbance.
        return Feasibility(
            required <= max_shed_w,
            required,
            rep.available_w + offered_w,
            f"feasible with the BMS: need {required:.0f} W, the site can shed {rep.available_w:.0f} W "
            f"and the BMS offers {offered_w:.0f} W",
        )
    if rep.feasible and required > max_shed_w:
        return Feasibility(
            False,
            required,
            max_shed_w,
            f"infeasible: need {required:.0f} W, limits.max_shed_w allows {max_shed_w:.0f} W "
            f"(shortfall {required - max_shed_w:.0f} W)",
        )
    return Feasibility(rep.feasible, rep.required_w, rep.available_w, rep.reason(ev.duration_s))


def site_feasibility(
    cfg: GatewayConfig,
    site: Callable[[], SiteView | None],
    offered_w: Callable[[], float | None] = lambda: None,
) -> FeasibilityFn:
    """Return the book's feasibility function: ``estimate`` on the latest site view and the BMS's offer."""
    ctx = planner.context_from_config(cfg)

    def feasibility(ev: DemandEvent) -> Feasibility:
        return estimate(ev, site(), cfg, ctx, offered_w() or 0.0)

    return feasibility
