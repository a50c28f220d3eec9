"""The lease guard on the devices: a node that may not act (standby, or past its lease deadline) writes nothing.

The audit fence refuses a stale node's rows, but the dispatcher writes a device *before* it audits
the write, and a release writes the device even when the log refuses its record. So every device
write of a hot-standby node goes through these wrappers, which ask ``LeaseManager.acting`` just
before the write: a node whose deadline passed (``margin_s`` before any other node can take the
lease) no longer touches the battery or the GPUs. Reads always pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.errors import DeviceError
from gateway.interfaces import Battery, GpuFleet
from gateway.model import BatteryState, GpuState


class NotActing(DeviceError):
    """A device write refused: this node does not hold the active lease (standby, or its term ran out)."""


class _Guarded:
    """Passes everything through to ``inner``; ``check`` refuses writes while ``acting()`` is false."""

    def __init__(self, inner: Any, acting: Callable[[], bool], device_id: str) -> None:
        self.inner = inner
        self._acting = acting
        self.device_id = device_id

    def check(self, action: str) -> None:
        """Raise NotActing unless this node may act now."""
        if not self._acting():
            raise NotActing(self.device_id, f"{action} refused: this node does not hold the active lease")


class GuardedBattery(_Guarded):
    """A battery whose setpoint and release are written only while this node acts."""

    def __init__(self, inner: Battery, acting: Callable[[], bool]) -> None:
        super().__init__(inner, acting, inner.device_id)

    async def read(self) -> BatteryState:
        return await self.inner.read()

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        self.check("setpoint")
        return float(await self.inner.set_discharge_w(power_w, lease_s))

    async def release(self) -> None:
        self.check("release")
        await self.inner.release()


class GuardedFleet(_Guarded):
    """A GPU fleet whose caps and release are written only while this node acts."""

    def __init__(self, inner: GpuFleet, acting: Callable[[], bool]) -> None:
        super().__init__(inner, acting, "gpus")

    async def read(self) -> tuple[GpuState, ...]:
        return await self.inner.read()

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        self.check("caps")
        return dict(await self.inner.set_caps(caps_w, lease_s))

    async def release(self) -> None:
        self.check("release")
        await self.inner.release()
