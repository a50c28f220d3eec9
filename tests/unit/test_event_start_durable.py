"""What is durable before an event's first command, checked through the real audit log and event store.

The event's start row, its first tick's row and the baseline kept for it (``baseline:<event id>``
in the event store) are one transaction, committed before the first command; the baseline is not
written in a transaction of its own. A commit that fails sends no command, and the next tick
writes the start row and the baseline again before its first command. Kept baselines are read
once at reconcile and answered from memory at an event's start; a restart still finds its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.accountstore import AccountStore
from gateway.audit import AuditLog
from gateway.audit.inbox import fail
from gateway.clock import ManualClock
from gateway.config import GatewayConfig, parse_config
from gateway.control import ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.errors import AuditError
from gateway.events import EventBook
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Interval, Signal, SignalName
from gateway.simulation.gpus import SimGpuFleet

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


class _Meter:
    device_id = "meter1"

    def __init__(self) -> None:
        self.w = 50_000.0

    async def read_facility_w(self) -> float:
        return self.w


class _Site:
    """A loop on the real audit log and event store, and what each commit and the fleet's first command saw."""

    def __init__(self, audit: AuditLog, store: EventStore, clock: ManualClock, cfg: GatewayConfig) -> None:
        self.audit, self.store, self.clock, self.cfg = audit, store, clock, cfg
        self.meter = _Meter()
        self.fleet = SimGpuFleet(cfg.gpus, clock)
        self.book = EventBook(cfg.openadr, store, audit, clock=clock)
        self.loop = self.new_loop()
        self.commits: list[tuple[list[str], int]] = []  # each batch's kinds and how many statements it carried
        self.at_first_command: dict[str, Any] | None = None
        self.fail_next: str | None = None  # the kind whose batch the next commit fails
        committer = audit._committer
        commit = committer.commit

        async def spy_commit(batch: Any, *args: Any, **kw: Any) -> Any:
            kinds = [p.kind for p in batch]
            if self.fail_next in kinds:
                self.fail_next = None
                fail(batch, AuditError("disk full (test)"))
                return None
            self.commits.append((kinds, sum(len(p.statements) for p in batch)))
            return await commit(batch, *args, **kw)

        committer.commit = spy_commit  # type: ignore[method-assign]
        set_caps = self.fleet.set_caps

        async def first_command(caps_w: Mapping[str, float], lease_s: float) -> dict[str, float]:
            if self.at_first_command is None:
                self.at_first_command = await self.durable("E1")
            return await set_caps(caps_w, lease_s)

        self.fleet.set_caps = first_command  # type: ignore[method-assign]

    def new_loop(self) -> ControlLoop:
        """Return a fresh loop (a new process) on the same store, log and devices."""
        dispatcher = Dispatcher(None, self.fleet, self.audit, self.clock, self.cfg.control.lease_s)
        return ControlLoop(
            self.cfg, self.book, self.meter, None, self.fleet, dispatcher, self.audit, self.clock,
            accounts=AccountStore(self.store),
        )  # fmt: skip

    async def durable(self, event_id: str) -> dict[str, Any]:
        """Return what the database holds (committed) for an event: its rows' kinds and its kept baseline."""
        async with self.audit.engine.connect() as conn:
            res = await conn.execute(
                sa.text("SELECT kind, data FROM audit_log WHERE event_id = :e ORDER BY seq"), {"e": event_id}
            )
            rows = [(k, json.loads(d)) for k, d in res.all()]
            res = await conn.execute(
                sa.text("SELECT value FROM ven_state WHERE key = :k"), {"k": f"baseline:{event_id}"}
            )
            kept = res.scalar_one_or_none()
        return {"kinds": [k for k, _ in rows], "rows": rows, "baseline": json.loads(kept)["w"] if kept else None}

    async def start_event(self) -> None:
        """Tick once before the event (its baseline is measured), then answer it and tick at its start."""
        await self.loop.reconcile()
        await self.loop.tick()
        signal = Signal(SignalName.SIMPLE, "level", (Interval(T0, 600.0, 2.0),))
        await self.book.answer(DemandEvent("E1", 0, "far", T0, 600.0, (signal,), vtn_id="VTN"))
        self.clock.advance(300.0 + self.cfg.control.ramp_up_s)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[_Site]:
    audit = await AuditLog.open(str(tmp_path / "audit.db"))
    clock = ManualClock(T0 - timedelta(minutes=5))
    cfg = parse_config({"gpus": {"groups": [{"count": 4, "job_class": "training", "tier": "flex1"}]}}, "<test>")
    yield _Site(audit, EventStore(audit.engine, clock), clock, cfg)
    await audit.close()


async def test_start_row_tick_row_and_baseline_are_one_commit_durable_before_the_first_command(site: _Site) -> None:
    await site.start_event()
    await site.loop.tick()

    seen = site.at_first_command
    assert seen is not None, "the event commanded the GPUs"
    assert seen["kinds"][-2:] == ["event.start", "control.tick"], seen["kinds"]
    start = seen["rows"][-2][1]
    assert not start["baseline_kept"]
    assert seen["baseline"] == start["baseline_w"], "the baseline is kept before the first command"
    # One commit for the three: the start row carries the baseline's write, the tick row follows it.
    batch = next(c for c in site.commits if "event.start" in c[0])
    assert batch == (["event.start", "control.tick"], 1), site.commits


async def test_a_failed_start_commit_sends_no_command_and_the_next_tick_writes_it_again(site: _Site) -> None:
    await site.start_event()
    site.fail_next = "event.start"
    with pytest.raises(AuditError):
        await site.loop.tick()
    assert site.at_first_command is None, "no command without the start rows and the baseline durable"
    assert (await site.durable("E1"))["baseline"] is None

    site.clock.advance(1.0)  # the GPUs' ramp limit allows a change per second elapsed
    await site.loop.tick()
    seen = site.at_first_command
    assert seen is not None
    assert seen["kinds"].count("event.start") == 1 and seen["kinds"][-2:] == ["event.start", "control.tick"]
    assert seen["baseline"] == seen["rows"][-2][1]["baseline_w"]


async def test_kept_baselines_are_read_once_and_a_restart_resumes_with_its_own(site: _Site) -> None:
    await site.start_event()
    reads: list[str] = []
    get_state = site.store.get_state

    async def counted(key: str) -> str | None:
        reads.append(key)
        return await get_state(key)

    site.store.get_state = counted  # type: ignore[method-assign]
    await site.loop.tick()
    assert "baseline:E1" not in reads, "the event's start reads its kept baseline from memory"
    first = (await site.durable("E1"))["rows"]
    baseline = next(d for k, d in first if k == "event.start")["baseline_w"]

    # A new process on the same store, with the facility reading lower under the event's caps.
    site.meter.w = 30_000.0
    site.loop = site.new_loop()
    await site.loop.reconcile()
    site.clock.advance(1.0)
    await site.loop.tick()
    starts = [d for k, d in (await site.durable("E1"))["rows"] if k == "event.start"]
    assert len(starts) == 2 and starts[1]["baseline_kept"] and starts[1]["baseline_w"] == baseline
