"""The few capability interfaces every device backend implements.

Power in watts, positive battery power means discharge (see ``gateway.model``).
A method that cannot reach its device raises ``DeviceUnavailable``; one whose
device refuses raises ``DeviceRejected``. None of them returns None on error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gateway.model import BatteryState, GpuState

if TYPE_CHECKING:
    from gateway.directive import Directive


class Meter(Protocol):
    """Reads the facility (or feeder) power."""

    device_id: str

    async def read_facility_w(self) -> float:
        """Return facility import power in W."""
        ...


class Battery(Protocol):
    """A battery or grid-interactive UPS that can be dispatched."""

    device_id: str

    async def read(self) -> BatteryState:
        """Return the battery's state of charge, power and limits."""
        ...

    async def set_discharge_w(self, power_w: float, lease_s: float) -> float:
        """Command discharge power (W, + discharge), leased for ``lease_s``; return the read-back setpoint."""
        ...

    async def release(self) -> None:
        """Return the battery to its normal (undispatched) mode."""
        ...


FLEET_DEVICE_ID = "gpus"  # a fleet has no device id of its own: its faults and commands are audited under this


class GpuFleet(Protocol):
    """A set of GPUs, local or remote, whose power caps can be set (audited as ``FLEET_DEVICE_ID``)."""

    async def read(self) -> tuple[GpuState, ...]:
        """Return every GPU's power, cap, limits and job."""
        ...

    async def set_caps(self, caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
        """Set many caps (W) leased for ``lease_s``; return the enforced cap of each GPU set."""
        ...

    async def release(self) -> None:
        """Restore every GPU's default power limit."""
        ...


class LeaseLapse(Protocol):
    """A node's leased caps that lapsed (its agent restored the defaults on its own)."""

    @property
    def node(self) -> str: ...
    @property
    def lapsed_at(self) -> datetime: ...
    @property
    def gpus(self) -> Sequence[str]: ...


@runtime_checkable
class ReportsLeaseLapses(Protocol):
    """A fleet whose nodes hold leases of their own and report the ones that lapsed (the NATS fleet)."""

    def take_lease_lapses(self) -> Sequence[LeaseLapse]:
        """Return the lapses seen since the last call, and forget them."""
        ...


class AuditSink(Protocol):
    """Where every stage records what it decided or did."""

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        """Append one record; return its sequence number once durably committed."""
        ...


@runtime_checkable
class ReportsLoss(Protocol):
    """An audit sink that can lose its database for good (the audit log), and says why."""

    @property
    def lost(self) -> str | None:
        """Return why every record is refused now, or None."""
        ...


@runtime_checkable
class TransactionalAuditSink(Protocol):
    """An audit sink that commits a record together with other writes to its own database."""

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
        """Append one record and run ``statements`` (on ``engine``, the sink's own) in one transaction."""
        ...


class WriteFence(Protocol):
    """Lets a write commit only while this node holds the active lease (hot standby, ``gateway.standby``)."""

    @property
    def token(self) -> int | None:
        """Return the fencing token this node's writes carry now; None while it may not write."""
        ...

    async def check(self, conn: Any, token: int | None) -> None:
        """Raise FencedOff unless ``token`` still holds the lease; keep it held until ``conn``'s transaction ends."""
        ...


class DirectiveSource(Protocol):
    """What the control loop follows: the directive at a moment, and a wake-up when it may have changed."""

    changed: asyncio.Event  # set whenever a new directive may apply (a new version, a stop, an override)

    def directive_at(self, t: datetime, default_ramp_up_s: float = 0.0) -> Directive:
        """Return what the facility must do at ``t`` and when that next changes."""
        ...


@dataclass(frozen=True)
class FeedReport:
    """One power feed as its agent last reported it (W; None: not reported, or no constraint)."""

    load_w: float | None
    constraint_w: float | None  # the constraint the agent enforces
    requested_w: float | None  # the constraint the gateway holds
    compliant: bool | None
    acked: bool  # the agent reports the gateway's last command for this feed as in force


@dataclass(frozen=True)
class FeedsStatus:
    """What metrics show of a site's feeds: the link, each feed, breaches, refusals, message counts."""

    device_id: str
    link_up: bool
    feeds: Mapping[str, FeedReport]
    breaches: Mapping[str, str]  # feed -> severity of an unresolved breach
    refused: Mapping[str, int]  # messages refused, by reason
    commands_sent: int
    statuses_received: int
    breach_alerts: int  # verified breach alerts received (every status change)
    enforcements: int = 0  # verified enforcement outcomes received (an infrastructure agent's)
    enforced: Mapping[str, str] = field(default_factory=dict)  # breach id -> feed: an action applied, not reverted


@runtime_checkable
class LoadFeeds(GpuFleet, Protocol):
    """Power feeds held under load targets by a site's own agent (DSX Flex), driven like a GPU fleet.

    Each feed reads as one ``GpuState`` (its load, its enforced constraint as the cap, its range as
    the cap limits); ``set_caps`` holds each feed at a load constraint for the lease, a cap at the
    feed's maximum and ``release`` remove the constraint. It also says what the feeds fail to shed.
    """

    device_id: str

    def owns(self, unit_id: str) -> bool:
        """Return whether a fleet id names one of these feeds."""
        ...

    def bind_event(self, event_id: Callable[[], str | None]) -> None:
        """Name the event in force (``event_id()``) in the feeds' own audit rows from now on."""
        ...

    def breach_excess_w(self) -> float:
        """Return how much (W) the feeds in an unresolved breach draw above their targets."""
        ...

    def breaches(self) -> dict[str, str]:
        """Return feed -> severity of every unresolved breach."""
        ...

    def status(self) -> FeedsStatus:
        """Return what metrics show of the feeds now."""
        ...
