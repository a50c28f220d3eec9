"""What the utility is told, what the gateway stores and what it does never disagree (issue 12, items 2 and 3).

A real Gateway (event book, event store and audit log in one SQLite or PostgreSQL database, its
VEN) talks to openleadr's own VTN on loopback. The database refuses the ``opt.decided`` row at the
SQL layer (a trigger that aborts the insert, as a full disk aborts the commit): the decision must not be
stored, nor answered, nor acted on; once the database takes writes again the VEN answers from the
store. Every opt-out, from the operator or from the BMS through its Modbus face (a pymodbus client
writing the opt-out register), is decided, stored, audited and then sent to the VTN.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pymodbus.client import AsyncModbusTcpClient

from gateway.app import Gateway
from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.compose import build_bms as build_bms_for
from gateway.config import parse_config
from gateway.model import Opt
from protocols.modbus.bms_server import register
from protocols.openadr import SimVtn
from tests.faults.harness import report
from tests.gwproc import until
from tests.pgdb import fetch, fetch_together, fresh_pg_database, raw

VEN = "truth-ven"
# Refuse the opt.decided row at the SQL layer, as a full disk refuses the commit (SQLite, PostgreSQL).
REFUSE = {
    "sqlite": [
        "CREATE TRIGGER test_disk_full BEFORE INSERT ON audit_log WHEN NEW.kind = '{kind}' "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$",
        "CREATE TRIGGER test_disk_full BEFORE INSERT ON audit_log FOR EACH ROW WHEN (NEW.kind = '{kind}') "
        "EXECUTE FUNCTION test_disk_full()",
    ],
}
ALLOW = {"sqlite": ["DROP TRIGGER test_disk_full"], "postgresql": ["DROP TRIGGER test_disk_full ON audit_log"]}


@dataclass
class Site:
    """A running gateway with its VEN registered at a simulated VTN."""

    gw: Gateway
    vtn: SimVtn
    url: str
    backend: str
    ven_id: str
    bms: Any = None

    async def refuse(self, kind: str) -> None:
        """Make the database refuse every audit row of one kind (and the transaction it is in)."""
        await raw(self.url, *(q.format(kind=kind) for q in REFUSE[self.backend]))

    async def allow(self) -> None:
        """Take the refusal away."""
        await raw(self.url, *ALLOW[self.backend])

    async def rows(self, kind: str, event_id: str | None = None) -> list[dict[str, Any]]:
        """Return (seq, actor, event id, data) of the committed audit rows of one kind, oldest first."""
        got = await fetch(self.url, _ROWS.format(kind=kind))
        return [r for r in _rows(got) if event_id in (None, r["event_id"])]

    async def state(self, key: str) -> dict[str, Any]:
        """Return one stored VEN state value, decoded."""
        (value,) = await fetch(self.url, f"SELECT value FROM ven_state WHERE key = '{key}'")
        return dict(json.loads(str(value[0])))

    def answered(self) -> dict[tuple[str, int], str]:
        """Return the VTN's view of each (event id, modification): the last opt it got in an
        oadrCreatedEvent, changed for an event's latest version by an oadrCreateOpt sent after it
        (an opt-out through EiOpt; the VEN may or may not answer the event again before the test looks)."""
        got = {(str(r["event_id"]), int(r["modification_number"])): r["opt_type"] for r in self.vtn.event_responses}
        for opt in self.vtn.opts:
            mods = [m for e, m in got if e == str(opt["event_id"])]
            if mods:
                got[(str(opt["event_id"]), max(mods))] = opt["opt_type"]
        return got

    async def stored(self) -> dict[tuple[str, int], str]:
        """Return the opt stored with each event version."""
        return _by_version(await fetch(self.url, _STORED))

    def in_book(self) -> dict[str, tuple[int, str]]:
        """Return the version and opt the event book acts on, by event id."""
        return {ev.event_id: (ev.modification_number, opt.value) for ev, opt in self.gw.book.events()}

    async def assert_agree(self) -> None:
        """Store, audit, VTN and book agree: every stored version has its row, every answer is stored as sent.

        The answers are taken first (each is stored before it is sent), then the store, the rows and
        the overrides in one snapshot: the gateway writes a version and its row in one transaction.
        """
        answered = self.answered()
        versions, decided_rows, overrides = await fetch_together(self.url, _STORED, _DECIDED, _OVERRIDES)
        stored = _by_version(versions)
        decided = {(r["event_id"], r["data"]["modification_number"]): r["data"]["opt"] for r in _rows(decided_rows)}
        assert stored == decided, f"event store and opt.decided rows differ: {stored} != {decided}"
        in_force = _with_overrides(stored, overrides)
        wrong = {k: (v, in_force.get(k)) for k, v in answered.items() if in_force.get(k) != v}
        assert not wrong, f"answered to the VTN (answer, stored): {wrong}"
        for event_id, (mod, opt) in self.in_book().items():
            assert in_force.get((event_id, mod)) == opt, f"the book acts on {event_id} {mod} {opt}, stored {in_force}"

    async def quiet(self) -> None:
        """Wait until the VTN answers a poll with nothing: no distribution is queued or being answered."""
        kinds: list[str] = []
        self.vtn.poll_observers.append(lambda kind, _versions, _t: kinds.append(kind))
        await until(lambda: "oadrResponse" in kinds, 5.0, "a poll answered with nothing")

    def add_event(self, start_in_s: float, **kw: Any) -> str:
        """Queue a 10-minute SIMPLE level-2 event starting ``start_in_s`` from now."""
        start = (datetime.now(UTC) + timedelta(seconds=start_in_s)).replace(microsecond=0)
        return self.vtn.add_event(self.ven_id, signal="SIMPLE", value=2, start=start, duration_s=600, **kw)


_ROWS = "SELECT seq, actor, event_id, data FROM audit_log WHERE kind = '{kind}' ORDER BY seq"
_STORED = "SELECT event_id, modification_number, opt FROM demand_events"
_DECIDED = _ROWS.format(kind="opt.decided")
_OVERRIDES = "SELECT key, value FROM ven_state WHERE key LIKE 'override:%'"


def _rows(got: list[tuple[object, ...]]) -> list[dict[str, Any]]:
    """Return audit rows read by ``_ROWS`` as dicts, their data decoded."""
    return [{"seq": s, "actor": a, "event_id": e, "data": json.loads(str(d))} for s, a, e, d in got]


def _by_version(got: list[tuple[object, ...]]) -> dict[tuple[str, int], str]:
    """Return the opt stored with each event version, from rows read by ``_STORED``."""
    return {(str(e), int(str(m))): str(o) for e, m, o in got}


def _with_overrides(stored: dict[tuple[str, int], str], got: list[tuple[object, ...]]) -> dict[tuple[str, int], str]:
    """Return the stored opts, each stored override (rows read by ``_OVERRIDES``) on its event's latest version."""
    in_force = dict(stored)
    for key, value in got:
        event_id, override = str(key).split(":", 1)[1], json.loads(str(value))
        mods = [m for e, m in stored if e == event_id]
        if override and mods:
            in_force[(event_id, max(mods))] = override["opt"]
    return in_force


