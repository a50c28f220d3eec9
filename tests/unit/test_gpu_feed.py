"""The agent simulator's GPU-backed feed: a constraint ramps the budget, equal caps make the GPUs draw it."""

from __future__ import annotations

import pytest

from gateway.clock import ManualClock
from gateway.config import GpuGroupConfig, GpusConfig
from gateway.simulation.gpus import SimGpuFleet
from protocols.dsx.gpu_feed import GpuFeedLoad


def _feed(clock: ManualClock) -> GpuFeedLoad:
    gpus = SimGpuFleet(GpusConfig(groups=[GpuGroupConfig(count=8, job_class="training", tier="flex1")]), clock)
    return GpuFeedLoad(gpus, other_w=2_000.0, ramp_w_per_s=100.0, clock=clock)


def _run(feed: GpuFeedLoad, clock: ManualClock, seconds: float) -> float:
    """Advance the clock in agent ticks of 0.1 s (each reading moves the caps); return the load."""
    for _ in range(round(seconds / 0.1)):
        clock.advance(0.1)
        feed.load_w()
    return feed.load_w()


def test_constraint_ramps_and_the_gpus_draw_it() -> None:
    clock = ManualClock()
    feed = _feed(clock)
    assert feed.load_w() == pytest.approx(feed.demand_w)
    assert feed.floor_w < feed.demand_w - 1_000.0
    goal = feed.demand_w - 1_000.0
    feed.steer(goal)
    # 500 W of the 1000 W ramp; the GPUs settle (0.3 s) a tick behind it
    assert _run(feed, clock, 5.0) == pytest.approx(feed.demand_w - 500.0, abs=50.0)
    assert _run(feed, clock, 6.0) == pytest.approx(goal, abs=1.0)
    caps = {g.cap_w for g in feed.states()}
    assert len(caps) == 1 and caps.pop() < max(g.max_cap_w for g in feed.states())
    feed.steer(0.0)  # below the floor: the feed stops at its floor
    assert _run(feed, clock, 60.0) == pytest.approx(feed.floor_w, abs=1.0)
    feed.steer(feed.demand_w)  # released
    assert _run(feed, clock, 60.0) == pytest.approx(feed.demand_w, abs=1.0)
    assert all(g.cap_w == g.max_cap_w for g in feed.states())


def test_rogue_jobs_ignore_the_constraint() -> None:
    clock = ManualClock()
    feed = _feed(clock)
    feed.rogue = True
    feed.steer(feed.floor_w)
    assert _run(feed, clock, 30.0) == pytest.approx(feed.demand_w)
