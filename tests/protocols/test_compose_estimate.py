"""The estimated facility meter (no metering device configured) while the battery stops answering."""

from __future__ import annotations

import pytest

from gateway.clock import ManualClock
from gateway.compose import build_devices
from gateway.config import parse_config
from protocols.modbus import BatterySimulator


async def test_estimate_keeps_the_battery_discharge_until_its_revert_timer_would_end_it() -> None:
    clock = ManualClock()
    sim = BatterySimulator("bess_generic", clock=clock)
    port = await sim.start()
    cfg = parse_config(
        {
            "site": {"non_gpu_it_w": 10_000.0, "cooling_overhead": 0.0},
            "battery": {"port": port, "revert_s": 30.0, "timeout_s": 0.3},
            "gpus": {"backend": "none"},
        }
    )
    dev = await build_devices(cfg, clock)
    meter, battery, closers = dev.meter, dev.battery, dev.closers
    assert meter is not None and battery is not None
    try:
        assert await meter.read_facility_w() == pytest.approx(10_000.0)
        await battery.set_discharge_w(4_000.0, lease_s=30.0)
        clock.advance(1.0)
        sim.step()  # the simulator's physics, at the manual clock's now
        with_battery = await meter.read_facility_w()
        assert with_battery == pytest.approx(6_000.0, abs=50.0)
        await sim.stop()  # the battery stops answering; it keeps discharging until it reverts
        clock.advance(10.0)
        assert await meter.read_facility_w() == pytest.approx(with_battery)
        clock.advance(25.0)  # past the revert timer: the battery is back to normal
        assert await meter.read_facility_w() == pytest.approx(10_000.0)
    finally:
        for close in closers:
            await close()


async def test_estimate_never_takes_an_impossible_battery_reading_as_a_value() -> None:
    """A power register no battery of this rating can show (900 kW on 250 kW) counts as unreadable, not as export."""
    clock = ManualClock()
    sim = BatterySimulator("bess_generic", clock=clock, max_discharge_w=250_000.0, max_charge_w=250_000.0)
    port = await sim.start()
    cfg = parse_config(
        {
            "site": {"non_gpu_it_w": 10_000.0, "cooling_overhead": 0.0},
            "battery": {"port": port, "revert_s": 30.0, "timeout_s": 0.3},
            "gpus": {"backend": "none"},
        }
    )
    dev = await build_devices(cfg, clock)
    meter, battery, closers = dev.meter, dev.battery, dev.closers
    assert meter is not None and battery is not None
    try:
        await battery.set_discharge_w(4_000.0, lease_s=30.0)
        clock.advance(1.0)
        sim.step()
        assert await meter.read_facility_w() == pytest.approx(6_000.0, abs=50.0)
        sim.server.set("power_w", 900_000.0)  # inside the map's bounds, far beyond this unit's rating
        assert await meter.read_facility_w() == pytest.approx(6_000.0, abs=50.0)  # the last possible reading
        clock.advance(35.0)  # past the revert timer: counted as back to normal, never as 900 kW of export
        assert await meter.read_facility_w() == pytest.approx(10_000.0)
    finally:
        for close in closers:
            await close()
        await sim.stop()
