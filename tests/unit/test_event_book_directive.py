"""The event book's directive over time: ramps, recovery, randomized starts, cancellations, signal kinds."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import directive
from gateway.audit import AuditLog
from gateway.clock import ManualClock
from gateway.config import OpenAdrConfig
from gateway.events import EventBook
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName, TargetKind

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def _event(
    eid: str = "E1",
    mod: int = 0,
    signals: tuple[Signal, ...] | None = None,
    status: str = "far",
    duration_s: float = 3600.0,
    **kw: Any,
) -> DemandEvent:
    if signals is None:
        signals = (Signal(SignalName.SIMPLE, "level", (Interval(T0, duration_s, 2.0),)),)
    return DemandEvent(eid, mod, status, T0, duration_s, signals, vtn_id="VTN", **kw)


def _signal(name: SignalName, signal_type: str, *values: float, step_s: float = 1800.0) -> Signal:
    ivs = tuple(Interval(T0 + timedelta(seconds=i * step_s), step_s, v) for i, v in enumerate(values))
    return Signal(name, signal_type, ivs)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[AuditLog, EventStore, ManualClock]]:
    audit = await AuditLog.open(str(tmp_path / "audit.db"))
    clock = ManualClock(T0 - timedelta(minutes=30))
    yield audit, EventStore(audit.engine, clock), clock
    await audit.close()


def _book(parts: tuple[AuditLog, EventStore, ManualClock], seed: int = 3, **cfg: Any) -> EventBook:
    audit, store, clock = parts
    cfg.setdefault("opt_policy", "always")
    return EventBook(OpenAdrConfig(**cfg), store, audit, clock=clock, rng=random.Random(seed))


def _fraction(book: EventBook, t: datetime) -> float:
    target = book.directive_at(t).target
    return 0.0 if target is None else target.ramp_fraction


def _delay(book: EventBook, event_id: str) -> float | None:
    """Return the randomized start offset the book drew for an event (from its directive), or None."""
    order = book.directive_at(T0).order(event_id)
    return None if order is None else order.start_delay_s


async def test_ramp_up_before_start_and_recovery_after_end(parts: Any) -> None:
    """2.0b rule 31: the VEN acts on the activePeriod sub-elements, x-eiRampUp and x-eiRecovery included.

    Ramp-up precedes dtstart (the reduction grows to full at dtstart); recovery follows the end
    (the reduction shrinks back to nothing over the recovery period).
    """
    book = _book(parts)
    await book.answer(_event(ramp_up_s=600.0, recovery_s=300.0))
    assert book.directive_at(T0 - 11 * MIN).target is None
    assert (
        _fraction(book, T0 - 10 * MIN) == pytest.approx(0.0, abs=1e-9)
        or book.directive_at(T0 - 10 * MIN).target is None
    )
    assert _fraction(book, T0 - 5 * MIN) == pytest.approx(0.5)
    assert _fraction(book, T0) == 1.0
    assert _fraction(book, T0 + 59 * MIN) == 1.0
    assert _fraction(book, T0 + 60 * MIN + timedelta(seconds=150)) == pytest.approx(0.5)
    assert book.directive_at(T0 + 65 * MIN).target is None
    # The limit during ramps lies between the baseline and the full ask.
    t = book.directive_at(T0 - 5 * MIN).target
    assert t is not None and t.facility_limit_w(100_000.0) == pytest.approx(90_000.0)  # level 2 = 20 %, half


async def test_ramp_applies_to_caps_too(parts: Any) -> None:
    book = _book(parts)
    cap = _signal(SignalName.LOAD_DISPATCH, "setpoint", 60_000.0, 60_000.0)
    await book.answer(_event(signals=(cap,), ramp_up_s=600.0))
    t = book.directive_at(T0 - 5 * MIN).target
    assert t is not None and t.kind is TargetKind.CAP_W
    assert t.facility_limit_w(100_000.0) == pytest.approx(80_000.0)


async def test_each_interval_asks_its_own_value(parts: Any) -> None:
    """2.0b rule 32: the VEN acts on each interval's duration and signalPayload."""
    book = _book(parts)
    await book.answer(_event(signals=(_signal(SignalName.SIMPLE, "level", 1, 3),)))
    first, second = book.directive_at(T0 + 10 * MIN).target, book.directive_at(T0 + 40 * MIN).target
    assert first is not None and first.value == pytest.approx(0.10)
    assert second is not None and second.value == pytest.approx(0.30)


