"""A gateway restarted mid-event reconciles with what the devices hold: no 0 W notch, no cap released and re-applied.

Two gateways in turn, in one process, over one SQLite audit log and event store: the first
dispatches an event to a real Modbus battery (the pymodbus battery simulator, its every write
recorded through the server's action callback) and to simulated GPUs, then dies without releasing
anything (its control loop stops, its driver closes; the device keeps the setpoint on its own
revert timer, the GPUs their caps on their leases). The second starts against the same devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.audit.schema import audit_log
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, parse_config
from gateway.estimate import ModelMeter
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName
from gateway.simulation.gpus import SimGpuFleet
from protocols.modbus import BatterySimulator, ModbusBattery
from protocols.modbus.endpoint import ModbusEndpoint
from tests.gwproc import until

BATTERY_W = 3000.0


class RecordingFleet:
    """The simulated GPUs, recording every cap command and release the gateway sends them."""

    def __init__(self, fleet: SimGpuFleet) -> None:
        self.fleet = fleet
        self.calls: list[tuple[str, dict[str, float]]] = []  # ("set_caps", caps) or ("release", {})

    async def read(self) -> Any:
        return await self.fleet.read()

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        self.calls.append(("set_caps", dict(caps_w)))
        return await self.fleet.set_caps(caps_w, lease_s)

    async def release(self) -> None:
        self.calls.append(("release", {}))
        await self.fleet.release()


def _config(db: Path) -> GatewayConfig:
    return parse_config(
        {
            "site": {"name": "restart-site", "non_gpu_it_w": 15_000.0, "cooling_overhead": 0.3},
            "audit": {"db_url": str(db)},
            "control": {"tick_s": 0.1, "lease_s": 10.0},
            "battery": {"revert_s": 10.0},
            "gpus": {"groups": [{"count": 8, "job_class": "training", "tier": "flex2"}]},
            "management": {"enabled": False},
        }
    )


async def test_a_restart_mid_event_keeps_what_the_devices_hold(tmp_path: Path) -> None:
    """Across the restart the battery's setpoint register never goes to 0 or dips, and no GPU cap is released."""
    cfg = _config(tmp_path / "audit.db")
    clock = SystemClock()
    bsim = BatterySimulator(
        "bess_generic", capacity_wh=40_000.0, max_discharge_w=BATTERY_W, max_charge_w=BATTERY_W, clock=clock
    )
    await bsim.start()
    setpoints: list[float] = []  # the setpoint register after every write the server saw
    seen = bsim.server.on_write
    assert seen is not None

    def on_write(names: frozenset[str]) -> None:
        seen(names)
        if "setpoint_w" in names:
            setpoints.append(bsim.setpoint_w)

    bsim.server.on_write = on_write
    fleet = RecordingFleet(SimGpuFleet(cfg.gpus, clock))  # the GPUs, and their leases, outlive the gateway

    async def gpu_w() -> float:
        return fleet.fleet.total_power_w()

    async def batt_w() -> float:
        return bsim.power_w

    meter = ModelMeter(gpu_w, batt_w, cfg.site.non_gpu_it_w, cfg.site.cooling_overhead, clock)
    started: list[tuple[Gateway, AuditLog, ModbusBattery]] = []

    async def start() -> Gateway:
        audit = await AuditLog.open(cfg.audit.db_url, clock)
        battery = ModbusBattery(
            "bess1",
            ModbusEndpoint("127.0.0.1", bsim.port, 1, timeout_s=1.0),
            "bess_generic",
            cfg.battery.revert_s,
            clock,
        )
        gw = Gateway(cfg, clock, audit, meter, battery, fleet)  # type: ignore[arg-type]
        started.append((gw, audit, battery))
        await gw.start(with_ven=False, with_mgmt=False)
        return gw

    def capped() -> dict[str, float]:
        return {g.gpu_id: g.cap_w for g in fleet.fleet.states() if g.cap_w < g.default_cap_w - 1.0}

    try:
        first = await start()
        now = clock.now()
        sig = Signal(SignalName.LOAD_DISPATCH, "delta", (Interval(now + timedelta(seconds=2), 600.0, 5_000.0),))
        # A 2 s ramp into the event: a restart that ramped again from nothing would dip the battery.
        ev = DemandEvent("E-restart", 0, "far", now + timedelta(seconds=2), 600.0, (sig,), ramp_up_s=2.0)
        assert (await first.book.answer(ev)).opt is Opt.IN
        await until(lambda: first.loop.active_event_id and first.loop.phase == "active", 10.0, "the event active")
        await until(lambda: bsim.setpoint_w == BATTERY_W and len(capped()) == 8, 10.0, "battery and caps in force")
        await until(lambda: len(first.loop.records) > 60, 10.0, "the accounting kept in the store")
        caps_before = capped()

        # The first gateway dies: nothing released, nothing said.
        first._stop.set()
        assert first._task is not None
        await first._task
        await started[0][2].close()
        await started[0][1].close()
        assert bsim.setpoint_w == BATTERY_W and bsim.control_mode == 1, "the device holds the setpoint on its timer"
        writes, calls = len(setpoints), len(fleet.calls)

        second = await start()
        await until(lambda: len(second.loop.records) > 20, 10.0, "ticks of the restarted gateway")
        after = setpoints[writes:]
        assert after, "the restarted gateway renews the battery's setpoint"
        assert min(after) >= 0.95 * BATTERY_W, f"the battery was notched across the restart: {after}"
        assert bsim.setpoint_w == BATTERY_W and bsim.control_mode == 1
        # The GPUs: never released, no cap sent back up to the default, caps as deep as before.
        assert ("release", {}) not in fleet.calls[calls:]
        raised = [c for kind, caps in fleet.calls[calls:] for c in caps.values() if c >= 699.0]
        assert raised == [], "a cap was released and re-applied"
        assert len(capped()) == 8
        assert abs(sum(capped().values()) - sum(caps_before.values())) <= 0.02 * sum(caps_before.values())
        kinds = [r["kind"] for r in await _rows_after_last_start(second)]
        assert "release.battery" not in kinds and "release.gpus" not in kinds, kinds
        assert "reconcile.kept" in kinds and kinds.index("reconcile.kept") < kinds.index("command.battery")
    finally:
        for gw, audit, battery in reversed(started):
            if gw is started[-1][0] and len(started) == 2:
                await gw.stop("test over")
            await battery.close()
            await audit.close()
        await bsim.stop()


async def _rows_after_last_start(gw: Gateway) -> list[Any]:
    """Return the audit rows written since the last ``gateway.start``, oldest first."""
    async with gw.audit_log.engine.connect() as conn:
        rows = list((await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).mappings())
    last = max(i for i, r in enumerate(rows) if r["kind"] == "gateway.start")
    return rows[last:]
