"""The estimated facility meter (no metering device configured) while the battery stops answering."""

from __future__ import annotations

import pytest

from gateway.clock import ManualClock
from gateway.config import parse_config
from gateway.wiring import build_devices
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
    meter, battery, _fleet, closers = await build_devices(cfg, clock)
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