async def test_start_randomization_is_drawn_once_and_kept(parts: Any) -> None:
    """2.0b rule 30: "The VEN must randomize the dtstart time of the event if a value is present in
    the startafter element. Event completion times are determined by adding the event duration to
    the randomized dtstart time. Modifications to an event should maintain the same random offset,
    unless the startafter element itself is modified."
    """
    audit, store, clock = parts
    book = _book(parts, seed=11)
    await book.answer(_event(start_after_s=600.0))
    delay = _delay(book, "E1")
    assert delay is not None and 0 < delay <= 600.0
    start = T0 + timedelta(seconds=delay)
    assert book.directive_at(start - timedelta(seconds=1)).target is None
    assert book.directive_at(start).target is not None
    assert book.directive_at(start + timedelta(seconds=3599)).target is not None
    assert book.directive_at(start + timedelta(seconds=3600)).target is None
    stored = await store.get("E1", 0)
    assert stored.start_delay_s == pytest.approx(delay)  # persisted with the version
    # A modification keeps the offset; a restart reads it back without drawing again.
    await book.answer(_event(mod=1, start_after_s=600.0))
    assert _delay(book, "E1") == delay
    restarted = _book(parts, seed=99)
    await restarted.load(clock.now())
    assert _delay(restarted, "E1") == delay
    # Changing startafter draws a new offset within the new window.
    await restarted.answer(_event(mod=2, start_after_s=60.0))
    new = _delay(restarted, "E1")
    assert new is not None and new != delay and 0 <= new <= 60.0


async def test_cancellation_is_randomized_like_the_start(parts: Any) -> None:
    """2.0b rule 65: "When an event containing a randomization value in the startafter element is
    cancelled, either explicitly or implicitly, the VEN MUST randomize its termination of the event.
    The randomization window should be between 0 and a duration equal to the value specified in
    startafter."
    """
    audit, store, clock = parts
    book = _book(parts, seed=5)
    await book.answer(_event(start_after_s=300.0))
    delay = _delay(book, "E1")
    assert delay is not None
    clock.advance(30 * 60 + delay + 600)  # 10 minutes into the randomized event
    await book.answer(_event(mod=1, status="cancelled", start_after_s=300.0))
    now = clock.now()
    assert book.directive_at(now).target is not None  # still running: termination randomized
    assert book.directive_at(now + timedelta(seconds=delay + 0.001)).target is None


async def test_cancellation_releases_at_once_honouring_recovery(parts: Any) -> None:
    audit, store, clock = parts
    book = _book(parts)
    await book.answer(_event(recovery_s=120.0))
    clock.advance(40 * 60)  # 10 minutes into the event
    await book.answer(_event(mod=1, status="cancelled", recovery_s=120.0))
    now = clock.now()
    assert _fraction(book, now + timedelta(seconds=60)) == pytest.approx(0.5)
    assert book.directive_at(now + timedelta(seconds=120)).target is None


async def test_implied_cancellation_of_a_missing_event(parts: Any) -> None:
    """2.0b rule 61: "If the VTN sends the oadrDistributeEvent payload and it does not contain an
    event for which the VEN is aware (i.e. in its list of known events) then the VEN must delete it
    from its list of known event (i.e. implied cancel)."
    """
    audit, store, clock = parts
    book = _book(parts)
    await book.answer(_event("E1"))
    await book.answer(_event("E2", priority=2))
    clock.advance(40 * 60)
    assert await book.on_distribution("VTN", {"E2"}) == ["E1"]
    target = book.directive_at(clock.now()).target
    assert target is not None and target.event_id == "E2"
    assert await book.on_distribution("VTN", {"E2"}) == []  # once
    assert await book.on_distribution("OtherVTN", set()) == []  # another VTN's list says nothing
    # Persisted: a restarted book keeps E1 stopped.
    restarted = _book(parts)
    await restarted.load(clock.now())
    target = restarted.directive_at(clock.now()).target
    assert target is not None and target.event_id == "E2"
    # An empty distribution cancels everything still running.
    assert await restarted.on_distribution("VTN", set()) == ["E2"]
    assert restarted.directive_at(clock.now()).target is None


async def test_unending_event_runs_until_cancelled(parts: Any) -> None:
    """2.0b rule 47: "An event with an overall duration of 0 indicates an event with no defined end
    time and will remain active until explicitly cancelled." (The adapter turns 0 into ten years.)
    """
    audit, store, clock = parts
    book = _book(parts)
    ten_years = 10 * 365 * 24 * 3600.0
    await book.answer(_event(duration_s=ten_years))
    assert book.directive_at(T0 + timedelta(days=30)).target is not None
    clock.advance(3600)
    await book.answer(_event(mod=1, status="cancelled", duration_s=ten_years))
    assert book.directive_at(clock.now()).target is None


