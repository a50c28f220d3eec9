"""ModbusBattery against the pymodbus battery simulator on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from structlog.testing import capture_logs

from gateway.clock import Clock, ManualClock, ScaledClock
from gateway.errors import ConfigError, DeviceRejected, DeviceUnavailable, InputRejected, ReadbackMismatch
from gateway.interfaces import Battery
from protocols.modbus.battery import ModbusBattery
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import load_mapping, parse_mapping
from protocols.modbus.simulator import BatterySimulator, PointServer
from protocols.modbus.transport import ModbusDeviceRejected, ModbusTransport

Site = tuple[BatterySimulator, ModbusBattery]
MAPS = Path(__file__).resolve().parents[2] / "mappings"


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


async def make_site(clock: Clock, *, revert_s: float = 60.0, timeout_s: float = 1.0, **sim_kw: Any) -> Site:
    """Start a simulator and a connected battery driver sharing ``clock``."""
    sim = BatterySimulator("bess_generic", clock=clock, **sim_kw)
    port = await sim.start()
    bat = ModbusBattery(
        "bess1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=timeout_s), "bess_generic", revert_s, clock
    )
    await bat.connect()
    return sim, bat


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    """Yield a simulator and driver on real-time clocks."""
    sim, bat = await make_site(ScaledClock(1.0))
    yield sim, bat
    await bat.close()
    await sim.stop()


@pytest.fixture
async def fast_site() -> AsyncIterator[Site]:
    """Yield a simulator and driver on a clock 10x real time with a 2 s revert timer (0.2 s real)."""
    sim, bat = await make_site(ScaledClock(10.0), revert_s=2.0)
    yield sim, bat
    await bat.close()
    await sim.stop()


async def test_implements_the_battery_interface(site: Site) -> None:
    """Satisfy gateway.interfaces.Battery and read the simulator's ratings."""
    sim, bat = site
    battery: Battery = bat
    state = await battery.read()
    assert (state.device_id, state.online) == ("bess1", True)
    assert state.soc_pct == pytest.approx(80.0)
    assert (state.max_discharge_w, state.max_charge_w, state.capacity_wh) == (250_000, 250_000, 1_000_000)


async def test_set_discharge_reads_back_and_power_follows(site: Site) -> None:
    """Write remote mode, revert timer and setpoint; return the read-back; power follows."""
    sim, bat = site
    assert await bat.set_discharge_w(50_000, lease_s=30) == 50_000
    assert (sim.setpoint_w, sim.control_mode) == (50_000, 1)
    await until(lambda: sim.power_w == 50_000)
    state = await bat.read()
    assert (state.power_w, state.setpoint_w) == (50_000, 50_000)
    assert await bat.set_discharge_w(-20_000, lease_s=30) == -20_000  # charging
    await until(lambda: sim.power_w == -20_000)


async def test_requests_are_coalesced(site: Site) -> None:
    """Read the whole state in one request per table; set and read back in two requests."""
    sim, bat = site
    before = sim.server.requests
    await bat.read()
    assert sim.server.requests - before == 2
    before = sim.server.requests
    await bat.set_discharge_w(1_000, lease_s=30)
    assert sim.server.requests - before == 2


async def test_watchdog_is_the_shorter_of_lease_and_revert(site: Site) -> None:
    """Write min(revert, lease) rounded up to whole seconds as the device's revert timer."""
    sim, bat = site
    await bat.set_discharge_w(1_000, lease_s=2.5)
    assert sim.server.get("watchdog_s") == 3
    await bat.set_discharge_w(1_000, lease_s=600)
    assert sim.server.get("watchdog_s") == 60


async def test_soc_falls_while_discharging() -> None:
    """Integrate state of charge: it falls while discharging (100x real time)."""
    sim, bat = await make_site(ScaledClock(100.0), capacity_wh=10_000, soc_pct=50)
    try:
        bat.start_keepalive()  # the 60 s revert timer is 0.6 s real here
        await bat.set_discharge_w(100_000, lease_s=3600)
        await until(lambda: sim.soc_pct < 45)
        assert (await bat.read()).soc_pct < 46
    finally:
        await bat.close()
        await sim.stop()