def _in_force(site: Any) -> str | None:
    """Return the event whose ask is in force now (the directive's target), or None."""
    target = site.gw.book.directive_at(datetime.now(UTC)).target
    return None if target is None else target.event_id


@pytest.fixture
async def make_site(tmp_path: Path) -> AsyncIterator[Any]:
    """Return a factory for running sites (``bms=True`` adds the BMS face); stop them after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            bms: bool = False, opt_service: bool = True, backend: str = "sqlite", middleware: Any = None
        ) -> Site:
            vtn = SimVtn(poll_interval_s=1.0, opt_service=opt_service)
            if middleware is not None:
                vtn.server.app.middlewares.append(middleware)
            url = await vtn.start()
            stack.push_async_callback(vtn.stop)
            if backend == "postgresql":
                db = await stack.enter_async_context(fresh_pg_database())
            else:
                db = str(tmp_path / "audit.db")
            cfg = parse_config({
                "audit": {"db_url": db},
                "battery": {"enabled": False},
                "gpus": {"backend": "none"},
                "management": {"enabled": False},
                "bms": {"enabled": bms, "port": 0},
                "openadr": {"vtn_url": url, "ven_name": VEN, "opt_policy": "always",
                            "registration_retry_initial_s": 0.05, "registration_retry_max_s": 0.2},
            })  # fmt: skip
            clock = SystemClock()
            log = await AuditLog.open(db, clock=clock)
            stack.push_async_callback(log.close)
            gw = Gateway(cfg, clock, log, None, None, None)
            await gw.start()
            stack.push_async_callback(gw.stop)
            site = Site(gw, vtn, db, backend, "")
            if bms:
                site.bms = build_bms_for(gw, clock)
                await site.bms.start()
                stack.push_async_callback(site.bms.stop)
            site.ven_id = await vtn.wait_for_registration(VEN, timeout_s=10.0)
            return site

        yield make


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_decision_the_database_refuses_is_neither_answered_nor_acted_on(make_site: Any, backend: str) -> None:
    """Modification 1 of an answered event, a new event and a cancellation arrive while the database
    refuses opt.decided: none is stored, audited as decided or answered; the book keeps acting on what
    was answered (and stops the cancelled event: the safe direction). Once the database takes writes,
    the VEN asks for the events again and answers each from the store."""
    site = await make_site(backend=backend)
    kept = site.add_event(600)
    cancelled = site.add_event(-60)  # active now
    await site.vtn.wait_for(lambda: len(site.answered()) == 2, timeout_s=10.0)
    assert site.answered() == {(kept, 0): "optIn", (cancelled, 0): "optIn"}
    assert _in_force(site) == cancelled
    await site.assert_agree()

    await site.refuse("opt.decided")
    assert site.vtn.modify_event(site.ven_id, kept, value=3) == 1
    site.vtn.cancel_event(site.ven_id, cancelled)
    fresh = site.add_event(900)

    async def held_twice() -> bool:  # the distribution, then at least one retry after the next poll
        held = [r["event_id"] for r in await site.rows("opt.held")]
        return all(held.count(e) >= 2 for e in (kept, fresh, cancelled))

    await until(held_twice, 10.0, "the VEN holding the three answers and asking again", site.answered)
    assert (kept, 1) not in site.answered() and not any(e == fresh for e, _ in site.answered())
    assert site.in_book()[kept] == (0, "optIn") and fresh not in site.in_book()
    assert _in_force(site) != cancelled  # stopped at once all the same
    await site.assert_agree()

    await site.allow()
    allowed = time.monotonic()
    want = {(kept, 1): "optIn", (fresh, 0): "optIn", (cancelled, 1): "optIn"}
    await until(lambda: want.items() <= site.answered().items(), 10.0, "answers from the store", site.answered)
    report(f"opt.decided refused by {backend}", answered_after_allowed_s=time.monotonic() - allowed)
    await site.assert_agree()
    assert want.keys() <= (await site.stored()).keys()
    assert site.in_book()[kept] == (1, "optIn") and site.in_book()[fresh] == (0, "optIn")
    assert _in_force(site) != cancelled


async def test_a_repeat_is_answered_from_the_store_when_it_cannot_be_audited(make_site: Any) -> None:
    """The VTN sends a known version again while the log refuses rows: the answer is the stored one."""
    site = await make_site()
    eid = site.add_event(600)
    assert await site.vtn.wait_for_response(eid, timeout_s=10.0) is Opt.IN
    await site.refuse("event.repeat")
    before = len(site.vtn.responses)
    audited = len(await site.rows("event.repeat"))
    other = site.add_event(1200)  # the VTN distributes again: eid comes back as a repeat
    await site.vtn.wait_for_response(other, timeout_s=10.0)
    again = [opt for e, _, opt in site.vtn.responses[before:] if e == eid]
    assert again and set(again) == {Opt.IN}, site.vtn.responses
    assert len(await site.rows("event.repeat")) == audited  # refused, and answered all the same
    await site.assert_agree()


@pytest.mark.parametrize("opt_service", [True, False], ids=["EiOpt", "oadrCreatedEvent"])
async def test_a_bms_opt_out_reaches_the_vtn(make_site: Any, opt_service: bool) -> None:
    """A pymodbus client writes the BMS face's opt-out register: the opt-out is decided, stored and
    audited (actor bms, with the writer's address), then sent to the VTN, in that order."""
    site = await make_site(bms=True, opt_service=opt_service)
    eid = site.add_event(-60)
    assert await site.vtn.wait_for_response(eid, timeout_s=10.0) is Opt.IN
    await until(lambda: _in_force(site) == eid, 5.0, "the event active")
    await until(lambda: site.bms.provider().event_id == eid, 5.0, "the BMS face showing the event")
    client = AsyncModbusTcpClient("127.0.0.1", port=site.bms.port)
    await client.connect()
    try:
        written = time.monotonic()
        assert not (await client.write_register(register("bms_opt_out").address, 1, device_id=1)).isError()
        if opt_service:
            await site.vtn.wait_for(lambda: site.vtn.opts, timeout_s=5.0)
            (opt,) = site.vtn.opts
            assert (str(opt["event_id"]), opt["opt_type"], opt["opt_reason"]) == (eid, "optOut", "overrideStatus")
        else:
            assert await site.vtn.wait_for_response(eid, timeout_s=5.0, modification_number=0) is Opt.OUT
            await site.vtn.wait_for(lambda: site.answered()[(eid, 0)] == "optOut", timeout_s=5.0)
        report(f"BMS opt-out to the VTN via {'EiOpt' if opt_service else 'EiEvent'}",
               write_to_vtn_s=time.monotonic() - written)  # fmt: skip
        # A refresh of the register (the BMS keeps its request alive) decides and sends nothing new.
        assert not (await client.write_register(register("bms_opt_out").address, 1, device_id=1)).isError()
    finally:
        client.close()
    assert _in_force(site) != eid
    (override,) = await site.rows("opt.override", eid)
    assert override["actor"] == "bms" and override["data"]["opt"] == "optOut"
    assert "(from 127.0.0.1:" in override["data"]["reason"]
    (sent,) = await site.rows("opt.sent_to_vtn", eid)
    assert sent["seq"] > override["seq"] and sent["data"]["via"] == ("EiOpt" if opt_service else "EiEvent")
    assert (await site.state(f"override:{eid}"))["actor"] == "bms"
    assert len(site.vtn.opts) == (1 if opt_service else 0)
    await site.assert_agree()


async def test_operator_and_bms_opt_outs_take_the_same_path(make_site: Any) -> None:
    """The operator's opt-out (the management endpoint's call) is stored, audited and sent like the BMS's."""
    site = await make_site()
    eid = site.add_event(-60)
    assert await site.vtn.wait_for_response(eid, timeout_s=10.0) is Opt.IN
    result = await site.gw.operator_opt_out(eid, "chiller fault", "127.0.0.1")
    assert result == {"ok": True, "event_id": eid, "opt": "optOut", "sent_to_vtn": True}
    assert [(str(o["event_id"]), o["opt_type"]) for o in site.vtn.opts] == [(eid, "optOut")]
    (override,) = await site.rows("opt.override", eid)
    (sent,) = await site.rows("opt.sent_to_vtn", eid)
    assert override["actor"] == "operator" and sent["seq"] > override["seq"]
    again = await site.gw.operator_opt_out(eid, "chiller fault", "127.0.0.1")
    assert again["ok"] and not again["sent_to_vtn"] and len(site.vtn.opts) == 1
    unknown = await site.gw.opt_out("no-such-event", "bms", "the BMS wrote bms_opt_out", "127.0.0.1:5020")
    assert unknown["ok"] is False and await site.rows("bms.opt_out_rejected")


async def test_an_opt_out_the_vtn_did_not_take_is_answered_again_from_the_store(make_site: Any) -> None:
    """The VTN fails both opt-change messages (HTTP 503): the VEN asks for the events after its next
    poll and answers the event from the store (optOut), without anyone asking again."""
    failing = {"EiOpt": 0, "EiEvent": 0}

    @web.middleware
    async def unavailable(request: web.Request, handler: Any) -> web.StreamResponse:
        service = request.path.rsplit("/", 1)[-1]
        body = await request.read()
        if failing.get(service) and (b"oadrCreateOpt" in body or b"oadrCreatedEvent" in body):
            failing[service] -= 1
            return web.Response(status=503)
        return await handler(request)

    site = await make_site(middleware=unavailable)
    eid = site.add_event(-60)
    assert await site.vtn.wait_for_response(eid, timeout_s=10.0) is Opt.IN
    await site.quiet()
    failing.update(EiOpt=1, EiEvent=1)
    result = await site.gw.operator_opt_out(eid, "chiller fault", "127.0.0.1")
    assert result["ok"] and result["sent_to_vtn"] is False and failing == {"EiOpt": 0, "EiEvent": 0}
    assert site.answered()[(eid, 0)] == "optIn"
    (failed,) = await site.rows("opt.send_failed", eid)
    assert failed["data"]["retry"] == "next poll"
    await site.vtn.wait_for(lambda: site.answered()[(eid, 0)] == "optOut", timeout_s=5.0)
    await site.assert_agree()