@pytest.mark.parametrize(
    ("signal", "kind", "value"),
    [
        (_signal(SignalName.LOAD_CONTROL, "x-loadControlCapacity", 0.75), TargetKind.SHED_FRACTION, 0.25),
        (_signal(SignalName.LOAD_CONTROL, "x-loadControlLevelOffset", 3), TargetKind.SHED_FRACTION, 0.30),
        (_signal(SignalName.LOAD_CONTROL, "x-loadControlLevelOffset", 9), TargetKind.SHED_FRACTION, 0.30),
        (_signal(SignalName.LOAD_CONTROL, "x-loadControlPercentOffset", -15), TargetKind.SHED_FRACTION, 0.15),
        (_signal(SignalName.LOAD_CONTROL, "x-loadControlSetpoint", 70_000), TargetKind.CAP_W, 70_000),
        (_signal(SignalName.LOAD_DISPATCH, "delta", 8_000), TargetKind.SHED_W, 8_000),
        (_signal(SignalName.LOAD_DISPATCH, "setpoint", 50_000), TargetKind.CAP_W, 50_000),
        (_signal(SignalName.ELECTRICITY_PRICE, "price", 0.62), TargetKind.SHED_FRACTION, 0.20),
        (_signal(SignalName.ENERGY_PRICE, "price", 1.5), TargetKind.SHED_FRACTION, 0.30),
        (_signal(SignalName.ELECTRICITY_PRICE, "priceMultiplier", 4.0), TargetKind.SHED_FRACTION, 0.10),
    ],
)
async def test_every_signal_kind_becomes_a_target(parts: Any, signal: Signal, kind: TargetKind, value: float) -> None:
    book = _book(parts, price_levels={"1": 0.25, "2": 0.5, "3": 1.0}, price_multiplier_levels={"1": 3.0})
    await book.answer(_event(signals=(signal,)))
    t = book.directive_at(T0 + MIN).target
    assert t is not None and t.kind is kind and t.value == pytest.approx(value)


@pytest.mark.parametrize(
    "signal",
    [
        _signal(SignalName.LOAD_CONTROL, "x-loadControlCapacity", 1.0),  # full capacity: no shed
        _signal(SignalName.LOAD_CONTROL, "x-loadControlLevelOffset", -1),  # raise load: not acted on
        _signal(SignalName.LOAD_CONTROL, "x-loadControlPercentOffset", 10),
        _signal(SignalName.ELECTRICITY_PRICE, "price", 0.10),  # below every threshold
        _signal(SignalName.SIMPLE, "level", 0),
        _signal(SignalName.LOAD_DISPATCH, "delta", 0),
    ],
)
async def test_signals_asking_for_nothing_give_no_target(parts: Any, signal: Signal) -> None:
    book = _book(parts, price_levels={"1": 0.25})
    await book.answer(_event(signals=(signal,)))
    assert book.directive_at(T0 + MIN).target is None


async def test_most_specific_signal_wins_and_required_shed(parts: Any) -> None:
    book = _book(parts)
    ev = _event(signals=(_signal(SignalName.SIMPLE, "level", 1), _signal(SignalName.LOAD_DISPATCH, "delta", 9_000)))
    await book.answer(ev)
    t = book.directive_at(T0 + MIN).target
    assert t is not None and t.kind is TargetKind.SHED_W
    caps = _event("E2", signals=(_signal(SignalName.LOAD_DISPATCH, "setpoint", 80_000, 60_000),))
    assert directive.required_shed_w(caps, 100_000.0, OpenAdrConfig()) == pytest.approx(40_000.0)
    # SIMPLE 1 = 10 % > 9 kW
    assert directive.required_shed_w(ev, 100_000.0, OpenAdrConfig()) == pytest.approx(10_000.0)


async def test_operator_opt_out_mid_event_recovers_over_the_recovery_period(parts: Any) -> None:
    audit, store, clock = parts
    book = _book(parts)
    await book.answer(_event(recovery_s=200.0))
    clock.advance(40 * 60)
    await book.override_opt("E1", Opt.OUT, actor="operator", reason="site emergency")
    now = clock.now()
    assert _fraction(book, now + timedelta(seconds=100)) == pytest.approx(0.5)
    assert book.directive_at(now + timedelta(seconds=200)).target is None
    # ... and back in: the operator may undo it.
    await book.override_opt("E1", Opt.IN, actor="operator", reason="emergency over")
    assert _fraction(book, now + timedelta(seconds=300)) == 1.0


async def test_the_directive_follows_every_new_version_and_override(parts: Any) -> None:
    """The book keeps each event's order between ticks; a new version or an override hands out a new one."""
    book = _book(parts)
    await book.answer(_event(duration_s=3600.0))
    first = book.directive_at(T0).order("E1")
    assert first is not None and first.end == T0 + timedelta(seconds=3600) and first.opt is Opt.IN
    assert book.directive_at(T0 + MIN).order("E1") is first  # nothing changed: the same order
    await book.answer(_event(mod=1, duration_s=1800.0))
    second = book.directive_at(T0).order("E1")
    assert second is not None and (second.modification_number, second.end) == (1, T0 + timedelta(seconds=1800))
    await book.override_opt("E1", Opt.OUT, actor="operator", reason="maintenance")
    third = book.directive_at(T0).order("E1")
    assert third is not None and third.opt is Opt.OUT and book.directive_at(T0 + MIN).target is None
