"""What the DSX Flex client knows, as plain frozen data: per-feed readings, commands, breaches."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from protocols.dsx import models as m


@dataclass(frozen=True)
class FeedLimits:
    """A feed this site controls and the constraints it may be given (W)."""

    tag: str
    min_w: float
    max_w: float


@dataclass(frozen=True)
class FeedReading:
    """One feed as the gateway sees it: what it asked, and what the agent last reported."""

    feed: str
    link_up: bool
    requested_w: float | None  # the constraint the gateway holds (None: released or never set)
    held: bool  # the gateway is renewing it
    correlation_id: str | None  # of the command that set requested_w
    acked: bool  # the agent reports that command's target (or, released, no target) as active
    constraint_w: float | None  # the constraint the agent enforces (None: none active)
    load_w: float | None  # the agent's calculated_load
    compliant: bool | None
    in_flight: bool | None
    event: str | None  # what triggered the last status for this feed
    default_w: float | None  # the agent's default_constraint
    status_age_s: float | None  # since the last verified status naming this feed


@dataclass(frozen=True)
class CommandTiming:
    """When one command went out and when the agent answered it (s after the command)."""

    correlation_id: str
    sent_mono: float
    feeds: tuple[str, ...]
    target_set_s: float | None = None  # first status with event target_set for it
    end_ramp_down_s: float | None = None  # first end_ramp_down with its target active


@dataclass(frozen=True)
class BreachAlert:
    """A verified grid.powerbreach.alert.v1 (power in W)."""

    feed: str
    status: str  # active | escalated | resolved
    severity: str  # warning | critical
    breach_id: str
    detected_at: datetime
    resolved_at: datetime | None
    target_correlation_id: str
    target_w: float
    measured_w: float
    shed_hints: tuple[m.ShedHint, ...]
    infrastructure_actions: tuple[str, ...]
    message_id: str

    @classmethod
    def from_data(cls, data: m.PowerBreachAlertData, message_id: str) -> BreachAlert:
        """Return the alert of a verified payload."""
        return cls(
            feed=data.feed_tag,
            status=data.status,
            severity=data.severity,
            breach_id=data.breach.breach_id,
            detected_at=data.breach.detected_at,
            resolved_at=data.breach.resolved_at,
            target_correlation_id=data.target.correlation_id,
            target_w=data.target.load_constraint.watts,
            measured_w=data.measured_load.watts,
            shed_hints=tuple(data.shed_hints or ()),
            infrastructure_actions=tuple(data.infrastructure_actions),
            message_id=message_id,
        )


@dataclass(frozen=True)
class Enforcement:
    """A verified grid.powerbreach.enforcement.v1."""

    infra: str
    breach_id: str
    feed: str
    action: str  # applied | reverted
    code: str  # success | partial | error
    diag_msg: str | None
    results: tuple[m.EnforcementResult, ...]
    timestamp: datetime


def reading(
    tag: str,
    link_up: bool,
    requested: tuple[float | None, str | None, bool],
    state: m.FeedState | None,
    status_age_s: float | None,
) -> FeedReading:
    """Return a feed's reading from what the gateway holds (W, correlation id, held) and the agent's last state."""
    requested_w, cid, held = requested
    active = state.active_target() if state else None
    if state is None:
        acked = False
    elif requested_w is None:
        acked = active is None
    else:
        acked = active is not None and active.correlation_id == cid
    return FeedReading(
        feed=tag,
        link_up=link_up,
        requested_w=requested_w,
        held=held,
        correlation_id=cid,
        acked=acked,
        constraint_w=active.load_constraint.watts if active else None,
        load_w=state.calculated_load.watts if state else None,
        compliant=state.compliant if state else None,
        in_flight=state.in_flight if state else None,
        event=str(state.event) if state else None,
        default_w=state.metadata.default_constraint.watts if state else None,
        status_age_s=status_age_s,
    )


def differs(a: m.FeedState, b: m.FeedState) -> bool:
    """Return whether two states of a feed differ in what the audit log records."""
    ta, tb = a.active_target(), b.active_target()
    return (
        a.compliant != b.compliant
        or a.in_flight != b.in_flight
        or (ta.correlation_id if ta else None) != (tb.correlation_id if tb else None)
    )


def state_row(state: m.FeedState) -> dict[str, Any]:
    """Return what the audit log records of a feed's reported state."""
    active = state.active_target()
    return {
        "event": str(state.event),
        "load_w": state.calculated_load.watts,
        "constraint_w": active.load_constraint.watts if active else None,
        "target_correlation_id": active.correlation_id if active else None,
        "compliant": state.compliant,
        "in_flight": state.in_flight,
    }


def alert_row(alert: BreachAlert) -> dict[str, Any]:
    """Return what the audit log records of a breach alert."""
    return {
        "feed": alert.feed,
        "status": alert.status,
        "severity": alert.severity,
        "breach_id": alert.breach_id,
        "target_w": alert.target_w,
        "measured_w": alert.measured_w,
        "target_correlation_id": alert.target_correlation_id,
        "infrastructure_actions": list(alert.infrastructure_actions),
        "shed_hints": len(alert.shed_hints),
        "message_id": alert.message_id,
    }


def enforcement_row(enf: Enforcement) -> dict[str, Any]:
    """Return what the audit log records of an enforcement outcome."""
    return {
        "infra": enf.infra,
        "breach_id": enf.breach_id,
        "feed": enf.feed,
        "action": enf.action,
        "code": enf.code,
        "results": [r.model_dump(mode="json", exclude_none=True) for r in enf.results],
        "diag_msg": enf.diag_msg,
    }
