"""What the utility is told, what the gateway stores and what it does never disagree (issue 12, items 2 and 3).

A real Gateway (event book, event store and audit log on one SQLite file, its VEN) talks to
openleadr's own VTN on loopback. The database refuses the ``opt.decided`` row at the SQL layer
(a trigger that aborts the insert, as a full disk would abort the commit): the decision must not be
stored, nor answered, nor acted on; once the database takes writes again the VEN answers from the
store. Every opt-out, from the operator or from the BMS through its Modbus face (a pymodbus client
writing the opt-out register), is decided, stored, audited and then sent to the VTN.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.model import Opt
from protocols.modbus.bms_server import register
from protocols.modbus.build import build_bms_for
from protocols.openadr import SimVtn
from tests.gwproc import until

VEN = "truth-ven"
REFUSE = (
    "CREATE TRIGGER test_disk_full BEFORE INSERT ON audit_log WHEN NEW.kind = 'opt.decided' "
    "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
)


@dataclass
class Site:
    """A running gateway with its VEN registered at a simulated VTN."""

    gw: Gateway
    vtn: SimVtn
    db: Path
    ven_id: str
    bms: Any = None

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement on the gateway's database from another connection; return its rows."""
        with sqlite3.connect(self.db, timeout=5.0) as conn:
            return conn.execute(query, args).fetchall()

    def rows(self, kind: str, event_id: str | None = None) -> list[dict[str, Any]]:
        """Return (seq, actor, event id, data) of the committed audit rows of one kind, oldest first."""
        got = self.sql("SELECT seq, actor, event_id, data FROM audit_log WHERE kind = ? ORDER BY seq", kind)
        return [
            {"seq": s, "actor": a, "event_id": e, "data": json.loads(d)} for s, a, e, d in got if event_id in (None, e)
        ]

    def answered(self) -> dict[tuple[str, int], str]:
        """Return the last opt the VTN got in an oadrCreatedEvent for each (event id, modification)."""
        return {(str(r["event_id"]), int(r["modification_number"])): r["opt_type"] for r in self.vtn.event_responses}

    def stored(self) -> dict[tuple[str, int], str]:
        """Return the opt stored with each event version."""
        return {(e, int(m)): o for e, m, o in self.sql("SELECT event_id, modification_number, opt FROM demand_events")}

    def decided(self) -> dict[tuple[str, int], str]:
        """Return the opt of each committed opt.decided row, by (event id, modification)."""
        return {(r["event_id"], r["data"]["modification_number"]): r["data"]["opt"] for r in self.rows("opt.decided")}

    def in_book(self) -> dict[str, tuple[int, str]]:
        """Return the version and opt the event book acts on, by event id."""
        return {ev.event_id: (ev.modification_number, opt.value) for ev, opt in self.gw.book.events()}

    def assert_agree(self) -> None:
        """Store, audit, VTN and book agree: every stored version has its row, every answer is stored as sent."""
        stored, decided, answered = self.stored(), self.decided(), self.answered()
        assert stored == decided, f"event store and opt.decided rows differ: {stored} != {decided}"
        wrong = {k: (v, stored.get(k)) for k, v in answered.items() if stored.get(k) != v}
        assert not wrong, f"answered to the VTN (answer, stored): {wrong}"
        for event_id, (mod, opt) in self.in_book().items():
            assert stored.get((event_id, mod)) == opt, f"the book acts on {event_id} {mod} {opt}, stored {stored}"

    def add_event(self, start_in_s: float, **kw: Any) -> str:
        """Queue a 10-minute SIMPLE level-2 event starting ``start_in_s`` from now."""
        start = (datetime.now(UTC) + timedelta(seconds=start_in_s)).replace(microsecond=0)
        return self.vtn.add_event(self.ven_id, signal="SIMPLE", value=2, start=start, duration_s=600, **kw)


