"""The gateway's domain values: frozen dataclasses, units in every name.

Sign convention, written once: battery power is positive when the battery
discharges (it supplies the site and lowers the facility meter) and negative
when it charges. Facility power is positive when the site imports from the grid.
All times are timezone-aware UTC datetimes; durations are seconds (``_s``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta


class SignalName(enum.StrEnum):
    """OpenADR 2.0b signal names the gateway understands."""

    SIMPLE = "SIMPLE"
    LOAD_DISPATCH = "LOAD_DISPATCH"
    LOAD_CONTROL = "LOAD_CONTROL"
    ELECTRICITY_PRICE = "ELECTRICITY_PRICE"
    ENERGY_PRICE = "ENERGY_PRICE"


class Opt(enum.StrEnum):
    """The answer to the utility for one event version."""

    IN = "optIn"
    OUT = "optOut"


class TargetKind(enum.StrEnum):
    """How a directive expresses what the facility must do."""

    SHED_FRACTION = "shed_fraction"  # reduce by this fraction of the baseline
    SHED_W = "shed_w"  # reduce by this many watts below the baseline
    CAP_W = "cap_w"  # hold the facility at or below this many watts


@dataclass(frozen=True)
class Interval:
    """One interval of a signal: its start, length and value."""

    start: datetime
    duration_s: float
    value: float

    @property
    def end(self) -> datetime:
        """Return when the interval ends."""
        return self.start + timedelta(seconds=self.duration_s)


@dataclass(frozen=True)
class Signal:
    """One event signal: name, type (level, delta, setpoint, ...) and intervals."""

    name: SignalName
    signal_type: str
    intervals: tuple[Interval, ...]
    unit: str | None = None

    def value_at(self, t: datetime) -> float | None:
        """Return the value of the interval covering ``t``, or None."""
        for iv in self.intervals:
            if iv.start <= t < iv.end:
                return iv.value
        return None


@dataclass(frozen=True)
class DemandEvent:
    """A demand-response event as the gateway keeps it; no wire dicts past the adapter."""

    event_id: str
    modification_number: int
    status: str  # far | near | active | completed | cancelled
    start: datetime
    duration_s: float
    signals: tuple[Signal, ...]
    priority: int = 0
    test_event: bool = False
    market_context: str = ""
    vtn_id: str = ""
    vtn_comment: str = ""
    ramp_up_s: float = 0.0
    recovery_s: float = 0.0
    start_after_s: float = 0.0
    created: datetime | None = None
    # eiTarget criteria as (kind, value) pairs: ven_id, resource_id, group_id, party_id, ...
    targets: tuple[tuple[str, str], ...] = ()
    ven_id: str = ""  # the venID that received the event (to match venID targets)

    @property
    def end(self) -> datetime:
        """Return when the event's active period ends."""
        return self.start + timedelta(seconds=self.duration_s)

    @property
    def cancelled(self) -> bool:
        """Return whether the utility cancelled this event."""
        return self.status == "cancelled"


@dataclass(frozen=True)
class Target:
    """What the facility must do now, and which event asks it."""

    kind: TargetKind
    value: float
    event_id: str
    modification_number: int
    baseline_w: float | None = None  # facility power before the event, for SHED_* kinds
    ramp_fraction: float = 1.0  # share of the reduction asked now (< 1 during ramp-up and recovery)

    def facility_limit_w(self, baseline_w: float) -> float:
        """Return the facility power (W) this target allows, given a baseline."""
        if self.kind is TargetKind.CAP_W:
            full = self.value
        elif self.kind is TargetKind.SHED_W:
            full = max(0.0, baseline_w - self.value)
        else:
            full = max(0.0, baseline_w * (1.0 - self.value))
        if self.ramp_fraction >= 1.0:
            return full
        return baseline_w - max(0.0, self.ramp_fraction) * max(0.0, baseline_w - full)


@dataclass(frozen=True)
class BatteryState:
    """One reading of the battery; power positive when discharging."""

    device_id: str
    soc_pct: float
    power_w: float
    setpoint_w: float
    max_discharge_w: float
    max_charge_w: float
    capacity_wh: float
    online: bool = True


@dataclass(frozen=True, slots=True)
class GpuState:
    """One reading of a GPU: power, cap, limits and the job on it."""

    gpu_id: str
    power_w: float
    cap_w: float
    min_cap_w: float
    max_cap_w: float
    default_cap_w: float
    job_class: str = "training"
    tier: str = "flex1"
    host: str = "local"
    throughput: float | None = None  # work units per second, where known
    job_id: str = ""  # the job on it where the fleet reports one (accounting then groups by it)
    # The smallest cap change worth a command (W); 0: every change. A DSX feed sets it: each new
    # load target restarts the agent's ramp, so watt-sized corrections every tick keep it from settling.
    cap_step_w: float = 0.0


class Role(enum.StrEnum):
    """What a device is to the site reading: the facility meter, the battery, or the GPU fleet."""

    METER = "meter"
    BATTERY = "battery"
    GPUS = "gpus"


@dataclass(frozen=True)
class DeviceFault:
    """Why one device gave no usable reading: its role, its id, and the error (``str``: "role: error")."""

    role: Role
    device_id: str
    error: str
    untrusted: bool = False  # it answered, with a reading that is not a possible one (not merely silent)

    def __str__(self) -> str:
        return f"{self.role.value}: {self.error}"


@dataclass(frozen=True)
class Snapshot:
    """One consistent reading of the whole site, taken at ``t``."""

    t: datetime
    facility_w: float | None
    battery: BatteryState | None
    gpus: tuple[GpuState, ...] = ()
    faults: tuple[DeviceFault, ...] = ()


@dataclass(frozen=True)
class TelemetrySample:
    """What the utility may be told about the site now (OpenADR TELEMETRY_* reports)."""

    t: datetime
    facility_w: float | None  # facility import power, W
    facility_energy_wh: float | None = None  # cumulative facility import energy, Wh
    battery_w: float | None = None  # + discharge
    gpu_w: float | None = None
    online: bool = True
    manual_override: bool = False  # a BMS or operator override is in force
    limit_w: float | None = None  # facility limit in force (None: no event under control)
    shed_pct: float | None = None  # reduction below the baseline now, percent


@dataclass(frozen=True)
class Setpoints:
    """What the planner wants applied: battery discharge (W) and per-GPU caps (W)."""

    battery_w: float | None = None
    gpu_caps_w: dict[str, float] = field(default_factory=dict)
    reason: str = ""