async def test_no_discharge_when_empty_no_charge_when_full() -> None:
    """Hold power at 0 for discharge at 0 % and for charge at 100 %."""
    for soc, asked in ((0.0, 10_000.0), (100.0, -10_000.0)):
        sim, bat = await make_site(ScaledClock(1.0), soc_pct=soc)
        try:
            await bat.set_discharge_w(asked, lease_s=30)
            sim.step()
            assert sim.power_w == 0
        finally:
            await bat.close()
            await sim.stop()


async def test_device_clipping_is_a_readback_mismatch(site: Site) -> None:
    """Raise ReadbackMismatch when the device stores another setpoint than the one written."""
    sim, bat = site
    with pytest.raises(ReadbackMismatch) as info:
        await bat.set_discharge_w(300_000, lease_s=30)
    assert (info.value.requested, info.value.reported) == (300_000, 250_000)
    assert bat.dispatched  # the write landed; the lease must still be released


async def test_watchdog_expiry_reverts_to_zero(fast_site: Site) -> None:
    """Revert to 0 W and local mode, and flag status bit 2, when nobody refreshes."""
    sim, bat = fast_site
    await bat.set_discharge_w(40_000, lease_s=30)
    await until(lambda: sim.watchdog_expired)
    assert (sim.setpoint_w, sim.control_mode) == (0, 0)
    await until(lambda: sim.power_w == 0)
    assert (await bat.read()).setpoint_w == 0


async def test_keepalive_holds_the_setpoint_and_stopping_it_lets_it_revert(fast_site: Site) -> None:
    """Refresh at half the revert period while leased; without it the device reverts."""
    sim, bat = fast_site
    bat.start_keepalive()
    await bat.set_discharge_w(40_000, lease_s=300)
    beat = sim.heartbeat
    # Eight refreshes at half the 2 s revert period: 8 s of clock time, four revert periods held.
    await until(lambda: sim.heartbeat >= beat + 8, 10.0)
    assert not sim.watchdog_expired
    assert (sim.setpoint_w, sim.control_mode) == (40_000, 1)
    assert sim.heartbeat >= 4
    await bat.stop_keepalive()
    await until(lambda: sim.watchdog_expired)


async def test_keepalive_stops_when_the_lease_lapses(fast_site: Site) -> None:
    """Stop refreshing at the lease's end so the device reverts on its own."""
    sim, bat = fast_site
    bat.start_keepalive()
    await bat.set_discharge_w(40_000, lease_s=2.0)
    await until(lambda: sim.watchdog_expired)
    assert not bat.dispatched
    assert await bat.refresh() is False  # nothing is written once the lease has lapsed


async def test_manual_refresh_rearms_and_can_extend_the_lease(fast_site: Site) -> None:
    """Rewrite the timer and bump the heartbeat on refresh(); extend the lease when asked."""
    sim, bat = fast_site
    await bat.set_discharge_w(40_000, lease_s=2.0)
    beat = sim.heartbeat
    for _ in range(8):  # 8 x 0.05 s real = 4 s of clock time, twice the lease and the revert timer
        assert await bat.refresh(lease_s=2.0)
        await asyncio.sleep(0.05)  # refreshes spaced in clock time: the pace under test, not a wait
    assert sim.heartbeat == beat + 8
    assert not sim.watchdog_expired
    assert bat.dispatched


async def test_release_returns_to_zero_and_local(site: Site) -> None:
    """Write setpoint 0 and local mode, verify them, and end the lease."""
    sim, bat = site
    await bat.set_discharge_w(30_000, lease_s=30)
    await until(lambda: sim.power_w == 30_000)
    await bat.release()
    assert (sim.setpoint_w, sim.control_mode) == (0, 0)
    assert not bat.dispatched
    await until(lambda: sim.power_w == 0)


