"""The dispatcher: the only code that writes to equipment.

It writes, reads back, audits both, renews leases, and releases everything at event end,
cancellation and shutdown. A device fault is audited and the rest keeps working. After a
restart mid-event it adopts what the devices still hold (``adopt``) instead of releasing them,
so the next ``apply`` moves them from there, with no 0 W notch in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from gateway.clock import Clock
from gateway.errors import AuditError, DeviceError, GatewayError
from gateway.interfaces import AuditSink, Battery, GpuFleet, LeaseLapse, ReportsLeaseLapses
from gateway.logs import get_logger
from gateway.model import BatteryState, GpuState

log = get_logger("gateway.dispatcher")

BATTERY_DEADBAND_W = 50.0  # smaller changes are not re-sent (they are still leased)
CAP_DEADBAND_W = 1.0
CAP_READBACK_TOLERANCE_W = 1.0

_Row = tuple[str, dict[str, Any], str]  # an audit row to append: kind, data, device id


class Dispatcher:
    """Applies setpoints to the battery and the GPU fleet, with read-back and leases."""

    def __init__(
        self, battery: Battery | None, fleet: GpuFleet | None, audit: AuditSink, clock: Clock, lease_s: float
    ) -> None:
        self.battery = battery
        self.fleet = fleet
        self._audit = audit
        self._clock = clock
        self._lease_s = lease_s
        self.battery_w: float | None = None  # last setpoint the battery confirmed
        self.caps_w: dict[str, float] = {}  # last caps the fleet confirmed (only capped GPUs)
        self._battery_sent_at = -1e18
        self._cap_sent_at: dict[str, float] = {}  # per GPU: when its cap was last sent (lease renewal)
        self.active = False
        self.faults: dict[str, str] = {}

    async def apply(
        self,
        battery_w: float | None,
        caps_w: Mapping[str, float],
        event_id: str | None,
        default_caps_w: Mapping[str, float],
    ) -> None:
        """Apply setpoints; re-send when changed or when half the lease has passed."""
        self.active = True
        await self._audit_lapses(event_id)
        now = self._clock.monotonic()
        jobs = []  # battery and GPUs are independent devices: command them concurrently
        if self.battery is not None and battery_w is not None:
            due = now - self._battery_sent_at >= self._lease_s / 2
            changed = self.battery_w is None or abs(battery_w - self.battery_w) >= BATTERY_DEADBAND_W
            if due or changed:
                jobs.append(self._set_battery(battery_w))
        if self.fleet is not None:
            half = self._lease_s / 2
            to_send = {
                g: c
                for g, c in caps_w.items()
                # changed since last confirmed, or capped and due for lease renewal
                if abs(c - self.caps_w.get(g, default_caps_w.get(g, c))) >= CAP_DEADBAND_W
                or (
                    c < default_caps_w.get(g, float("inf")) - CAP_DEADBAND_W
                    and now - self._cap_sent_at.get(g, -1e18) >= half
                )
            }
            if to_send:
                jobs.append(self._set_caps(to_send, default_caps_w))
        if not jobs:
            return
        # Every device's command and read-back first, then all their rows together (one commit): a
        # row's commit is never in the way of another device's read-back, and each is still audited
        # before apply returns. The rows of the devices that answered are written even when another
        # job raised (what was actuated is always recorded); then the first error is raised.
        done = await asyncio.gather(*jobs, return_exceptions=True)
        rows = [row for d in done if not isinstance(d, BaseException) for row in d]
        appended = await asyncio.gather(
            *(self._audit.append(kind, data, event_id=event_id, device_id=dev) for kind, data, dev in rows),
            return_exceptions=True,
        )
        for res in (*done, *appended):
            if isinstance(res, BaseException):
                raise res

    async def _set_battery(self, power_w: float) -> list[_Row]:
        """Command the battery and read back; return the rows that audit both values."""
        assert self.battery is not None
        dev = self.battery.device_id
        try:
            readback = await self.battery.set_discharge_w(power_w, self._lease_s)
        except DeviceError as err:
            return [self._fault_row(dev, "command.battery", err, {"requested_w": power_w})]
        self._battery_sent_at = self._clock.monotonic()
        self.battery_w = readback
        self._recovered(dev)
        data = {"requested_w": round(power_w, 1), "readback_w": round(readback, 1), "lease_s": self._lease_s}
        return [("command.battery", data, dev)]

    async def _set_caps(self, caps_w: Mapping[str, float], default_caps_w: Mapping[str, float]) -> list[_Row]:
        """Command GPU caps in one call; return the rows that audit requested against enforced."""
        assert self.fleet is not None
        try:
            enforced = await self.fleet.set_caps(caps_w, self._lease_s)
        except GatewayError as err:
            return [self._fault_row("gpus", "command.gpus", err, {"requested": _round(caps_w)})]
        sent_at = self._clock.monotonic()
        for g in enforced:
            self._cap_sent_at[g] = sent_at
        mismatched = {
            g: {"requested_w": round(c, 1), "enforced_w": round(enforced.get(g, float("nan")), 1)}
            for g, c in caps_w.items()
            if abs(enforced.get(g, float("inf")) - c) > CAP_READBACK_TOLERANCE_W
        }
        for g, c in enforced.items():
            if c < default_caps_w.get(g, float("inf")) - CAP_DEADBAND_W:
                self.caps_w[g] = c
            else:
                self.caps_w.pop(g, None)
        self._recovered("gpus")
        data = {"requested_w": _round(caps_w), "enforced_w": _round(enforced), "lease_s": self._lease_s}
        rows: list[_Row] = [("command.gpus", data, "gpus")]
        if mismatched:
            rows.append(("fault.readback", {"mismatched": mismatched}, "gpus"))
        return rows

    def adopt(self, battery: BatteryState | None, gpus: Sequence[GpuState]) -> dict[str, Any]:
        """Take over the setpoint and caps the devices hold from an earlier process; return what was kept.

        Nothing is written: the next ``apply`` renews every lease, moving each device from what it
        holds to what the plan says (a restart mid-event, so no release and re-apply).
        """
        kept: dict[str, Any] = {}
        if self.battery is not None and battery is not None and abs(battery.setpoint_w) >= BATTERY_DEADBAND_W:
            self.battery_w = battery.setpoint_w
            kept["battery_w"] = round(battery.setpoint_w, 1)
        caps = {g.gpu_id: g.cap_w for g in gpus if g.cap_w < g.default_cap_w - CAP_DEADBAND_W}
        if self.fleet is not None and caps:
            self.caps_w.update(caps)
            kept["gpu_caps_w"] = _round(caps)
        self.active = self.active or bool(kept)
        return kept

    async def release(self, reason: str, event_id: str | None = None) -> None:
        """Return every device to normal and audit the release; never raises on device or audit faults.

        Releasing is the safe direction, so every device is released even when the audit log
        refuses the record of it (the refusal is logged here and counted by the log's health).
        """
        await _unaudited(self._audit_lapses(event_id), "fault.lease_lapsed")
        await self.release_battery(reason, event_id)
        if self.fleet is not None:
            try:
                await self.fleet.release()
            except GatewayError as err:
                await _unaudited(self._fault("gpus", "release.gpus", err, event_id, {}), "release.gpus")
            else:
                self.caps_w.clear()
                self._cap_sent_at.clear()
                record = self._audit.append("release.gpus", {"reason": reason}, event_id=event_id, device_id="gpus")
                await _unaudited(record, "release.gpus")
        self.active = False
        log.info("released", reason=reason, event_id=event_id)

    async def release_battery(self, reason: str, event_id: str | None = None) -> None:
        """Return the battery alone to normal and audit it; never raises on device or audit faults."""
        if self.battery is None:
            return
        dev = self.battery.device_id
        try:
            await self.battery.release()
        except DeviceError as err:
            await _unaudited(self._fault(dev, "release.battery", err, event_id, {}), "release.battery")
        else:
            self.battery_w = None
            record = self._audit.append("release.battery", {"reason": reason}, event_id=event_id, device_id=dev)
            await _unaudited(record, "release.battery")

    async def _audit_lapses(self, event_id: str | None) -> None:
        """Audit the leases the fleet reports lapsed (node agents restore defaults on their own; the fleet logs it)."""
        lapses: Sequence[LeaseLapse] = (
            self.fleet.take_lease_lapses() if isinstance(self.fleet, ReportsLeaseLapses) else ()
        )
        for lapse in lapses:
            await self._audit.append(
                "fault.lease_lapsed",
                {"node": lapse.node, "lapsed_at": lapse.lapsed_at.isoformat(), "gpus": list(lapse.gpus)},
                event_id=event_id,
                device_id=lapse.node,
            )

    async def _fault(
        self, device_id: str, action: str, err: Exception, event_id: str | None, extra: dict[str, Any]
    ) -> None:
        """Audit a device fault; log it once per change of state."""
        kind, data, dev = self._fault_row(device_id, action, err, extra)
        await self._audit.append(kind, data, event_id=event_id, device_id=dev)

    def _fault_row(self, device_id: str, action: str, err: Exception, extra: dict[str, Any]) -> _Row:
        """Note a device fault (logged once per change of state); return the row that audits it."""
        if self.faults.get(device_id) != str(err):
            log.warning("device fault", device_id=device_id, action=action, error=str(err))
        self.faults[device_id] = str(err)
        return (
            "fault.device",
            {"action": action, "error": str(err), "error_type": type(err).__name__, **extra},
            device_id,
        )

    def _recovered(self, device_id: str) -> None:
        """Log once that a faulted device answers again."""
        if self.faults.pop(device_id, None) is not None:
            log.info("device recovered", device_id=device_id)


async def _unaudited(record: Awaitable[Any], kind: str) -> None:
    """Await an audit append made while releasing; log (never raise) when the log refuses it."""
    try:
        await record
    except AuditError as err:
        log.error("release done but not audited", kind=kind, error=str(err))


def _round(caps: Mapping[str, float]) -> dict[str, float]:
    """Round a caps mapping for the audit log."""
    return {g: round(c, 1) for g, c in caps.items()}
