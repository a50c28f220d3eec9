"""Build device backends from config for `drgw run` (the demo builds its own simulated peers)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.interfaces import Battery, GpuFleet, Meter
from gateway.logs import get_logger
from gateway.simulation.site import ModelMeter

log = get_logger("gateway.wiring")


async def build_devices(
    cfg: GatewayConfig, clock: Clock
) -> tuple[Meter | None, Battery | None, GpuFleet | None, list[Callable[[], Awaitable[Any]]]]:
    """Return (meter, battery, fleet, closers) for the configured equipment."""
    closers: list[Callable[[], Awaitable[Any]]] = []
    battery: Any = None
    if cfg.battery.enabled:
        from protocols.modbus import ModbusBattery, load_mapping

        b = cfg.battery
        battery = ModbusBattery(
            b.device_id,
            b.host,
            b.port,
            b.unit,
            load_mapping(b.mapping),
            timeout_s=b.timeout_s,
            revert_s=b.revert_s,
            clock=clock,
        )
        try:
            await battery.connect()
        except GatewayError as err:
            log.warning("battery not reachable at start; will retry", device_id=b.device_id, error=str(err))
        closers.append(battery.close)
    fleet: Any = None
    if cfg.gpus.backend == "sim":
        from gateway.simulation.gpus import SimGpuFleet

        fleet = SimGpuFleet(cfg.gpus, clock)
    elif cfg.gpus.backend == "nvml":
        from protocols.nvml import NvmlFleet

        fleet = NvmlFleet()
        fleet.open()
    # Until a metering device is configured (Modbus/OPC UA meters), estimate the facility
    # from its parts; the audit log records readings as estimates via the meter's device id.
    fleet_ref = fleet
    battery_ref = battery

    async def gpu_w() -> float:
        return sum(g.power_w for g in await fleet_ref.read()) if fleet_ref else 0.0

    async def batt_w() -> float:
        if battery_ref is None:
            return 0.0
        try:
            return float((await battery_ref.read()).power_w)
        except GatewayError:
            return 0.0

    meter = ModelMeter(gpu_w, batt_w, cfg.site.non_gpu_it_w, cfg.site.cooling_overhead, clock)
    meter.device_id = "meter-estimate"
    return meter, battery, fleet, closers
