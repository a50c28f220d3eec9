"""The facility meter estimated from its parts (GPU and other IT load, cooling overhead, minus battery):
what ``drgw run`` reads with ``[meter] backend = "estimate"``, and the simulated site's meter."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from gateway import plausible
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.interfaces import Battery, GpuFleet


class ModelMeter:
    """A facility meter computed from its parts: (GPU + other IT) * (1 + cooling) - battery.

    ``drgw run`` without a metering device uses it as an estimate (and says so); the simulated
    site uses it as its meter. ``disturbance_pct`` adds a slow swing to the non-GPU load
    so the closed loop has something real to correct.
    """

    device_id = "meter"

    def __init__(
        self,
        gpu_power_w: Callable[[], Awaitable[float]],
        battery_power_w: Callable[[], Awaitable[float]],
        non_gpu_it_w: float,
        cooling_overhead: float,
        clock: Clock,
        disturbance_pct: float = 0.0,
        disturbance_period_s: float = 600.0,
    ) -> None:
        self._gpu = gpu_power_w
        self._battery = battery_power_w
        self.non_gpu_it_w = non_gpu_it_w
        self.cooling_overhead = cooling_overhead
        self._clock = clock
        self._dist = disturbance_pct / 100.0
        self._period = disturbance_period_s

    def other_it_w(self) -> float:
        """Return the non-GPU IT load (W) now, including the disturbance."""
        phase = 2 * math.pi * self._clock.monotonic() / self._period
        return self.non_gpu_it_w * (1.0 + self._dist * math.sin(phase))

    async def read_facility_w(self) -> float:
        """Return facility import power (W)."""
        it = await self._gpu() + self.other_it_w()
        return it * (1.0 + self.cooling_overhead) - await self._battery()


def estimated_meter(cfg: GatewayConfig, fleet: GpuFleet | None, battery: Battery | None, clock: Clock) -> ModelMeter:
    """Return the facility estimated from the site's parts, for ``[meter] backend = "estimate"``.

    The audit log records its readings under the device id "meter-estimate".
    """

    async def gpu_w() -> float:
        return sum(g.power_w for g in await fleet.read()) if fleet else 0.0

    last: list[float] = [0.0, -1e18]  # the battery's last read power (W) and when (monotonic s)
    revert_s = cfg.battery.revert_s

    async def batt_w() -> float:
        """The battery's power; while it does not answer (or gives no possible reading), its last reading
        until its revert timer would have returned it to normal (what the control loop assumes too), then 0."""
        if battery is None:
            return 0.0
        try:
            state = await battery.read()
        except GatewayError:
            state = None
        if state is None or plausible.battery_fault(state) is not None:
            return last[0] if clock.monotonic() - last[1] <= revert_s else 0.0
        last[:] = [float(state.power_w), clock.monotonic()]
        return last[0]

    meter = ModelMeter(gpu_w, batt_w, cfg.site.non_gpu_it_w, cfg.site.cooling_overhead, clock)
    meter.device_id = "meter-estimate"
    return meter
