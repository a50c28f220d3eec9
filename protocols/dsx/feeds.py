"""The DSX Flex feeds as a load actuator the planner and dispatcher drive (``gateway.interfaces.LoadFeeds``).

Each configured feed reads as one unit of the fleet (``GpuState``, id ``feed:<tag>``): its power is
the agent's ``calculated_load``, its cap the load constraint the agent enforces (the feed's
``max_w`` when none), its range ``min_w..max_w``, its job class and tier from ``[[dsxflex.feeds]]``.
So the planner's battery-first, value-aware split turns the share the GPUs must shed into one
load constraint per feed, and the dispatcher's leases become DSX leases: every cap is sent as
``set_constraints(..., hold_s=lease_s)`` (the client renews it with a fresh ``end_time`` while
held), a cap back at ``max_w`` and ``release()`` send the null constraint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.errors import DeviceUnavailable, InputRejected
from gateway.interfaces import FeedReport, FeedsStatus
from gateway.model import GpuState
from protocols.dsx.flex_client import DsxFlexClient
from protocols.dsx.flex_state import BreachAlert, Enforcement

PREFIX = "feed:"
RELEASE_WITHIN_W = 1.0  # a cap this close to the feed's max_w releases the feed


@dataclass(frozen=True)
class FeedProfile:
    """What the planner needs to know about one feed besides its limits."""

    tag: str
    job_class: str = "training"
    tier: str = "flex1"


class DsxFeedFleet:
    """The feeds of one DSX Flex Agent, read and constrained through a ``DsxFlexClient``."""

    def __init__(
        self,
        client: DsxFlexClient,
        profiles: Mapping[str, FeedProfile],
        event_id: Callable[[], str | None] = lambda: None,
        min_change_pct: float = 0.0,
    ) -> None:
        """``min_change_pct``: of each feed's max_w, the smallest constraint change worth a new target
        (read() reports it as the unit's ``cap_step_w``; the limits keep the held target below it)."""
        self.client = client
        self._min_change = min_change_pct / 100.0
        self.device_id = client.device_id
        self._limits = {f.tag: f for f in client.settings.feeds}
        self._profiles = dict(profiles)
        self._event_id = event_id  # the event being delivered, for the client's audit rows
        self._alerts = 0
        chained = client.on_breach

        def on_breach(alert: BreachAlert) -> None:
            self._alerts += 1
            if chained is not None:
                chained(alert)

        client.on_breach = on_breach
        self._enforcements = 0
        self._enforced: dict[str, str] = {}  # breach id -> feed, while an infrastructure action is applied
        chained_enf = client.on_enforcement

        def on_enforcement(enf: Enforcement) -> None:
            self._enforcements += 1
            if enf.action == "applied":
                self._enforced[enf.breach_id] = enf.feed
            else:
                self._enforced.pop(enf.breach_id, None)
            if chained_enf is not None:
                chained_enf(enf)

        client.on_enforcement = on_enforcement

    def bind_event(self, event_id: Callable[[], str | None]) -> None:
        """Name the event in force in the client's audit rows from now on."""
        self._event_id = event_id

    @staticmethod
    def unit_id(tag: str) -> str:
        """Return the fleet id of a feed."""
        return PREFIX + tag

    def owns(self, unit_id: str) -> bool:
        """Return whether a fleet id names one of these feeds."""
        return unit_id.startswith(PREFIX) and unit_id[len(PREFIX) :] in self._limits

    async def read(self) -> tuple[GpuState, ...]:
        """Return every feed as the agent last reported it; DeviceUnavailable while the link is down."""
        if not self.client.link_up:
            raise DeviceUnavailable(self.device_id, "no verified status (link down)")
        out = []
        for tag, r in self.client.read().items():
            lim = self._limits[tag]
            if r.load_w is None:
                raise DeviceUnavailable(self.device_id, f"the agent has not reported feed {tag}")
            prof = self._profiles.get(tag, FeedProfile(tag))
            cap = lim.max_w if r.constraint_w is None else min(max(r.constraint_w, lim.min_w), lim.max_w)
            out.append(
                GpuState(
                    gpu_id=self.unit_id(tag),
                    power_w=r.load_w,
                    cap_w=cap,
                    min_cap_w=lim.min_w,
                    max_cap_w=lim.max_w,
                    default_cap_w=lim.max_w,
                    cap_step_w=self._min_change * lim.max_w,
                    job_class=prof.job_class,
                    tier=prof.tier,
                    host=self.device_id,
                )
            )
        return tuple(out)

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Hold each feed at its cap (W) for ``lease_s`` as a load constraint; a cap at max_w releases it.

        Returns the constraint asked of each feed (its max_w for a released one): the agent confirms
        it later in its status, which the client audits (a different constraint is ``fault.readback``).
        """
        constraints: dict[str, float | None] = {}
        for unit, cap in caps_w.items():
            if not self.owns(unit):
                raise InputRejected(f"{self.device_id}: {unit!r} is not a configured feed")
            lim = self._limits[unit[len(PREFIX) :]]
            w = min(max(cap, lim.min_w), lim.max_w)
            constraints[lim.tag] = None if w >= lim.max_w - RELEASE_WITHIN_W else w
        await self.client.set_constraints(constraints, lease_s, event_id=self._event_id())
        return {self.unit_id(t): (self._limits[t].max_w if w is None else w) for t, w in constraints.items()}

    async def release(self) -> None:
        """Send the null constraint for every feed."""
        await self.client.release(event_id=self._event_id())

    def breach_excess_w(self) -> float:
        """Return how much (W) the feeds in an unresolved breach draw above their targets."""
        return sum(max(0.0, b.measured_w - b.target_w) for b in self.client.breaches.values())

    def breaches(self) -> dict[str, str]:
        """Return feed -> severity of every unresolved breach."""
        return {feed: b.severity for feed, b in self.client.breaches.items()}

    def status(self) -> FeedsStatus:
        """Return what metrics show of the feeds now."""
        c = self.client
        reports = {
            t: FeedReport(r.load_w, r.constraint_w, r.requested_w, r.compliant, r.acked) for t, r in c.read().items()
        }
        return FeedsStatus(
            self.device_id,
            c.link_up,
            reports,
            self.breaches(),
            dict(c.refused),
            c.commands_sent,
            c.statuses,
            self._alerts,
            self._enforcements,
            dict(self._enforced),
        )

    @property
    def link_up(self) -> bool:
        """Return whether the agent's status heartbeat is alive."""
        return self.client.link_up
