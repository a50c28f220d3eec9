"""The Modbus meter and UPS drivers against pymodbus servers built from their maps; the UPS guard."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.clock import ManualClock
from gateway.errors import DeviceRejected, DeviceUnavailable
from gateway.interfaces import Battery, Meter
from protocols.modbus.battery import ModbusBattery
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.meter import ModbusMeter
from protocols.modbus.simulator import BatterySimulator, PointServer
from protocols.modbus.ups import ModbusUps, UpsGuardedBattery, UpsState, discharge_allowance_w
from tests.faults.proxy import FaultProxy


@pytest.fixture(autouse=True)
def _info_logs() -> Iterator[None]:
    """Let info logs through even if an earlier test ran `drgw` in-process (it filters at WARNING)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


@pytest.fixture
async def meter_site() -> AsyncIterator[tuple[PointServer, ModbusMeter, ManualClock]]:
    """Yield a meter server, a connected meter driver and their shared manual clock."""
    clock = ManualClock()
    server = PointServer("meter_facility")
    port = await server.start()
    meter = ModbusMeter("meter1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=0.2), "meter_facility", clock)
    await meter.connect()
    yield server, meter, clock
    await meter.close()
    await server.stop()


async def test_meter_reads_facility_power_in_watts(meter_site: tuple[PointServer, ModbusMeter, ManualClock]) -> None:
    """Read the CDAB float in kW as W, through the Meter interface."""
    server, meter, _ = meter_site
    server.set("total_active_power_w", 1_234_500.0)
    assert server.registers("total_active_power_w")[1] != 0  # low word first on the wire
    m: Meter = meter
    assert await m.read_facility_w() == pytest.approx(1_234_500.0)


async def test_meter_reads_a_polling_group(meter_site: tuple[PointServer, ModbusMeter, ManualClock]) -> None:
    """Read only the slow group's points (energy counters, serial number), text included."""
    server, meter, _ = meter_site
    server.set("energy_import_wh", 2.0**40)
    server.set("serial_number", "M-0042")
    slow = await meter.read_group("slow")
    assert set(slow) == {"energy_import_wh", "energy_export_wh", "serial_number"}
    assert slow["energy_import_wh"] == 2.0**40
    assert slow["serial_number"] == "M-0042"


async def test_meter_lost_and_back(meter_site: tuple[PointServer, ModbusMeter, ManualClock]) -> None:
    """Fail, back off without traffic, log the outage and the recovery once each."""
    server, meter, clock = meter_site
    server.set("total_active_power_w", 500_000.0)
    with capture_logs() as logs:
        server.set_offline(True)
        with pytest.raises(DeviceUnavailable):
            await meter.read_facility_w()
        before, t0 = server.requests, time.monotonic()
        for _ in range(3):
            with pytest.raises(DeviceUnavailable, match="backing off"):
                await meter.read_facility_w()
        assert server.requests == before and time.monotonic() - t0 < 0.1
        server.set_offline(False)
        clock.advance(1.0)
        assert await meter.read_facility_w() == pytest.approx(500_000.0)
        assert await meter.read_facility_w() == pytest.approx(500_000.0)
    events = [e["event"] for e in logs]
    assert (events.count("unavailable"), events.count("recovered")) == (1, 1)


@pytest.fixture
async def ups_site() -> AsyncIterator[tuple[PointServer, ModbusUps]]:
    """Yield a UPS server in a healthy state and a connected UPS driver."""
    server = PointServer("ups_generic")
    port = await server.start()
    for name, value in (("battery_soc_pct", 100.0), ("runtime_remaining_s", 1800.0), ("status", 1.0), ("alarms", 0.0)):
        server.set(name, value)
    ups = ModbusUps("ups1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=0.2), "ups_generic")
    await ups.connect()
    yield server, ups
    await ups.close()
    await server.stop()


async def test_ups_telemetry(ups_site: tuple[PointServer, ModbusUps]) -> None:
    """Read charge, runtime, the on-battery bit of the status word, and alarms; sentinels as None."""
    server, ups = ups_site
    assert await ups.read() == UpsState("ups1", 100.0, 1800.0, False, 0)
    server.set("status", 0b011)  # online and on battery
    server.set("runtime_remaining_s", None)
    state = await ups.read()
    assert (state.on_battery, state.runtime_s) == (True, None)


@pytest.mark.parametrize(
    ("state", "allowed"),
    [
        (UpsState("u", 100.0, 1800.0, False, 0), math.inf),
        (UpsState("u", 100.0, 1800.0, True, 0), 0.0),  # utility outage: the UPS carries the load
        (UpsState("u", 100.0, 1800.0, False, 0b10), 0.0),  # an alarm
        (UpsState("u", 100.0, 300.0, False, 0), 0.0),  # less runtime than the reserve
        (UpsState("u", 40.0, 1800.0, False, 0), 0.0),  # less charge than the reserve
        (UpsState("u", None, 1800.0, False, 0), 0.0),  # not available is not "fine"
        (UpsState("u", 100.0, 1800.0, None, 0), 0.0),
        (None, 0.0),  # the UPS cannot be read
    ],
)
def test_ups_guard(state: UpsState | None, allowed: float) -> None:
    """Allow discharge only while the UPS is on mains, alarm-free, and above its runtime and charge reserves."""
    assert discharge_allowance_w(state, min_runtime_s=600, min_soc_pct=50)[0] == allowed


async def test_guarded_battery_holds_discharge_while_the_ups_is_on_battery(
    ups_site: tuple[PointServer, ModbusUps],
) -> None:
    """Lower the reported discharge limit to 0 and clamp setpoints while the UPS is on battery; charging passes."""
    server, ups = ups_site
    sim = BatterySimulator("bess_generic")
    port = await sim.start()
    inner = ModbusBattery("bess1", ModbusEndpoint("127.0.0.1", port, 1), "bess_generic")
    guarded = UpsGuardedBattery(inner, ups, min_runtime_s=600, min_soc_pct=50)
    battery: Battery = guarded
    try:
        assert (await battery.read()).max_discharge_w == 250_000
        assert await battery.set_discharge_w(10_000, lease_s=30) == 10_000
        server.set("status", 0b011)
        assert (await battery.read()).max_discharge_w == 0
        assert await battery.set_discharge_w(10_000, lease_s=30) == 0
        assert await battery.set_discharge_w(-10_000, lease_s=30) == -10_000
        await ups.close()
        server.set_offline(True)  # an unreadable UPS guards like an outage
        server.set("status", 1.0)
        assert (await battery.read()).max_discharge_w == 0
        assert "unknown" in guarded.reason
    finally:
        await inner.close()
        await sim.stop()


async def test_ups_with_an_impossible_charge_or_runtime_allows_no_discharge(
    ups_site: tuple[PointServer, ModbusUps],
) -> None:
    """A UPS reporting 6000 % charge or a year of runtime is not "ready": the guard allows nothing."""
    server, ups = ups_site
    server.set("battery_soc_pct", 6000.0)
    state = await ups.read()
    assert state.soc_pct is None and discharge_allowance_w(state, 600, 50)[0] == 0.0
    server.set("battery_soc_pct", 100.0)
    server.set("runtime_remaining_s", 365 * 86_400.0)
    state = await ups.read()
    assert state.runtime_s is None and discharge_allowance_w(state, 600, 50)[0] == 0.0


async def test_ups_with_a_not_available_value_is_rejected_by_a_strict_read(
    ups_site: tuple[PointServer, ModbusUps],
) -> None:
    """Refuse to pass a sentinel off as a number in a strict transport read."""
    server, ups = ups_site
    server.set("battery_soc_pct", None)
    with pytest.raises(DeviceRejected, match="not available"):
        await ups._transport.read(["battery_soc_pct"])


async def test_polling_groups_are_read_at_their_own_periods(
    meter_site: tuple[PointServer, ModbusMeter, ManualClock],
) -> None:
    """Read every group at first, then only the groups whose period has passed, in coalesced requests."""
    server, meter, clock = meter_site
    server.set("total_active_power_w", 100_000.0)
    server.set("energy_import_wh", 1_000.0)
    before = server.requests
    first = await meter.telemetry()
    assert set(first) == set(meter.mapping.points)
    assert server.requests - before == 3  # fast 3000-3013; slow 3100-3107 and 3200-3205 (too far apart for one)
    server.set("total_active_power_w", 200_000.0)
    server.set("energy_import_wh", 2_000.0)
    clock.advance(1.0)  # fast (1 s) is due, slow (30 s) is not
    before = server.requests
    second = await meter.telemetry()
    assert server.requests - before == 1
    assert (second["total_active_power_w"], second["energy_import_wh"]) == (200_000.0, 1_000.0)
    clock.advance(30.0)
    third = await meter.telemetry()
    assert third["energy_import_wh"] == 2_000.0


async def test_a_session_that_stops_answering_is_dropped_and_a_new_one_opened() -> None:
    """A device (or a bridge before it) that holds a TCP session open but never answers on it again."""
    clock = ManualClock()
    server = PointServer("meter_facility")
    proxy = FaultProxy("127.0.0.1", await server.start())
    port = await proxy.start()
    meter = ModbusMeter("meter1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=0.2), "meter_facility", clock)
    try:
        server.set("total_active_power_w", 500_000.0)
        await proxy.set_mode("blackhole")
        await meter.connect()  # accepted while black-holed: this session never answers, even once healed
        with pytest.raises(DeviceUnavailable, match="No response"):
            await meter.read_facility_w()
        await proxy.set_mode("pass")  # new sessions answer again
        clock.advance(1.0)  # past the first backoff
        assert await meter.read_facility_w() == pytest.approx(500_000.0)
        assert len(proxy.accepted) == 2  # the silent session was given up at once, not kept for later requests
    finally:
        await meter.close()
        await proxy.stop()
        await server.stop()
