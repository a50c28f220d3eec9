"""Shadow mode (``[control] mode = "shadow"``): hear, decide, plan and audit every tick; write to no device.

Operators run a gateway this way for weeks before they let it act. It is put on at one place,
the composition root (``wrap``):

- the battery and the GPU fleet are wrapped so that every read reaches the real device and no
  write does: a setpoint or cap "commanded" is taken as what the device would have confirmed
  (so the plan ramps and renews as a live gateway's would), and a release is a no-op;
- the audit sink is wrapped so that every row the gateway writes carries ``"mode": "shadow"``,
  and the dispatcher's rows are renamed ``shadow.command.battery``, ``shadow.command.gpus``,
  ``shadow.release.*``: what the gateway would have commanded (``planned_w``, ``written: false``),
  never mistaken for a command by the audit tools, metrics or the event report.

The control loop's disturbance observer learns nothing in shadow mode: the meter shows the site
as it is, not as the plan would have made it (``ControlLoop`` checks ``cfg.control.mode``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import AuditError
from gateway.interfaces import AuditSink, Battery, GpuFleet, TransactionalAuditSink
from gateway.logs import get_logger
from gateway.model import BatteryState, GpuState

log = get_logger("gateway.shadow")

SHADOW = "shadow"
# The dispatcher's kinds, renamed in shadow mode so that nothing counts them as device commands.
RENAMED = ("command.", "release.", "fault.readback", "fault.lease_lapsed")


class ShadowBattery:
    """A battery whose reads reach the device and whose writes do not."""

    def __init__(self, inner: Battery) -> None:
        self.inner = inner
        self.device_id = inner.device_id
        self.planned_w: float | None = None  # the discharge the gateway would hold now (W)
        self.writes = 0  # writes the gateway asked for (none reached the device)

    async def read(self) -> BatteryState:
        """Return the real battery's state."""
        return await self.inner.read()

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Take a discharge setpoint (W) without writing it; return it as if the battery confirmed it."""
        self.planned_w = power_w
        self.writes += 1
        return power_w

    async def release(self) -> None:
        """Forget the planned setpoint (the device was never commanded)."""
        self.planned_w = None


class ShadowFleet:
    """A GPU fleet whose reads reach the GPUs and whose cap changes do not."""

    def __init__(self, inner: GpuFleet) -> None:
        self.inner = inner
        self.planned_caps_w: dict[str, float] = {}  # the caps the gateway would hold now (W)
        self.writes = 0

    async def read(self) -> tuple[GpuState, ...]:
        """Return every real GPU's state."""
        return await self.inner.read()

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Take caps (W) without setting them; return them as if the fleet enforced them."""
        self.planned_caps_w.update(caps_w)
        self.writes += 1
        return dict(caps_w)

    async def release(self) -> None:
        """Forget the planned caps (no GPU was capped)."""
        self.planned_caps_w.clear()


def shadow_row(kind: str, data: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return the kind and data a row is audited with in shadow mode."""
    out = {**data, "mode": SHADOW}
    if not kind.startswith(RENAMED):
        return kind, out
    if kind.startswith("command."):
        out = {k: v for k, v in out.items() if k not in ("requested_w", "readback_w", "enforced_w")}
        out["planned_w"] = data.get("requested_w")
        out["written"] = False
    return f"{SHADOW}.{kind}", out


class ShadowAudit:
    """An audit sink that marks every row as shadow and renames the dispatcher's (see ``shadow_row``)."""

    def __init__(self, inner: AuditSink) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        """Reach the wrapped log's other attributes (engine, head, checkpoints, ...)."""
        return getattr(self._inner, name)

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append one row, marked shadow."""
        kind, marked = shadow_row(kind, data)
        return await self._inner.append(kind, marked, actor=actor, event_id=event_id, device_id=device_id)

    async def append_with(
        self,
        kind: str,
        data: Mapping[str, Any],
        statements: Sequence[Any],
        *,
        engine: Any,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append one row, marked shadow, together with ``statements``."""
        if not isinstance(self._inner, TransactionalAuditSink):
            raise AuditError(f"the audit log cannot commit {kind} together with other writes")
        kind, marked = shadow_row(kind, data)
        return await self._inner.append_with(
            kind, marked, statements, engine=engine, actor=actor, event_id=event_id, device_id=device_id
        )


def wrap(
    mode: str, battery: Battery | None, fleet: GpuFleet | None, audit: AuditSink
) -> tuple[Battery | None, GpuFleet | None, AuditSink]:
    """Return the battery, fleet and audit sink the gateway uses in ``mode`` (shadow: wrapped, live: as given)."""
    if mode != SHADOW:
        return battery, fleet, audit
    log.warning("shadow mode: planning and auditing only, writing to no device")
    return (
        None if battery is None else ShadowBattery(battery),
        None if fleet is None else ShadowFleet(fleet),
        ShadowAudit(audit),
    )
