"""Properties of the planner over random sites (hypothesis): tiers, device limits, monotone shed, optimality."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import allocation, gpumodel, planner
from gateway.accounting import EventAccount
from gateway.model import BatteryState, GpuState, Snapshot

TIERS = {"flex0": 0.0, "flex1": 0.10, "flex2": 0.25, "flex3": 0.50}
DEVICES = [(400.0, 100.0), (700.0, 200.0), (1000.0, 200.0)]  # (max cap = TDP, min cap): A100, H100, B200
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def sites(draw: st.DrawFn) -> tuple[tuple[GpuState, ...], dict[str, float], planner.PlanContext]:
    """Draw a fleet of 1-24 GPUs with mixed devices, job classes and tiers, and a context."""
    n = draw(st.integers(1, 24))
    gpus = []
    for i in range(n):
        tdp, lo = draw(st.sampled_from(DEVICES))
        job = draw(st.sampled_from(sorted(gpumodel.JOB_CLASSES)))
        tier = draw(st.sampled_from(sorted(TIERS)))
        nat = gpumodel.job_class(job).natural_w(tdp) * draw(st.floats(0.85, 1.05))
        gpus.append(GpuState(f"g{i}", nat, tdp, lo, tdp, tdp, job, tier))
    ctx = planner.PlanContext(
        TIERS,
        cooling_overhead=draw(st.floats(0.0, 0.5)),
        tier_weight={t: draw(st.floats(0.2, 5.0)) for t in TIERS},
        min_cap_fraction=draw(st.sampled_from([0.0, 0.0, 0.4, 0.6])),
        battery_policy=draw(st.sampled_from(["deepest", "spread"])),
    )
    return tuple(gpus), {g.gpu_id: g.power_w for g in gpus}, ctx


batteries = st.one_of(
    st.none(),
    st.builds(
        lambda soc, p, cap: BatteryState("b", soc, 0.0, 0.0, p, p, cap),
        st.floats(0.0, 100.0),
        st.floats(0.0, 20_000.0),
        st.floats(1_000.0, 100_000.0),
    ),
)


def _kept(g: GpuState, cap: float, natural: float) -> float:
    return gpumodel.throughput_fraction_at_cap(cap, natural, gpumodel.job_class(g.job_class).beta)


@SETTINGS
@given(sites(), batteries, st.floats(0.0, 1.5), st.data())
def test_never_exceeds_a_tier_or_its_allowance_and_never_leaves_device_limits(
    site: tuple[tuple[GpuState, ...], dict[str, float], planner.PlanContext],
    battery: BatteryState | None,
    depth: float,
    data: st.DataObject,
) -> None:
    gpus, nat, ctx = site
    allowance = None
    if data.draw(st.booleans()):
        allowance = {g.gpu_id: data.draw(st.floats(0.0, 1.0)) for g in gpus}
    need = depth * (planner.max_shed_w(battery, gpus, nat, ctx, 3600.0) + 1.0)
    p = planner.plan(need, battery, gpus, nat, ctx, 3600.0, allowance=allowance)
    for g in gpus:
        cap = p.gpu_caps_w[g.gpu_id]
        lo = max(g.min_cap_w, ctx.min_cap_fraction * g.max_cap_w)
        assert lo - 1e-9 <= cap <= g.max_cap_w + 1e-9
        allowed = allowance[g.gpu_id] if allowance is not None else TIERS[g.tier]
        assert _kept(g, cap, nat[g.gpu_id]) >= 1.0 - allowed - 1e-9
    if battery is not None:
        assert 0.0 <= p.battery_w <= battery.max_discharge_w + 1e-9
    # It delivers what it can: the target, or everything it has.
    most = planner.plan(1e12, battery, gpus, nat, ctx, 3600.0, allowance=allowance).expected_shed_w
    assert abs(p.expected_shed_w - min(need, most)) <= 1e-6 * max(need, 1.0)


@SETTINGS
@given(sites(), batteries, st.floats(0.0, 1.2), st.floats(0.0, 1.2))
def test_sheds_more_as_the_target_deepens(
    site: tuple[tuple[GpuState, ...], dict[str, float], planner.PlanContext],
    battery: BatteryState | None,
    a: float,
    b: float,
) -> None:
    gpus, nat, ctx = site
    most = planner.max_shed_w(battery, gpus, nat, ctx, 3600.0) + 1.0
    shallow_need, deep_need = sorted((a * most, b * most))
    shallow = planner.plan(shallow_need, battery, gpus, nat, ctx, 3600.0)
    deep = planner.plan(deep_need, battery, gpus, nat, ctx, 3600.0)
    tol = 1e-6 * most
    assert deep.expected_shed_w >= shallow.expected_shed_w - tol
    assert deep.gpu_facility_shed_w >= shallow.gpu_facility_shed_w - tol
    assert deep.battery_w >= shallow.battery_w - tol
    assert deep.weighted_loss >= shallow.weighted_loss - 1e-9
    for g in gpus:  # and no GPU is given back watts: every cap moves down (or stays)
        assert deep.gpu_caps_w[g.gpu_id] <= shallow.gpu_caps_w[g.gpu_id] + 1e-6 * g.max_cap_w


@SETTINGS
@given(sites(), st.floats(0.05, 0.95), st.data())
def test_no_pair_of_gpus_can_trade_shed_for_less_loss(
    site: tuple[tuple[GpuState, ...], dict[str, float], planner.PlanContext],
    depth: float,
    data: st.DataObject,
) -> None:
    gpus, nat, ctx = site
    fleet = planner.fleet_arrays(gpus, nat, ctx)
    a = allocation.allocate(fleet, depth * fleet.max_shed_w())
    if len(fleet) < 2:
        return
    i, j = data.draw(st.lists(st.integers(0, len(fleet) - 1), min_size=2, max_size=2, unique=True))
    shed = fleet.shed_w(a.f)
    for delta in (0.5, 5.0, 25.0):  # move delta W of shed from GPU j to GPU i, where both have room
        moved = shed.copy()
        moved[i] += delta
        moved[j] -= delta
        f = allocation.clock_for_shed(fleet, moved)
        if abs(float(np.sum(fleet.shed_w(f))) - float(np.sum(shed))) > 1e-6:
            continue  # a bound was hit: not a feasible trade
        assert fleet.weighted_loss(f) >= a.weighted_loss - 1e-9 * max(1.0, a.weighted_loss)


@SETTINGS
@given(
    st.sampled_from(sorted(TIERS)),
    st.floats(600.0, 7200.0),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200),
)
def test_spending_the_allowance_each_tick_never_exceeds_the_event_budget(
    tier: str, duration_s: float, appetite: list[float]
) -> None:
    # Whatever the job is asked to lose each tick (up to its allowance), its average stays within its tier.
    t0 = datetime(2026, 7, 1, tzinfo=UTC)
    acct = EventAccount("E", t0, t0 + timedelta(seconds=duration_s), 1e5, TIERS, burst=3.0, margin=0.0)
    tick = duration_s / len(appetite)
    ntput = 1000.0
    g = GpuState("g0", 600.0, 700.0, 200.0, 700.0, 700.0, "training", tier, throughput=ntput)
    acct.add(Snapshot(t0, 1e5, None, (g,)), 0.0, {"g0": 650.0}, {"g0": ntput}, set())
    for k, want in enumerate(appetite):
        now = t0 + timedelta(seconds=k * tick)
        allowed = (acct.allowances([g], now) or {}).get("g0", 0.0)
        loss = min(want, allowed)
        assert allowed <= 3.0 * TIERS[tier] + 1e-12
        lossy = GpuState("g0", 600.0, 500.0, 200.0, 700.0, 700.0, "training", tier, throughput=ntput * (1 - loss))
        acct.add(
            Snapshot(now + timedelta(seconds=tick), 1e5, None, (lossy,)), tick, {"g0": 650.0}, {"g0": ntput}, {"g0"}
        )
    job = acct.summary()["jobs"][0]
    assert job["throughput_lost_fraction"] <= TIERS[tier] + 1e-9
    assert job["within_budget"]
