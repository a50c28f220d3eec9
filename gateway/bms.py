"""The BMS face, without the protocol: the register map the gateway serves and the state behind it.

The facility's building management system reads the gateway's state from holding registers
and may write a few of its own: an opt-out request for the current event, and the
flexibility it can offer from cooling or backup generation. ``REGISTERS`` is the one source
of the map: the Modbus server (``protocols.modbus.bms_server``) serves it and ``docs/bms.md``
is generated from it (``render_markdown``). ``BmsInputs`` validates what the BMS writes and
lets each value lapse after a TTL unless the BMS writes it again, so a BMS that goes quiet
cannot hold the gateway in a state it asked for long ago.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Protocol

from gateway.clock import Clock
from gateway.errors import InputRejected
from gateway.model import DemandEvent, Opt, Role

if TYPE_CHECKING:
    from gateway.status import ControlStatus

MAP_VERSION = 2  # 2: events_active (register 33)
NOT_AVAILABLE_INT32 = -(2**31)  # what an int32 register holds when the value is unknown
NOT_AVAILABLE_UINT16 = 0xFFFF


class EventState(enum.IntEnum):
    """What the gateway is doing about demand-response events."""

    IDLE = 0  # no event known
    PENDING = 1  # an event the gateway opted into starts later
    ACTIVE = 2  # shedding now
    OPTED_OUT = 3  # the current or next event was declined


class Alarm(enum.IntFlag):
    """Alarm bits of the ``alarms`` register."""

    METER_LOST = 1 << 0
    BATTERY_LOST = 1 << 1
    GPUS_LOST = 1 << 2
    STALE = 1 << 3  # the control loop has not ticked recently
    SHORTFALL = 1 << 4  # measured facility power is above the event's target
    FEED_BREACH = 1 << 5  # a DSX Flex feed draws above its load target (the agent's breach alert)
    FEED_BREACH_CRITICAL = 1 << 6  # ... more than 20 % above it (the alert's severity critical)
    FEED_ENFORCED = 1 << 7  # an infrastructure agent applied an action to a breach (not reverted yet)


RegType = Literal["uint16", "int16", "uint32", "int32", "string"]


@dataclass(frozen=True)
class BmsRegister:
    """One value of the BMS register map (holding registers, 0-based addresses)."""

    name: str
    address: int
    type: RegType
    description: str
    unit: str = ""
    scale: float = 1.0  # register = value / scale
    size: int = 0  # registers of a string
    writable: bool = False
    min: float | None = None  # writable values outside [min, max] are refused
    max: float | None = None

    @property
    def count(self) -> int:
        """Return how many registers the value spans."""
        return self.size if self.type == "string" else 2 if self.type.endswith("32") else 1


REGISTERS: tuple[BmsRegister, ...] = (
    BmsRegister("map_version", 0, "uint16", f"Version of this register map ({MAP_VERSION})."),
    BmsRegister(
        "heartbeat", 1, "uint16", "UTC seconds of the control loop's latest tick, modulo 65536; frozen if it stalls."
    ),
    BmsRegister("snapshot_age_s", 2, "uint16", "Age of the values below; 65535 before the first tick.", "s"),
    BmsRegister(
        "alarms",
        3,
        "uint16",
        "Bits: 0 meter lost, 1 battery lost, 2 GPUs lost, 3 control loop stale, 4 facility above target, "
        "5 a DSX Flex feed above its load target (breach), 6 a breach more than 20 % over target (critical), "
        "7 an infrastructure action applied to a breach (enforcement, not reverted).",
    ),
    BmsRegister("event_state", 4, "uint16", "0 idle, 1 event pending (opted in), 2 event active, 3 opted out."),
    BmsRegister("event_id", 5, "string", "Id of the current or next event, ASCII, NUL-padded (32 chars).", size=16),
    BmsRegister("target_facility_w", 21, "int32", "Facility power the event allows; -2147483648 when none.", "W"),
    BmsRegister("measured_facility_w", 23, "int32", "Facility import power measured; -2147483648 if unknown.", "W"),
    BmsRegister("shed_achieved_w", 25, "int32", "Baseline minus measured facility power during an event, else 0.", "W"),
    BmsRegister("battery_soc_pct", 27, "uint16", "Battery state of charge; 65535 if unknown.", "%", scale=0.1),
    BmsRegister("battery_power_w", 28, "int32", "Battery power, + discharge; -2147483648 if unknown.", "W"),
    BmsRegister("gpu_cap_pct", 30, "uint16", "Mean GPU power cap, % of each GPU's max; 65535 if none.", "%", scale=0.1),
    BmsRegister(
        "bms_opt_out_remaining_s", 31, "uint16", "Seconds until the BMS opt-out request lapses (0: none).", "s"
    ),
    BmsRegister("bms_flex_remaining_s", 32, "uint16", "Seconds until the BMS flexibility offer lapses (0: none).", "s"),
    BmsRegister(
        "events_active",
        33,
        "uint16",
        "OpenADR events whose active period (after any randomized start) covers now and that the gateway is "
        "delivering: the event active indicator; 0 none.",
    ),
    BmsRegister(
        "bms_opt_out",
        100,
        "uint16",
        "BMS writes 1 to ask the gateway to opt out of the current event, 0 to withdraw. Lapses after the TTL.",
        writable=True,
        min=0,
        max=1,
    ),
    BmsRegister(
        "bms_available_flex_w",
        101,
        "uint32",
        "BMS writes the power it can shed from cooling or backup generation. Lapses after the TTL.",
        "W",
        writable=True,
        min=0,
        max=4_294_967_295,
    ),
)
BY_NAME = {r.name: r for r in REGISTERS}
WRITABLE = tuple(r for r in REGISTERS if r.writable)


@dataclass(frozen=True)
class BmsSnapshot:
    """What the gateway shows the BMS: one consistent set of values, taken at ``t``."""

    t: datetime | None = None  # the control tick the values come from; None before the first
    event_state: EventState = EventState.IDLE
    event_id: str = ""
    target_facility_w: float | None = None
    measured_facility_w: float | None = None
    shed_achieved_w: float = 0.0
    battery_soc_pct: float | None = None
    battery_power_w: float | None = None
    gpu_cap_pct: float | None = None
    alarms: Alarm = Alarm(0)
    events_active: int = 0


StateProvider = Callable[[], BmsSnapshot]


@dataclass
class _Input:
    """One writable value: what the BMS wrote, when it lapses, and who wrote it."""

    value: float = 0.0
    until: float = -math.inf  # clock.monotonic() when it lapses
    peer: str = ""
    event_id: str = ""


class BmsInputs:
    """The BMS's writable values, validated, with a time-to-live each."""

    def __init__(self, ttl_s: float, max_flex_w: float, clock: Clock, site_max_w: float = math.inf) -> None:
        self.ttl_s = ttl_s
        self.max_flex_w = max_flex_w  # [bms] max_flex_w
        self.site_max_w = site_max_w  # the most the configured site could draw: no offer can shed more
        self._clock = clock
        self._inputs = {r.name: _Input() for r in WRITABLE}

    def check(self, name: str, value: float) -> None:
        """Raise InputRejected if the BMS may not write ``value`` to ``name``."""
        reg = BY_NAME.get(name)
        if reg is None or not reg.writable:
            raise InputRejected(f"BMS register {name!r} is read-only")
        hi = reg.max if reg.max is not None else math.inf
        lo = reg.min if reg.min is not None else -math.inf
        if not (math.isfinite(value) and lo <= value <= hi):
            raise InputRejected(f"BMS register {name}: {value:g} is outside {lo:g}..{hi:g}")
        if name == "bms_available_flex_w" and value > min(self.max_flex_w, self.site_max_w):
            bound, why = min(
                (self.max_flex_w, "[bms] max_flex_w"), (self.site_max_w, "the most the configured site can draw")
            )
            raise InputRejected(f"BMS flexibility offer {value:g} W is above {bound:g} W ({why})")

    def accept(self, name: str, value: float, peer: str, event_id: str = "") -> None:
        """Store a validated write from ``peer``; it lapses ``ttl_s`` from now unless written again."""
        self.check(name, value)
        until = self._clock.monotonic() + self.ttl_s if value else -math.inf
        self._inputs[name] = _Input(value, until, peer, event_id)

    def value(self, name: str) -> float:
        """Return a writable value in force now (0 once it has lapsed)."""
        inp = self._inputs[name]
        return inp.value if self._clock.monotonic() < inp.until else 0.0

    def remaining_s(self, name: str) -> float:
        """Return seconds until ``name`` lapses (0 if not in force)."""
        return max(0.0, self._inputs[name].until - self._clock.monotonic())

    def writer(self, name: str) -> str:
        """Return the peer address that last wrote ``name``."""
        return self._inputs[name].peer

    def lapsed(self) -> list[str]:
        """Return the names whose non-zero value has lapsed since the last call (and clear them)."""
        now = self._clock.monotonic()
        out = [n for n, inp in self._inputs.items() if inp.value and now >= inp.until]
        for n in out:
            self._inputs[n] = _Input(peer=self._inputs[n].peer)
        return out

    def next_lapse_s(self) -> float | None:
        """Return seconds until the next value in force lapses, or None if none is."""
        now = self._clock.monotonic()
        pending = [inp.until - now for inp in self._inputs.values() if inp.value and inp.until > -math.inf]
        return max(0.0, min(pending)) if pending else None

    def opt_out_requested(self) -> bool:
        """Return whether the BMS asks, now, to opt out of the current event."""
        return self.value("bms_opt_out") == 1

    def opt_out_event_id(self) -> str | None:
        """Return the event that was current when the BMS asked to opt out (None if it does not ask)."""
        return (self._inputs["bms_opt_out"].event_id or None) if self.opt_out_requested() else None

    def available_flex_w(self) -> float:
        """Return the flexibility (W) the BMS offers now from cooling or backup generation."""
        return self.value("bms_available_flex_w")


