"""The control loop against a real Modbus battery that misbehaves: a pymodbus server built from bess_generic.

The battery simulator answers the ModbusBattery driver over TCP on loopback; simulated GPUs, the
model facility meter and the real event book, planner, limits, dispatcher and control loop run on
a manual clock, ticked by hand. A battery is believed only within physics: one whose state-of-charge
register lies (0xFFFF: 6553.5 %) while its real charge is under the floor is never discharged,
and its fault is audited once per transition. A battery that delivers half of each setpoint (and
says so in its power register) is made up by the GPUs: the facility lands on the target. A meter
reading no site can give (NaN, beyond the meter's range, outside the site's configured range) is
a fault, never a value: it does not move the baseline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.clock import ManualClock
from gateway.config import GatewayConfig, parse_config
from gateway.control import ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.estimate import ModelMeter
from gateway.events import EventBook
from gateway.feasibility import site_feasibility
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName
from gateway.simulation.gpus import SimGpuFleet
from gateway.status import StatusBoard
from protocols.modbus import BatterySimulator, ModbusBattery, ModbusMeter, PointServer
from protocols.modbus.endpoint import ModbusEndpoint
from tests.doubles import MemoryStore as Store
from tests.doubles import RecordingAudit as Audit

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
TICK_S = 2.0
BATTERY_W = 3000.0


def _config() -> GatewayConfig:
    return parse_config(
        {
            "site": {"non_gpu_it_w": 15_000.0, "cooling_overhead": 0.3},
            "control": {"tick_s": TICK_S, "lease_s": 30.0, "gain": 0.6},
            "limits": {"soc_floor_pct": 20.0},
            "gpus": {"groups": [{"count": 16, "job_class": "training", "tier": "flex2"}]},
        }
    )


def _event(shed_w: float, minutes: float) -> DemandEvent:
    sig = Signal(SignalName.LOAD_DISPATCH, "delta", (Interval(T0, minutes * 60.0, shed_w),))
    return DemandEvent("E1", 0, "far", T0, minutes * 60.0, (sig,))


class ModbusSite:
    """The battery simulator behind its Modbus server, the driver, GPUs, meter and the loop, on one manual clock."""

    def __init__(self, bsim: BatterySimulator, battery: ModbusBattery, clock: ManualClock) -> None:
        self.cfg = _config()
        self.clock, self.bsim, self.battery = clock, bsim, battery
        self.fleet = SimGpuFleet(self.cfg.gpus, clock)
        self.audit = Audit()
        self.setpoints: list[float] = []  # the setpoint register after every write the server saw

        async def gpu_w() -> float:
            return self.fleet.total_power_w()

        async def batt_w() -> float:
            return bsim.power_w

        seen = bsim.server.on_write
        assert seen is not None

        def on_write(names: frozenset[str]) -> None:
            seen(names)
            if "setpoint_w" in names:
                self.setpoints.append(bsim.setpoint_w)

        bsim.server.on_write = on_write
        self.meter = ModelMeter(gpu_w, batt_w, self.cfg.site.non_gpu_it_w, self.cfg.site.cooling_overhead, clock)
        board = StatusBoard()  # the loop publishes the site view the book's feasibility estimate reads
        feasibility = site_feasibility(self.cfg, board.latest_site)
        self.book = EventBook(self.cfg.openadr, Store(), self.audit, feasibility, clock=clock)
        self.dispatcher = Dispatcher(battery, self.fleet, self.audit, clock, self.cfg.control.lease_s)
        self.loop = ControlLoop(
            self.cfg, self.book, self.meter, battery, self.fleet, self.dispatcher, self.audit, clock, status=board
        )

    async def run_until(self, t: datetime) -> list[tuple[datetime, float, float | None]]:
        """Tick until ``t`` (the battery's physics stepped around each tick); return (time, meter W, limit W)."""
        out = []
        while self.clock.now() < t:
            self.bsim.step()
            rec = await self.loop.tick()
            self.bsim.step()  # what the tick wrote takes effect
            out.append((rec.t, rec.facility_w or 0.0, rec.limit_w))
            self.clock.advance(TICK_S)
        return out

    def gpu_facility_shed_w(self) -> float:
        """Return what the GPU caps shed at the meter now (W): uncapped draw minus draw, with cooling."""
        natural = sum(self.fleet.natural_w().values())
        return (natural - self.fleet.total_power_w()) * (1.0 + self.cfg.site.cooling_overhead)


@pytest.fixture
async def make_site() -> AsyncIterator[Any]:
    """Start battery simulators (on their Modbus servers) with connected drivers; stop them afterwards."""
    started: list[tuple[BatterySimulator, ModbusBattery]] = []

    async def make(**battery: Any) -> ModbusSite:
        clock = ManualClock(T0 - timedelta(minutes=10))
        kw: dict[str, Any] = {"capacity_wh": 40_000.0, "max_discharge_w": BATTERY_W, "max_charge_w": BATTERY_W}
        bsim = BatterySimulator("bess_generic", clock=clock, **{**kw, **battery})
        port = await bsim.server.start()  # the physics is stepped by the test, around each tick
        drv = ModbusBattery("bess1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=2.0), "bess_generic", 60.0, clock)
        await drv.connect()
        started.append((bsim, drv))
        return ModbusSite(bsim, drv, clock)

    yield make
    for bsim, drv in started:
        await drv.close()
        await bsim.server.stop()


@pytest.mark.parametrize("raw", [0xFFFF, 0x4000], ids=["sentinel-0xFFFF", "impossible-1638.4pct"])
async def test_a_battery_whose_soc_register_lies_is_never_discharged(make_site: Any, raw: int) -> None:
    """SoC register 0xFFFF (or 1638.4 %) while the real charge is under the floor: no discharge, one fault per lie."""
    site: ModbusSite = await make_site(soc_pct=15.0)  # under the 20 % floor
    site.bsim.report_soc_raw(raw)
    await site.run_until(T0 - timedelta(minutes=1))
    assert (await site.book.answer(_event(3_000.0, 30.0))).opt is Opt.IN  # the GPUs alone can shed 3 kW
    trace = await site.run_until(T0 + timedelta(minutes=5))
    assert site.setpoints == [] and site.bsim.power_w == 0.0, "a battery under its floor was discharged"
    faults = site.audit.of("fault.device", "bess1")
    assert len(faults) == 1, faults  # once per transition, not once per tick
    assert "soc_pct" in faults[0]["error"] and ("not available" in faults[0]["error"] or "bounds" in faults[0]["error"])
    ticks = site.audit.data_of("control.tick")
    assert ticks and all(d["battery_w"] is None for d in ticks) and all(d["faults"] for d in ticks)
    # The GPUs carry the event without it.
    settled = [abs(f - lim) for t, f, lim in trace if t >= T0 + timedelta(minutes=2) and lim is not None]
    assert max(settled) < 0.01 * trace[-1][2], max(settled)  # type: ignore[operator]

    site.bsim.report_soc_raw(None)  # the register tells the truth again: 15 %, under the floor
    await site.run_until(T0 + timedelta(minutes=8))
    assert len(site.audit.of("device.recovered", "bess1")) == 1
    assert site.bsim.power_w == 0.0 and all(sp <= 0.0 for sp in site.setpoints)  # the floor holds it

    site.bsim.report_soc_raw(raw)  # and lies again: a second transition, a second fault
    await site.run_until(T0 + timedelta(minutes=11))
    assert len(site.audit.of("fault.device", "bess1")) == 2
    assert site.bsim.power_w == 0.0 and all(sp <= 0.0 for sp in site.setpoints)


async def test_a_battery_that_starts_lying_mid_discharge_is_released_at_once(make_site: Any) -> None:
    """A discharging battery whose SoC register turns to 0xFFFF is released on that tick, not left to its lease."""
    site: ModbusSite = await make_site(soc_pct=60.0)
    await site.run_until(T0 - timedelta(minutes=1))
    assert (await site.book.answer(_event(4_000.0, 30.0))).opt is Opt.IN
    await site.run_until(T0 + timedelta(minutes=3))
    assert site.bsim.power_w == BATTERY_W
    site.bsim.report_soc_raw(0xFFFF)
    trace = await site.run_until(T0 + timedelta(minutes=3, seconds=TICK_S))  # one tick reads the lie
    assert site.bsim.setpoint_w == 0.0 and site.bsim.control_mode == 0 and site.bsim.power_w == 0.0
    assert len(site.audit.of("fault.device", "bess1")) == 1
    (released,) = site.audit.of("release.battery", "bess1")
    assert released["reason"] == "battery reading not possible"
    trace += await site.run_until(T0 + timedelta(minutes=8))  # the GPUs took over the whole shed at once
    assert site.bsim.power_w == 0.0 and len(site.audit.of("release.battery", "bess1")) == 1
    errors = [abs(f - lim) for _, f, lim in trace if lim is not None]
    assert max(errors) < 0.01 * trace[-1][2], max(errors)  # type: ignore[operator]


async def test_a_battery_that_delivers_half_is_made_up_by_the_gpus(make_site: Any) -> None:
    """A battery applying half of each setpoint: the GPUs carry the rest and the meter lands on the target."""
    site: ModbusSite = await make_site(soc_pct=80.0, delivery_fraction=0.5)
    await site.run_until(T0 - timedelta(minutes=1))
    assert (await site.book.answer(_event(5_000.0, 30.0))).opt is Opt.IN
    trace = await site.run_until(T0 + timedelta(minutes=10))
    # The battery is asked for all it has and gives half of it, honestly reported.
    assert site.bsim.setpoint_w == BATTERY_W and site.bsim.power_w == BATTERY_W / 2
    settled = [(f, lim) for t, f, lim in trace if t >= T0 + timedelta(minutes=3) and lim is not None]
    worst = max(abs(f - lim) for f, lim in settled)
    assert worst < 0.005 * settled[-1][1], f"the meter missed the target by up to {worst:.0f} W"
    # The GPUs carry what the battery does not: 5 kW less the 1.5 kW it really gives, not less its 3 kW setpoint.
    assert site.gpu_facility_shed_w() == pytest.approx(5_000.0 - BATTERY_W / 2, rel=0.05)


async def test_an_impossible_facility_reading_is_a_fault_not_a_value() -> None:
    """A real Modbus meter reading NaN, beyond its map's bounds or outside the site's range: no value, one fault."""
    cfg = parse_config({"meter": {"backend": "modbus", "min_w": -5_000.0, "max_w": 200_000.0}})
    server = PointServer("meter_facility")
    port = await server.start()
    clock = ManualClock(T0)
    meter = ModbusMeter("meter1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=2.0), "meter_facility", clock)
    await meter.connect()
    audit = Audit()
    book = EventBook(cfg.openadr, Store(), audit, clock=clock)
    loop = ControlLoop(cfg, book, meter, None, None, Dispatcher(None, None, audit, clock, 30.0), audit, clock)
    try:
        server.set("total_active_power_w", 60_000.0)
        for _ in range(3):
            assert (await loop.tick()).facility_w == 60_000.0
            clock.advance(TICK_S)
        for impossible in (-50_000.0, 5.0e9, None, 1.0e6):  # None: the float's NaN ("not available")
            server.set("total_active_power_w", impossible)
            for _ in range(3):
                assert (await loop.tick()).facility_w is None, impossible
                clock.advance(TICK_S)
            server.set("total_active_power_w", 61_000.0)
            assert (await loop.tick()).facility_w == 61_000.0
            clock.advance(TICK_S)
        faults = audit.of("fault.device", "meter1")
        assert len(faults) == 4 and len(audit.of("device.recovered", "meter1")) == 4, faults
        assert "below the site's possible -5000 W" in faults[0]["error"]
        assert "outside its physical bounds" in faults[1]["error"]
        assert "not available" in faults[2]["error"]
        assert "above the site's possible 200000 W" in faults[3]["error"]
        assert loop.baseline_w is not None and 60_000.0 <= loop.baseline_w <= 61_000.0  # never moved by a lie
    finally:
        await meter.close()
        await server.stop()
