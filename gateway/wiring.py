"""Build device backends from config for `drgw run` (the demo builds its own simulated peers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import plausible
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
    from protocols.modbus.build import build_equipment

    eq = await build_equipment(cfg, clock)
    closers: list[Callable[[], Awaitable[Any]]] = list(eq.closers)
    battery: Any = eq.battery
    fleet: Any = None
    if cfg.gpus.backend == "sim":
        from gateway.simulation.gpus import SimGpuFleet

        fleet = SimGpuFleet(cfg.gpus, clock)
    elif cfg.gpus.backend == "nvml":
        from protocols.nvml import NvmlFleet

        fleet = NvmlFleet()
        fleet.open()
    elif cfg.gpus.backend == "nats":
        from protocols.fleet import NatsFleet

        fleet = NatsFleet.from_config(cfg.gpus, cfg.site.name, clock)
        try:
            await fleet.connect()
        except GatewayError as err:
            log.warning("NATS not reachable at start; will retry", url=cfg.gpus.nats_url, error=str(err))
            retry = asyncio.create_task(_connect_until_up(fleet, cfg.gpus.nats_url), name="nats-connect")
            closers.append(_cancel(retry))
        closers.append(fleet.close)
    if eq.meter is not None:
        return eq.meter, battery, fleet, closers
    # No metering device configured ([meter] backend = "estimate"): estimate the facility from its
    # parts; the audit log records these readings under the device id "meter-estimate".
    fleet_ref = fleet
    battery_ref = battery

    async def gpu_w() -> float:
        return sum(g.power_w for g in await fleet_ref.read()) if fleet_ref else 0.0

    last: list[float] = [0.0, -1e18]  # the battery's last read power (W) and when (monotonic s)
    revert_s = cfg.battery.revert_s

    async def batt_w() -> float:
        """The battery's power; while it does not answer (or gives no possible reading), its last reading
        until its revert timer would have returned it to normal (what the control loop assumes too), then 0."""
        if battery_ref is None:
            return 0.0
        try:
            state = await battery_ref.read()
        except GatewayError:
            state = None
        if state is None or plausible.battery_fault(state) is not None:
            return last[0] if clock.monotonic() - last[1] <= revert_s else 0.0
        last[:] = [float(state.power_w), clock.monotonic()]
        return last[0]

    meter = ModelMeter(gpu_w, batt_w, cfg.site.non_gpu_it_w, cfg.site.cooling_overhead, clock)
    meter.device_id = "meter-estimate"
    return meter, battery, fleet, closers


async def _connect_until_up(fleet: Any, url: str) -> None:
    """Retry a fleet's first connection with capped exponential backoff (nats-py reconnects after that)."""
    delay = 0.5
    while True:
        await asyncio.sleep(delay)
        try:
            await fleet.connect()
        except GatewayError as err:
            delay = min(delay * 2, 30.0)
            log.debug("NATS still not reachable", url=url, error=str(err), retry_in_s=delay)
            continue
        log.info("NATS connected", url=url)
        return


def _cancel(task: asyncio.Task[None]) -> Callable[[], Awaitable[None]]:
    """Return a closer that cancels a background task and waits for it."""

    async def close() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return close
