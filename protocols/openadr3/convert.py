"""Turn a validated OpenADR 3.1 event into the gateway's DemandEvent; refuse what cannot be acted on.

Payloads the event book can act on, mapped onto the signals the 2.0b path produces:

=============================  ===============  ==============================  ====================
3.1 payload type               2.0b signal      signal type                     value
=============================  ===============  ==============================  ====================
SIMPLE (0..3)                  SIMPLE           level                           as is
IMPORT_CAPACITY_LIMIT          LOAD_DISPATCH    setpoint (cap)                  W (units KW/W/MW)
DISPATCH_SETPOINT              LOAD_DISPATCH    setpoint (cap)                  W
DISPATCH_SETPOINT_RELATIVE     LOAD_DISPATCH    delta (shed)                    W, -value (negative
                                                                                = use less)
CONTROL_LEVEL_OFFSET (-10..10) LOAD_CONTROL     x-loadControlLevelOffset        as is
CONTROL_LEVEL_OFFSET_PERCENT   LOAD_CONTROL     x-loadControlPercentOffset      value x 100
PRICE (units KWH)              ELECTRICITY_PRICE price (levels configured)      currency per kWh
=============================  ===============  ==============================  ====================

Every other payload type (alerts, GHG, curves, export and reservation values, private strings) is
listed in ``Converted.ignored`` and audited by the caller; an event with nothing left to act on is
refused (``EventRefused``), as is one whose actionable values are out of range or unitless.

Timing (User Guide 7.3, 7.4): an interval takes its own ``intervalPeriod`` over the event's; a
missing start follows the previous interval; a first interval with no start at all, or the "now"
sentinel, starts at the event's ``createdDateTime`` (stable across re-reads). Multi-valued payloads
split their interval into equal sub-intervals. ``event.duration`` truncates, or loops the intervals
(at most ``MAX_INTERVALS`` of them). Infinite durations become ``OPEN_ENDED_S``. ``randomizeStart``
R (a shift of up to +-R) becomes a start R earlier and a ``start_after_s`` of 2R, so the book's
uniform delay gives the same spread. Priority 0 is highest in 3.1 and the book ranks 1 highest
with 0 meaning none: 3.1 priority p becomes p + 1, none stays 0. An event whose window is the
zero-length sentinel (start "0001-01-01", duration PT0S: User Guide 7.9) is a cancellation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.errors import InputRejected
from gateway.model import DemandEvent, Interval, Signal, SignalName
from protocols.openadr3.timing import TimeValueError, duration_s, parse_datetime, shift

OPEN_ENDED_S = 10 * 365 * 24 * 3600.0  # as on the 2.0b path: runs until cancelled
MAX_INTERVALS = 4096
_POWER = {"KW": 1e3, "W": 1.0, "MW": 1e6}
_CAP_TYPES = frozenset({"IMPORT_CAPACITY_LIMIT", "DISPATCH_SETPOINT"})
ACTIONABLE = frozenset({"SIMPLE", "PRICE", "DISPATCH_SETPOINT_RELATIVE", "CONTROL_LEVEL_OFFSET",
                        "CONTROL_LEVEL_OFFSET_PERCENT"}) | _CAP_TYPES  # fmt: skip


class EventRefused(InputRejected):
    """An event the gateway cannot act on; ``title`` and ``status`` form the spec's problem object."""

    title = "Unprocessable event"
    status = 400

    def problem(self) -> dict[str, Any]:
        """Return the refusal as the definition's problem object."""
        return {"type": "about:blank", "title": self.title, "status": self.status, "detail": str(self)[:500]}


@dataclass(frozen=True)
class Slot:
    """One resolved (sub-)interval: the event interval id, start, length (s, maybe inf) and payloads."""

    interval_id: int
    start: datetime
    duration_s: float
    payloads: dict[str, list[Any]]


