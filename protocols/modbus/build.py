"""Modbus equipment from config: the battery (vendor map or SunSpec), the Modbus meter, the UPS (and the
guard it puts on the battery) and the BMS face, for the composition root (``gateway.compose``).

Nothing here is connected at import or when built; the composition root connects what it builds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gateway.bms import StateProvider
from gateway.clock import Clock
from gateway.config import BatteryConfig, BmsConfig, MeterConfig, UpsConfig
from gateway.interfaces import AuditSink, Battery
from protocols.modbus.battery import ModbusBattery
from protocols.modbus.endpoint import ModbusEndpoint
from protocols.modbus.mapping import load_mapping
from protocols.modbus.meter import ModbusMeter
from protocols.modbus.ups import ModbusUps, UpsGuardedBattery

if TYPE_CHECKING:
    from protocols.modbus.bms_server import BmsServer, OptOutHook
    from protocols.modbus.sunspec_battery import SunspecBattery


def build_battery(cfg: BatteryConfig, clock: Clock) -> ModbusBattery | SunspecBattery:
    """Return the battery driver its mapping calls for (SunSpec maps get the SunSpec driver)."""
    m = load_mapping(cfg.mapping)
    if m.sunspec is None:
        return ModbusBattery(cfg.device_id, ModbusEndpoint.of(cfg), m, cfg.revert_s, clock)
    from protocols.modbus.sunspec_battery import SunspecBattery  # pysunspec2's definitions: SunSpec maps only

    return SunspecBattery(cfg.device_id, ModbusEndpoint.of(cfg), m, cfg.revert_s, clock)


def build_modbus_meter(cfg: MeterConfig, clock: Clock) -> ModbusMeter:
    """Return the Modbus meter of a ``[meter]`` section with ``backend = "modbus"``."""
    return ModbusMeter(cfg.device_id, ModbusEndpoint.of(cfg), cfg.mapping, clock)


def build_ups(cfg: UpsConfig, clock: Clock) -> ModbusUps | None:
    """Return the UPS telemetry driver, or None when no UPS is configured."""
    if not cfg.enabled:
        return None
    return ModbusUps(cfg.device_id, ModbusEndpoint.of(cfg), cfg.mapping, clock)


def guard_battery(battery: Battery, ups: ModbusUps, cfg: UpsConfig) -> UpsGuardedBattery:
    """Return ``battery`` behind the UPS guard: no discharge while the UPS is short of its reserve."""
    return UpsGuardedBattery(battery, ups, cfg.min_runtime_s, cfg.min_soc_pct)


def build_bms(
    cfg: BmsConfig,
    provider: StateProvider,
    audit: AuditSink,
    clock: Clock,
    *,
    on_opt_out: OptOutHook | None = None,
    site_max_w: float = math.inf,
) -> BmsServer | None:
    """Return the BMS face (not started), or None when disabled."""
    if not cfg.enabled:
        return None
    from protocols.modbus.bms_server import BmsServer

    return BmsServer(cfg, provider, audit, clock, on_opt_out=on_opt_out, site_max_w=site_max_w)
