"""DemandEvent JSON round trip for the event store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.eventstore import event_from_json, event_to_json
from gateway.model import DemandEvent, Interval, Signal, SignalName

T = datetime(2026, 5, 1, 14, 0, 0, 123456, tzinfo=UTC)


def full_event() -> DemandEvent:
    """Return an event with every field set away from its default."""
    return DemandEvent(
        event_id="ev-1",
        modification_number=3,
        status="near",
        start=T,
        duration_s=3600.5,
        signals=(
            Signal(SignalName.SIMPLE, "level", (Interval(T, 1800.0, 2.0), Interval(T, 1800.5, 1.0))),
            Signal(SignalName.LOAD_DISPATCH, "delta", (Interval(T, 60.0, -1.5e6),), unit="W"),
        ),
        priority=2,
        test_event=True,
        market_context="http://mc.example/1",
        vtn_id="VtnOne",
        vtn_comment="héllo",
        ramp_up_s=900.0,
        recovery_s=600.0,
        start_after_s=120.0,
        created=T - timedelta(days=1),
    )


def test_round_trip_keeps_every_field() -> None:
    ev = full_event()
    back = event_from_json(event_to_json(ev))
    assert back == ev
    assert isinstance(back.signals, tuple) and isinstance(back.signals[0].intervals, tuple)
    assert back.signals[1].name is SignalName.LOAD_DISPATCH
    assert back.start.tzinfo is not None and back.created is not None


def test_round_trip_of_defaults() -> None:
    ev = DemandEvent("e", 0, "far", T, 60.0, ())
    assert event_from_json(event_to_json(ev)) == ev


def test_other_offsets_come_back_as_the_same_instant() -> None:
    ev = DemandEvent("e", 0, "far", T.astimezone(timezone(timedelta(hours=-5))), 60.0, ())
    assert event_from_json(event_to_json(ev)).start == T


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        event_to_json(DemandEvent("e", 0, "far", datetime(2026, 1, 1), 60.0, ()))


@pytest.mark.parametrize("text", ["{}", '{"v": 99}', "[1]", "not json"])
def test_garbage_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        event_from_json(text)