@dataclass(frozen=True)
class Converted:
    """A DemandEvent and the payload types it carried that the gateway does not act on."""

    event: DemandEvent
    ignored: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = field(default=(), repr=False)


def _refuse(event_id: str, what: str) -> EventRefused:
    """Return a refusal naming the event."""
    return EventRefused(f"event {event_id}: {what}")


def resolve(event: dict[str, Any], refuse_id: str | None = None) -> list[Slot]:
    """Return the event's intervals placed in time (sub-intervals split, event.duration applied)."""
    eid = refuse_id or str(event.get("id"))
    default = event.get("intervalPeriod") or {}
    created = _time(event.get("createdDateTime"), "createdDateTime", eid)
    d_start = _time(default.get("start"), "intervalPeriod.start", eid) if default.get("start") else None
    d_dur = _dur(default.get("duration"), "intervalPeriod.duration", eid) if default.get("duration") else None
    raw = event.get("intervals") or []
    slots: list[Slot] = []
    cursor: datetime | None = None
    for n, iv in enumerate(raw):
        own = iv.get("intervalPeriod") or {}
        start: datetime | None
        if own.get("start"):
            start = _time(own["start"], f"intervals[{n}].intervalPeriod.start", eid)
            if start is None:  # the "now" sentinel: event start for the first, else follow on
                start = (d_start or created) if n == 0 else cursor
        else:
            start = cursor if n else (d_start or created)
        if start is None:
            start = created
        length = _dur(own["duration"], f"intervals[{n}].intervalPeriod.duration", eid) if own.get("duration") else d_dur
        if length is None:
            raise _refuse(eid, f"interval {n} has no duration (neither its own nor the event's intervalPeriod)")
        if start is None:
            raise _refuse(eid, f"interval {n} has no start and the event no createdDateTime")
        payloads: dict[str, list[Any]] = {}
        for p in iv.get("payloads") or []:
            payloads.setdefault(p["type"], []).extend(p["values"])
        slots.extend(_split(int(iv["id"]), start, length, payloads, eid))
        cursor = shift(start, length)
    if event.get("duration"):
        slots = _apply_event_duration(slots, _dur(event["duration"], "duration", eid))
    return slots


def _split(interval_id: int, start: datetime, length: float, payloads: dict[str, list[Any]], eid: str) -> list[Slot]:
    """Split an interval whose scalar payload carries several values into equal sub-intervals."""
    counts = {len(v) for k, v in payloads.items() if k in ACTIONABLE}
    k = max(counts, default=1)
    if k <= 1:
        return [Slot(interval_id, start, length, payloads)]
    if math.isinf(length):
        raise _refuse(eid, f"interval {interval_id}: {k} values cannot share an infinite interval")
    step = length / k
    out = []
    for i in range(k):
        part = {t: [v[i]] if len(v) == k else v for t, v in payloads.items()}
        out.append(Slot(interval_id, shift(start, i * step), step, part))
    return out


def _apply_event_duration(slots: list[Slot], total_s: float) -> list[Slot]:
    """Truncate the intervals to event.duration, or repeat them to fill it (at most MAX_INTERVALS)."""
    if not slots:
        return slots
    first = slots[0].start
    span = max((s.start - first).total_seconds() + s.duration_s for s in slots)
    out: list[Slot] = []
    offset = 0.0
    while len(out) < MAX_INTERVALS and offset < total_s:
        for s in slots:
            begin = (s.start - first).total_seconds() + offset
            if begin >= total_s or len(out) >= MAX_INTERVALS:
                break
            out.append(Slot(s.interval_id, shift(first, begin), min(s.duration_s, total_s - begin), s.payloads))
        if math.isinf(span) or span <= 0:
            break
        offset += span
    return out


