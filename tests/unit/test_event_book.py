"""The event book: keyed by (event id, modification number), never acts twice, one directive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.config import OpenAdrConfig
from gateway.events import EventBook, Feasibility
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName, TargetKind

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


def _event(
    eid: str = "E1",
    mod: int = 0,
    level: float = 2.0,
    status: str = "far",
    priority: int = 0,
    signal: SignalName = SignalName.SIMPLE,
    signal_type: str = "level",
    test_event: bool = False,
) -> DemandEvent:
    iv = Interval(T0, 3600.0, level)
    return DemandEvent(
        event_id=eid,
        modification_number=mod,
        status=status,
        start=T0,
        duration_s=3600.0,
        signals=(Signal(signal, signal_type, (iv,)),),
        priority=priority,
        test_event=test_event,
    )


@pytest.fixture
async def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    audit = await AuditLog.open(str(tmp_path / "audit.db"))
    yield audit, EventStore(audit.engine)
    await audit.close()


async def test_repeat_answers_as_before_and_restart_does_not_act_twice(env) -> None:  # type: ignore[no-untyped-def]
    audit, store = env
    calls: list[str] = []

    def feas(ev: DemandEvent, book: EventBook) -> Feasibility:
        calls.append(ev.event_id)
        return Feasibility(True, 100.0, 200.0, "feasible")

    book = EventBook(OpenAdrConfig(), store, audit, feas)
    assert await book.on_event(_event()) is Opt.IN
    assert await book.on_event(_event()) is Opt.IN
    assert calls == ["E1"]
    # A new book over the same store (a restart) answers the repeat without deciding again.
    book2 = EventBook(OpenAdrConfig(), store, audit, feas)
    assert await book2.load(T0 - timedelta(minutes=5)) == 1
    assert await book2.on_event(_event()) is Opt.IN
    assert calls == ["E1"]
    assert book2.target_at(T0 + timedelta(minutes=1)) is not None


async def test_infeasible_event_opts_out_with_reason(env) -> None:  # type: ignore[no-untyped-def]
    audit, store = env
    book = EventBook(
        OpenAdrConfig(),
        store,
        audit,
        lambda ev, b: Feasibility(False, 900.0, 100.0, "infeasible: shortfall 800 W"),
    )
    assert await book.on_event(_event()) is Opt.OUT
    assert book.target_at(T0 + timedelta(minutes=1)) is None
    stored = await store.get("E1", 0)
    assert stored.opt_reason == "infeasible: shortfall 800 W"


async def test_stale_modification_number_keeps_the_newer_version(env) -> None:  # type: ignore[no-untyped-def]
    audit, store = env
    book = EventBook(OpenAdrConfig(opt_policy="always"), store, audit)
    await book.on_event(_event(mod=2, level=3.0))
    await book.on_event(_event(mod=1, level=1.0))
    t = book.target_at(T0 + timedelta(minutes=1))
    assert t is not None and t.modification_number == 2 and t.value == pytest.approx(0.30)


async def test_update_then_cancel(env) -> None:  # type: ignore[no-untyped-def]
    audit, store = env
    book = EventBook(OpenAdrConfig(opt_policy="always"), store, audit)
    await book.on_event(_event(mod=0, level=1.0))
    await book.on_event(_event(mod=1, level=3.0))
    t = book.target_at(T0 + timedelta(minutes=1))
    assert t is not None and t.value == pytest.approx(0.30)
    assert await book.on_event(_event(mod=2, status="cancelled")) is Opt.IN
    assert book.target_at(T0 + timedelta(minutes=1)) is None


async def test_directive_window_priority_and_signal_kinds(env) -> None:  # type: ignore[no-untyped-def]
    audit, store = env
    book = EventBook(OpenAdrConfig(opt_policy="always"), store, audit)
    await book.on_event(_event("LOW", priority=0, level=1.0))
    await book.on_event(
        _event("HIGH", priority=1, signal=SignalName.LOAD_DISPATCH, signal_type="delta", level=5000.0)
    )
    await book.on_event(
        _event("CAP", priority=2, signal=SignalName.LOAD_DISPATCH, signal_type="setpoint", level=40_000.0)
    )
    assert book.target_at(T0 - timedelta(seconds=1)) is None
    assert book.target_at(T0 + timedelta(hours=1)) is None
    t = book.target_at(T0)
    assert t is not None and t.event_id == "HIGH" and t.kind is TargetKind.SHED_W and t.value == 5000.0
    assert t.facility_limit_w(30_000.0) == 25_000.0


async def test_test_events_acknowledged_not_acted_on(env) -> None:  # type: ignore[no-untyped-def]
    audit, store = env
    book = EventBook(OpenAdrConfig(opt_policy="feasible"), store, audit)
    assert await book.on_event(_event(test_event=True)) is Opt.IN
    assert book.target_at(T0 + timedelta(minutes=1)) is None