def site_max_w(site_it_w: float, gpu_max_w: float, cooling_overhead: float) -> float:
    """Return the most the configured site could draw (W): IT load at full GPU caps, plus cooling."""
    return (site_it_w + gpu_max_w) * (1.0 + cooling_overhead)


class KnownEvents(Protocol):
    """Where the BMS face and metrics learn the events known to the gateway (the event book)."""

    def events(self) -> list[tuple[DemandEvent, Opt]]: ...
    def active_event_ids(self, t: datetime) -> list[str]: ...


ALARM_OF_ROLE = {Role.METER: Alarm.METER_LOST, Role.BATTERY: Alarm.BATTERY_LOST, Role.GPUS: Alarm.GPUS_LOST}


def snapshot_of(status: ControlStatus | None, book: KnownEvents, now: datetime, stale_after_s: float) -> BmsSnapshot:
    """Return what the BMS should see from the control loop's latest status and the event book."""
    snap = status.snapshot if status is not None else None
    if status is None or snap is None:
        return BmsSnapshot()
    alarms = Alarm(0)
    for fault in snap.faults:
        alarms |= ALARM_OF_ROLE[fault.role]
    if (now - snap.t).total_seconds() > stale_after_s:
        alarms |= Alarm.STALE
    active, limit_w = status.event_id, status.limit_w
    if active and limit_w is not None and snap.facility_w is not None and snap.facility_w > limit_w * 1.01:
        alarms |= Alarm.SHORTFALL
    state, event_id = _event_state(active, book, now)
    baseline = status.baseline_w
    shed = baseline - snap.facility_w if active and baseline is not None and snap.facility_w is not None else 0.0
    caps = [g.cap_w / g.max_cap_w * 100.0 for g in snap.gpus if g.max_cap_w > 0]
    return BmsSnapshot(
        t=snap.t,
        event_state=state,
        event_id=event_id,
        target_facility_w=limit_w if active else None,
        measured_facility_w=snap.facility_w,
        shed_achieved_w=shed,
        battery_soc_pct=snap.battery.soc_pct if snap.battery else None,
        battery_power_w=snap.battery.power_w if snap.battery else None,
        gpu_cap_pct=sum(caps) / len(caps) if caps else None,
        alarms=alarms,
        events_active=len(book.active_event_ids(now)),
    )


