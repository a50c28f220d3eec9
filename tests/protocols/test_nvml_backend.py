"""The NVML fleet backend against FakeNvml (real pynvml error classes), and against this machine's pynvml."""

from __future__ import annotations

import inspect

import pynvml
import pytest

from gateway.errors import DeviceRejected, DeviceUnavailable, InputRejected, PermissionDenied
from protocols.nvml import FakeGpu, FakeNvml, NvmlFleet, smoke
from protocols.nvml.smoke import collect

UUID_A = "GPU-aaaaaaaa-0000-0000-0000-000000000001"
UUID_B = "GPU-bbbbbbbb-0000-0000-0000-000000000002"


class FakeTime:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _nvml(*, root: bool = True, time: FakeTime | None = None) -> FakeNvml:
    """Return a fake with an H100 (700 W) and an A100 (400 W) drawing below their limits."""
    return FakeNvml(
        [
            FakeGpu(uuid=UUID_A, load_mw=650_123),
            FakeGpu(
                name="NVIDIA A100-SXM4-80GB",
                uuid=UUID_B,
                load_mw=310_000,
                min_limit_mw=100_000,
                max_limit_mw=400_000,
                default_limit_mw=400_000,
            ),
        ],
        root=root,
        monotonic=time or FakeTime(),
    )


def test_fake_raises_the_real_pynvml_errors() -> None:
    fake = _nvml()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        FakeNvml().nvmlInit()
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        FakeNvml([], driver_loaded=False).nvmlInit()
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetPowerManagementLimit(h, 100_000)
    with pytest.raises(TypeError):
        fake.nvmlDeviceSetPowerManagementLimit(h, 300_000.0)  # type: ignore[arg-type]
    fake.root = False
    with pytest.raises(pynvml.NVMLError_NoPermission) as err:
        fake.nvmlDeviceSetPowerManagementLimit(h, 300_000)
    assert err.value.value == pynvml.NVML_ERROR_NO_PERMISSION
    fake.gpus[0].power_management = False
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetEnforcedPowerLimit(h)
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetName(h)


def test_fake_energy_counter_is_monotonic_in_mj() -> None:
    time = FakeTime()
    fake = _nvml(time=time)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(1)
    e0 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    time.t += 2.0
    e1 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    assert e1 - e0 == 310_000 * 2  # 310 W for 2 s = 620 J = 620 000 mJ


async def test_read_converts_mw_to_w() -> None:
    fleet = NvmlFleet(_nvml(), job_map=lambda uuid: ("decode", "flex0") if uuid == UUID_B else ("training", "flex1"))
    states = {s.gpu_id: s for s in await fleet.read()}
    assert set(states) == {UUID_A, UUID_B}
    a, b = states[UUID_A], states[UUID_B]
    assert a.power_w == pytest.approx(650.123)
    assert (a.cap_w, a.min_cap_w, a.max_cap_w, a.default_cap_w) == (700.0, 200.0, 700.0, 700.0)
    assert (b.cap_w, b.min_cap_w, b.max_cap_w, b.default_cap_w) == (400.0, 100.0, 400.0, 400.0)
    assert (a.job_class, a.tier, b.job_class, b.tier) == ("training", "flex1", "decode", "flex0")
    assert a.host == "local"


async def test_read_reports_enforced_limit_set_by_others() -> None:
    fake = _nvml()
    fake.gpus[0].external_limit_mw = 500_000  # e.g. a BMC cap
    states = await NvmlFleet(fake).read()
    assert states[0].cap_w == 500.0
    assert states[0].power_w == 500.0


async def test_set_within_range_reads_back_and_writes_only_on_change() -> None:
    fake = _nvml()
    fleet = NvmlFleet(fake)
    enforced = await fleet.set_caps({UUID_A: 450.0, UUID_B: 400.0}, lease_s=30.0)
    assert enforced == {UUID_A: 450.0, UUID_B: 400.0}
    assert fake.gpus[0].set_calls == [450_000]
    assert fake.gpus[1].set_calls == []  # already at 400 W: nothing written
    await fleet.set_caps({UUID_A: 450.0}, lease_s=30.0)
    assert fake.gpus[0].set_calls == [450_000]
    states = {s.gpu_id: s for s in await fleet.read()}
    assert states[UUID_A].cap_w == 450.0
    assert states[UUID_A].power_w == 450.0


async def test_set_returns_enforced_not_requested() -> None:
    fake = _nvml()
    fake.gpus[0].external_limit_mw = 400_000
    assert await NvmlFleet(fake).set_caps({UUID_A: 600.0}, lease_s=30.0) == {UUID_A: 400.0}


