"""The directive's steps: the event book names the next one, and the control loop wakes just after it.

An event that starts between two ticks must be acted on at its start, not up to a tick later.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.clock import ManualClock
from gateway.config import OpenAdrConfig, parse_config
from gateway.control import STEP_WAKE_S, ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.events import EventBook
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Opt, Signal, SignalName

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def _event(eid: str = "E1", *, start: datetime = T0, intervals: tuple[float, ...] = (600.0,), **kw: Any) -> DemandEvent:
    ivs, t = [], start
    for d in intervals:
        ivs.append(Interval(t, d, 2.0))
        t += timedelta(seconds=d)
    signal = Signal(SignalName.SIMPLE, "level", tuple(ivs))
    return DemandEvent(eid, 0, "far", start, sum(intervals), (signal,), vtn_id="VTN", **kw)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[AuditLog, EventStore, ManualClock]]:
    audit = await AuditLog.open(str(tmp_path / "audit.db"))
    clock = ManualClock(T0 - timedelta(minutes=30))
    yield audit, EventStore(audit.engine, clock), clock
    await audit.close()


def _book(parts: tuple[AuditLog, EventStore, ManualClock], **cfg: Any) -> EventBook:
    audit, store, clock = parts
    cfg.setdefault("opt_policy", "always")
    return EventBook(OpenAdrConfig(**cfg), store, audit, clock=clock, rng=random.Random(3))


def _delay(book: EventBook, event_id: str) -> float | None:
    """Return the randomized start offset the book drew for an event (from its directive), or None."""
    order = book.directive_at(T0).order(event_id)
    return None if order is None else order.start_delay_s


async def test_next_change_walks_ramp_start_intervals_end_and_recovery(parts: Any) -> None:
    """Every step of an acted-on event is named in order: ramp-up start, start, each interval, end, recovery end."""
    book = _book(parts)
    assert book.directive_at(T0 - 3600 * S).next_change is None  # nothing known yet
    await book.answer(_event(intervals=(300.0, 300.0), ramp_up_s=60.0, recovery_s=120.0))
    steps, t = [], T0 - 3600 * S
    while (nxt := book.directive_at(t).next_change) is not None:
        steps.append(nxt)
        t = nxt
    assert steps == [T0 - 60 * S, T0, T0 + 300 * S, T0 + 600 * S, T0 + 720 * S]


async def test_next_change_ignores_events_not_acted_on(parts: Any) -> None:
    """An opted-out event does not wake the loop; one that is over does not either."""
    book = _book(parts, opt_policy="never")
    await book.answer(_event())
    assert book.directive_at(T0 - 60 * S).next_change is None
    book2 = _book(parts)
    await book2.answer(_event("E2"))
    assert book2.directive_at(T0 + 600 * S).next_change is None
    assert book2.directive_at(T0 + 599 * S).next_change == T0 + 600 * S


async def test_next_change_follows_cancellation_and_randomized_start(parts: Any) -> None:
    """A randomized start moves every step by the drawn delay; a cancellation brings the end forward."""
    audit, store, clock = parts
    book = _book(parts)
    await book.answer(_event(start_after_s=120.0))
    delay = _delay(book, "E1")
    assert delay is not None and 0.0 <= delay <= 120.0
    assert book.directive_at(T0 - 60 * S).next_change == T0 + timedelta(seconds=delay)
    clock.advance(1800.0 + 60.0)  # one minute into the event
    await book.cancel("E1", "test")
    stop = book.directive_at(clock.now() - S).next_change
    assert stop is not None and stop <= T0 + timedelta(seconds=60.0 + delay)


async def test_control_loop_waits_until_just_after_the_next_step(parts: Any) -> None:
    """The loop sleeps a full tick when nothing steps sooner, and only until just after a start when one does."""
    audit, store, clock = parts
    book = _book(parts)
    cfg = parse_config({"control": {"tick_s": 5.0}}, "<test>")
    dispatcher = Dispatcher(None, None, audit, clock, cfg.control.lease_s)
    loop = ControlLoop(cfg, book, None, None, None, dispatcher, audit, clock)
    assert loop.wait_s() == 5.0
    await book.answer(_event(start=clock.now() + 2 * S))
    assert book.events()[0][1] is Opt.IN
    assert loop.wait_s() == pytest.approx(2.0 + STEP_WAKE_S)
    clock.advance(2.0 + STEP_WAKE_S)
    assert book.directive_at(clock.now()).target is not None  # woken just after the start: the event is in force
