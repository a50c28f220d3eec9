"""OpenADR 3.1 time values, drift, schema corrections, event conversion and report plans (pure)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway import directive
from gateway.config import OpenAdrConfig
from gateway.model import SignalName, TargetKind
from protocols.openadr3 import drift, schema
from protocols.openadr3.convert import OPEN_ENDED_S, EventRefused, resolve, to_demand_event
from protocols.openadr3.reports import plan
from protocols.openadr3.timing import TimeValueError, duration_s, format_duration, parse_datetime

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CREATED = "2026-06-01T11:00:00.000Z"


def event(**fields: Any) -> dict[str, Any]:
    """Return a server-side event object (valid unless the fields make it otherwise)."""
    return {"id": "e1", "createdDateTime": CREATED, "modificationDateTime": CREATED, "objectType": "EVENT",
            "programID": "p1", **fields}  # fmt: skip


def payload(kind: str, *values: Any) -> dict[str, Any]:
    """Return one valuesMap."""
    return {"type": kind, "values": list(values)}


def convert(ev: dict[str, Any], price: bool = False, targets: frozenset[str] = frozenset()) -> Any:
    """Validate and convert an event the way the VEN does."""
    fixed, _ = drift.normalise("EVENT", ev)
    schema.validate("event", fixed)
    descriptors = {d["payloadType"]: d for d in fixed.get("payloadDescriptors") or []}
    return to_demand_event(fixed, version=3, now=NOW, vtn_id="vtn", ven_name="ven", program_name="dr",
                           descriptors=descriptors, price_types=frozenset({"price"} if price else ()),
                           our_targets=targets)  # fmt: skip


@pytest.mark.parametrize("text", ["P9999Y", "P9999Y0M0DT0H0M0S", "P119988M", "P3649635D", "P521378W", "P10000Y"])
def test_the_infinite_sentinel_is_recognised_by_value_in_any_spelling(text: str) -> None:
    """Definition, intervalPeriod: 'A duration of "P9999Y" may indicate infinity.'"""
    assert duration_s(text) == math.inf


@pytest.mark.parametrize(("text", "seconds"), [("PT1H", 3600), ("PT0S", 0), ("P1W", 604_800), ("PT1.5S", 1.5),
                                               ("P1DT2H3M4S", 93_784), ("-PT1H", -3600), ("P9000Y", None)])  # fmt: skip
def test_durations(text: str, seconds: float | None) -> None:
    value = duration_s(text)
    assert value == seconds if seconds is not None else math.isfinite(value) and value > 8999 * 365 * 86400


@pytest.mark.parametrize("text", ["1H", "PT", "P1H", "", "PT1H "])
def test_bad_durations_are_refused(text: str) -> None:
    if text == "PT1H ":  # surrounding space is tolerated
        assert duration_s(text) == 3600
        return
    with pytest.raises(TimeValueError):
        duration_s(text)


def test_format_duration_round_trips() -> None:
    for seconds in (0.0, 1.0, 59.5, 3600.0, 93_784.0, math.inf):
        assert duration_s(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["0001-01-01", "0001-01-01T00:00:00", "0001-01-01T00:00:00Z"])
def test_the_now_sentinel(text: str) -> None:
    assert parse_datetime(text) is None


def test_datetimes_need_an_offset() -> None:
    assert parse_datetime("2026-06-01T12:00:00+02:00") == datetime(2026, 6, 1, 10, tzinfo=UTC)
    with pytest.raises(TimeValueError, match="offset"):
        parse_datetime("2026-06-01T12:00:00")


def test_interval_period_without_start_starts_at_creation() -> None:
    """Field drift: an intervalPeriod with a duration and no start (the schema allows it)."""
    got = convert(event(intervalPeriod={"duration": "PT2H"}, intervals=[{"id": 0, "payloads": [payload("SIMPLE", 1)]}]))
    assert got.event.start == datetime(2026, 6, 1, 11, tzinfo=UTC) and got.event.duration_s == 7200
    assert got.event.status == "active"


def test_intervals_follow_on_and_take_their_own_periods() -> None:
    ev = event(intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H"}, intervals=[
        {"id": 0, "payloads": [payload("SIMPLE", 1)]},
        {"id": 1, "intervalPeriod": {"duration": "PT2H"}, "payloads": [payload("SIMPLE", 3)]},
        {"id": 2, "intervalPeriod": {"start": "2026-06-01T18:00:00Z"}, "payloads": [payload("SIMPLE", 2)]},
    ])  # fmt: skip
    [sig] = convert(ev).event.signals
    assert [(iv.start.hour, iv.duration_s, iv.value) for iv in sig.intervals] == [
        (13, 3600, 1), (14, 7200, 3), (18, 3600, 2)]  # fmt: skip


def test_do_it_now_with_infinite_duration_runs_until_cancelled() -> None:
    """User Guide 7.3: start '0001-01-01' and duration 'P9999Y' is a 'do it now' event."""
    ev = event(intervalPeriod={"start": "0001-01-01", "duration": "P9999Y0M0DT0H0M0S"},
               intervals=[{"id": 0, "payloads": [payload("SIMPLE", 3)]}])  # fmt: skip
    got = convert(ev).event
    assert got.start == datetime(2026, 6, 1, 11, tzinfo=UTC) and got.duration_s == OPEN_ENDED_S
    assert got.status == "active"


def test_multi_valued_prices_split_their_interval() -> None:
    """User Guide 7.3: 'the duration of an intervalPeriod must be divided by the number of entries'."""
    ev = event(payloadDescriptors=[{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "PRICE", "units": "KWH",
                                    "currency": "USD"}],
               intervals=[{"id": 0, "intervalPeriod": {"start": "2026-06-01T13:00:00Z", "duration": "PT3H"},
                           "payloads": [payload("PRICE", 0.17, 0.03, 0.11)]}])  # fmt: skip
    [sig] = convert(ev, price=True).event.signals
    assert sig.name is SignalName.ELECTRICITY_PRICE and sig.unit == "USD/kWh"
    assert [(iv.start.hour, iv.duration_s, iv.value) for iv in sig.intervals] == [
        (13, 3600, 0.17), (14, 3600, 0.03), (15, 3600, 0.11)]  # fmt: skip


def test_unknown_payload_types_alone_are_refused_beside_others_ignored() -> None:
    only = event(intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H"},
                 intervals=[{"id": 0, "payloads": [payload("X_PRIVATE_THING", 7), payload("GHG", 0.3)]}])  # fmt: skip
    with pytest.raises(EventRefused, match="no payload this site can act on") as err:
        convert(only)
    assert err.value.problem()["status"] == 400
    mixed = event(intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H"},
                  intervals=[{"id": 0, "payloads": [payload("SIMPLE", 2), payload("X_PRIVATE_THING", 7)]}])  # fmt: skip
    got = convert(mixed)
    assert got.ignored == ("X_PRIVATE_THING",) and [s.name for s in got.event.signals] == [SignalName.SIMPLE]
    with pytest.raises(EventRefused, match="level 7"):
        convert(event(intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H"},
                      intervals=[{"id": 0, "payloads": [payload("SIMPLE", 7)]}]))  # fmt: skip


def _book_ask(ev: Any, t: datetime) -> Any:
    """Ask the directive what an event asks at ``t`` (the mapping the event book resolves with)."""
    return directive.ask_at(ev, t, OpenAdrConfig())


@pytest.mark.parametrize(("ptype", "value", "units", "ask"), [
    ("IMPORT_CAPACITY_LIMIT", 10.0, "KW", (TargetKind.CAP_W, 10_000.0)),
    ("DISPATCH_SETPOINT", 2.0, "MW", (TargetKind.CAP_W, 2_000_000.0)),
    ("DISPATCH_SETPOINT_RELATIVE", -50.0, "KW", (TargetKind.SHED_W, 50_000.0)),
    ("DISPATCH_SETPOINT_RELATIVE", 50.0, "KW", None),
    ("CONTROL_LEVEL_OFFSET_PERCENT", -0.2, "PERCENT", (TargetKind.SHED_FRACTION, pytest.approx(0.2))),
    ("CONTROL_LEVEL_OFFSET", 2, None, (TargetKind.SHED_FRACTION, 0.2)),
])  # fmt: skip
def test_payloads_reach_the_event_book_as_its_targets(ptype: str, value: float, units: str | None, ask: Any) -> None:
    desc = {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": ptype}
    if units:
        desc["units"] = units
    ev = event(payloadDescriptors=[desc], intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H"},
               intervals=[{"id": 0, "payloads": [payload(ptype, value)]}])  # fmt: skip
    got = convert(ev).event
    assert _book_ask(got, datetime(2026, 6, 1, 13, 30, tzinfo=UTC)) == ask


def test_a_power_payload_without_units_is_refused() -> None:
    ev = event(intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H"},
               intervals=[{"id": 0, "payloads": [payload("IMPORT_CAPACITY_LIMIT", 10.0)]}])  # fmt: skip
    with pytest.raises(EventRefused, match="units None"):
        convert(ev)


def test_randomize_priority_targets() -> None:
    ev = event(priority=0, targets=["group-a", "group-b"],
               intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H", "randomizeStart": "PT10M"},
               intervals=[{"id": 0, "payloads": [payload("SIMPLE", 1)]}])  # fmt: skip
    got = convert(ev, targets=frozenset({"group-b"})).event
    assert got.start == datetime(2026, 6, 1, 12, 50, tzinfo=UTC) and got.start_after_s == 1200
    assert got.priority == 1 and got.targets == ()
    assert convert({**ev, "priority": None}).event.priority == 0
    assert convert(ev, targets=frozenset({"group-z"})).event.targets == (("target", "group-a"), ("target", "group-b"))


def test_the_zero_window_sentinel_is_a_cancellation() -> None:
    """User Guide 7.9: start and duration set to '0001-01-01' and 'PT0S' cancel an event."""
    ev = event(intervalPeriod={"start": "0001-01-01", "duration": "PT0S"},
               intervals=[{"id": 0, "payloads": [payload("SIMPLE", 1)]}])  # fmt: skip
    assert convert(ev).event.cancelled


def test_event_duration_truncates_and_loops() -> None:
    base = {
        "intervalPeriod": {"start": "2026-06-01T13:00:00Z", "duration": "PT1H"},
        "intervals": [{"id": 0, "payloads": [payload("SIMPLE", 1)]}, {"id": 1, "payloads": [payload("SIMPLE", 2)]}],
    }
    cut = resolve(event(duration="PT90M", **base))
    assert [(s.interval_id, s.duration_s) for s in cut] == [(0, 3600), (1, 1800)]
    loop = resolve(event(duration="PT5H", **base))
    assert [s.interval_id for s in loop] == [0, 1, 0, 1, 0]
    assert loop[-1].start == datetime(2026, 6, 1, 17, tzinfo=UTC)


def test_drift_payload_descriptor_without_object_type() -> None:
    """The User Guide's own examples omit objectType, which the definition requires."""
    ev = event(payloadDescriptors=[{"payloadType": "PRICE", "units": "KWH", "currency": "USD"}])
    with pytest.raises(schema.SchemaRejected, match="objectType"):
        schema.validate("event", ev)
    fixed, notes = drift.normalise("EVENT", ev)
    schema.validate("event", fixed)
    assert notes and ev["payloadDescriptors"][0].get("objectType") is None  # the original is untouched


