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

A negative x-eiRampUp or x-eiRecovery (the schema allows a signed duration; the 2.0b test tool sends
"-PT1M") means no ramp-up or recovery period: it is read as 0, not refused.

An active period (or an interval) of duration 0 means "open-ended, until cancelled" in OpenADR
2.0b; it becomes ``OPEN_ENDED_S`` seconds, which every consumer treats as "no end yet".

The signal name "simple" (OpenADR 2.0a's, still allowed by the 2.0b schema) is SIMPLE.

Refusals carry the 2.0b response code the VEN answers with: ``SignalNotSupported`` (460) for a
signal name or type the gateway cannot act on, plain ``InvalidEvent`` (454) for anything else.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.errors import InputRejected
from gateway.model import DemandEvent, Interval, Signal, SignalName

OPEN_ENDED_S = 10 * 365 * 24 * 3600.0  # ten years: an open-ended event runs until cancelled
INVALID_DATA = 454
SIGNAL_NOT_SUPPORTED = 460
_STATUSES = frozenset({"none", "far", "near", "active", "completed", "cancelled"})
_SCALE = {"p": 1e-12, "n": 1e-9, "micro": 1e-6, "m": 1e-3, "c": 1e-2, "d": 1e-1, "none": 1.0,
          "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}  # fmt: skip
_POWER_UNITS = {"W": 1.0, "kW": 1e3, "MW": 1e6, "GW": 1e9}
_MEASUREMENT_KEYS = ("powerReal", "powerApparent", "powerReactive", "energyReal", "currencyPerKWh",
                     "currency", "customUnit")  # fmt: skip
_TARGET_KINDS = ("ven_id", "resource_id", "group_id", "group_name", "party_id")
PRICE_TYPES = frozenset({"price", "priceRelative", "priceMultiplier"})
# 2.0a's lower-case "simple", which the 2.0b schema still lists beside "SIMPLE" (no other case form is allowed)
_ALIASES = {"simple": SignalName.SIMPLE.value}
# signal name -> signal types the gateway can act on
_TYPES = {
    SignalName.SIMPLE: frozenset({"level"}),
    SignalName.LOAD_DISPATCH: frozenset({"delta", "setpoint"}),
    SignalName.LOAD_CONTROL: frozenset(
        {"x-loadControlCapacity", "x-loadControlLevelOffset", "x-loadControlPercentOffset", "x-loadControlSetpoint"}
    ),
    SignalName.ELECTRICITY_PRICE: PRICE_TYPES,
    SignalName.ENERGY_PRICE: PRICE_TYPES,
}


class InvalidEvent(InputRejected):
    """An event the gateway refuses; ``code`` is the 2.0b eventResponse code to answer with."""

    code = INVALID_DATA


class SignalNotSupported(InvalidEvent):
    """An event carrying a signal name or type the gateway cannot act on."""

    code = SIGNAL_NOT_SUPPORTED


class _Reject:
    """Build refusals that name the event they concern."""

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id

    def __call__(self, what: str, kind: type[InvalidEvent] = InvalidEvent) -> InvalidEvent:
        """Return a refusal naming the event and what was wrong."""
        return kind(f"event {self.event_id}: {what}")


def to_demand_event(
    event: dict[str, Any],
    vtn_id: str,
    ven_id: str = "",
    price_types: frozenset[str] = PRICE_TYPES,
) -> DemandEvent:
    """Convert one openleadr event dict into a DemandEvent; raise InvalidEvent naming what is wrong.

    ``price_types`` are the price signal types the gateway has thresholds for; others are refused.
    """
    if not isinstance(event, dict):
        raise InvalidEvent(f"event is a {type(event).__name__}, not a mapping")
    desc = event.get("event_descriptor")
    if not isinstance(desc, dict):
        raise InvalidEvent("event (no id): missing eventDescriptor")
    raw_id = desc.get("event_id")
    if raw_id is None or isinstance(raw_id, bool) or str(raw_id).strip() == "":
        raise InvalidEvent("event (no id): missing eventID")
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
    ramp_up_s = _optional_seconds(period.get("ramp_up"), "x-eiRampUp", reject, negative_is_zero=True)
    recovery_s = _optional_seconds(period.get("recovery"), "x-eiRecovery", reject, negative_is_zero=True)
    start_after_s = _optional_seconds(_start_after(period.get("tolerance")), "startafter", reject)
    _shift(start, -ramp_up_s, "activePeriod dtstart minus x-eiRampUp", reject)
    _shift(start, duration_s + start_after_s + recovery_s, "activePeriod end plus startafter and x-eiRecovery", reject)

    raw_signals = event.get("event_signals")
    if isinstance(raw_signals, dict):  # openleadr nests the list once more in some shapes
        raw_signals = raw_signals.get("event_signals")
    if not isinstance(raw_signals, list) or not raw_signals:
        raise reject("no eiEventSignal")
    signals = tuple(_signal(s, i, start, reject, price_types) for i, s in enumerate(raw_signals))

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
        targets=targets_of(event),
        ven_id=ven_id,
    )


def targets_of(event: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Return the event's eiTarget criteria as sorted (kind, value) pairs."""
    found: set[tuple[str, str]] = set()
    raw = event.get("targets")
    if isinstance(raw, dict):
        raw = [raw]
    for target in raw if isinstance(raw, list) else []:
        if isinstance(target, dict):
            found.update((k, str(v)) for k, v in target.items() if k in _TARGET_KINDS and v is not None)
    by_type = event.get("targets_by_type")
    if isinstance(by_type, dict):
        for kind, values in by_type.items():
            if kind in _TARGET_KINDS:
                for v in values if isinstance(values, list) else [values]:
                    if v is not None:
                        found.add((kind, str(v)))
    return tuple(sorted(found))


def _signal(raw: Any, index: int, event_start: datetime, reject: _Reject, price_types: frozenset[str]) -> Signal:
    """Convert one eiEventSignal the gateway can act on; refuse the others with 460."""
    if not isinstance(raw, dict):
        raise reject(f"signal #{index} is not a mapping")
    name = raw.get("signal_name")
    text = name if isinstance(name, str) else ""
    try:
        signal_name = SignalName(_ALIASES.get(text, text))
    except ValueError:
        raise reject(f"signal {name!r} is not supported", SignalNotSupported) from None
    signal_type = raw.get("signal_type")
    if not isinstance(signal_type, str):
        raise reject(f"signal {name}: missing signalType")
    if signal_type not in _TYPES[signal_name]:
        allowed = " or ".join(repr(t) for t in sorted(_TYPES[signal_name]))
        raise reject(f"signal {name}: signalType {signal_type!r} is not {allowed}", SignalNotSupported)
    if signal_type in PRICE_TYPES and signal_type not in price_types:
        raise reject(f"signal {name}: no price levels configured for signalType {signal_type!r}", SignalNotSupported)
    scale, unit = _unit(raw, signal_name, signal_type, reject)
    intervals = _intervals(raw.get("intervals"), signal_name.value, event_start, reject)
    out: list[Interval] = []
    for n, (iv_start, iv_duration_s, value) in enumerate(intervals):
        _check_value(signal_name, signal_type, n, value, reject)
        out.append(Interval(start=iv_start, duration_s=iv_duration_s, value=float(value) * scale))
    return Signal(name=signal_name, signal_type=signal_type, intervals=tuple(out), unit=unit)


def _unit(raw: dict[str, Any], name: SignalName, signal_type: str, reject: _Reject) -> tuple[float, str | None]:
    """Return (multiplier to the gateway's unit, unit) for a signal's payload values."""
    if name is SignalName.LOAD_DISPATCH or signal_type == "x-loadControlSetpoint":
        return _watts_per_unit(raw, name.value, reject), "W"
    if name is SignalName.LOAD_CONTROL:
        return 1.0, {"x-loadControlCapacity": "fraction", "x-loadControlLevelOffset": "level"}.get(signal_type, "%")
    if signal_type == "price":
        kind, unit, scale = _measurement(raw)
        if kind not in (None, "currencyPerKWh"):
            raise reject(f"signal {name.value}: measurement {kind!r} is not currencyPerKWh")
        factor = _SCALE.get(scale or "none")
        if factor is None:
            raise reject(f"signal {name.value}: siScaleCode {scale!r} is not known")
        return factor, f"{unit}/kWh" if unit else "/kWh"
    return 1.0, None  # SIMPLE levels, relative prices and multipliers carry no unit


def _check_value(name: SignalName, signal_type: str, n: int, value: float, reject: _Reject) -> None:
    """Refuse a payload value outside what its signal type allows."""
    where = f"signal {name.value} interval {n}"
    if name is SignalName.SIMPLE and value not in (0, 1, 2, 3):
        raise reject(f"signal SIMPLE interval {n}: level {value!r} is not 0, 1, 2 or 3")
    if signal_type in ("delta", "setpoint", "x-loadControlSetpoint") and value < 0:
        raise reject(f"{where}: {signal_type} {value!r} is negative")
    if signal_type == "x-loadControlCapacity" and not 0.0 <= value <= 1.0:
        raise reject(f"{where}: capacity {value!r} is outside 0..1")
    if signal_type == "x-loadControlLevelOffset" and value != int(value):
        raise reject(f"{where}: level offset {value!r} is not an integer")
    if signal_type == "x-loadControlPercentOffset" and not -100.0 <= value <= 100.0:
        raise reject(f"{where}: percent offset {value!r} is outside -100..100")


def _intervals(raw: Any, name: str, event_start: datetime, reject: _Reject) -> list[tuple[datetime, float, float]]:
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
        cursor = _shift(iv_start, duration_s, f"signal {name} interval {n} end", reject)
    return out


def _measurement(raw: dict[str, Any]) -> tuple[str | None, Any, Any]:
    """Return (measurement name, unit, scale) from either of openleadr's shapes; Nones when absent."""
    meas = raw.get("measurement")
    if isinstance(meas, dict):
        return meas.get("name"), meas.get("unit"), meas.get("scale")
    kind = next((k for k in _MEASUREMENT_KEYS if isinstance(raw.get(k), dict)), None)
    if kind is None:
        return None, None, None
    return kind, raw[kind].get("item_units"), raw[kind].get("si_scale_code")


def _watts_per_unit(raw: dict[str, Any], what: str, reject: _Reject) -> float:
    """Return how many watts one unit of this power signal's payload is."""
    kind, unit, scale = _measurement(raw)
    if kind is None:
        raise reject(f"signal {what}: no unit (itemUnits) given")
    if kind != "powerReal":
        raise reject(f"signal {what}: measurement {kind!r} is not powerReal")
    if unit not in _POWER_UNITS:
        raise reject(f"signal {what}: unit {unit!r} is not one of {', '.join(_POWER_UNITS)}")
    if scale is None:
        scale = "none"
    if scale not in _SCALE:
        raise reject(f"signal {what}: siScaleCode {scale!r} is not known")
    return _POWER_UNITS[unit] * _SCALE[scale]


def _datetime(value: Any, what: str, reject: _Reject) -> datetime:
    """Return an aware UTC datetime or raise; openleadr leaves unreadable values as strings."""
    if not isinstance(value, datetime):
        raise reject(f"{what} {value!r} is not a UTC date-time")
    if value.tzinfo is None:
        raise reject(f"{what} {value.isoformat()} has no time zone")
    return value.astimezone(UTC)


def _seconds(value: Any, what: str, reject: _Reject, negative_is_zero: bool = False) -> float:
    """Return a non-negative duration in seconds or raise (a negative one is 0 where ``negative_is_zero``)."""
    if not isinstance(value, timedelta):
        raise reject(f"{what} {value!r} is not a duration")
    seconds = value.total_seconds()
    if seconds < 0 and negative_is_zero:
        return 0.0
    if seconds < 0:
        raise reject(f"{what} {seconds} s is negative")
    return seconds


def _shift(t: datetime, seconds: float, what: str, reject: _Reject) -> datetime:
    """Return ``t`` moved by ``seconds``; refuse a time a datetime cannot hold (before year 1, after 9999)."""
    try:
        return t + timedelta(seconds=seconds)
    except OverflowError:
        raise reject(f"{what} is outside the representable years 1-9999 ({t.isoformat()} {seconds:+g} s)") from None


def _optional_seconds(value: Any, what: str, reject: _Reject, negative_is_zero: bool = False) -> float:
    """Return a duration in seconds, 0 when absent."""
    return 0.0 if value is None else _seconds(value, what, reject, negative_is_zero)


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
