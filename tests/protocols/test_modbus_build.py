"""Equipment built from config (gateway.compose, protocols.modbus.build) against simulators on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.compose import build_bms as build_bms_for
from gateway.compose import build_devices, build_meter
from gateway.config import parse_config
from gateway.errors import ConfigError
from protocols.modbus.build import build_bms
from protocols.modbus.meter import ModbusMeter
from protocols.modbus.simulator import PointServer
from protocols.modbus.sunspec_battery import SunspecBattery
from protocols.modbus.sunspec_sim import SunspecSimulator
from protocols.modbus.ups import UpsGuardedBattery
from tests.doubles import RecordingAudit


async def test_a_sunspec_battery_a_ups_and_a_modbus_meter_from_config() -> None:
    """Pick the SunSpec driver from the map, guard it with the UPS, and read the meter."""
    clock = ManualClock()
    inverter = SunspecSimulator(clock=clock)
    ups = PointServer("ups_generic")
    meter = PointServer("meter_facility")
    ports = [await inverter.start(), await ups.start(), await meter.start()]
    for name, value in (("battery_soc_pct", 90.0), ("runtime_remaining_s", 3600.0), ("status", 1.0)):
        ups.set(name, value)
    meter.set("total_active_power_w", 750_000.0)
    cfg = parse_config(
        {
            "battery": {"mapping": "sunspec_storage", "port": ports[0], "device_id": "inv1"},
            "ups": {"enabled": True, "port": ports[1]},
            "meter": {"backend": "modbus", "port": ports[2]},
            "gpus": {"backend": "none"},
        }
    )
    eq = await build_devices(cfg, clock)
    try:
        assert isinstance(eq.battery, UpsGuardedBattery) and isinstance(eq.battery.inner, SunspecBattery)
        assert isinstance(eq.meter, ModbusMeter)
        assert await eq.meter.read_facility_w() == pytest.approx(750_000.0)
        assert (await eq.battery.read()).max_discharge_w == 250_000
        ups.set("status", 0b011)  # on battery
        assert (await eq.battery.read()).max_discharge_w == 0
    finally:
        for close in eq.closers:
            await close()
        for sim in (inverter, ups, meter):
            await sim.stop()


async def test_devices_down_at_start_are_not_fatal() -> None:
    """Build and return the devices even when none answers yet."""
    cfg = parse_config(
        {
            "battery": {"port": 9, "timeout_s": 0.2},
            "meter": {"backend": "modbus", "port": 9},
            "gpus": {"backend": "none"},
        }
    )
    eq = await build_devices(cfg, ManualClock())
    assert eq.battery is not None and eq.meter is not None and eq.ups is None
    for close in eq.closers:
        await close()


def test_the_estimate_backend_builds_no_meter_and_a_disabled_bms_no_server() -> None:
    """Return None for backend "estimate" and for [bms] enabled = false."""
    cfg = parse_config({})
    assert build_meter(cfg.meter, ManualClock()) is None
    assert build_bms(cfg.bms, lambda: None, None, ManualClock()) is None  # type: ignore[arg-type]


def test_an_opcua_meter_from_config(tmp_path: Path) -> None:
    """Build an OPC UA meter with the configured security; a missing password file is a config error."""
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n", encoding="utf-8")
    section = {
        "url": "opc.tcp://127.0.0.1:4840/",
        "certificate": "c.der",
        "private_key": "k.pem",
        "server_certificate": "s.der",
        "username": "gw",
        "password_file": str(secret),
    }
    cfg = parse_config({"meter": {"backend": "opcua", "opcua": section}})
    meter = build_meter(cfg.meter, ManualClock())
    assert meter.client.security.password == "hunter2"
    assert meter.client.node_map.model == "opcua_substation"
    broken = parse_config({"meter": {"backend": "opcua", "opcua": {**section, "password_file": str(tmp_path / "no")}}})
    with pytest.raises(ConfigError, match="password_file"):
        build_meter(broken.meter, ManualClock())


@pytest.mark.parametrize(
    ("meter", "key"),
    [
        ({"backend": "opcua"}, "meter"),
        ({"backend": "opcua", "opcua": {"url": "opc.tcp://h:4840/"}}, "meter.opcua"),
        ({"backend": "opcua", "opcua": {"security": "none", "username": "u"}}, "meter.opcua"),
    ],
)
def test_meter_config_errors(meter: dict, key: str) -> None:
    """Refuse an OPC UA meter without its section, without certificates, or a user without a password file."""
    with pytest.raises(ConfigError) as info:
        parse_config({"meter": meter}, "gw.toml")
    assert info.value.key == key


async def test_the_bms_face_of_a_gateway_passes_opt_outs_to_its_opt_out_path() -> None:
    """Serve the gateway's state and hand an opt-out to gw.opt_out (the one opt-out path) as actor bms."""
    from types import SimpleNamespace

    from pymodbus.client import AsyncModbusTcpClient

    from gateway.bms import snapshot_of
    from gateway.model import Snapshot
    from gateway.status import ControlStatus, SiteView, StatusBoard

    calls: list[tuple[str, str, str, str]] = []

    class Book:
        def events(self) -> list:
            return []

        def active_event_ids(self, _t: object) -> list[str]:
            return ["ev-7"]

    async def opt_out(event_id: str, actor: str, reason: str, origin: str) -> dict:
        calls.append((event_id, actor, reason, origin))
        return {"ok": True}

    clock = ManualClock()
    board = StatusBoard()  # what the control loop publishes each tick
    site = SiteView(Snapshot(t=clock.now(), facility_w=90_000.0, battery=None), 100_000.0, {}, {})
    board.publish(ControlStatus(1, site, None, "ev-7", "active", 80_000.0, frozenset(), (), None))
    cfg = parse_config({"bms": {"enabled": True, "port": 0}})

    def bms_snapshot(stale_after_s: float) -> object:
        return snapshot_of(board.latest, Book(), clock.now(), stale_after_s)

    # The face gets what it needs from the gateway (its state, its opt-out path), nothing of its insides.
    gw = SimpleNamespace(cfg=cfg, audit=RecordingAudit(), opt_out=opt_out, bms_snapshot=bms_snapshot)
    bms = build_bms_for(gw, clock)  # type: ignore[arg-type]
    assert bms is not None
    port = await bms.start()
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        rr = await client.read_holding_registers(4, count=1, device_id=1)
        assert rr.registers == [2]  # event active
        assert not (await client.write_register(100, 1, device_id=1)).isError()
        assert calls and calls[0][:2] == ("ev-7", "bms") and calls[0][3].startswith("127.0.0.1:")
    finally:
        client.close()
        await bms.stop()
