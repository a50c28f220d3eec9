"""The simulated site's facility meter: GPU and other IT load, cooling overhead, minus battery."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from gateway.clock import Clock


class ModelMeter:
    """A facility meter computed from its parts: (GPU + other IT) * (1 + cooling) - battery.

    The simulated site uses it as its meter; ``drgw run`` without a metering device uses it
    as an estimate (and says so). ``disturbance_pct`` adds a slow swing to the non-GPU load
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
