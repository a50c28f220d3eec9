"""Turn openleadr's parsed event dict into the gateway's DemandEvent; reject what we cannot honour.

openleadr hands the VEN each ``oadrEvent`` as a plain dict (``utils.normalize_dict`` over
xmltodict's output). Its quirks, all handled here:

- numeric-looking strings arrive as int or float (an event id "42" is ``42``);
- the ramp-up and recovery periods are ``active_period['ramp_up']`` / ``['recovery']``, the start
  tolerance is ``active_period['tolerance']['tolerate']['startafter']``;
- a signal's unit is either ``signal['measurement'] = {'name', 'unit', 'scale', ...}`` or, when
  openleadr's normaliser skipped it (it stops at the first signal without a measurement), the
  raw ``signal['powerReal'] = {'item_units', 'si_scale_code', ...}``;
- a date-time it cannot read is left as the original string.

An active period (or an interval) of duration 0 means "open-ended, until cancelled" in OpenADR
2.0b; it becomes ``OPEN_ENDED_S`` seconds, which every consumer treats as "no end yet".
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.errors import InputRejected
from gateway.model import DemandEvent, Interval, Signal, SignalName

OPEN_ENDED_S = 10 * 365 * 24 * 3600.0  # ten years: an open-ended event runs until cancelled
_STATUSES = frozenset({"none", "far", "near", "active", "completed", "cancelled"})
_SCALE = {"p": 1e-12, "n": 1e-9, "micro": 1e-6, "m": 1e-3, "c": 1e-2, "d": 1e-1, "none": 1.0,
          "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}  # fmt: skip
_POWER_UNITS = {"W": 1.0, "kW": 1e3, "MW": 1e6, "GW": 1e9}
_MEASUREMENT_KEYS = ("powerReal", "powerApparent", "powerReactive", "energyReal", "customUnit")
_LOAD_DISPATCH_TYPES = frozenset({"delta", "setpoint"})


class _Reject:
    """Build InputRejected errors that name the event they concern."""

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id

    def __call__(self, what: str) -> InputRejected:
        """Return an InputRejected naming the event and what was wrong."""
        return InputRejected(f"event {self.event_id}: {what}")


def to_demand_event(event: dict[str, Any], vtn_id: str) -> DemandEvent:
    """Convert one openleadr event dict into a DemandEvent; raise InputRejected naming what is wrong."""
    if not isinstance(event, dict):
        raise InputRejected(f"event is a {type(event).__name__}, not a mapping")
    desc = event.get("event_descriptor")
    if not isinstance(desc, dict):
        raise InputRejected("event (no id): missing eventDescriptor")
    raw_id = desc.get("event_id")
    if raw_id is None or isinstance(raw_id, bool) or str(raw_id).strip() == "":
        raise InputRejected("event (no id): missing eventID")
    event_id = str(raw_id)
    reject = _Reject(event_id)

    mod = desc.get("modification_number")
    if isinstance(mod, bool) or not isinstance(mod, int) or mod < 0:
        raise reject(f"modificationNumber {mod!r} is not a non-negative integer")
    status = desc.get("event_status")
    if status not in _STATUSES:
        raise reject(f"eventStatus {status!r} is not one of {', '.join(sorted(_STATUSES))}")
    priority = desc.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise reject(f"priority {priority!r} is not a non-negative integer")
    created_raw = desc.get("created_date_time")
    created = None if created_raw is None else _datetime(created_raw, "createdDateTime", reject)

    period = event.get("active_period")
    if not isinstance(period, dict):
        raise reject("missing eiActivePeriod")
    start = _datetime(period.get("dtstart"), "activePeriod dtstart", reject)
    duration_s = _seconds(period.get("duration"), "activePeriod duration", reject)
    if duration_s == 0:
        duration_s = OPEN_ENDED_S
    ramp_up_s = _optional_seconds(period.get("ramp_up"), "x-eiRampUp", reject)
    recovery_s = _optional_seconds(period.get("recovery"), "x-eiRecovery", reject)
    start_after_s = _optional_seconds(_start_after(period.get("tolerance")), "startafter", reject)

    raw_signals = event.get("event_signals")
    if isinstance(raw_signals, dict):  # openleadr nests the list once more in some shapes
        raw_signals = raw_signals.get("event_signals")
    if not isinstance(raw_signals, list) or not raw_signals:
        raise reject("no eiEventSignal")
    signals = tuple(_signal(s, i, start, reject) for i, s in enumerate(raw_signals))

    return DemandEvent(
        event_id=event_id,
        modification_number=mod,
        status=status,
        start=start,
        duration_s=duration_s,
        signals=signals,
        priority=priority,
        test_event=_test_event(desc.get("test_event", False)),
        market_context=_text(desc.get("market_context")),
        vtn_id=vtn_id,
        vtn_comment=_text(desc.get("vtn_comment")),
        ramp_up_s=ramp_up_s,
        recovery_s=recovery_s,
        start_after_s=start_after_s,
        created=created,
    )


def _signal(raw: Any, index: int, event_start: datetime, reject: _Reject) -> Signal:
    """Convert one eiEventSignal; SIMPLE (level 0-3) and LOAD_DISPATCH (W) only."""
    if not isinstance(raw, dict):
        raise reject(f"signal #{index} is not a mapping")
    name = raw.get("signal_name")
    try:
        signal_name = SignalName(name if isinstance(name, str) else "")
    except ValueError:
        raise reject(f"signal {name!r} is not supported") from None
    signal_type = raw.get("signal_type")
    if not isinstance(signal_type, str):
        raise reject(f"signal {name}: missing signalType")
    scale = 1.0
    unit: str | None = None
    if signal_name is SignalName.SIMPLE:
        if signal_type != "level":
            raise reject(f"signal SIMPLE: signalType {signal_type!r} is not 'level'")
    else:
        if signal_type not in _LOAD_DISPATCH_TYPES:
            raise reject(f"signal LOAD_DISPATCH: signalType {signal_type!r} is not 'delta' or 'setpoint'")
        scale = _watts_per_unit(raw, reject)
        unit = "W"
    intervals = _intervals(raw.get("intervals"), signal_name.value, event_start, reject)
    out: list[Interval] = []
    for n, (iv_start, iv_duration_s, value) in enumerate(intervals):
        if signal_name is SignalName.SIMPLE:
            if value not in (0, 1, 2, 3):
                raise reject(f"signal SIMPLE interval {n}: level {value!r} is not 0, 1, 2 or 3")
        elif value < 0:
            raise reject(f"signal LOAD_DISPATCH interval {n}: {signal_type} {value!r} is negative")
        out.append(Interval(start=iv_start, duration_s=iv_duration_s, value=float(value) * scale))
    return Signal(name=signal_name, signal_type=signal_type, intervals=tuple(out), unit=unit)


def _intervals(
    raw: Any, name: str, event_start: datetime, reject: _Reject
) -> list[tuple[datetime, float, float]]:
    """Return (start, duration_s, raw value) per interval; starts run on from the previous end."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise reject(f"signal {name}: no intervals")
    cursor = event_start
    out: list[tuple[datetime, float, float]] = []
    for n, iv in enumerate(raw):
        if not isinstance(iv, dict):
            raise reject(f"signal {name} interval {n} is not a mapping")
        iv_start = cursor if iv.get("dtstart") is None else _datetime(iv["dtstart"], "dtstart", reject)
        duration_s = _seconds(iv.get("duration"), f"signal {name} interval {n} duration", reject)
        if duration_s == 0:
            if n != len(raw) - 1:
                raise reject(f"signal {name} interval {n}: duration 0 is allowed only on the last interval")
            duration_s = OPEN_ENDED_S
        value = iv.get("signal_payload")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise reject(f"signal {name} interval {n}: payload {value!r} is not a number")
        out.append((iv_start, duration_s, float(value)))
        cursor = iv_start + timedelta(seconds=duration_s)
    return out