async def test_invalid_requests_change_nothing(site: Site) -> None:
    """Refuse a non-positive lease, a setpoint outside the map's limits, and writes to read-only points."""
    sim, bat = site
    before = sim.server.requests
    with pytest.raises(InputRejected, match="lease_s"):
        await bat.set_discharge_w(1_000, lease_s=0)
    with pytest.raises(InputRejected, match="limits"):
        await bat.set_discharge_w(2_000_000, lease_s=30)
    transport = ModbusTransport("bess1", ModbusEndpoint("127.0.0.1", sim.port, 1), bat.mapping)
    with pytest.raises(InputRejected, match="read-only"):
        await transport.write({"power_w": 1.0})
    with pytest.raises(InputRejected, match="read-only"):  # checked before the rw point is sent
        await transport.write({"setpoint_w": 5.0, "soc_pct": 1.0})
    transport.close()
    assert sim.server.requests == before
    assert (sim.setpoint_w, sim.control_mode) == (0, 0)


async def test_device_exception_is_device_rejected() -> None:
    """Map a Modbus exception response (illegal address on a read-only register) to DeviceRejected."""
    doc: dict[str, Any] = {
        "model": "t",
        "vendor": "t",
        "points": {
            "a": {"table": "holding", "address": 10, "type": "uint16", "access": "rw"},
            "b": {"table": "holding", "address": 11, "type": "uint16"},
        },
    }
    server = PointServer(parse_mapping(doc, "device.yaml"))
    port = await server.start()
    lying = parse_mapping({**doc, "points": {**doc["points"], "b": {**doc["points"]["b"], "access": "rw"}}})
    transport = ModbusTransport("dev", ModbusEndpoint("127.0.0.1", port, 1), lying)
    try:
        await transport.write({"a": 7})
        with pytest.raises(ModbusDeviceRejected) as info:
            await transport.write({"b": 7})
        assert info.value.exception_code == 2
        assert server.get("b") == 0
    finally:
        transport.close()
        await server.stop()


