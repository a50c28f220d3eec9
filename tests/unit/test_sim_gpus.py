"""The simulated GPU fleet: ids, model-based power and throughput, validation, settling, leases."""

from __future__ import annotations

import pytest

from gateway import gpumodel
from gateway.clock import ManualClock
from gateway.config import GpusConfig
from gateway.errors import DeviceRejected, InputRejected
from gateway.simulation import SimGpuFleet
from gateway.simulation.gpus import NOISE_FRACTION, SETTLE_S, THROUGHPUT_MAX


def _config() -> GpusConfig:
    """Return two training GPUs, one batch-inference GPU on another host, and one decode GPU."""
    return GpusConfig.model_validate(
        {
            "groups": [
                {"count": 2, "job_class": "training", "tier": "flex1"},
                {"count": 1, "job_class": "batch_inference", "tier": "flex2", "host": "node-b"},
                {"count": 1, "job_class": "decode", "tier": "flex0", "min_cap_w": 150.0, "max_cap_w": 600.0},
            ]
        }
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fleet(clock: ManualClock) -> SimGpuFleet:
    return SimGpuFleet(_config(), clock, seed=7)


async def test_read_builds_gpus_from_groups(fleet: SimGpuFleet) -> None:
    states = await fleet.read()
    assert [s.gpu_id for s in states] == ["gpu-000", "gpu-001", "gpu-002", "gpu-003"]
    assert [s.job_class for s in states] == ["training", "training", "batch_inference", "decode"]
    assert [s.tier for s in states] == ["flex1", "flex1", "flex2", "flex0"]
    assert states[2].host == "node-b" and states[0].host == "local"
    assert (states[3].min_cap_w, states[3].max_cap_w, states[3].default_cap_w) == (150.0, 600.0, 600.0)
    for s in states:
        assert s.cap_w == s.default_cap_w == s.max_cap_w
        job = gpumodel.job_class(s.job_class)
        nominal_w = job.natural_w(700.0)
        assert abs(s.power_w - nominal_w) <= NOISE_FRACTION * nominal_w + 1e-9
        assert s.throughput == pytest.approx(THROUGHPUT_MAX[s.job_class])
    assert states[0].power_w != states[1].power_w  # per-GPU noise


async def test_same_seed_same_fleet(clock: ManualClock) -> None:
    a = await SimGpuFleet(_config(), clock, seed=3).read()
    b = await SimGpuFleet(_config(), clock, seed=3).read()
    c = await SimGpuFleet(_config(), clock, seed=4).read()
    assert a == b
    assert a != c


async def test_cap_settles_after_lag_and_follows_model(fleet: SimGpuFleet, clock: ManualClock) -> None:
    natural = fleet.natural_w()["gpu-000"]
    before = (await fleet.read())[0]
    enforced = await fleet.set_caps({"gpu-000": 490.0}, lease_s=30.0)
    assert enforced == {"gpu-000": 490.0}
    now = (await fleet.read())[0]
    assert now.cap_w == 490.0  # the limit reads back at once
    assert now.power_w == pytest.approx(before.power_w)  # the draw has not moved yet
    clock.advance(SETTLE_S / 2)
    mid = (await fleet.read())[0]
    assert 490.0 < mid.power_w < before.power_w
    clock.advance(SETTLE_S / 2)
    settled = (await fleet.read())[0]
    assert settled.power_w == pytest.approx(gpumodel.power_at_cap(490.0, natural))
    assert settled.power_w <= 490.0 + 1e-9
    assert settled.throughput == pytest.approx(
        THROUGHPUT_MAX["training"] * gpumodel.throughput_fraction_at_cap(490.0, natural, 1.0)
    )
    assert settled.throughput == pytest.approx(0.875 * THROUGHPUT_MAX["training"], abs=20.0)


async def test_with_no_settling_the_draw_follows_every_change_at_once(clock: ManualClock) -> None:
    fleet = SimGpuFleet(_config(), clock, seed=7, settle_s=0.0)
    natural = fleet.natural_w()["gpu-000"]
    for cap in (490.0, 600.0, 300.0, 700.0):
        await fleet.set_caps({"gpu-000": cap}, lease_s=30.0)
        assert (await fleet.read())[0].power_w == pytest.approx(gpumodel.power_at_cap(cap, natural))
    fleet.set_job("gpu-000", "decode")
    decode_natural = fleet.natural_w()["gpu-000"]
    await fleet.set_caps({"gpu-000": 200.0}, lease_s=30.0)
    assert (await fleet.read())[0].power_w == pytest.approx(gpumodel.power_at_cap(200.0, decode_natural))


async def test_a_change_while_settling_moves_on_from_the_draw_of_that_moment(
    fleet: SimGpuFleet, clock: ManualClock
) -> None:
    natural = fleet.natural_w()["gpu-000"]
    start = (await fleet.read())[0].power_w
    await fleet.set_caps({"gpu-000": 300.0}, lease_s=30.0)
    clock.advance(SETTLE_S / 2)
    mid = (await fleet.read())[0].power_w
    assert mid == pytest.approx((start + gpumodel.power_at_cap(300.0, natural)) / 2)
    await fleet.set_caps({"gpu-000": 700.0}, lease_s=30.0)  # back up, from where the draw is now
    assert (await fleet.read())[0].power_w == pytest.approx(mid)
    clock.advance(SETTLE_S / 2)
    assert (await fleet.read())[0].power_w == pytest.approx((mid + natural) / 2)


async def test_decode_cap_above_natural_saves_nothing(fleet: SimGpuFleet, clock: ManualClock) -> None:
    before = (await fleet.read())[3]
    await fleet.set_caps({"gpu-003": 400.0}, lease_s=30.0)
    clock.advance(1.0)
    after = (await fleet.read())[3]
    assert after.power_w == pytest.approx(before.power_w)
    assert after.throughput == pytest.approx(before.throughput)


async def test_out_of_range_cap_rejected_and_batch_not_applied(fleet: SimGpuFleet) -> None:
    with pytest.raises(DeviceRejected, match=r"gpu-001: cap 100 W outside the allowed range \[200, 700\] W"):
        await fleet.set_caps({"gpu-000": 400.0, "gpu-001": 100.0}, lease_s=30.0)
    assert [s.cap_w for s in await fleet.read()] == [700.0, 700.0, 700.0, 600.0]
    with pytest.raises(DeviceRejected, match="gpu-003"):
        await fleet.set_caps({"gpu-003": 650.0}, lease_s=30.0)


async def test_unknown_gpu_and_bad_values_rejected(fleet: SimGpuFleet) -> None:
    with pytest.raises(InputRejected, match="gpu-999"):
        await fleet.set_caps({"gpu-000": 400.0, "gpu-999": 400.0}, lease_s=30.0)
    with pytest.raises(InputRejected, match="finite"):
        await fleet.set_caps({"gpu-000": float("nan")}, lease_s=30.0)
    with pytest.raises(InputRejected, match="lease_s"):
        await fleet.set_caps({"gpu-000": 400.0}, lease_s=0.0)
    assert (await fleet.read())[0].cap_w == 700.0


async def test_lease_lapses_and_default_returns(fleet: SimGpuFleet, clock: ManualClock) -> None:
    await fleet.set_caps({"gpu-000": 300.0, "gpu-002": 400.0}, lease_s=10.0)
    clock.advance(8.0)
    await fleet.set_caps({"gpu-002": 400.0}, lease_s=10.0)  # renew only gpu-002
    clock.advance(3.0)  # t = 11: gpu-000's lease lapsed at t = 10, gpu-002's runs to t = 18
    states = {s.gpu_id: s for s in await fleet.read()}
    assert states["gpu-000"].cap_w == 700.0
    assert states["gpu-002"].cap_w == 400.0
    # The restore happened at t = 10, so by t = 11 the draw is back at the uncapped level.
    assert states["gpu-000"].power_w == pytest.approx(fleet.natural_w()["gpu-000"])
    clock.advance(7.0)
    assert {s.gpu_id: s.cap_w for s in await fleet.read()}["gpu-002"] == 700.0


async def test_a_shorter_lease_given_later_lapses_first(fleet: SimGpuFleet, clock: ManualClock) -> None:
    await fleet.set_caps({"gpu-000": 300.0}, lease_s=60.0)
    await fleet.read()  # nothing lapses before t = 60 ...
    await fleet.set_caps({"gpu-001": 300.0}, lease_s=2.0)  # ... until this
    clock.advance(3.0)
    caps = {s.gpu_id: s.cap_w for s in await fleet.read()}
    assert (caps["gpu-000"], caps["gpu-001"]) == (300.0, 700.0)


async def test_release_restores_defaults(fleet: SimGpuFleet, clock: ManualClock) -> None:
    full_w = fleet.total_power_w()
    full_tp = fleet.total_throughput()
    await fleet.set_caps({"gpu-000": 300.0, "gpu-001": 300.0, "gpu-002": 300.0}, lease_s=60.0)
    clock.advance(1.0)
    assert fleet.total_power_w() < full_w - 500.0
    assert fleet.total_throughput() < full_tp
    await fleet.release()
    assert all(s.cap_w == s.default_cap_w for s in await fleet.read())
    clock.advance(1.0)
    assert fleet.total_power_w() == pytest.approx(full_w)
    assert fleet.total_throughput() == pytest.approx(full_tp)


async def test_set_job_changes_draw_and_class(fleet: SimGpuFleet) -> None:
    fleet.set_job("gpu-000", "decode", "flex0")
    s = (await fleet.read())[0]
    assert (s.job_class, s.tier) == ("decode", "flex0")
    assert s.power_w == pytest.approx(fleet.natural_w()["gpu-000"])
    assert s.power_w < 0.4 * 700.0
    assert s.throughput == pytest.approx(THROUGHPUT_MAX["decode"])
    with pytest.raises(InputRejected, match="unknown job class"):
        fleet.set_job("gpu-000", "mining")
    with pytest.raises(InputRejected, match="gpu-042"):
        fleet.set_job("gpu-042", "training")


async def test_a_settled_reading_is_kept_until_the_next_change(fleet: SimGpuFleet, clock: ManualClock) -> None:
    await fleet.set_caps({"gpu-000": 400.0}, lease_s=10.0)
    clock.advance(SETTLE_S / 4)
    settling = (await fleet.read())[0]
    clock.advance(SETTLE_S / 4)
    assert (await fleet.read())[0].power_w < settling.power_w  # still moving: worked out at every read
    clock.advance(SETTLE_S)
    settled = (await fleet.read())[0]
    clock.advance(1.0)
    assert (await fleet.read())[0] is settled  # nothing in it moves until a change: kept
    clock.advance(10.0)  # the lease lapses: the default limit is back, and so is the draw
    lapsed = (await fleet.read())[0]
    assert (lapsed.cap_w, lapsed.power_w) == (700.0, pytest.approx(fleet.natural_w()["gpu-000"]))
    fleet.set_job("gpu-000", "decode", "flex0")
    changed = (await fleet.read())[0]
    assert (changed.job_class, changed.throughput) == ("decode", pytest.approx(THROUGHPUT_MAX["decode"]))


async def test_a_cap_settled_under_before_reads_the_same_as_a_fresh_fleet(clock: ManualClock) -> None:
    fleet = SimGpuFleet(_config(), clock, seed=7, settle_s=0.0)
    fresh = SimGpuFleet(_config(), clock, seed=7, settle_s=0.0)
    await fleet.set_caps({"gpu-000": 400.0}, lease_s=10.0)
    under_400 = (await fleet.read())[0]
    await fleet.set_caps({"gpu-000": 500.0}, lease_s=10.0)
    assert (await fleet.read())[0].power_w > under_400.power_w
    await fleet.set_caps({"gpu-000": 400.0}, lease_s=10.0)
    again = (await fleet.read())[0]
    assert again is under_400  # kept by cap: the model is not worked out again
    await fresh.set_caps({"gpu-000": 400.0}, lease_s=10.0)
    assert again == (await fresh.read())[0]
    fleet.set_job("gpu-000", "decode")  # another job: every kept reading is stale
    fresh.set_job("gpu-000", "decode")
    assert (await fleet.read())[0] == (await fresh.read())[0] != under_400
    for cap in [*range(300, 700, 25)] * 2:  # more caps than it keeps, each twice: still right
        await fleet.set_caps({"gpu-000": float(cap)}, lease_s=10.0)
        ref = SimGpuFleet(_config(), clock, seed=7, settle_s=0.0)
        ref.set_job("gpu-000", "decode")
        await ref.set_caps({"gpu-000": float(cap)}, lease_s=10.0)
        assert (await fleet.read())[0] == (await ref.read())[0]