@pytest.fixture
async def make_site(tmp_path: Path) -> AsyncIterator[Any]:
    """Return a factory for running sites (``bms=True`` adds the BMS face); stop them after the test."""
    started: list[tuple[Site, AuditLog]] = []

    async def make(bms: bool = False, opt_service: bool = True) -> Site:
        vtn = SimVtn(poll_interval_s=1.0, opt_service=opt_service)
        url = await vtn.start()
        db = tmp_path / f"audit-{len(started)}.db"
        cfg = parse_config({
            "audit": {"db_url": str(db)},
            "battery": {"enabled": False},
            "gpus": {"backend": "none"},
            "management": {"enabled": False},
            "bms": {"enabled": bms, "port": 0},
            "openadr": {"vtn_url": url, "ven_name": VEN, "opt_policy": "always",
                        "registration_retry_initial_s": 0.05, "registration_retry_max_s": 0.2},
        })  # fmt: skip
        clock = SystemClock()
        log = await AuditLog.open(str(db), clock=clock)
        gw = Gateway(cfg, clock, log, None, None, None)
        await gw.start()
        site = Site(gw, vtn, db, "")
        started.append((site, log))
        if bms:
            site.bms = build_bms_for(gw, clock)
            await site.bms.start()
        site.ven_id = await vtn.wait_for_registration(VEN, timeout_s=10.0)
        return site

    yield make
    for site, log in reversed(started):
        if site.bms is not None:
            await site.bms.stop()
        await site.gw.stop()
        await log.close()
        await site.vtn.stop()


async def test_a_decision_the_database_refuses_is_neither_answered_nor_acted_on(make_site: Any) -> None:
    """Modification 1 of an answered event, a new event and a cancellation arrive while the database
    refuses opt.decided: none is stored, audited as decided or answered; the book keeps acting on what
    was answered (and stops the cancelled event: the safe direction). Once the database takes writes,
    the VEN asks for the events again and answers each from the store."""
    site = await make_site()
    kept = site.add_event(600)
    cancelled = site.add_event(-60)  # active now
    await site.vtn.wait_for(lambda: len(site.answered()) == 2, timeout_s=10.0)
    assert site.answered() == {(kept, 0): "optIn", (cancelled, 0): "optIn"}
    assert cancelled in site.gw.book.active_event_ids(datetime.now(UTC))
    site.assert_agree()

    site.sql(REFUSE)
    assert site.vtn.modify_event(site.ven_id, kept, value=3) == 1
    site.vtn.cancel_event(site.ven_id, cancelled)
    fresh = site.add_event(900)

    def held_twice() -> bool:  # the distribution, then at least one retry after the next poll
        return all(len(site.rows("opt.held", e)) >= 2 for e in (kept, fresh, cancelled))

    await until(held_twice, 10.0, "the VEN holding the three answers and asking again", site.answered)
    assert (kept, 1) not in site.answered() and not any(e == fresh for e, _ in site.answered())
    assert site.in_book()[kept] == (0, "optIn") and fresh not in site.in_book()
    assert cancelled not in site.gw.book.active_event_ids(datetime.now(UTC))  # stopped at once all the same
    site.assert_agree()

    site.sql("DROP TRIGGER test_disk_full")
    want = {(kept, 1): "optIn", (fresh, 0): "optIn", (cancelled, 1): "optIn"}
    await until(lambda: want.items() <= site.answered().items(), 10.0, "answers from the store", site.answered)
    site.assert_agree()
    assert want.keys() <= site.stored().keys()
    assert site.in_book()[kept] == (1, "optIn") and site.in_book()[fresh] == (0, "optIn")
    assert cancelled not in site.gw.book.active_event_ids(datetime.now(UTC))


async def test_a_repeat_is_answered_from_the_store_when_it_cannot_be_audited(make_site: Any) -> None:
    """The VTN sends a known version again while the log refuses rows: the answer is the stored one."""
    site = await make_site()
    eid = site.add_event(600)
    assert await site.vtn.wait_for_response(eid, timeout_s=10.0) is Opt.IN
    site.sql(REFUSE.replace("'opt.decided'", "'event.repeat'"))
    other = site.add_event(1200)  # the VTN distributes again: eid comes back as a repeat
    await site.vtn.wait_for_response(other, timeout_s=10.0)
    assert [(e, m, o) for e, m, o in site.vtn.responses if e == eid] == [(eid, 0, Opt.IN), (eid, 0, Opt.IN)]
    assert site.rows("event.repeat") == []  # refused, and answered all the same
    site.assert_agree()