def to_demand_event(
    event: dict[str, Any],
    *,
    version: int,
    now: datetime,
    vtn_id: str,
    ven_name: str,
    program_name: str,
    descriptors: dict[str, dict[str, Any]],
    price_types: frozenset[str],
    our_targets: frozenset[str],
) -> Converted:
    """Convert one validated event into a DemandEvent; raise EventRefused when nothing can be acted on."""
    eid = str(event["id"])
    created = _time(event.get("createdDateTime"), "createdDateTime", eid)
    slots = resolve(event)
    targets = _targets(event.get("targets"), our_targets)
    priority = event.get("priority")
    common: dict[str, Any] = {
        "event_id": eid,
        "modification_number": version,
        "priority": 0 if priority is None else int(priority) + 1,
        "market_context": program_name,
        "vtn_id": vtn_id,
        "vtn_comment": event.get("eventName") or "",
        "created": created,
        "targets": targets,
        "ven_id": ven_name,
    }
    if _is_cancellation(event, slots):
        start = created or now
        return Converted(DemandEvent(status="cancelled", start=start, duration_s=0.0, signals=(), **common))
    if not slots:
        raise _refuse(eid, "no intervals: nothing to act on (a report-only event)")
    randomize_s = _randomize_s(event)
    signals, ignored = _signals(slots, descriptors, price_types, eid, randomize_s)
    if not signals:
        kinds = ", ".join(sorted(ignored)) or "none"
        raise _refuse(eid, f"no payload this site can act on (payload types: {kinds})")
    start = min(iv.start for s in signals for iv in s.intervals)
    end = max(iv.end for s in signals for iv in s.intervals)
    duration = (end - start).total_seconds()
    status = "completed" if end <= now else "active" if start <= now else "far"
    demand = DemandEvent(status=status, start=start, duration_s=duration, signals=signals,
                         start_after_s=2 * randomize_s, **common)  # fmt: skip
    return Converted(demand, tuple(sorted(ignored)), tuple(slots))


def _signals(
    slots: list[Slot], descriptors: dict[str, dict[str, Any]], price_types: frozenset[str], eid: str, rand_s: float
) -> tuple[tuple[Signal, ...], set[str]]:
    """Build one Signal per actionable payload type; return them and the payload types ignored."""
    ignored: set[str] = set()
    by_type: dict[str, list[Interval]] = {}
    for slot in slots:
        for ptype, values in slot.payloads.items():
            if ptype not in ACTIONABLE or (ptype == "PRICE" and "price" not in price_types):
                ignored.add(ptype)
                continue
            if len(values) != 1:
                raise _refuse(eid, f"interval {slot.interval_id}: {ptype} carries {len(values)} values")
            length = OPEN_ENDED_S if math.isinf(slot.duration_s) else slot.duration_s
            value = _value(ptype, values[0], descriptors.get(ptype, {}), eid, slot.interval_id)
            by_type.setdefault(ptype, []).append(Interval(shift(slot.start, -rand_s), length, value))
    out = []
    for ptype, intervals in sorted(by_type.items()):
        name, signal_type, unit = _SIGNAL[ptype]
        if ptype == "PRICE":
            unit = f"{descriptors.get('PRICE', {}).get('currency') or ''}/kWh"
        out.append(Signal(name, signal_type, tuple(sorted(intervals, key=lambda iv: iv.start)), unit))
    return tuple(out), ignored


_SIGNAL: dict[str, tuple[SignalName, str, str | None]] = {
    "SIMPLE": (SignalName.SIMPLE, "level", None),
    "IMPORT_CAPACITY_LIMIT": (SignalName.LOAD_DISPATCH, "setpoint", "W"),
    "DISPATCH_SETPOINT": (SignalName.LOAD_DISPATCH, "setpoint", "W"),
    "DISPATCH_SETPOINT_RELATIVE": (SignalName.LOAD_DISPATCH, "delta", "W"),
    "CONTROL_LEVEL_OFFSET": (SignalName.LOAD_CONTROL, "x-loadControlLevelOffset", "level"),
    "CONTROL_LEVEL_OFFSET_PERCENT": (SignalName.LOAD_CONTROL, "x-loadControlPercentOffset", "%"),
    "PRICE": (SignalName.ELECTRICITY_PRICE, "price", None),
}


