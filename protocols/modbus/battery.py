"""A grid-interactive battery dispatched over Modbus TCP, driven by a register map.

The map names each register's ``role``; this driver needs the roles in ``ROLES``. Every
setpoint is written together with remote mode, the device's revert timer (``watchdog_s``,
the lease or the configured revert period, whichever is shorter) and a heartbeat, then read
back. If the gateway stops refreshing, the device reverts to 0 W on its own.

A device that does not answer is backed off: after a failure every call fails fast with
``DeviceUnavailable`` until the backoff window (doubling to a cap) has passed, and the
driver logs "unavailable" once and "recovered" once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway.clock import Clock, SystemClock
from gateway.errors import DeviceError, DeviceRejected, DeviceUnavailable, InputRejected, ReadbackMismatch
from gateway.logs import get_logger
from gateway.model import BatteryState
from protocols.modbus import codec
from protocols.modbus.mapping import Mapping, load_mapping
from protocols.modbus.transport import ModbusTransport

ROLES = (
    "soc_pct",
    "power_w",
    "setpoint_w",
    "max_discharge_w",
    "max_charge_w",
    "capacity_wh",
    "watchdog_s",
    "heartbeat",
    "control_mode",
    "status",
)
READ_ROLES = ("soc_pct", "power_w", "setpoint_w", "max_discharge_w", "max_charge_w", "capacity_wh", "status")
MODE_LOCAL = 0
MODE_REMOTE = 1
STATUS_ONLINE = 1 << 0
STATUS_FAULT = 1 << 1
STATUS_WATCHDOG_EXPIRED = 1 << 2

T = TypeVar("T")


class ModbusBattery:
    """Implements ``gateway.interfaces.Battery`` for a Modbus battery described by a mapping."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        unit: int,
        mapping: Mapping | str | Path,
        timeout_s: float = 1.0,
        revert_s: float = 60.0,
        clock: Clock | None = None,
        *,
        retries: int = 0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.device_id = device_id
        self.mapping = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
        self._pts = self.mapping.require_roles(ROLES)
        self.revert_s = revert_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock: Clock = clock or SystemClock()
        self._transport = ModbusTransport(
            device_id, host, port, unit, self.mapping, timeout_s=timeout_s, retries=retries
        )
        self._log = get_logger(__name__).bind(device_id=device_id)
        self._lock = asyncio.Lock()
        self._lease_until: float | None = None  # clock.monotonic() when the lease lapses; None: released
        self._watchdog_s = revert_s  # the revert timer most recently written
        self._heartbeat = 0
        self._down = False
        self._backoff_s = 0.0
        self._retry_at: float | None = None
        self._kick = asyncio.Event()
        self._keepalive: asyncio.Task[None] | None = None

    def _name(self, role: str) -> str:
        """Return the mapping's point name for ``role``."""
        return self._pts[role].name

    @property
    def dispatched(self) -> bool:
        """Return whether a leased setpoint is in force (set and neither released nor lapsed)."""
        return self._lease_until is not None and self._clock.monotonic() < self._lease_until

    async def connect(self) -> None:
        """Open the connection; raise DeviceUnavailable if the device does not answer."""
        async with self._lock:
            await self._guarded("connect", self._transport.connect)

    async def close(self) -> None:
        """Stop the keep-alive task and close the connection (does not release)."""
        await self.stop_keepalive()
        self._transport.close()

    async def read(self) -> BatteryState:
        """Return state of charge, power, setpoint and limits in one coalesced read."""
        names = [self._name(r) for r in READ_ROLES]
        async with self._lock:
            v = await self._guarded("read", lambda: self._transport.read(names))
        status = int(v[self._name("status")])
        return BatteryState(
            device_id=self.device_id,
            soc_pct=v[self._name("soc_pct")],
            power_w=v[self._name("power_w")],
            setpoint_w=v[self._name("setpoint_w")],
            max_discharge_w=v[self._name("max_discharge_w")],
            max_charge_w=v[self._name("max_charge_w")],
            capacity_wh=v[self._name("capacity_wh")],
            online=bool(status & STATUS_ONLINE) and not status & STATUS_FAULT,
        )

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Command ``power_w`` (W, + discharge) in remote mode for ``lease_s``; return the read-back."""
        if not lease_s > 0:
            raise InputRejected(f"{self.device_id}: lease_s must be positive, got {lease_s}")
        sp = self._name("setpoint_w")
        async with self._lock:
            watchdog_s = self._watchdog_value(min(self.revert_s, lease_s))
            values = {
                self._name("control_mode"): float(MODE_REMOTE),
                self._name("watchdog_s"): watchdog_s,
                self._name("heartbeat"): self._next_heartbeat(),
                sp: power_w,
            }
            await self._guarded("set_discharge_w", lambda: self._transport.write(values))
            self._lease_until = self._clock.monotonic() + lease_s
            self._watchdog_s = watchdog_s
            self._kick.set()
            reported = (await self._guarded("read back", lambda: self._transport.read([sp])))[sp]
        if abs(reported - power_w) > codec.lsb(self._pts["setpoint_w"]) * (1 + 1e-9):
            raise ReadbackMismatch(self.device_id, sp, power_w, reported)
        return reported

    async def release(self) -> None:
        """Write setpoint 0 and local mode, end the lease, and verify both by read-back."""
        sp, mode = self._name("setpoint_w"), self._name("control_mode")
        async with self._lock:
            await self._guarded("release", lambda: self._transport.write({sp: 0.0, mode: float(MODE_LOCAL)}))
            self._lease_until = None
            back = await self._guarded("read back", lambda: self._transport.read([sp, mode]))
        if abs(back[sp]) > codec.lsb(self._pts["setpoint_w"]) * (1 + 1e-9):
            raise ReadbackMismatch(self.device_id, sp, 0.0, back[sp])
        if int(back[mode]) != MODE_LOCAL:
            raise ReadbackMismatch(self.device_id, mode, float(MODE_LOCAL), back[mode])

    async def refresh(self, lease_s: float | None = None) -> bool:
        """Re-arm the revert timer and bump the heartbeat; ``lease_s`` first extends the lease from now.

        Undispatched, only the heartbeat is written. Once the lease has lapsed nothing is
        written, so the device's own timer reverts it; returns whether anything was written.
        """
        async with self._lock:
            now = self._clock.monotonic()
            if lease_s is not None and self._lease_until is not None and now < self._lease_until:
                self._lease_until = now + lease_s
            values = {self._name("heartbeat"): self._next_heartbeat()}
            if self._lease_until is not None:
                remaining = self._lease_until - now
                if remaining <= 0:
                    return False
                self._watchdog_s = self._watchdog_value(min(self.revert_s, remaining))
                values[self._name("watchdog_s")] = self._watchdog_s
            await self._guarded("refresh", lambda: self._transport.write(values))
            return True

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
            with contextlib.suppress(DeviceError):  # logged by _guarded; the next period retries
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

    def _watchdog_value(self, seconds: float) -> float:
        """Return the revert timer to write for ``seconds``: rounded up a step, within the map's limits."""
        p = self._pts["watchdog_s"]
        step = codec.lsb(p)
        value = max(step, math.ceil(seconds / step - 1e-9) * step)  # never 0: 0 disables many timers
        lim = self.mapping.limits.get(p.name)
        if lim is not None:
            value = min(max(value, lim.min), lim.max)
        lo, hi = codec.value_range(p)
        return min(max(value, lo), hi)

    def _next_heartbeat(self) -> float:
        """Return the next heartbeat counter value, wrapping within the point's range."""
        _lo, hi = codec.value_range(self._pts["heartbeat"])
        self._heartbeat = (self._heartbeat + 1) % (int(hi) + 1)
        return float(self._heartbeat)

    async def _guarded(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one device operation under the backoff rules; log outage and recovery once each."""
        now = self._clock.monotonic()
        if self._retry_at is not None and now < self._retry_at:
            raise DeviceUnavailable(
                self.device_id, f"{what}: not tried, backing off {self._retry_at - now:.1f} s after a failure"
            )
        try:
            result = await op()
        except DeviceUnavailable as err:
            first = not self._down
            self._backoff_s = (
                self.backoff_initial_s if first else min(self._backoff_s * 2, self.backoff_max_s)
            )
            self._retry_at = self._clock.monotonic() + self._backoff_s
            self._down = True
            if first:
                self._log.warning("unavailable", op=what, error=str(err), backoff_s=self._backoff_s)
            raise
        except DeviceRejected:
            self._mark_up()  # it answered, so it is reachable
            raise
        self._mark_up()
        return result

    def _mark_up(self) -> None:
        """Clear the backoff and log the recovery if the device was down."""
        self._retry_at = None
        self._backoff_s = 0.0
        if self._down:
            self._down = False
            self._log.info("recovered")
