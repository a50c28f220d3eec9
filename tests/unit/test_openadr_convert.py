"""to_demand_event: openleadr's parsed event dicts in, frozen DemandEvents (or clear refusals) out."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from openleadr import objects
from openleadr.messaging import create_message, parse_message

from gateway.errors import InputRejected
from gateway.model import DemandEvent, SignalName
from protocols.openadr.convert import OPEN_ENDED_S, InvalidEvent, SignalNotSupported, to_demand_event

T0 = datetime(2026, 7, 1, 18, 0, tzinfo=UTC)


def _event(**overrides: Any) -> dict[str, Any]:
    """Return an event dict shaped exactly like openleadr's parser output (checked against it below)."""
    ev: dict[str, Any] = {
        "event_descriptor": {
            "event_id": "E1",
            "modification_number": 3,
            "modification_date_time": T0 - timedelta(hours=1),
            "priority": 1,
            "market_context": "oadr://utility/cbp",
            "created_date_time": T0 - timedelta(hours=2),
            "event_status": "far",
            "test_event": False,
            "vtn_comment": "heat wave",
        },
        "active_period": {
            "dtstart": T0,
            "duration": timedelta(hours=1),
            "tolerance": {"tolerate": {"startafter": timedelta(minutes=5)}},
            "ramp_up": timedelta(minutes=15),
            "recovery": timedelta(minutes=10),
        },
        "event_signals": [
            {
                "intervals": [
                    {"dtstart": T0, "duration": timedelta(minutes=30), "uid": 0, "signal_payload": 2.0},
                    {
                        "dtstart": T0 + timedelta(minutes=30),
                        "duration": timedelta(minutes=30),
                        "uid": 1,
                        "signal_payload": 1.0,
                    },
                ],
                "signal_name": "SIMPLE",
                "signal_type": "level",
                "signal_id": "S1",
                "current_value": 0.0,
            }
        ],
        "targets": [{"ven_id": "ven1"}],
        "targets_by_type": {"ven_id": ["ven1"]},
        "response_required": "always",
    }
    ev.update(overrides)
    return ev


def _dispatch(signal_type: str = "delta", **measure: Any) -> dict[str, Any]:
    """Return a LOAD_DISPATCH signal with a normalised measurement (openleadr's usual shape)."""
    return {
        "intervals": [{"duration": timedelta(hours=1), "uid": 0, "signal_payload": 500.0}],
        "signal_name": "LOAD_DISPATCH",
        "signal_type": signal_type,
        "signal_id": "S2",
        "measurement": {
            "name": "powerReal",
            "description": "RealPower",
            "unit": "W",
            "scale": "k",
            **measure,
        },
    }


def _rejected(event: dict[str, Any]) -> str:
    """Return the InputRejected message for an event."""
    with pytest.raises(InputRejected) as info:
        to_demand_event(event, "DrgwVTN")
    return str(info.value)


