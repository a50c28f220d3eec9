"""The event book: keyed by (event id, modification number), never acts twice, one directive."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.clock import ManualClock
from gateway.config import OpenAdrConfig
from gateway.errors import InputRejected
from gateway.events import EventBook, Outcome
from gateway.eventstore import EventStore
from gateway.feasibility import Feasibility
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
    **kw: Any,
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
        vtn_id="VTN",
        **kw,
    )


class Env:
    """An audit log, its event store, a manual clock at T0 - 10 min, and book factories."""

    def __init__(self, audit: AuditLog, clock: ManualClock) -> None:
        self.audit = audit
        self.clock = clock
        self.store = EventStore(audit.engine, clock)

    def book(self, feasibility: Any = None, seed: int = 7, **cfg: Any) -> EventBook:
        """Return a book over the shared store."""
        return EventBook(OpenAdrConfig(**cfg), self.store, self.audit, feasibility, clock=self.clock,
                         rng=random.Random(seed))  # fmt: skip


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    audit = await AuditLog.open(str(tmp_path / "audit.db"))
    yield Env(audit, ManualClock(T0 - timedelta(minutes=10)))
    await audit.close()


async def test_repeat_answers_as_before_and_restart_does_not_act_twice(env: Env) -> None:
    calls: list[str] = []

    def feas(ev: DemandEvent) -> Feasibility:
        calls.append(ev.event_id)
        return Feasibility(True, 100.0, 200.0, "feasible")

    book = env.book(feas)
    assert (await book.answer(_event())).outcome is Outcome.NEW
    again = await book.answer(_event())
    assert (again.opt, again.outcome) == (Opt.IN, Outcome.REPEAT)
    assert calls == ["E1"]
    # A new book over the same store (a restart) answers the repeat without deciding again.
    book2 = env.book(feas)
    assert await book2.load(env.clock.now()) == 1
    assert (await book2.answer(_event())).opt is Opt.IN
    assert calls == ["E1"]
    assert book2.directive_at(T0 + timedelta(minutes=1)).target is not None


async def test_infeasible_event_opts_out_with_reason(env: Env) -> None:
    book = env.book(lambda ev: Feasibility(False, 900.0, 100.0, "infeasible: shortfall 800 W"))
    assert (await book.answer(_event())).opt is Opt.OUT
    assert book.directive_at(T0 + timedelta(minutes=1)).target is None
    stored = await env.store.get("E1", 0)
    assert stored is not None and stored.opt_reason == "infeasible: shortfall 800 W"


async def test_lower_modification_number_is_rejected_and_audited(env: Env) -> None:
    """2.0b rule 58: "If the VTN sends an oadrEvent with an eventID that the VEN is already aware of,
    but which has a lower modification number than one in which the VEN is already aware then this
    is an ERROR and the VEN should respond with the appropriate error code. Note that this is true
    regardless of the event state including cancelled."
    """
    book = env.book(opt_policy="always")
    await book.answer(_event(mod=2, level=3.0))
    stale = await book.answer(_event(mod=1, level=1.0))
    assert (stale.opt, stale.outcome) == (Opt.IN, Outcome.STALE)
    assert "lower than 2" in stale.reason
    t = book.directive_at(T0 + timedelta(minutes=1)).target
    assert t is not None and t.modification_number == 2 and t.value == pytest.approx(0.30)
    assert await env.store.get("E1", 1) is None  # never stored: nothing acknowledged changed
    # ... also after a cancellation.
    await book.answer(_event(mod=3, status="cancelled"))
    assert (await book.answer(_event(mod=2))).outcome is Outcome.STALE


async def test_higher_modification_replans_at_once(env: Env) -> None:
    """2.0b rule 57: a known eventID with a higher modification number replaces the previous event."""
    book = env.book(opt_policy="always")
    await book.answer(_event(mod=0, level=1.0))
    book.changed.clear()
    assert (await book.answer(_event(mod=1, level=3.0))).outcome is Outcome.UPDATED
    assert book.changed.is_set()
    t = book.directive_at(T0 + timedelta(minutes=1)).target
    assert t is not None and t.value == pytest.approx(0.30) and t.modification_number == 1


async def test_cancellation_stops_at_once(env: Env) -> None:
    """2.0b rule 59: a cancelled eventStatus for a known event cancels the existing event."""
    book = env.book(opt_policy="always")
    await book.answer(_event(mod=0))
    env.clock.advance(15 * 60)  # 5 minutes into the event
    assert book.directive_at(env.clock.now()).target is not None
    answer = await book.answer(_event(mod=1, status="cancelled"))
    assert (answer.opt, answer.outcome) == (Opt.IN, Outcome.CANCELLED)
    assert book.directive_at(env.clock.now()).target is None


async def test_unknown_cancelled_event_is_confirmed_and_ignored(env: Env) -> None:
    """2.0b rule 60: "If the VTN sends an oadrEvent with the eventStatus set to cancelled and has an
    eventID that the VEN is not aware of then the VEN should ignore the event since it is not
    currently in its list of known events, but still must respond with the createdEvent if required
    to do so by oadrResponseRequired."
    """
    book = env.book(opt_policy="always")
    answer = await book.answer(_event(mod=4, status="cancelled"))
    assert answer.opt is Opt.IN
    assert book.directive_at(T0 + timedelta(minutes=1)).target is None


async def test_directive_window_priority_and_signal_kinds(env: Env) -> None:
    """2.0b rule 18: "DR events for programs with higher priorities supersede the events of programs
    with lower priorities. If two programs with overlapping events have the same priority then the
    program whose event was activated first takes priority."
    """
    book = env.book(opt_policy="always")
    await book.answer(_event("LOW", priority=0, level=1.0))
    await book.answer(_event("HIGH", priority=1, signal=SignalName.LOAD_DISPATCH, signal_type="delta", level=5000.0))
    await book.answer(
        _event("CAP", priority=2, signal=SignalName.LOAD_DISPATCH, signal_type="setpoint", level=40_000.0)
    )
    assert book.directive_at(T0 - timedelta(seconds=1)).target is None
    assert book.directive_at(T0 + timedelta(hours=1)).target is None
    t = book.directive_at(T0).target
    assert t is not None and t.event_id == "HIGH" and t.kind is TargetKind.SHED_W and t.value == 5000.0
    assert t.facility_limit_w(30_000.0) == 25_000.0


async def test_equal_priority_goes_to_the_event_that_started_first(env: Env) -> None:
    book = env.book(opt_policy="always")
    late = replace(_event("E2", priority=3, level=3.0), start=T0 + timedelta(minutes=10))
    late = replace(late, signals=(Signal(SignalName.SIMPLE, "level", (Interval(late.start, 3600.0, 3.0),)),))
    await book.answer(late)
    await book.answer(_event("E1", priority=3, level=1.0))
    t = book.directive_at(T0 + timedelta(minutes=20)).target
    assert t is not None and t.event_id == "E1"
    t = book.directive_at(T0 + timedelta(minutes=65)).target  # E1 over: E2 still runs
    assert t is not None and t.event_id == "E2"


async def test_test_events_acknowledged_not_acted_on(env: Env) -> None:
    """2.0b rule 6: "The presence of any string except 'false' in the oadrDisributeEvent testEvent
    element is treated as a trigger for a test event." The gateway answers it and does nothing.
    """
    book = env.book(opt_policy="feasible")
    assert (await book.answer(_event(test_event=True))).opt is Opt.IN
    assert book.directive_at(T0 + timedelta(minutes=1)).target is None
    acting = env.book(opt_policy="always", act_on_test_events=True)
    await acting.load(env.clock.now())
    assert (await acting.answer(_event("E2", test_event=True))).opt is Opt.IN
    assert acting.directive_at(T0 + timedelta(minutes=1)).target is not None


@pytest.mark.parametrize(
    ("cfg", "kw", "outcome"),
    [
        ({"market_contexts": ["oadr://utility/cbp"]}, {"market_context": "oadr://other"}, Outcome.WRONG_MARKET),
        ({"resource_ids": ["site-a"]}, {"targets": (("resource_id", "site-b"),)}, Outcome.NOT_TARGETED),
        ({}, {"targets": (("ven_id", "someone-else"),), "ven_id": "me"}, Outcome.NOT_TARGETED),
        ({"group_ids": ["g1"]}, {"targets": (("group_id", "g2"), ("party_id", "p"))}, Outcome.NOT_TARGETED),
    ],
)
async def test_events_not_for_this_ven_are_answered_and_ignored(
    env: Env, cfg: dict[str, Any], kw: dict[str, Any], outcome: Outcome
) -> None:
    """2.0b rule 48: logical errors the VEN must detect include "VEN receives non-matching market
    context" and "VEN receives non-matching eiTarget"; they are answered (4xx, optOut), not acted on.
    """
    book = env.book(opt_policy="always", **cfg)
    answer = await book.answer(_event(**kw))
    assert (answer.opt, answer.outcome) == (Opt.OUT, outcome)
    assert book.directive_at(T0 + timedelta(minutes=1)).target is None


@pytest.mark.parametrize(
    "targets",
    [(), (("ven_id", "me"),), (("resource_id", "site-a"), ("ven_id", "other")), (("group_name", "g1"),)],
)
async def test_matching_targets_are_ors(env: Env, targets: tuple[tuple[str, str], ...]) -> None:
    """2.0b rule 22: "If no sub elements are present in oadrDistributeEvent eiTarget, the presumption
    is that the recipient is the intended target of the event. If multiple criteria are present in
    eiTarget subelements, the values are OR'd togther to determine whether the VEN is a target."
    """
    book = env.book(opt_policy="always", resource_ids=["site-a"], group_ids=["g1"])
    answer = await book.answer(_event(targets=targets, ven_id="me"))
    assert (answer.opt, answer.outcome) == (Opt.IN, Outcome.NEW)


async def test_operator_override_changes_the_directive_at_once_and_persists(env: Env) -> None:
    book = env.book(opt_policy="always")
    await book.answer(_event())
    env.clock.advance(15 * 60)
    assert book.directive_at(env.clock.now()).target is not None
    book.changed.clear()
    answer = await book.override_opt("E1", Opt.OUT, actor="operator", reason="cooling plant trip")
    assert answer.opt is Opt.OUT and book.changed.is_set()
    assert book.directive_at(env.clock.now()).target is None
    assert [opt for ev, opt in book.events()] == [Opt.OUT]
    # The utility re-sends the same version: the answer is the operator's, not the old optIn.
    assert (await book.answer(_event())).opt is Opt.OUT
    # After a restart, too (never a conflicting opt).
    book2 = env.book(opt_policy="always")
    await book2.load(env.clock.now())
    assert (await book2.answer(_event())).opt is Opt.OUT
    assert book2.directive_at(env.clock.now()).target is None
    # A later version of the event keeps the operator's decision.
    later = await book2.answer(_event(mod=1, level=3.0))
    assert later.opt is Opt.OUT and "operator override: cooling plant trip" in later.reason


async def test_override_is_refused_without_reason_actor_or_known_event(env: Env) -> None:
    book = env.book(opt_policy="always")
    await book.answer(_event())
    with pytest.raises(InputRejected, match="not known"):
        await book.override_opt("nope", Opt.OUT, actor="operator", reason="x")
    with pytest.raises(InputRejected, match="actor"):
        await book.override_opt("E1", Opt.OUT, actor="utility", reason="x")
    with pytest.raises(InputRejected, match="reason"):
        await book.override_opt("E1", Opt.OUT, actor="bms", reason=" ")


async def test_state_records_are_plain_json(env: Env) -> None:
    book = env.book(opt_policy="always")
    await book.answer(_event())
    await book.override_opt("E1", Opt.OUT, actor="bms", reason="r")
    raw = await env.store.get_state("override:E1")
    assert raw is not None and json.loads(raw)["actor"] == "bms"