@pytest.mark.parametrize("opt_service", [True, False], ids=["EiOpt", "oadrCreatedEvent"])
async def test_a_bms_opt_out_reaches_the_vtn(make_site: Any, opt_service: bool) -> None:
    """A pymodbus client writes the BMS face's opt-out register: the opt-out is decided, stored and
    audited (actor bms, with the writer's address), then sent to the VTN, in that order."""
    site = await make_site(bms=True, opt_service=opt_service)
    eid = site.add_event(-60)
    assert await site.vtn.wait_for_response(eid, timeout_s=10.0) is Opt.IN
    await until(lambda: eid in site.gw.book.active_event_ids(datetime.now(UTC)), 5.0, "the event active")
    await until(lambda: site.bms.provider().event_id == eid, 5.0, "the BMS face showing the event")
    client = AsyncModbusTcpClient("127.0.0.1", port=site.bms.port)
    await client.connect()
    try:
        assert not (await client.write_register(register("bms_opt_out").address, 1, device_id=1)).isError()
        if opt_service:
            await site.vtn.wait_for(lambda: site.vtn.opts, timeout_s=5.0)
            (opt,) = site.vtn.opts
            assert (str(opt["event_id"]), opt["opt_type"], opt["opt_reason"]) == (eid, "optOut", "overrideStatus")
        else:
            assert await site.vtn.wait_for_response(eid, timeout_s=5.0, modification_number=0) is Opt.OUT
            await site.vtn.wait_for(lambda: site.answered()[(eid, 0)] == "optOut", timeout_s=5.0)
        # A refresh of the register (the BMS keeps its request alive) decides and sends nothing new.
        assert not (await client.write_register(register("bms_opt_out").address, 1, device_id=1)).isError()
    finally:
        client.close()
    assert eid not in site.gw.book.active_event_ids(datetime.now(UTC))
    (override,) = site.rows("opt.override", eid)
    assert override["actor"] == "bms" and override["data"]["opt"] == "optOut"
    assert "(from 127.0.0.1:" in override["data"]["reason"]
    (sent,) = site.rows("opt.sent_to_vtn", eid)
    assert sent["seq"] > override["seq"] and sent["data"]["via"] == ("EiOpt" if opt_service else "EiEvent")
    (stored,) = site.sql("SELECT value FROM ven_state WHERE key = ?", f"override:{eid}")
    assert json.loads(stored[0])["actor"] == "bms"
    assert len(site.vtn.opts) == (1 if opt_service else 0)


async def test_operator_and_bms_opt_outs_take_the_same_path(make_site: Any) -> None:
    """The operator's opt-out (the management endpoint's call) is stored, audited and sent like the BMS's."""
    site = await make_site()
    eid = site.add_event(-60)
    assert await site.vtn.wait_for_response(eid, timeout_s=10.0) is Opt.IN
    result = await site.gw.operator_opt_out(eid, "chiller fault", "127.0.0.1")
    assert result == {"ok": True, "event_id": eid, "opt": "optOut", "sent_to_vtn": True}
    assert [(str(o["event_id"]), o["opt_type"]) for o in site.vtn.opts] == [(eid, "optOut")]
    (override,) = site.rows("opt.override", eid)
    (sent,) = site.rows("opt.sent_to_vtn", eid)
    assert override["actor"] == "operator" and sent["seq"] > override["seq"]
    again = await site.gw.operator_opt_out(eid, "chiller fault", "127.0.0.1")
    assert again["ok"] and not again["sent_to_vtn"] and len(site.vtn.opts) == 1
    unknown = await site.gw.opt_out("no-such-event", "bms", "the BMS wrote bms_opt_out", "127.0.0.1:5020")
    assert unknown["ok"] is False and site.rows("bms.opt_out_rejected")
