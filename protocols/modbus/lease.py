"""What every leased, dispatchable Modbus device driver shares: the lease, keep-alive and ramp.

A setpoint is leased: ``dispatched`` holds until the lease lapses or the driver releases.
While leased, a keep-alive task calls the driver's ``refresh()`` at half the revert timer
the driver last wrote, so the device's own timer never fires while the gateway lives and
always fires once it stops. A map's ``control.max_ramp_w_per_s`` limits how fast commanded
setpoints move: from the last command, or from what the device was read holding (a setpoint
an earlier process left, after a restart), never from an assumed 0 W.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.clock import Clock
from gateway.errors import DeviceError


class LeasedDevice:
    """Base of the battery drivers: lease bookkeeping, keep-alive task and setpoint ramp."""

    device_id: str

    def __init__(self, clock: Clock, revert_s: float) -> None:
        self._clock = clock
        self.revert_s = revert_s
        self._lease_until: float | None = None  # clock.monotonic() when the lease lapses; None: released
        self._watchdog_s = revert_s  # the revert timer most recently written
        self._last_command: tuple[float, float] | None = None  # (monotonic, W) last commanded
        self._held_w = 0.0  # the setpoint the device was last read holding while not dispatched by us
        self._kick = asyncio.Event()
        self._keepalive: asyncio.Task[None] | None = None

    @property
    def dispatched(self) -> bool:
        """Return whether a leased setpoint is in force (set and neither released nor lapsed)."""
        return self._lease_until is not None and self._clock.monotonic() < self._lease_until

    async def refresh(self, lease_s: float | None = None) -> bool:
        """Re-arm the device's revert timer; return whether anything was written."""
        raise NotImplementedError

    def _leased(self, lease_s: float, power_w: float, watchdog_s: float) -> None:
        """Record a confirmed setpoint write: the lease, the timer written, and wake the keep-alive."""
        now = self._clock.monotonic()
        self._lease_until = now + lease_s
        self._last_command = (now, power_w)
        self._watchdog_s = watchdog_s
        self._kick.set()

    def _released(self) -> None:
        """Forget the lease after a release."""
        self._lease_until = None
        self._last_command = None
        self._held_w = 0.0

    def _seen_holding(self, setpoint_w: float) -> None:
        """Note the setpoint a read found; while undispatched it is where the next ramp starts."""
        if not self.dispatched:
            self._held_w = setpoint_w

    def _ramped(self, power_w: float, ramp_w_per_s: float | None) -> float:
        """Return ``power_w`` moved no faster than ``ramp_w_per_s`` from the last command (or what the device holds)."""
        if ramp_w_per_s is None:
            return power_w
        now = self._clock.monotonic()
        at, last_w = self._last_command if self._last_command and self.dispatched else (now, self._held_w)
        room = ramp_w_per_s * max(0.0, now - at)
        return min(max(power_w, last_w - room), last_w + room)

    def start_keepalive(self) -> asyncio.Task[None]:
        """Start (once) a task that refreshes at half the revert timer while a lease is in force."""
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = asyncio.create_task(self._keepalive_loop(), name=f"keepalive {self.device_id}")
        return self._keepalive

    async def stop_keepalive(self) -> None:
        """Stop the keep-alive task if it runs."""
        task, self._keepalive = self._keepalive, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keepalive_loop(self) -> None:
        """Refresh every half revert period while dispatched; idle until the next setpoint otherwise."""
        while True:
            self._kick.clear()
            if not self.dispatched:
                await self._kick.wait()
                continue
            await self._sleep_or_kick(self._watchdog_s / 2)
            if self._kick.is_set() or not self.dispatched:
                continue  # a new setpoint restarted the timer, or the lease lapsed
            with contextlib.suppress(DeviceError):  # logged by the link; the next period retries
                await self.refresh()

    async def _sleep_or_kick(self, seconds: float) -> None:
        """Wait ``seconds`` of clock time, or less if a new setpoint is written."""
        waiters = [
            asyncio.ensure_future(self._clock.sleep(seconds)),
            asyncio.ensure_future(self._kick.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
