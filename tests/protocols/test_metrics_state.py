"""What /metrics says about commands, links and the next event, from a Gateway wired to a real Modbus battery
(the pymodbus simulator on 127.0.0.1) and simulated GPUs, on a manual clock so the "since" times are exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.clock import ManualClock
from gateway.config import parse_config
from gateway.model import DemandEvent, Interval, Signal, SignalName
from gateway.simulation.gpus import SimGpuFleet
from protocols.modbus.battery import ModbusBattery
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.simulator import BatterySimulator
from tests.monitoring import sample

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


async def test_commands_by_result_and_links_with_since(tmp_path: Path) -> None:
    """A setpoint the battery stores otherwise is a fault and a read-back mismatch, a taken one is ok, releases
    count apart; a battery that stops answering is a link down since that tick, not a failed command."""
    clock = ManualClock(T0)
    sim = BatterySimulator("bess_generic", clock=clock)  # stores at most 250 kW
    port = await sim.start()
    battery = ModbusBattery("bess1", ModbusEndpoint("127.0.0.1", port, 1, timeout_s=0.5), "bess_generic", 60.0, clock)
    await battery.connect()
    db = str(tmp_path / "audit.db")
    cfg = parse_config({"audit": {"db_url": db}, "battery": {"port": port}, "gpus": {"backend": "sim"}})
    audit = await AuditLog.open(db, clock=clock)
    fleet = SimGpuFleet(cfg.gpus, clock)
    gw = Gateway(cfg, clock, audit, None, battery, fleet)
    try:
        await gw.loop.tick()  # every link seen up at T0
        await gw.dispatcher.apply(300_000.0, {}, "ev-1", {})  # stored as 250 kW: read back otherwise
        await gw.dispatcher.apply(5_000.0, {}, "ev-1", {})
        defaults = {g.gpu_id: g.default_cap_w for g in await fleet.read()}
        await gw.dispatcher.apply(None, {gpu: cap - 100.0 for gpu, cap in defaults.items()}, "ev-1", defaults)
        await gw.dispatcher.release("test", "ev-1")
        await sim.stop()
        clock.advance(30.0)
        await gw.loop.tick()  # the battery does not answer
        text = gw.metrics().decode()
    finally:
        await battery.close()
        await sim.stop()
        await audit.close()

    def commands(device: str, action: str, result: str) -> float | None:
        return sample(text, "drgw_commands_total", device=device, action=action, result=result)

    assert (commands("battery", "set", "fault"), commands("battery", "set", "ok")) == (1.0, 1.0)
    assert (commands("gpus", "set", "ok"), commands("gpus", "set", "fault")) == (1.0, 0.0)
    assert (commands("battery", "release", "ok"), commands("gpus", "release", "ok")) == (1.0, 1.0)
    assert commands("battery", "release", "fault") == 0.0
    assert sample(text, "drgw_command_readback_mismatches_total", device="battery") == 1.0
    assert sample(text, "drgw_command_readback_mismatches_total", device="gpus") == 0.0
    assert sample(text, "drgw_link_up", peer="battery") == 0.0
    assert sample(text, "drgw_link_since_timestamp_seconds", peer="battery") == (T0 + timedelta(seconds=30)).timestamp()
    for peer in ("gpus", "audit_writer"):
        assert sample(text, "drgw_link_up", peer=peer) == 1.0
        assert sample(text, "drgw_link_since_timestamp_seconds", peer=peer) == T0.timestamp()
    assert sample(text, "drgw_link_up", peer="meter") is None  # not configured: no series, rather than "up"


async def test_an_event_opted_into_for_later_is_pending_with_its_window(tmp_path: Path) -> None:
    """Before its start, the next event is "pending", named, with its window; nothing is active or in a phase."""
    clock = ManualClock(T0)
    db = str(tmp_path / "audit.db")
    cfg = parse_config({"audit": {"db_url": db}, "battery": {"enabled": False}, "openadr": {"opt_policy": "always"}})
    audit = await AuditLog.open(db, clock=clock)
    gw = Gateway(cfg, clock, audit, None, None, None)
    start = T0 + timedelta(hours=1)
    signal = Signal(SignalName.SIMPLE, "level", (Interval(start, 1800.0, 1.0),))
    try:
        await gw.book.answer(DemandEvent("ev-later", 0, "far", start, 1800.0, (signal,), vtn_id="vtn"))
        text = gw.metrics().decode()
    finally:
        await audit.close()
    states = {s: sample(text, "drgw_event_state", state=s) for s in ("idle", "pending", "active", "opted_out")}
    assert states == {"idle": 0.0, "pending": 1.0, "active": 0.0, "opted_out": 0.0}
    assert sample(text, "drgw_event_info", event_id="ev-later") == 1.0
    assert sample(text, "drgw_event_start_timestamp_seconds") == start.timestamp()
    assert sample(text, "drgw_event_end_timestamp_seconds") == (start + timedelta(seconds=1800)).timestamp()
    assert sample(text, "drgw_event_active") == 0.0
    assert all(sample(text, "drgw_event_phase", phase=p) == 0.0 for p in ("ramp_up", "active", "recovery"))
