"""SunspecBattery against the SunSpec storage-inverter simulator on 127.0.0.1 (both from pysunspec2's definitions)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.clock import Clock, ManualClock, ScaledClock
from gateway.errors import DeviceRejected, DeviceUnavailable, ReadbackMismatch
from gateway.interfaces import Battery
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import Mapping, load_mapping, parse_mapping
from protocols.modbus.sunspec_battery import SunspecBattery
from protocols.modbus.sunspec_sim import SunspecSimulator

Site = tuple[SunspecSimulator, SunspecBattery]


@pytest.fixture(autouse=True)
def _info_logs() -> Iterator[None]:
    """Let info logs through even if an earlier test ran `drgw` in-process (it filters at WARNING)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


async def until(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Wait (bounded) until ``cond()`` holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


def storage_map(**sunspec: Any) -> Mapping:
    """Return the shipped SunSpec storage map with some ``sunspec`` settings changed."""
    doc: dict[str, Any] = {"model": "s", "vendor": "v", "kind": "battery", "dispatchable": True}
    doc["sunspec"] = {"models": [1, 124, 704, 802], "optional": [713, 715], **sunspec}
    return parse_mapping(doc, "storage.yaml")


async def make_site(
    clock: Clock, mapping: Mapping | str = "sunspec_storage", revert_s: float = 60.0, **kw: Any
) -> Site:
    """Start a simulator and a connected driver sharing ``clock``."""
    sim = SunspecSimulator(mapping, clock=clock, **kw)
    port = await sim.start()
    bat = SunspecBattery("inv1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=0.3), mapping, revert_s, clock)
    await bat.connect()
    return sim, bat


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    """Yield a simulator and driver on a real-time clock."""
    sim, bat = await make_site(ScaledClock(1.0))
    yield sim, bat
    await bat.close()
    await sim.stop()


async def test_reads_state_through_the_battery_interface(site: Site) -> None:
    """Read state of charge (802), ratings and capacity, scale factors applied."""
    sim, bat = site
    battery: Battery = bat
    state = await battery.read()
    assert (state.soc_pct, state.power_w, state.setpoint_w) == (80.0, 0.0, 0.0)
    assert (state.max_discharge_w, state.max_charge_w, state.capacity_wh) == (250_000, 250_000, 1_000_000)
    assert state.online


async def test_wset_is_written_with_its_reversion_timer_and_heartbeat(site: Site) -> None:
    """Enable WSet in watts with WSetRvrtTms = min(revert, lease) and a controller heartbeat; read it back."""
    sim, bat = site
    assert await bat.set_discharge_w(42_000, lease_s=25.5) == 42_000
    assert (sim.get("704.WSetEna"), sim.get("704.WSetMod"), sim.get("704.WSet")) == (1, 1, 42_000)
    assert sim.get("704.WSetRvrtTms") == 26
    assert sim.get("802.CtrlHb") == 1
    await until(lambda: sim.power_w == 42_000)
    state = await bat.read()
    assert (state.setpoint_w, state.power_w) == (42_000, 42_000)
    assert await bat.set_discharge_w(-30_000, lease_s=600) == -30_000  # charging
    assert (sim.get("704.WSetRvrtTms"), sim.get("802.CtrlHb")) == (60, 2)


async def test_release_disables_the_setpoint(site: Site) -> None:
    """Write WSetEna 0 and WSet 0, verify, and return to 0 W."""
    sim, bat = site
    await bat.set_discharge_w(20_000, lease_s=30)
    await until(lambda: sim.power_w == 20_000)
    await bat.release()
    assert (sim.get("704.WSetEna"), sim.get("704.WSet")) == (0, 0)
    assert not bat.dispatched
    await until(lambda: sim.power_w == 0)


async def test_device_clipping_is_a_readback_mismatch(site: Site) -> None:
    """Raise ReadbackMismatch when the inverter stores another WSet than the one written."""
    sim, bat = site
    with pytest.raises(ReadbackMismatch) as info:
        await bat.set_discharge_w(400_000, lease_s=30)
    assert (info.value.requested, info.value.reported) == (400_000, 250_000)


async def test_local_control_refuses_and_sends_nothing(site: Site) -> None:
    """Check 802/715 LocRemCtl before commanding; in local control nothing is written."""
    sim, bat = site
    sim.set_local(True)
    await bat.read()
    writes = sim.controller_writes
    with pytest.raises(DeviceRejected, match="local control"):
        await bat.set_discharge_w(10_000, lease_s=30)
    assert sim.controller_writes == writes
    assert sim.get("704.WSetEna") == 0


async def test_keepalive_refreshes_at_half_the_timer_and_the_device_reverts_without_it() -> None:
    """Hold the setpoint past many reversion periods while refreshed; revert once the refreshing stops."""
    sim, bat = await make_site(ScaledClock(10.0), revert_s=2.0)
    try:
        bat.start_keepalive()
        await bat.set_discharge_w(40_000, lease_s=300)
        beat = sim.get("802.CtrlHb")
        # Eight refreshes at half the 2 s timer: 8 s of device time, four reversion periods held.
        await until(lambda: sim.get("802.CtrlHb") >= beat + 8, 10.0)  # type: ignore[operator]
        assert not sim.reverted
        assert sim.get("704.WSetEna") == 1
        assert sim.get("802.CtrlHb") >= 4  # type: ignore[operator]
        await bat.stop_keepalive()
        await until(lambda: sim.reverted)
        await until(lambda: sim.power_w == 0)
        assert (await bat.read()).setpoint_w == 0
    finally:
        await bat.close()
        await sim.stop()


async def test_model_124_control_path() -> None:
    """Command an older inverter through StorCtl_Mod and OutWRte/InWRte in % of WChaMax."""
    m = storage_map(control="124")
    sim, bat = await make_site(ScaledClock(1.0), m)
    try:
        assert await bat.set_discharge_w(50_000, lease_s=30) == pytest.approx(50_000)
        assert (sim.get("124.StorCtl_Mod"), sim.get("124.OutWRte")) == (2, 20.0)
        assert sim.get("124.InOutWRte_RvrtTms") == 30
        await until(lambda: sim.power_w == pytest.approx(50_000))
        assert await bat.set_discharge_w(-25_000, lease_s=30) == pytest.approx(-25_000)
        assert (sim.get("124.StorCtl_Mod"), sim.get("124.InWRte")) == (1, 10.0)
        await bat.release()
        assert sim.get("124.StorCtl_Mod") == 0
    finally:
        await bat.close()
        await sim.stop()


async def test_state_of_charge_falls_back_and_never_reads_a_sentinel_as_zero(site: Site) -> None:
    """Take SoC from 713 when 802 has none; refuse the reading when no model has one."""
    sim, bat = site
    sim.set("802.SoC", None)
    sim.set("713.SoC", 55.0)
    sim._publish = lambda: None  # type: ignore[method-assign]  # hold the values set here
    assert (await bat.read()).soc_pct == 55.0
    sim.set("713.SoC", None)
    sim.set("124.ChaState", None)
    with pytest.raises(DeviceRejected, match="state of charge: not available"):
        await bat.read()


async def test_a_state_of_charge_outside_0_to_100_is_not_a_reading(site: Site) -> None:
    """Skip a SoC no battery can have (650 %) for the next model's; refuse the reading when none is possible."""
    sim, bat = site
    sim._publish = lambda: None  # type: ignore[method-assign]  # hold the values set here
    sim.set("802.SoC", 650.0)
    sim.set("713.SoC", 42.0)
    assert (await bat.read()).soc_pct == 42.0
    sim.set("713.SoC", 101.0)
    sim.set("124.ChaState", 6553.0)
    with pytest.raises(DeviceRejected, match="state of charge: not available or not a possible reading"):
        await bat.read()


async def test_an_enabled_setpoint_without_a_value_is_refused_not_read_as_0(site: Site) -> None:
    """Read 704 WSet's "not implemented" value under WSetEna = 1 as a fault, never as a 0 W setpoint."""
    sim, bat = site
    await bat.set_discharge_w(2_000.0, 30.0)
    sim.set("704.WSet", None)
    with pytest.raises(DeviceRejected, match="704.WSet: in force but not available"):
        await bat.read()


async def test_a_device_without_the_control_model_is_rejected_at_connect() -> None:
    """Refuse a device whose chain lacks a required model."""
    sim = SunspecSimulator(storage_map(models=[1, 124, 802], optional=[], control="124"))
    port = await sim.start()
    bat = SunspecBattery("inv1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=0.3), "sunspec_storage")
    try:
        with pytest.raises(DeviceRejected, match=r"models \[704\] missing"):
            await bat.connect()
    finally:
        await bat.close()
        await sim.stop()


async def test_lost_and_back_is_backed_off_and_logged_once() -> None:
    """Fail fast inside the backoff, then recover; one "unavailable" and one "recovered"."""
    clock = ManualClock()
    sim, bat = await make_site(clock)
    try:
        with capture_logs() as logs:
            sim.set_offline(True)
            with pytest.raises(DeviceUnavailable):
                await bat.read()
            before = sim.server.requests
            with pytest.raises(DeviceUnavailable, match="backing off"):
                await bat.set_discharge_w(1_000, lease_s=30)
            assert sim.server.requests == before
            sim.set_offline(False)
            clock.advance(1.0)
            assert (await bat.read()).online
        events = [e["event"] for e in logs]
        assert (events.count("unavailable"), events.count("recovered")) == (1, 1)
    finally:
        await bat.close()
        await sim.stop()


def test_a_ups_or_wrong_map_cannot_be_a_sunspec_battery() -> None:
    """Refuse a non-SunSpec map and a control model the map does not require."""
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="not a SunSpec map"):
        SunspecBattery("x", ModbusEndpoint("127.0.0.1", 1502, 1), "bess_generic")
    with pytest.raises(ConfigError, match="needs model 704"):
        SunspecBattery("x", ModbusEndpoint("127.0.0.1", 1502, 1), storage_map(models=[1, 124, 802], optional=[]))
    assert load_mapping("sunspec_storage").sunspec is not None