def _watts_per_unit(raw: dict[str, Any], reject: _Reject) -> float:
    """Return how many watts one unit of this LOAD_DISPATCH signal's payload is."""
    meas = raw.get("measurement")
    if isinstance(meas, dict):
        kind, unit, scale = meas.get("name"), meas.get("unit"), meas.get("scale")
    else:
        kind = next((k for k in _MEASUREMENT_KEYS if isinstance(raw.get(k), dict)), None)
        if kind is None:
            raise reject("signal LOAD_DISPATCH: no unit (itemUnits) given")
        unit, scale = raw[kind].get("item_units"), raw[kind].get("si_scale_code")
    if kind != "powerReal":
        raise reject(f"signal LOAD_DISPATCH: measurement {kind!r} is not powerReal")
    if unit not in _POWER_UNITS:
        raise reject(f"signal LOAD_DISPATCH: unit {unit!r} is not one of {', '.join(_POWER_UNITS)}")
    if scale is None:
        scale = "none"
    if scale not in _SCALE:
        raise reject(f"signal LOAD_DISPATCH: siScaleCode {scale!r} is not known")
    return _POWER_UNITS[unit] * _SCALE[scale]


def _datetime(value: Any, what: str, reject: _Reject) -> datetime:
    """Return an aware UTC datetime or raise; openleadr leaves unreadable values as strings."""
    if not isinstance(value, datetime):
        raise reject(f"{what} {value!r} is not a UTC date-time")
    if value.tzinfo is None:
        raise reject(f"{what} {value.isoformat()} has no time zone")
    return value.astimezone(UTC)


def _seconds(value: Any, what: str, reject: _Reject) -> float:
    """Return a non-negative duration in seconds or raise."""
    if not isinstance(value, timedelta):
        raise reject(f"{what} {value!r} is not a duration")
    seconds = value.total_seconds()
    if seconds < 0:
        raise reject(f"{what} {seconds} s is negative")
    return seconds


def _optional_seconds(value: Any, what: str, reject: _Reject) -> float:
    """Return a duration in seconds, 0 when absent."""
    return 0.0 if value is None else _seconds(value, what, reject)


def _start_after(tolerance: Any) -> Any:
    """Return the startafter duration from either tolerance shape, or None."""
    if not isinstance(tolerance, dict):
        return None
    tolerate = tolerance.get("tolerate", tolerance)
    return tolerate.get("startafter") if isinstance(tolerate, dict) else None


def _test_event(value: Any) -> bool:
    """Return the testEvent flag; anything but false counts as a test (2.0b rule 6)."""
    if isinstance(value, bool):
        return value
    return value is not None and str(value).strip().lower() != "false"


def _text(value: Any) -> str:
    """Return a text field as str; openleadr turns digit-only text into numbers."""
    return "" if value is None else str(value)
