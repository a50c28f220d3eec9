"""Load actuators beside the GPU fleet: a GPU fleet and a site's power feeds planned and dispatched as one.

``CombinedFleet`` presents the GPUs and the feeds (``LoadFeeds``: the DSX Flex Agent's) as one
``GpuFleet``, so the planner splits the GPUs' share of a shed over GPU caps and feed constraints
by value, and the dispatcher writes, leases and releases both. ``feeds_of`` finds the feeds in a
fleet, for the breach lean (``breach_excess_w``) and metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from gateway.interfaces import GpuFleet, LoadFeeds
from gateway.model import GpuState


@runtime_checkable
class ReportsLapses(Protocol):
    """A fleet whose node agents restore default caps on their own when a lease lapses (NATS)."""

    def take_lease_lapses(self) -> Sequence[Any]:
        """Return (and forget) the lapses seen since the last call."""
        ...


class CombinedFleet:
    """A GPU fleet and the site's feeds as one fleet; a read fails when either part's read fails."""

    def __init__(self, gpus: GpuFleet, feeds: LoadFeeds) -> None:
        self.gpus = gpus
        self.feeds = feeds

    async def read(self) -> tuple[GpuState, ...]:
        """Return the GPUs and the feeds, read concurrently."""
        g, f = await asyncio.gather(self.gpus.read(), self.feeds.read())
        return g + f

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Send the feeds' share to the feeds and the rest to the GPUs, concurrently; return both read-backs."""
        feed_caps = {u: c for u, c in caps_w.items() if self.feeds.owns(u)}
        gpu_caps = {u: c for u, c in caps_w.items() if u not in feed_caps}
        if not gpu_caps and not feed_caps:
            return {}
        jobs = []
        if gpu_caps:
            jobs.append(self.gpus.set_caps(gpu_caps, lease_s))
        if feed_caps:
            jobs.append(self.feeds.set_caps(feed_caps, lease_s))
        out: dict[str, float] = {}
        for part in await asyncio.gather(*jobs):
            out.update(part)
        return out

    async def release(self) -> None:
        """Release both parts; the first failure is raised after both were tried."""
        results = await asyncio.gather(self.gpus.release(), self.feeds.release(), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def take_lease_lapses(self) -> list[Any]:
        """Pass on the GPU fleet's lapsed leases (node agents), if it reports any."""
        return list(self.gpus.take_lease_lapses()) if isinstance(self.gpus, ReportsLapses) else []


def feeds_of(fleet: GpuFleet | None) -> LoadFeeds | None:
    """Return the power feeds a fleet drives (itself, or the feeds part of a combined fleet), or None."""
    if isinstance(fleet, CombinedFleet):
        return fleet.feeds
    if fleet is not None and isinstance(fleet, LoadFeeds):
        return fleet
    return None


def breach_excess_w(fleet: GpuFleet | None) -> float:
    """Return how much (W) the fleet's feeds in breach draw above their targets (0 without feeds)."""
    feeds = feeds_of(fleet)
    return feeds.breach_excess_w() if feeds is not None else 0.0


def feed_breaches(fleet: GpuFleet | None) -> tuple[dict[str, str], bool]:
    """Return feed -> severity of every unresolved breach of the fleet's feeds (none without feeds), and
    whether an infrastructure action applied to a breach is not reverted yet."""
    feeds = feeds_of(fleet)
    if feeds is None:
        return {}, False
    return feeds.breaches(), bool(feeds.status().enforced)