def test_drift_report_frequency_as_a_duration() -> None:
    ev = event(reportDescriptors=[{"payloadType": "DEMAND", "frequency": "PT15M"}])
    with pytest.raises(schema.SchemaRejected, match="frequency"):
        schema.validate("event", ev)
    fixed, notes = drift.normalise("EVENT", ev)
    schema.validate("event", fixed)
    assert fixed["reportDescriptors"][0][drift.FREQUENCY_S] == 900 and "duration" in notes[0]
    assert plan(fixed, [], fixed["reportDescriptors"][0]).every_s == 900


def test_schema_corrections_and_discriminator() -> None:
    ven = {"id": "v1", "createdDateTime": CREATED, "modificationDateTime": CREATED, "objectType": "VEN",
           "venName": "ven", "clientID": "c1"}  # fmt: skip
    schema.validate("ven", ven)  # objectType VEN, though BlVenRequest alone would demand BL_VEN_REQUEST
    schema.validate("notification", {"objectType": "VEN", "operation": "UPDATE", "object": ven})
    with pytest.raises(schema.SchemaRejected, match="programName"):
        schema.validate("notification", {"objectType": "PROGRAM", "operation": "UPDATE",
                                         "object": {**ven, "objectType": "PROGRAM"}})  # fmt: skip


