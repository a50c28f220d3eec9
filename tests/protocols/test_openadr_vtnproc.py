"""The simulated VTN in a process of its own: requests over the pipe, poll notes, a clean stop."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.errors import GatewayError
from gateway.eventstore import EventStore
from gateway.model import DemandEvent, Opt
from protocols.openadr import Ven
from protocols.openadr.vtnproc import VtnProcess
from tests.doubles import until


async def test_vtn_process_serves_answers_and_stops() -> None:
    vtn = VtnProcess(poll_interval_s=1.0)
    url = await vtn.start()
    try:
        assert url.startswith("http://127.0.0.1:")
        assert await vtn.registered() == {}
        start = datetime.now(UTC) + timedelta(minutes=5)
        eid = await vtn.add_event("ven-x", event_id="evt-chosen", signal="SIMPLE", value=2.0, start=start,
                                  duration_s=60.0)  # fmt: skip
        assert eid == "evt-chosen"
        assert await vtn.add_event("ven-x", signal="SIMPLE", value=1.0, start=start, duration_s=60.0, only=True)
        assert await vtn.responses() == []  # no VEN has answered anything
        with pytest.raises(GatewayError, match="unknown request 'nope'"):
            await vtn.call("nope")
        naive = datetime(2026, 7, 1, 14, 0)
        with pytest.raises(GatewayError, match="must be an aware datetime"):  # reported; the VTN keeps serving
            await vtn.add_event("ven-x", signal="SIMPLE", value=1.0, start=naive, duration_s=60.0)
        assert await vtn.registered() == {}
    finally:
        proc = vtn._proc
        await vtn.stop()
    assert proc is not None and proc.returncode == 0
    with pytest.raises(GatewayError, match="not running"):
        await vtn.registered()


async def test_poll_notes_carry_the_monotonic_send_time(tmp_path: Path) -> None:
    """A VEN's poll is reported with the event versions it carried, at a time on the machine's monotonic clock."""
    notes: list[tuple[str, list[tuple[str, int]], float]] = []
    vtn = VtnProcess(poll_interval_s=1.0)
    vtn.poll_observers.append(lambda kind, events, t: notes.append((kind, events, t)))
    url = await vtn.start()
    audit = await AuditLog.open(str(tmp_path / "audit.db"))
    seen: list[DemandEvent] = []

    async def on_event(ev: DemandEvent) -> Opt:
        seen.append(ev)
        return Opt.IN

    cfg = OpenAdrConfig(vtn_url=url, ven_name="proc-ven", registration_retry_initial_s=0.2)
    ven = Ven(cfg, on_event, audit, SystemClock(), state=EventStore(audit.engine, SystemClock()))
    try:
        await ven.start()
        await until(lambda: ven.registered and bool(notes), 20.0)
        t0 = time.monotonic()
        start = datetime.now(UTC) + timedelta(minutes=5)
        eid = await vtn.add_event(str(ven.ven_id), signal="SIMPLE", value=2.0, start=start, duration_s=60.0)
        await until(lambda: any(ev.event_id == eid for ev in seen), 20.0)
        kind, events, sent_at = next(n for n in notes if (eid, 0) in n[1])
        assert kind == "oadrDistributeEvent"
        assert t0 < sent_at < time.monotonic()
        deadline = time.monotonic() + 10.0
        while (eid, 0, Opt.IN) not in await vtn.responses():  # the VEN's answer reaches the VTN
            assert time.monotonic() < deadline, "the VEN's oadrCreatedEvent never reached the VTN"
            await asyncio.sleep(0.05)
    finally:
        await ven.stop()
        await audit.close()
        await vtn.stop()