async def test_nothing_listening_is_unavailable() -> None:
    """Raise DeviceUnavailable when the port refuses connections."""
    sim = BatterySimulator(load_mapping("bess_generic"))
    port = await sim.start()
    await sim.stop()
    bat = ModbusBattery("bess1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=0.5), "bess_generic")
    with pytest.raises(DeviceUnavailable):
        await bat.connect()
    await bat.close()


async def test_offline_backs_off_fails_fast_and_recovers() -> None:
    """Fail with DeviceUnavailable, fail fast inside a doubling backoff, log the outage and recovery once."""
    clock = ManualClock()
    sim, bat = await make_site(clock, timeout_s=0.2)
    try:
        with capture_logs() as logs:
            sim.set_offline(True)
            with pytest.raises(DeviceUnavailable):
                await bat.read()  # waits for the timeout
            t0 = time.monotonic()
            for _ in range(5):
                with pytest.raises(DeviceUnavailable, match="backing off"):
                    await bat.read()
            assert time.monotonic() - t0 < 0.1  # no round trips: the device is not hammered
            clock.advance(1.0)  # initial backoff passed: one real try, which fails; backoff doubles to 2 s
            with pytest.raises(DeviceUnavailable, match="unit 1"):
                await bat.set_discharge_w(1_000, lease_s=30)
            clock.advance(1.5)
            with pytest.raises(DeviceUnavailable, match="backing off"):
                await bat.read()
            sim.set_offline(False)
            clock.advance(0.6)
            assert (await bat.read()).online
            await bat.read()
        events = [e["event"] for e in logs]
        assert events.count("unavailable") == 1
        assert events.count("recovered") == 1
        assert sim.setpoint_w == 0  # nothing sent while offline took effect
    finally:
        await bat.close()
        await sim.stop()


async def test_local_control_refuses_setpoints_and_sends_nothing() -> None:
    """Check the unit's local/remote switch before commanding: in local control nothing is written."""
    clock = ManualClock()
    sim, bat = await make_site(clock)
    try:
        await bat.set_discharge_w(1_000, lease_s=30)  # remote: accepted
        sim.set_local(True)
        await bat.read()  # the tick's read sees the switch
        before = sim.server.requests
        with pytest.raises(DeviceRejected, match="local control"):
            await bat.set_discharge_w(5_000, lease_s=30)
        assert sim.server.requests == before
        assert sim.setpoint_w == 1_000
        sim.set_local(False)
        clock.advance(11.0)  # the cached reading is stale: re-read before commanding
        assert await bat.set_discharge_w(5_000, lease_s=30) == 5_000
    finally:
        await bat.close()
        await sim.stop()


async def test_the_maps_ramp_limit_moves_setpoints_gradually() -> None:
    """Move the commanded setpoint no faster than the map's control.max_ramp_w_per_s, from 0 W."""
    doc = yaml.safe_load((MAPS / "bess_generic.yaml").read_text(encoding="utf-8"))
    doc["control"] = {"max_ramp_w_per_s": 1_000.0}
    m = parse_mapping(doc, "ramped.yaml")
    clock = ManualClock()
    sim = BatterySimulator(m, clock=clock)
    port = await sim.start()
    bat = ModbusBattery("bess1", ModbusEndpoint("127.0.0.1", port, 1), m, clock=clock)
    try:
        assert await bat.set_discharge_w(50_000, lease_s=300) == 0  # no time has passed yet
        clock.advance(2.0)
        assert await bat.set_discharge_w(50_000, lease_s=300) == 2_000
        clock.advance(10.0)
        assert await bat.set_discharge_w(-5_000, lease_s=300) == -5_000  # within 10 000 W of 2 000 W
        await bat.release()
        assert await bat.set_discharge_w(50_000, lease_s=300) == 0  # after a release: from 0 W again
    finally:
        await bat.close()
        await sim.stop()


async def test_a_restarted_driver_ramps_from_what_the_device_holds_not_from_0_w() -> None:
    """A new driver (a restarted gateway) reads the 3 kW an earlier one left and moves from there: no 0 W write."""
    doc = yaml.safe_load((MAPS / "bess_generic.yaml").read_text(encoding="utf-8"))
    doc["control"] = {"max_ramp_w_per_s": 1_000.0}
    m = parse_mapping(doc, "ramped.yaml")
    clock = ManualClock()
    sim = BatterySimulator(m, clock=clock)
    port = await sim.start()
    first = ModbusBattery("bess1", ModbusEndpoint("127.0.0.1", port, 1), m, clock=clock)
    second = ModbusBattery("bess1", ModbusEndpoint("127.0.0.1", port, 1), m, clock=clock)
    try:
        await first.set_discharge_w(0.0, lease_s=300)
        clock.advance(3.0)
        assert await first.set_discharge_w(3_000, lease_s=300) == 3_000
        await first.close()  # the earlier process is gone; the device holds 3 kW on its revert timer
        assert (await second.read()).setpoint_w == 3_000
        assert await second.set_discharge_w(3_000, lease_s=300) == 3_000  # was 0 W: a notch
        assert sim.setpoint_w == 3_000
        clock.advance(1.0)
        assert await second.set_discharge_w(5_000, lease_s=300) == 4_000  # and ramps on from there
    finally:
        await first.close()
        await second.close()
        await sim.stop()


@pytest.mark.parametrize(("name", "reason"), [("ups_generic", "telemetry only"), ("meter_facility", "telemetry only")])
def test_telemetry_maps_cannot_drive_a_battery(name: str, reason: str) -> None:
    """Refuse a UPS map (unless it says dispatchable: true) and a meter map as a battery."""
    with pytest.raises(ConfigError, match=reason) as info:
        ModbusBattery("x", ModbusEndpoint("127.0.0.1", 1502, 1), name)
    assert info.value.key == "dispatchable"
