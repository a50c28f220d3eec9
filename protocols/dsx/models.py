"""Pydantic models of the DSX Flex envelope and payloads (dsx-flex 1.7.0 ``components.schemas``).

Inbound messages are validated strictly (no string-to-number coercion, finite numbers, aware
timestamps); the payload schemas of the contract do not forbid extra members, so extras are
ignored there, while the envelope keeps them (CloudEvents extension attributes).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from protocols.dsx import contract as c


def check_uuid4(value: str) -> str:
    """Return ``value`` if it is a UUIDv4 string; raise ValueError otherwise."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"{value!r} is not a UUID") from None
    if parsed.version != 4:
        raise ValueError(f"{value!r} is a UUID version {parsed.version}, not 4")
    return value


def iso(when: datetime) -> str:
    """Return an aware datetime as RFC 3339 UTC with milliseconds and a ``Z``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _In(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore", allow_inf_nan=False)


class Envelope(BaseModel):
    """The CloudEvents 1.0.2 structured-mode envelope every DSX Flex message is."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow", allow_inf_nan=False)

    specversion: Literal["1.0.2"]
    id: str
    source: str = Field(pattern=c.SOURCE_RE.pattern)
    type: str = Field(min_length=1)
    time: AwareDatetime
    datacontenttype: Literal["application/json"]
    subject: str = Field(min_length=1)
    traceparent: str = Field(pattern=c.TRACEPARENT_RE.pattern)
    tracestate: str | None = None
    correlationid: str | None = None
    # The schema admits the plaintext object too, but the prose says MUST be signed: an object is
    # parsed here and refused as unsigned by the codec.
    data: str | dict[str, Any]

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_uuid4(v)

    @field_validator("correlationid")
    @classmethod
    def _correlationid(cls, v: str | None) -> str | None:
        return None if v is None else check_uuid4(v)


class PowerValue(_In):
    """PowerUnit / LoadConstraint: a value >= 0 and a unit word."""

    value: float = Field(ge=0)
    unit: Literal["watt", "kilowatt", "megawatt"]

    @property
    def watts(self) -> float:
        """Return the value in W."""
        return c.to_watts(self.value, self.unit)


class Interval(_In):
    """A target's time window; no start means now, no end means until replaced."""

    start_time: AwareDatetime | None = None
    end_time: AwareDatetime | None = None


class Strategy(_In):
    """How the agent sheds."""

    best_effort: bool = False


class TargetRequest(_In):
    """One item of ``SetLoadTargetData.targets``; a null constraint releases the feeds."""

    interval: Interval
    feed_tags: list[str] | None = None
    load_constraint: PowerValue | None  # required, nullable
    strategy: Strategy | None = None


class SetLoadTargetData(_In):
    """Payload of grid.loadtarget.set.v1."""

    targets: list[TargetRequest] = Field(min_length=1)


class FeedMetadata(_In):
    """Static feed configuration reported in every status."""

    power_minimum: PowerValue
    power_maximum: PowerValue
    default_constraint: PowerValue


class FeedTarget(_In):
    """A target the agent holds for a feed, active or scheduled."""

    active: bool
    load_constraint: PowerValue
    interval: Interval
    strategy: Strategy
    correlation_id: str

    @field_validator("correlation_id")
    @classmethod
    def _cid(cls, v: str) -> str:
        return check_uuid4(v)


class FeedState(_In):
    """One feed's power state in a status snapshot."""

    metadata: FeedMetadata
    targets: list[FeedTarget]
    calculated_load: PowerValue
    in_flight: bool
    event: c.FeedEvent
    # Typed string in the schema, yet described as "null if no event is active": both accepted.
    power_event_start_time: AwareDatetime | None = None
    compliant: bool

    def active_target(self) -> FeedTarget | None:
        """Return the target being enforced now, if any."""
        return next((t for t in self.targets if t.active), None)


class PowerStateStatusData(_In):
    """Payload of grid.powerstate.status.v1."""

    snapshot_time: AwareDatetime
    feeds: dict[str, FeedState]


class ShedHint(_In):
    """A non-binding shedding suggestion in a breach alert."""

    resource_id: str
    resource_type: Literal["node", "gpu", "chassis"]
    action: Literal["power_cap", "throttle", "suspend"]
    priority: int = Field(ge=1)
    target_power: PowerValue | None = None


class BreachDetails(_In):
    """Breach identity and timing."""

    breach_id: str
    detected_at: AwareDatetime
    resolved_at: AwareDatetime | None = None

    @field_validator("breach_id")
    @classmethod
    def _bid(cls, v: str) -> str:
        return check_uuid4(v)


class BreachTarget(_In):
    """The target being breached."""

    correlation_id: str
    load_constraint: PowerValue


class PowerBreachAlertData(_In):
    """Payload of grid.powerbreach.alert.v1."""

    feed_tag: str
    status: Literal["active", "escalated", "resolved"]
    severity: Literal["warning", "critical"]
    breach: BreachDetails
    target: BreachTarget
    measured_load: PowerValue
    shed_hints: list[ShedHint] | None = None
    infrastructure_actions: list[Literal["SHUTDOWN_NODES", "SHUTDOWN_RACKS", "CUT_DATA_FEEDS", "TRIP_BREAKERS"]]


class EnforcementResult(_In):
    """One resource's enforcement outcome."""

    resource_id: str
    resource_type: Literal["node", "gpu", "chassis"]
    requested_action: Literal["power_cap", "throttle", "suspend"]
    code: Literal["applied", "failed", "skipped"]
    message: str | None = None
    applied_power: PowerValue | None = None


class PowerBreachEnforcementData(_In):
    """Payload of grid.powerbreach.enforcement.v1."""

    breach_id: str
    feed_tag: str
    action: Literal["applied", "reverted"]
    code: Literal["success", "partial", "error"]
    diag_msg: str | None = None
    results: list[EnforcementResult]
    timestamp: AwareDatetime


PAYLOADS: dict[c.EventType, type[_In]] = {
    c.EventType.LOADTARGET_SET: SetLoadTargetData,
    c.EventType.POWERSTATE_STATUS: PowerStateStatusData,
    c.EventType.POWERBREACH_ALERT: PowerBreachAlertData,
    c.EventType.POWERBREACH_ENFORCEMENT: PowerBreachEnforcementData,
}


def power(watts: float) -> dict[str, Any]:
    """Return a PowerUnit object for a value in W (sent in watts: exact, no rounding)."""
    return {"value": float(watts), "unit": "watt"}