def with_feed_breaches(snap: BmsSnapshot, breaches: Mapping[str, str], enforced: bool = False) -> BmsSnapshot:
    """Return ``snap`` with the breach bits set for unresolved DSX Flex breaches (feed -> severity), and the
    enforcement bit while an infrastructure action applied to a breach is not reverted."""
    alarms = snap.alarms | (Alarm.FEED_ENFORCED if enforced else Alarm(0))
    if breaches:
        alarms |= Alarm.FEED_BREACH
    if "critical" in breaches.values():
        alarms |= Alarm.FEED_BREACH_CRITICAL
    return snap if alarms == snap.alarms else replace(snap, alarms=alarms)


def _event_state(active: str | None, book: KnownEvents, now: datetime) -> tuple[EventState, str]:
    """Return the event state and id the BMS sees: the active event, else the next one known."""
    state, ev = current_event(active, book, now)
    return state, active or (ev.event_id if ev is not None else "")


def current_event(active: str | None, book: KnownEvents, now: datetime) -> tuple[EventState, DemandEvent | None]:
    """Return the event state and the event it concerns: the active event, else the next one known."""
    if active:
        return EventState.ACTIVE, next((ev for ev, _ in book.events() if ev.event_id == active), None)
    upcoming = sorted(
        ((ev, opt) for ev, opt in book.events() if not ev.cancelled and ev.end > now),
        key=lambda pair: pair[0].start,
    )
    if not upcoming:
        return EventState.IDLE, None
    ev, opt = upcoming[0]
    return (EventState.OPTED_OUT if str(opt) == "optOut" else EventState.PENDING), ev