def test_simple_event_keeps_every_field() -> None:
    ev = to_demand_event(_event(), "DrgwVTN")
    assert ev == DemandEvent(
        event_id="E1",
        modification_number=3,
        status="far",
        start=T0,
        duration_s=3600.0,
        signals=ev.signals,
        priority=1,
        test_event=False,
        market_context="oadr://utility/cbp",
        vtn_id="DrgwVTN",
        vtn_comment="heat wave",
        ramp_up_s=900.0,
        recovery_s=600.0,
        start_after_s=300.0,
        created=T0 - timedelta(hours=2),
        targets=(("ven_id", "ven1"),),
    )
    (sig,) = ev.signals
    assert sig.name is SignalName.SIMPLE and sig.signal_type == "level" and sig.unit is None
    assert [(iv.start, iv.duration_s, iv.value) for iv in sig.intervals] == [
        (T0, 1800.0, 2.0),
        (T0 + timedelta(minutes=30), 1800.0, 1.0),
    ]
    assert isinstance(ev.signals, tuple) and isinstance(sig.intervals, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.status = "active"  # type: ignore[misc]


def test_times_become_utc() -> None:
    cest = timezone(timedelta(hours=2))
    raw = _event()
    raw["active_period"]["dtstart"] = T0.astimezone(cest)
    ev = to_demand_event(raw, "V")
    assert ev.start == T0 and ev.start.utcoffset() == timedelta(0)


def test_intervals_without_dtstart_follow_each_other() -> None:
    raw = _event()
    for iv in raw["event_signals"][0]["intervals"]:
        del iv["dtstart"]
    raw["event_signals"][0]["intervals"].append({"duration": timedelta(minutes=5), "signal_payload": 3})
    sig = to_demand_event(raw, "V").signals[0]
    assert [iv.start for iv in sig.intervals] == [T0, T0 + timedelta(minutes=30), T0 + timedelta(minutes=60)]
    assert sig.intervals[2].value == 3.0


@pytest.mark.parametrize(
    ("measure", "expected_w"),
    [
        ({}, 500_000.0),  # itemUnits W, siScaleCode k
        ({"scale": "M"}, 500e6),
        ({"scale": "none"}, 500.0),
        ({"scale": None}, 500.0),  # no siScaleCode: plain units
        ({"unit": "kW", "scale": None}, 500_000.0),
        ({"unit": "MW", "scale": "none"}, 500e6),
    ],
)
def test_load_dispatch_delta_converts_to_watts(measure: dict[str, Any], expected_w: float) -> None:
    ev = to_demand_event(_event(event_signals=[_dispatch(**measure)]), "V")
    (sig,) = ev.signals
    assert sig.name is SignalName.LOAD_DISPATCH and sig.signal_type == "delta" and sig.unit == "W"
    assert sig.intervals[0].value == pytest.approx(expected_w)
    assert sig.intervals[0].start == T0  # no dtstart on the interval: the event's start


def test_load_dispatch_setpoint_and_raw_measurement_shape() -> None:
    # openleadr's normaliser stops at the first signal without a measurement, so a LOAD_DISPATCH
    # signal after a SIMPLE one keeps the raw powerReal block with item_units / si_scale_code.
    raw_signal = _dispatch("setpoint")
    del raw_signal["measurement"]
    raw_signal["powerReal"] = {"item_description": "RealPower", "item_units": "W", "si_scale_code": "M"}
    raw_signal["intervals"][0]["signal_payload"] = 12.5
    raw = _event()
    raw["event_signals"].append(raw_signal)
    sig = to_demand_event(raw, "V").signals[1]
    assert (sig.signal_type, sig.intervals[0].value, sig.unit) == ("setpoint", 12.5e6, "W")


def test_zero_duration_means_open_ended() -> None:
    raw = _event()
    raw["active_period"]["duration"] = timedelta(0)
    raw["event_signals"][0]["intervals"][1]["duration"] = timedelta(0)
    ev = to_demand_event(raw, "V")
    assert ev.duration_s == OPEN_ENDED_S
    assert ev.signals[0].intervals[1].duration_s == OPEN_ENDED_S
    assert ev.signals[0].value_at(T0 + timedelta(days=30)) == 1.0


def test_openleadr_number_quirks_and_optional_fields() -> None:
    raw = _event()
    desc = raw["event_descriptor"]
    desc.update(event_id=42, market_context=7, test_event="true")
    for key in ("priority", "vtn_comment", "created_date_time"):
        del desc[key]
    for key in ("tolerance", "ramp_up", "recovery"):
        del raw["active_period"][key]
    ev = to_demand_event(raw, "V")
    assert (ev.event_id, ev.market_context, ev.test_event) == ("42", "7", True)
    assert (ev.priority, ev.vtn_comment, ev.created) == (0, "", None)
    assert (ev.ramp_up_s, ev.recovery_s, ev.start_after_s) == (0.0, 0.0, 0.0)


def test_cancelled_status_passes_through() -> None:
    raw = _event()
    raw["event_descriptor"]["event_status"] = "cancelled"
    assert to_demand_event(raw, "V").cancelled


def _mutate(path: str, value: Any) -> dict[str, Any]:
    """Return a fresh event with one nested key replaced (value _DEL deletes it)."""
    raw = copy.deepcopy(_event())
    *parents, last = path.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DEL:
        del node[last]
    else:
        node[last] = value
    return raw


_DEL = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("event_signals.0.signal_name", "FOO", "event E1: signal 'FOO' is not supported"),
        ("event_signals.0.signal_name", "BID_PRICE", "signal 'BID_PRICE' is not supported"),
        ("event_signals.0.signal_type", "delta", "signal SIMPLE: signalType 'delta' is not 'level'"),
        ("event_signals.0.intervals.0.signal_payload", 5.0, "level 5.0 is not 0, 1, 2 or 3"),
        ("event_signals.0.intervals.0.signal_payload", 1.5, "level 1.5 is not 0, 1, 2 or 3"),
        ("event_signals.0.intervals.0.signal_payload", float("nan"), "payload nan is not a number"),
        ("event_signals.0.intervals.0.signal_payload", True, "payload True is not a number"),
        ("event_signals.0.intervals.0.signal_payload", _DEL, "payload None is not a number"),
        ("event_signals.0.intervals.0.duration", "PT1H", "interval 0 duration 'PT1H' is not a duration"),
        ("event_signals.0.intervals.0.duration", timedelta(0), "duration 0 is allowed only on the last"),
        ("event_signals.0.intervals", [], "signal SIMPLE: no intervals"),
        ("event_signals", [], "event E1: no eiEventSignal"),
        ("event_signals", _DEL, "event E1: no eiEventSignal"),
        ("active_period", _DEL, "event E1: missing eiActivePeriod"),
        ("active_period.dtstart", "2026-13-01", "activePeriod dtstart '2026-13-01' is not a UTC date-time"),
        ("active_period.dtstart", datetime(2026, 7, 1), "has no time zone"),
        ("active_period.duration", timedelta(seconds=-5), "activePeriod duration -5.0 s is negative"),
        ("active_period.ramp_up", "soon", "x-eiRampUp 'soon' is not a duration"),
        ("event_descriptor.modification_number", -1, "modificationNumber -1 is not a non-negative"),
        ("event_descriptor.modification_number", _DEL, "modificationNumber None is not a non-negative"),
        ("event_descriptor.event_status", "pending", "eventStatus 'pending' is not one of"),
        ("event_descriptor.priority", -2, "priority -2 is not a non-negative integer"),
        ("event_descriptor.event_id", _DEL, "event (no id): missing eventID"),
        ("event_descriptor", _DEL, "event (no id): missing eventDescriptor"),
    ],
)
def test_malformed_events_are_rejected_with_a_reason(path: str, value: Any, message: str) -> None:
    assert message in _rejected(_mutate(path, value))


