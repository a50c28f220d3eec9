"""An event's start row and its first tick's row go to the audit log together: one commit, not two.

The audit sink here commits the way ``AuditLog``'s writer does: every row queued since its last
commit goes into the next one. Both rows must be durable before the event's first command.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.clock import ManualClock
from gateway.config import parse_config
from gateway.control import ControlLoop
from gateway.dispatcher import Dispatcher
from gateway.events import EventBook
from gateway.model import DemandEvent, Interval, Signal, SignalName
from gateway.simulation.gpus import SimGpuFleet
from tests.doubles import MemoryStore, RecordingAudit

T0 = datetime(2026, 7, 1, 14, 0, tzinfo=UTC)


class _Meter:
    device_id = "meter1"

    async def read_facility_w(self) -> float:
        return 50_000.0


class GroupCommitAudit(RecordingAudit):
    """Rows are queued; a commit takes every row queued so far (as ``AuditLog``'s writer does)."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[list[str]] = []
        self._queued: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self._wake = asyncio.Event()

    async def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        actor: str = "gateway",
        event_id: str | None = None,
        device_id: str | None = None,
    ) -> int:
        row = {"kind": kind, "data": dict(data), "actor": actor, "event_id": event_id, "device_id": device_id}
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queued.append((row, fut))
        self._wake.set()
        return await fut

    async def writer(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(0)  # a commit takes a while: rows queued meanwhile join the next one
            batch, self._queued = self._queued, []
            self._wake.clear()
            if batch:
                self.commits.append([row["kind"] for row, _ in batch])
                for row, fut in batch:
                    self.rows.append(row)
                    fut.set_result(len(self.rows))


async def test_event_start_and_first_tick_rows_are_one_commit_before_the_first_command() -> None:
    cfg = parse_config({"gpus": {"groups": [{"count": 4, "job_class": "training", "tier": "flex1"}]}}, "<test>")
    clock, audit = ManualClock(T0 - timedelta(minutes=5)), GroupCommitAudit()
    writer = asyncio.create_task(audit.writer())
    try:
        fleet = SimGpuFleet(cfg.gpus, clock)
        book = EventBook(cfg.openadr, MemoryStore(), audit, clock=clock)
        dispatcher = Dispatcher(None, fleet, audit, clock, cfg.control.lease_s)
        loop = ControlLoop(cfg, book, _Meter(), None, fleet, dispatcher, audit, clock)
        await loop.tick()  # the baseline, measured before the event
        signal = Signal(SignalName.SIMPLE, "level", (Interval(T0, 600.0, 2.0),))
        await book.answer(DemandEvent("E1", 0, "far", T0, 600.0, (signal,), vtn_id="VTN"))
        clock.advance(300.0 + cfg.control.ramp_up_s)
        await loop.tick()
    finally:
        writer.cancel()
    assert "event.start" in audit.kinds(), audit.commits
    start = next(i for i, c in enumerate(audit.commits) if "event.start" in c)
    assert audit.commits[start] == ["event.start", "control.tick"]
    kinds = audit.kinds()
    assert kinds.index("event.start") < kinds.index("control.tick") < kinds.index("command.gpus")