def _num(x: float) -> str:
    """Return a number for the docs: whole numbers without a decimal point or exponent."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def render_markdown() -> str:
    """Return the BMS register map as Markdown (the text of docs/bms.md)."""
    lines = [
        "# BMS register map",
        "",
        "<!-- Generated from gateway/bms.py (REGISTERS) by `python -m gateway.bms`; do not edit. -->",
        "",
        "The gateway serves these Modbus TCP holding registers (function code 3; writes with 6 or 16) to the",
        "facility BMS at the `[bms]` address and port (default 127.0.0.1:1502, unit 1). Addresses are 0-based.",
        "32-bit values are big-endian, high word first. Engineering value = register x scale.",
        "Registers 34-99 are reserved and read as 0.",
        "",
        "A write to a read-only or reserved register is refused with exception code 2 (ILLEGAL DATA ADDRESS),",
        "as is a write covering only part of a 32-bit value; a value out of range is refused with exception",
        "code 3 (ILLEGAL DATA VALUE), as is a flexibility offer above `[bms] max_flex_w` or above what the",
        "configured site can draw (`[site]` IT load and `[[gpus.groups]]` at their max caps, plus cooling).",
        "Accepted writes are recorded in the audit log with the writer's address and lapse `input_ttl_s`",
        "seconds (`[bms]`, default 300) after the last write: write again to keep them. A write that repeats",
        "the value in force, from the same address, within 10 s of the row that recorded it is counted in",
        "the next row (`repeats`) instead of a row of its own. Writes that change something are taken up to",
        "10 per address (40 in all) per 10 s; more are refused with code 6 (SERVER DEVICE BUSY).",
        "At most `max_connections` (default 16) connections are open at once (a new one closes the one",
        "silent longest); a connection silent for `idle_timeout_s` (default 60) is closed.",
        "An opt-out written while an event is current or pending opts the gateway out of that event the way",
        "every opt-out goes: decided, stored and audited (actor `bms`, with the writer's address), then sent",
        "to the VTN. Writing it again decides nothing new; a later 0 or a lapse does not opt back in: an operator can.",
        "",
        f"Map version {MAP_VERSION}.",
        "",
        "| Address | Name | Type | Scale | Unit | Access | Description |",
        "|---:|---|---|---:|---|---|---|",
    ]
    for r in REGISTERS:
        addr = str(r.address) if r.count == 1 else f"{r.address}-{r.address + r.count - 1}"
        access = "read/write" if r.writable else "read"
        desc = r.description
        if r.writable and r.min is not None and r.max is not None:
            desc += f" Range {_num(r.min)}..{_num(r.max)}" + (
                " (at most `[bms] max_flex_w`)." if r.unit == "W" else "."
            )
        lines.append(f"| {addr} | `{r.name}` | {r.type} | {r.scale:g} | {r.unit} | {access} | {desc} |")
    lines += [
        "",
        "`event_state`: " + ", ".join(f"{s.value} {s.name.lower()}" for s in EventState) + ".",
        "",
        "`alarms` bits: " + ", ".join(f"{a.value.bit_length() - 1} {(a.name or '').lower()}" for a in Alarm) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
