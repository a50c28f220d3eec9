"""Facts of the DSX Exchange contract this package relies on (dsx-flex 1.7.0, bms 1.0.0); see docs/dsx.md.

Everything a topic, an enum or a unit depends on is named here once, so that a change of the
contract is a change of this file.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum

DSX_FLEX_VERSION = "1.7.0"
BMS_VERSION = "1.0.0"

# -- CloudEvents envelope (dsx-flex BaseCloudEvent) ---------------------------------------------
SPECVERSION = "1.0.2"  # the contract's const; CloudEvents SDKs refuse it (they want "1.0")
DATACONTENTTYPE = "application/json"
SOURCE_RE = re.compile(r"^//grid/v1/(isv|dsx-flex-agent|infra)/([^/]+)$")
TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
JWS_COMPACT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
SIGNING_ALGS = ("ES256", "RS256")  # the contract allows either; this gateway signs with ES256
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # one topic level; no MQTT wildcards or '/'


class Role(StrEnum):
    """Publisher roles in ``source`` (//grid/v1/<role>/<identifier>)."""

    ISV = "isv"
    AGENT = "dsx-flex-agent"
    INFRA = "infra"


class EventType(StrEnum):
    """The four DSX Flex event types."""

    LOADTARGET_SET = "grid.loadtarget.set.v1"
    POWERSTATE_STATUS = "grid.powerstate.status.v1"
    POWERBREACH_ALERT = "grid.powerbreach.alert.v1"
    POWERBREACH_ENFORCEMENT = "grid.powerbreach.enforcement.v1"


SUBJECTS = {
    EventType.LOADTARGET_SET: "loadtarget",
    EventType.POWERSTATE_STATUS: "powerstate",
    EventType.POWERBREACH_ALERT: "powerbreach",
    EventType.POWERBREACH_ENFORCEMENT: "powerbreach",
}
QOS = {
    EventType.LOADTARGET_SET: 1,
    EventType.POWERSTATE_STATUS: 1,
    EventType.POWERBREACH_ALERT: 2,
    EventType.POWERBREACH_ENFORCEMENT: 2,
}
PUBLISHER = {
    EventType.LOADTARGET_SET: Role.ISV,
    EventType.POWERSTATE_STATUS: Role.AGENT,
    EventType.POWERBREACH_ALERT: Role.AGENT,
    EventType.POWERBREACH_ENFORCEMENT: Role.INFRA,
}


def source(role: Role, identifier: str) -> str:
    """Return the ``source`` URI of a publisher."""
    return f"//grid/v1/{role}/{identifier}"


def topic(event_type: EventType, identifier: str) -> str:
    """Return the channel address of an event type for the publisher's identifier (or "+")."""
    if event_type is EventType.LOADTARGET_SET:
        return f"grid/v1/isv/{identifier}/loadtarget/set"
    if event_type is EventType.POWERSTATE_STATUS:
        return f"grid/v1/dsx-flex-agent/{identifier}/powerstate/status"
    if event_type is EventType.POWERBREACH_ALERT:
        return f"grid/v1/dsx-flex-agent/{identifier}/powerbreach"
    return f"grid/v1/infra/{identifier}/powerbreach/enforcement"


def topic_identifier(address: str) -> str:
    """Return the publisher identifier (the fourth level) of a grid/v1 topic."""
    parts = address.split("/")
    return parts[3] if len(parts) > 3 else ""


# -- Feed states and breaches -------------------------------------------------------------------
class FeedEvent(StrEnum):
    """What made the agent publish a status (FeedState.event)."""

    TARGET_SET = "target_set"
    START_RAMP_DOWN = "start_ramp_down"
    END_RAMP_DOWN = "end_ramp_down"
    START_RAMP_UP = "start_ramp_up"
    END_RAMP_UP = "end_ramp_up"
    PERIODIC = "periodic"


BREACH_STATUSES = ("active", "escalated", "resolved")
BREACH_SEVERITIES = ("warning", "critical")
CRITICAL_EXCESS_FRACTION = 0.20  # critical: load more than 20 % over the target
INFRASTRUCTURE_ACTIONS = ("SHUTDOWN_NODES", "SHUTDOWN_RACKS", "CUT_DATA_FEEDS", "TRIP_BREAKERS")

# -- Units --------------------------------------------------------------------------------------
POWER_UNITS_W = {"watt": 1.0, "kilowatt": 1e3, "megawatt": 1e6}  # DSX Flex PowerUnit.unit

# BMS engUnit is a free string (the contract leaves its enum commented out: "#enum: [kW]").
# Case matters only where it must: "mW" would be milliwatts, so a lone lower-case "mw" is refused.
BMS_POWER_UNITS_W = {
    "W": 1.0,
    "w": 1.0,
    "watt": 1.0,
    "watts": 1.0,
    "kW": 1e3,
    "KW": 1e3,
    "kw": 1e3,
    "kilowatt": 1e3,
    "kilowatts": 1e3,
    "MW": 1e6,
    "megawatt": 1e6,
    "megawatts": 1e6,
    "GW": 1e9,
}


def to_watts(value: float, unit: str) -> float:
    """Return a DSX Flex power value in W; raise ValueError for a unit outside the contract's enum."""
    try:
        factor = POWER_UNITS_W[unit]
    except KeyError:
        raise ValueError(f"unit {unit!r} is not one of {', '.join(POWER_UNITS_W)}") from None
    watts = value * factor
    if not math.isfinite(watts):
        raise ValueError(f"{value} {unit} is not a finite power")
    return watts


def bms_factor_w(eng_unit: str) -> float:
    """Return the factor from a BMS engUnit to W; raise ValueError for a unit that is not power."""
    factor = BMS_POWER_UNITS_W.get(eng_unit.strip()) or BMS_POWER_UNITS_W.get(eng_unit.strip().lower())
    if factor is None or eng_unit.strip() in ("mw", "mW"):
        raise ValueError(f"engUnit {eng_unit!r} is not a power unit this gateway reads (W, kW, MW, GW)")
    return factor


# -- BMS topics ---------------------------------------------------------------------------------
BMS_PREFIX = "BMS/v1"
BMS_PUBLISHER = "PUB"
VALUE_REPUBLISH_S = 100.0  # values on change and every 100 s; metadata every 100 s, retained
HEARTBEAT_S = 10.0  # HeartbeatTimestampBms and HeartbeatTimestampIntegration, every 10 s


def bms_topic(publisher: str, kind: str, object_type: str, point_type: str, tag_path: str) -> str:
    """Return ``BMS/v1/{publisher}/{kind}/{objectType}/{pointType}/{tagPath}``."""
    return f"{BMS_PREFIX}/{publisher}/{kind}/{object_type}/{point_type}/{tag_path}"


def split_bms_topic(address: str) -> tuple[str, str, str, str, str] | None:
    """Return (publisher, kind, objectType, pointType, tagPath) of a BMS topic, or None if it is not one."""
    parts = address.split("/", 6)
    if len(parts) != 7 or f"{parts[0]}/{parts[1]}" != BMS_PREFIX or not parts[6]:
        return None
    return parts[2], parts[3], parts[4], parts[5], parts[6]


def derive_value_topic(metadata_topic: str, integration: str) -> str:
    """Return the value topic an integration publishes on for a BMS metadata topic.

    The contract's rule: replace ``PUB`` with the integration's identifier and ``Metadata`` with
    ``Value``, keeping ``{objectType}/{pointType}/{tagPath}`` unchanged.
    """
    parts = split_bms_topic(metadata_topic)
    if parts is None or parts[0] != BMS_PUBLISHER or parts[1] != "Metadata":
        raise ValueError(f"{metadata_topic!r} is not a BMS metadata topic")
    return bms_topic(integration, "Value", parts[2], parts[3], parts[4])