def _slots(n: int) -> list[Any]:
    """Return n hourly slots from 13:00."""
    return resolve(event(intervalPeriod={"start": "2026-06-01T13:00:00Z", "duration": "PT1H"},
                         intervals=[{"id": i, "payloads": [payload("SIMPLE", 1)]} for i in range(n)]))  # fmt: skip


def test_report_plans() -> None:
    """User Guide 7.5: defaults report once after the last interval; start/num/frequency/repeat roll."""
    ev, slots = event(), _slots(6)
    default = plan(ev, slots, {"payloadType": "USAGE"})
    [(due, covered)] = default.windows
    assert due == datetime(2026, 6, 1, 19, tzinfo=UTC) and len(covered) == 6 and default.units == "KWH"
    rolling = plan(ev, slots, {"payloadType": "DEMAND", "startInterval": 1, "numIntervals": 2, "frequency": 2,
                               "repeat": 3})  # fmt: skip
    assert [(d.hour, [s.interval_id for s in c]) for d, c in rolling.windows] == [(15, [0, 1]), (17, [2, 3]),
                                                                                 (19, [4, 5])]  # fmt: skip
    assert plan(ev, slots, {"payloadType": "READING", "frequency": 0}).every_s == 0.0
    for bad, why in (({"payloadType": "STORAGE_CHARGE_LEVEL"}, "not one this VEN reports"),
                     ({"payloadType": "READING", "units": "VOLTS"}, "units"),
                     ({"payloadType": "USAGE", "historical": False}, "forecasts")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            plan(ev, slots, bad)


def test_now_is_used_only_for_status() -> None:
    ev = event(intervalPeriod={"start": "2026-06-01T09:00:00Z", "duration": "PT1H"},
               intervals=[{"id": 0, "payloads": [payload("SIMPLE", 1)]}])  # fmt: skip
    assert convert(ev).event.status == "completed"
    assert (
        convert({**ev, "intervalPeriod": {"start": "2026-06-02T09:00:00Z", "duration": "PT1H"}}).event.status == "far"
    )
    assert timedelta(seconds=convert(ev).event.duration_s) == timedelta(hours=1)