def _value(ptype: str, raw: Any, descriptor: dict[str, Any], eid: str, n: int) -> float:
    """Return one payload value in the gateway's units; refuse values out of range or without units."""
    where = f"interval {n}: {ptype}"
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise _refuse(eid, f"{where} value {raw!r} is not a number")
    value = float(raw)
    if ptype == "SIMPLE":
        if value not in (0, 1, 2, 3):
            raise _refuse(eid, f"{where} level {raw!r} is not 0, 1, 2 or 3")
        return value
    if ptype in _CAP_TYPES or ptype == "DISPATCH_SETPOINT_RELATIVE":
        units = descriptor.get("units")
        if units not in _POWER:
            raise _refuse(eid, f"{where} units {units!r} are not one of {', '.join(_POWER)} (payloadDescriptor)")
        watts = value * _POWER[units]
        if ptype == "DISPATCH_SETPOINT_RELATIVE":
            return max(0.0, -watts)  # a negative change is a reduction; an increase asks nothing of this site
        if watts < 0:
            raise _refuse(eid, f"{where} {raw!r} {units} is negative")
        return watts
    if ptype == "CONTROL_LEVEL_OFFSET":
        if value != int(value) or not -10 <= value <= 10:
            raise _refuse(eid, f"{where} {raw!r} is not an integer in -10..10")
        return value
    if ptype == "CONTROL_LEVEL_OFFSET_PERCENT":
        if not -1.0 <= value <= 1.0:
            raise _refuse(eid, f"{where} {raw!r} is outside -1.0..1.0")
        return value * 100.0
    units = descriptor.get("units")  # PRICE
    if units not in (None, "KWH"):
        raise _refuse(eid, f"{where} units {units!r} are not KWH")
    return value


def _randomize_s(event: dict[str, Any]) -> float:
    """Return the event's randomizeStart (s): its own, else its first interval's; 0 when absent."""
    for period in (event.get("intervalPeriod"), *(iv.get("intervalPeriod") for iv in event.get("intervals") or [])):
        if isinstance(period, dict) and period.get("randomizeStart"):
            value = abs(duration_s(period["randomizeStart"]))
            return 0.0 if math.isinf(value) else value
    return 0.0


def _is_cancellation(event: dict[str, Any], slots: list[Slot]) -> bool:
    """Return whether the event's window is the zero-length sentinel (User Guide 7.9)."""
    period = event.get("intervalPeriod") or {}
    if not period.get("start") or not period.get("duration"):
        return False
    try:
        sentinel = parse_datetime(period["start"]) is None and duration_s(period["duration"]) == 0
    except TimeValueError:
        return False
    return sentinel and all(s.duration_s == 0 for s in slots)


def _targets(raw: Any, ours: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """Return () when the event is for everyone or names one of our targets, else its targets as pairs.

    The event book answers NOT_TARGETED for pairs it does not know, so an event naming only
    targets this VEN was not given is recorded and not acted on.
    """
    if not raw:
        return ()
    named = {str(t) for t in raw}
    if named & ours:
        return ()
    return tuple(sorted(("target", t) for t in named))


def _time(value: Any, what: str, eid: str) -> datetime | None:
    """Parse a date-time (None for the "now" sentinel) or refuse the event."""
    if value is None:
        return None
    try:
        return parse_datetime(value)
    except TimeValueError as err:
        raise _refuse(eid, f"{what}: {err}") from err


def _dur(value: Any, what: str, eid: str) -> float:
    """Parse a non-negative duration (inf for P9999Y) or refuse the event."""
    try:
        seconds = duration_s(value)
    except TimeValueError as err:
        raise _refuse(eid, f"{what}: {err}") from err
    if seconds < 0:
        raise _refuse(eid, f"{what} {value!r} is negative")
    return seconds