@pytest.mark.parametrize(
    ("signal", "message"),
    [
        (_dispatch("level"), "LOAD_DISPATCH: signalType 'level' is not 'delta' or 'setpoint'"),
        (_dispatch(unit="A"), "unit 'A' is not one of W, kW, MW, GW"),
        (_dispatch(name="energyReal"), "measurement 'energyReal' is not powerReal"),
        (_dispatch(scale="q"), "siScaleCode 'q' is not known"),
        ({**_dispatch(), "measurement": None}, "LOAD_DISPATCH: no unit (itemUnits) given"),
    ],
)
def test_load_dispatch_without_usable_units_is_rejected(signal: dict[str, Any], message: str) -> None:
    assert message in _rejected(_event(event_signals=[signal]))


def test_negative_delta_is_rejected() -> None:
    signal = _dispatch()
    signal["intervals"][0]["signal_payload"] = -10.0
    assert "delta -10.0 is negative" in _rejected(_event(event_signals=[signal]))


def test_real_openleadr_message_round_trip() -> None:
    """Render an oadrDistributeEvent with openleadr's templates and convert what its parser returns."""
    power = objects.Measurement(name="powerReal", description="RealPower", unit="W", scale="k")
    event = objects.Event(
        event_descriptor=objects.EventDescriptor(
            event_id="RT1",
            modification_number=2,
            market_context="oadr://x",
            event_status="far",
            created_date_time=T0 - timedelta(hours=1),
            vtn_comment="drill",
            test_event=True,
        ),
        active_period=objects.ActivePeriod(
            dtstart=T0,
            duration=timedelta(minutes=20),
            ramp_up_period=timedelta(minutes=2),
            recovery_period=timedelta(minutes=3),
            tolerance={"startafter": timedelta(seconds=90)},
        ),
        event_signals=[
            objects.EventSignal(
                intervals=[objects.Interval(dtstart=T0, duration=timedelta(minutes=20), signal_payload=1)],
                signal_name="SIMPLE",
                signal_type="level",
                signal_id="s1",
            ),
            objects.EventSignal(
                intervals=[
                    objects.Interval(dtstart=T0, duration=timedelta(minutes=10), signal_payload=250.0),
                    objects.Interval(
                        dtstart=T0 + timedelta(minutes=10),
                        duration=timedelta(minutes=10),
                        signal_payload=750.0,
                    ),
                ],
                signal_name="LOAD_DISPATCH",
                signal_type="delta",
                signal_id="s2",
                measurement=power,
            ),
        ],
        targets=[objects.Target(ven_id="ven1")],
    )
    xml = create_message(
        "oadrDistributeEvent",
        request_id="r1",
        vtn_id="DrgwVTN",
        events=[asdict(event)],
        response={"response_code": 200, "response_description": "OK", "request_id": "r1"},
    )
    message_type, payload = parse_message(xml)
    assert message_type == "oadrDistributeEvent"
    ev = to_demand_event(payload["events"][0], payload["vtn_id"])
    assert (ev.event_id, ev.modification_number, ev.vtn_id, ev.test_event) == ("RT1", 2, "DrgwVTN", True)
    assert (ev.ramp_up_s, ev.recovery_s, ev.start_after_s, ev.duration_s) == (120.0, 180.0, 90.0, 1200.0)
    assert ev.signals[0].value_at(T0) == 1.0
    assert [iv.value for iv in ev.signals[1].intervals] == [250_000.0, 750_000.0]
    assert ev.signals[1].value_at(T0 + timedelta(minutes=15)) == 750_000.0


