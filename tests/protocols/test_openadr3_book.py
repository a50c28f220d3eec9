"""The 3.1 VEN feeding the real event book (SQLite audit log and event store): the same directive as 2.0b."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.events import EventBook
from gateway.eventstore import EventStore
from gateway.model import TargetKind
from protocols.openadr3 import SimVtn3, Ven3
from protocols.openadr3.timing import format_datetime
from tests.doubles import until
from tests.protocols.oadr3_helpers import config


async def test_capacity_limit_becomes_the_books_cap_and_deletion_stops_it(tmp_path: Path) -> None:
    sim = SimVtn3()
    await sim.start()
    audit = await AuditLog.open(str(tmp_path / "audit.db"))
    clock = SystemClock()
    try:
        cfg = config(sim.base_url, tmp_path).model_copy(update={"opt_policy": "always"})
        store = EventStore(audit.engine, clock)
        book = EventBook(cfg, store, audit, clock=clock)
        kw = {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}
        program = await sim.add_program("dr", payloadDescriptors=[kw])
        start = datetime.now(UTC) - timedelta(seconds=1)
        ev = await sim.add_event({"programID": program["id"], "priority": 0,
                                  "intervalPeriod": {"start": format_datetime(start), "duration": "PT1H"},
                                  "intervals": [{"id": 0, "payloads": [
                                      {"type": "IMPORT_CAPACITY_LIMIT", "values": [800]}]}]})  # fmt: skip
        ven = Ven3(cfg, book.answer, audit, clock, book.cancel, on_distribution=book.on_distribution, state=store)
        await ven.start()
        try:
            await until(lambda: book.directive_at(clock.now()).target is not None)
            target = book.directive_at(clock.now()).target
            assert target is not None and (target.kind, target.value) == (TargetKind.CAP_W, 800_000.0)
            await sim.update_event(ev["id"], {"intervals": [{"id": 0, "payloads": [
                {"type": "IMPORT_CAPACITY_LIMIT", "values": [700]}]}]})  # fmt: skip
            await until(lambda: getattr(book.directive_at(clock.now()).target, "value", None) == 700_000.0)
            assert [e.modification_number for e, _ in book.events()] == [1]
            await sim.delete_event(ev["id"])  # no push configured: the next poll no longer lists it
            await until(lambda: book.directive_at(clock.now()).target is None)
        finally:
            await ven.stop()
    finally:
        await audit.close()
        await sim.stop()
    assert sim.all_violations() == []
