"""The control loop's read model: one typed status per tick, and the latest site view.

The loop publishes; metrics, the BMS face, telemetry reports, the measurement store, /readyz and
the opt decision's feasibility estimate read what it published, never the loop's own members.
``StatusBoard`` keeps the latest of each and calls its subscribers with every new status (a
console's server-sent events would subscribe here: ``subscribe`` returns the way to unsubscribe).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from gateway.logs import get_logger
from gateway.model import DeviceFault, Role, Snapshot

log = get_logger("gateway.status")


@dataclass(frozen=True)
class TickRecord:
    """What one tick saw and did; kept for the demo summary, the measurement store and telemetry."""

    t: datetime
    event_id: str | None
    limit_w: float | None
    facility_w: float | None
    battery_w: float
    gpu_w: float
    throughput: float
    natural_throughput: float
    phase: str = ""  # ramp_up | active | recovery while an event is under control
    gpu_natural_w: float | None = None  # what the GPUs would draw uncapped (estimate), W


@dataclass(frozen=True)
class SiteView:
    """The site as the loop last read it: snapshot, baseline and each GPU's natural (uncapped) draw.

    ``natural_w`` and ``natural_tput`` are read-only views of the loop's running estimates.
    """

    snapshot: Snapshot
    baseline_w: float | None  # facility power before any event (W); frozen while one runs
    natural_w: Mapping[str, float]  # per GPU: what it would draw uncapped (W)
    natural_tput: Mapping[str, float]  # per GPU: its uncapped work rate (work units/s)


@dataclass(frozen=True)
class LinkDown:
    """A device whose reads fail (or give no possible reading), and since when (ISO time)."""

    fault: DeviceFault
    since: str


class RunningAccount(Protocol):
    """The running accounting of the event under control, as readers see it (``accounting.EventAccount``)."""

    @property
    def facility_shed_wh(self) -> float: ...
    @property
    def battery_wh(self) -> float: ...
    def summary(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ControlStatus:
    """The control loop's state as published after each tick (and at start, event start and end, shutdown)."""

    seq: int  # counts the statuses published by this board
    site: SiteView | None  # the latest reading of the site (None before the first)
    record: TickRecord | None  # the tick that published it (None for a status between ticks)
    event_id: str | None  # the event under control (set before its first command)
    phase: str  # ramp_up | active | recovery while an event is under control, else ""
    limit_w: float | None  # facility power the event allows now, ramped (W); None when idle
    roles: frozenset[Role]  # the devices this site reads (meter, battery, gpus), configured or not
    down: tuple[LinkDown, ...]  # devices not answering now, typed
    account: RunningAccount | None  # the running accounting of the event under control (read only)

    @property
    def snapshot(self) -> Snapshot | None:
        """Return the latest snapshot of the site, or None before the first read."""
        return self.site.snapshot if self.site is not None else None

    @property
    def baseline_w(self) -> float | None:
        """Return the facility baseline (W): measured between events, frozen while one runs."""
        return self.site.baseline_w if self.site is not None else None

    def devices_down(self) -> dict[str, str]:
        """Return each device role not answering now with its error ("meter": "...")."""
        return {d.fault.role.value: d.fault.error for d in self.down}


class StatusBoard:
    """The latest site view and control status, and who wants every new status."""

    def __init__(self) -> None:
        self.site: SiteView | None = None
        self.latest: ControlStatus | None = None
        self._subscribers: list[Callable[[ControlStatus], None]] = []

    def publish_site(self, view: SiteView) -> None:
        """Keep the latest site view (after every read of the site, a tick or a reconcile)."""
        self.site = view

    def latest_site(self) -> SiteView | None:
        """Return the latest site view, or None before the first read."""
        return self.site

    def next_seq(self) -> int:
        """Return the sequence number the next status carries."""
        return 1 if self.latest is None else self.latest.seq + 1

    def publish(self, status: ControlStatus) -> None:
        """Keep ``status`` as the latest and hand it to every subscriber (one that fails is logged, not raised)."""
        self.latest = status
        for notify in list(self._subscribers):
            try:
                notify(status)
            except Exception as err:  # a reader must never stop the control loop
                log.error("status subscriber failed", subscriber=_name(notify), error=str(err))

    def subscribe(self, notify: Callable[[ControlStatus], None]) -> Callable[[], None]:
        """Call ``notify`` with every status from now on (it must not block); return what unsubscribes it."""
        self._subscribers.append(notify)

        def unsubscribe() -> None:
            if notify in self._subscribers:
                self._subscribers.remove(notify)

        return unsubscribe


def _name(fn: Callable[..., Any]) -> str:
    """Return a callable's name for a log line."""
    return str(getattr(fn, "__qualname__", repr(fn)))


def roles_of(meter: object | None, battery: object | None, fleet: object | None) -> frozenset[Role]:
    """Return the roles a site has devices for."""
    present: Sequence[tuple[Role, object | None]] = ((Role.METER, meter), (Role.BATTERY, battery), (Role.GPUS, fleet))
    return frozenset(role for role, dev in present if dev is not None)