async def test_out_of_range_rejected_with_nothing_changed() -> None:
    fake = _nvml()
    fleet = NvmlFleet(fake)
    with pytest.raises(DeviceRejected, match=r"outside the allowed range \[100, 400\] W") as err:
        await fleet.set_caps({UUID_A: 450.0, UUID_B: 450.0}, lease_s=30.0)
    assert err.value.device_id == UUID_B
    assert fake.gpus[0].set_calls == [] and fake.gpus[1].set_calls == []
    with pytest.raises(InputRejected, match="GPU-nope"):
        await fleet.set_caps({UUID_A: 450.0, "GPU-nope": 300.0}, lease_s=30.0)
    with pytest.raises(InputRejected, match="finite"):
        await fleet.set_caps({UUID_A: float("inf")}, lease_s=30.0)
    assert fake.gpus[0].set_calls == []


async def test_no_permission_maps_to_permission_denied_with_the_fix() -> None:
    fake = _nvml(root=False)
    fleet = NvmlFleet(fake)
    with pytest.raises(PermissionDenied, match="needs root") as err:
        await fleet.set_caps({UUID_A: 450.0}, lease_s=30.0)
    assert "CAP_SYS_ADMIN" in str(err.value)
    assert isinstance(err.value.__cause__, pynvml.NVMLError_NoPermission)
    assert fake.gpus[0].limit_mw is None
    assert len(await fleet.read()) == 2  # reading needs no root


async def test_release_restores_default_limits() -> None:
    fake = _nvml()
    fleet = NvmlFleet(fake)
    await fleet.set_caps({UUID_A: 300.0, UUID_B: 200.0}, lease_s=30.0)
    await fleet.release()
    assert [s.cap_w for s in await fleet.read()] == [700.0, 400.0]
    assert fake.gpus[0].set_calls == [300_000, 700_000]


async def test_lost_gpu_is_unavailable_and_other_errors_are_rejected() -> None:
    fake = _nvml()
    fleet = NvmlFleet(fake)
    fleet.open()
    fake.gpus[1].lost = True
    with pytest.raises(DeviceUnavailable, match=UUID_B):
        await fleet.read()
    fake.gpus[1].lost = False
    fake.gpus[1].power_management = False
    with pytest.raises(DeviceRejected, match="Not Supported"):
        await fleet.set_caps({UUID_B: 300.0}, lease_s=30.0)


async def test_gpu_without_power_management_is_left_out() -> None:
    fake = _nvml()
    fake.gpus[1].power_management = False
    fleet = NvmlFleet(fake)
    assert [s.gpu_id for s in await fleet.read()] == [UUID_A]
    assert fleet.unmanaged == [UUID_B]


async def test_no_library_reads_as_empty_fleet() -> None:
    fake = FakeNvml()
    fleet = NvmlFleet(fake)
    assert await fleet.read() == ()
    assert await fleet.read() == ()
    assert fake.init_calls == 1  # tried once, logged once
    assert await fleet.set_caps({}, lease_s=30.0) == {}
    with pytest.raises(InputRejected, match="gpu-000"):
        await fleet.set_caps({"gpu-000": 300.0}, lease_s=30.0)
    await fleet.release()
    await fleet.close()


async def test_open_is_idempotent_and_close_shuts_nvml_down() -> None:
    fake = _nvml()
    fleet = NvmlFleet(fake)
    fleet.open()
    fleet.open()
    await fleet.read()
    assert fake.init_calls == 1 and fake.initialized
    assert fleet.gpu_ids == (UUID_A, UUID_B)
    await fleet.close()
    assert not fake.initialized
    assert fleet.gpu_ids == ()


async def test_real_pynvml_on_this_machine_reports_no_gpus_cleanly() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver; the test is for machines without one")
    fleet = NvmlFleet()  # the real pynvml module
    assert await fleet.read() == ()
    assert fleet.gpu_ids == ()
    await fleet.release()
    await fleet.close()


def test_smoke_collect_is_read_only() -> None:
    fake = _nvml()
    fake.gpus[1].energy_counter = False
    report = collect(fake)
    assert report["nvml"] == "ok"
    a, b = report["gpus"]
    assert a["uuid"] == UUID_A and a["power_w"] == pytest.approx(650.123)
    assert a["constraints_w"] == [200.0, 700.0]
    assert b["energy_mj"]["code"] == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert all(g.set_calls == [] for g in fake.gpus)
    assert not fake.initialized
    assert collect(FakeNvml())["nvml"] == "unavailable"


def test_smoke_source_calls_no_setter() -> None:
    source = inspect.getsource(smoke)
    assert "Set" not in source.replace("Settings", "")