def _signal(name: str, signal_type: str, value: float, **extra: Any) -> dict[str, Any]:
    """Return one signal dict with a single one-hour interval."""
    return {
        "intervals": [{"duration": timedelta(hours=1), "uid": 0, "signal_payload": value}],
        "signal_name": name,
        "signal_type": signal_type,
        "signal_id": "S9",
        **extra,
    }


@pytest.mark.parametrize(
    ("signal", "unit", "value"),
    [
        (_signal("LOAD_CONTROL", "x-loadControlCapacity", 0.7), "fraction", 0.7),
        (_signal("LOAD_CONTROL", "x-loadControlLevelOffset", 2), "level", 2.0),
        (_signal("LOAD_CONTROL", "x-loadControlPercentOffset", -20), "%", -20.0),
        (
            _signal("LOAD_CONTROL", "x-loadControlSetpoint", 3.0,
                    measurement={"name": "powerReal", "unit": "MW", "scale": "none"}),
            "W",
            3e6,
        ),
        (
            _signal("ELECTRICITY_PRICE", "price", 0.42,
                    measurement={"name": "currencyPerKWh", "unit": "USD", "scale": "none"}),
            "USD/kWh",
            0.42,
        ),
        (_signal("ENERGY_PRICE", "priceRelative", 0.05), None, 0.05),
        (_signal("ELECTRICITY_PRICE", "priceMultiplier", 2.5), None, 2.5),
    ],
)  # fmt: skip
def test_load_control_and_price_signals(signal: dict[str, Any], unit: str | None, value: float) -> None:
    (sig,) = to_demand_event(_event(event_signals=[signal]), "V").signals
    assert (sig.name.value, sig.signal_type, sig.unit) == (signal["signal_name"], signal["signal_type"], unit)
    assert sig.intervals[0].value == pytest.approx(value)


@pytest.mark.parametrize(
    ("signal", "price_types", "message", "code"),
    [
        (_signal("BID_LOAD", "setpoint", 1), None, "signal 'BID_LOAD' is not supported", 460),
        (_signal("LOAD_CONTROL", "level", 1), None, "signalType 'level' is not", 460),
        (_signal("ELECTRICITY_PRICE", "price", 1), frozenset({"priceMultiplier"}), "no price levels configured", 460),
        (_signal("LOAD_CONTROL", "x-loadControlCapacity", 1.5), None, "capacity 1.5 is outside 0..1", 454),
        (_signal("LOAD_CONTROL", "x-loadControlLevelOffset", 1.5), None, "level offset 1.5 is not an integer", 454),
        (_signal("LOAD_CONTROL", "x-loadControlPercentOffset", -150), None, "is outside -100..100", 454),
        (_signal("LOAD_CONTROL", "x-loadControlSetpoint", 5), None, "no unit (itemUnits) given", 454),
        (
            _signal("ENERGY_PRICE", "price", 1, measurement={"name": "currencyPerKW", "unit": "USD", "scale": "none"}),
            None,
            "is not currencyPerKWh",
            454,
        ),
    ],
)
def test_unsupported_and_invalid_signals_carry_their_code(
    signal: dict[str, Any], price_types: frozenset[str] | None, message: str, code: int
) -> None:
    """2.0b rule 48: "VEN receives unsupported signalName" is a logical error answered with a 4xx code."""
    kwargs = {} if price_types is None else {"price_types": price_types}
    with pytest.raises(InvalidEvent) as info:
        to_demand_event(_event(event_signals=[signal]), "V", **kwargs)
    assert message in str(info.value) and info.value.code == code
    assert isinstance(info.value, SignalNotSupported) == (code == 460)
    assert isinstance(info.value, InputRejected)


def test_targets_from_both_shapes() -> None:
    raw = _event(
        targets=[{"ven_id": "v1"}, {"resource_id": 7}, {"end_device_asset": {"mrid": "m"}}],
        targets_by_type={"group_id": ["g1", "g2"], "party_id": "p1"},
    )
    ev = to_demand_event(raw, "V", ven_id="v1")
    assert ev.targets == (("group_id", "g1"), ("group_id", "g2"), ("party_id", "p1"), ("resource_id", "7"),
                          ("ven_id", "v1"))  # fmt: skip
    assert ev.ven_id == "v1"
    assert to_demand_event(_event(targets=None, targets_by_type=None), "V").targets == ()
