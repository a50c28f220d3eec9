"""OpenADR 2.0b event conformance: the VEN and the real event book against openleadr's own VTN.

Each test runs the VEN (1 s polls) against ``SimVtn`` (openleadr's ``OpenADRServer``) on
127.0.0.1 with an ephemeral port, wired to an ``EventBook`` over a real ``EventStore`` the way
the gateway wires them. Tests of a conformance rule quote the rule.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from openleadr import objects
from openleadr.messaging import create_message

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.events import EventBook
from gateway.eventstore import EventStore
from gateway.model import Opt
from protocols.openadr import SimVtn, Ven
from tests.doubles import MemoryEvidence, RecordingAudit, until
from tests.protocols.onedistribution import OK, one_distribution

VEN = "drgw-conf"


@dataclass
class Site:
    """One VTN, VEN, event book and their records."""

    vtn: SimVtn
    url: str
    ven: Ven
    book: EventBook
    store: EventStore
    audit: RecordingAudit
    evidence: MemoryEvidence

    def rows(self, kind: str, event_id: str | None = None) -> list[dict[str, Any]]:
        """Return audit rows of one kind (for one event)."""
        return [r for r in self.audit.of_kind(kind) if event_id is None or r["event_id"] == event_id]

    def codes(self, event_id: str) -> list[tuple[int, int, str]]:
        """Return (modification number, response code, opt) of every answer the VTN got for an event."""
        return [
            (int(r["modification_number"]), int(r["response_code"]), r["opt_type"])
            for r in self.vtn.event_responses
            if str(r["event_id"]) == event_id
        ]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = await AuditLog.open(str(tmp_path / "audit.db"))
    yield log
    await log.close()


async def _site(db: AuditLog, vtn: SimVtn | None = None, **cfg: Any) -> Site:
    """Start a VTN (unless given) and a VEN wired to a fresh event book."""
    vtn = vtn or SimVtn(poll_interval_s=1.0)
    url = await vtn.start()
    audit, evidence = RecordingAudit(), MemoryEvidence()
    config = OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05,
                           registration_retry_max_s=0.2, **{"opt_policy": "always", **cfg})  # fmt: skip
    store = EventStore(db.engine)
    book = EventBook(config, store, audit, rng=random.Random(1))
    ven = Ven(config, book.answer, audit, SystemClock(), on_cancel=book.cancel,
              on_distribution=book.on_distribution, state=store, evidence=evidence)  # fmt: skip
    await ven.start()
    await until(lambda: ven.registered)
    return Site(vtn, url, ven, book, store, audit, evidence)


@pytest.fixture
async def site(db: AuditLog) -> AsyncIterator[Site]:
    s = await _site(db)
    yield s
    await s.ven.stop()
    await s.vtn.stop()


def _soon(minutes: float = 10) -> datetime:
    """Return a whole-second UTC time ``minutes`` from now."""
    return (datetime.now(UTC) + timedelta(minutes=minutes)).replace(microsecond=0)


def _active(book: EventBook) -> str | None:
    """Return the event id the directive follows now."""
    t = book.directive_at(datetime.now(UTC)).target
    return None if t is None else t.event_id


async def test_answer_uses_the_distribution_request_id(site: Site) -> None:
    """2.0b rule 42: "A VEN receiving an oadrDistributeEvent eiEvent must use the received requestID
    value in the EiCreatedEvent eventResponse when responding to the event. ... The eiResponse:requestID
    in oadrCreatedEvent shall be left empty if the payload contains eventResponses."
    """
    eid = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600)
    assert await site.vtn.wait_for_response(eid, timeout_s=4.0) is Opt.IN
    distributions = [b for b in site.evidence.blobs.values() if b"oadrDistributeEvent" in b]
    request_ids = {m.group(1).decode() for b in distributions for m in re.finditer(rb"<requestID[^>]*>([^<]+)<", b)}
    (answer,) = [r for r in site.vtn.event_responses if r["event_id"] == eid]
    assert answer["request_id"] in request_ids
    created = next(b for b in site.evidence.blobs.values() if b"oadrCreatedEvent" in b)
    assert re.search(rb"<ei:eiResponse>.*?<requestID[^>]*></requestID>", created, re.S)


async def test_modified_event_replans_and_stale_version_is_refused(site: Site) -> None:
    """2.0b rules 57 and 58: a higher modification number replaces the event; "If the VTN sends an
    oadrEvent with an eventID that the VEN is already aware of, but which has a lower modification
    number than one in which the VEN is already aware then this is an ERROR and the VEN should respond
    with the appropriate error code."
    """
    eid = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(-1), duration_s=600)
    await site.vtn.wait_for_response(eid, timeout_s=4.0, modification_number=0)
    t = site.book.directive_at(datetime.now(UTC)).target
    assert t is not None and t.value == pytest.approx(0.10)
    assert site.vtn.modify_event(VEN, eid, value=3) == 1
    await site.vtn.wait_for_response(eid, timeout_s=4.0, modification_number=1)
    t = site.book.directive_at(datetime.now(UTC)).target
    assert t is not None and t.value == pytest.approx(0.30) and t.modification_number == 1
    site.vtn.modify_event(VEN, eid, value=2, modification_number=0)  # an older version again
    await site.vtn.wait_for(lambda: len(site.codes(eid)) >= 3, timeout_s=4.0)
    assert site.codes(eid)[:3] == [(0, 200, "optIn"), (1, 200, "optIn"), (0, 450, "optIn")]
    t = site.book.directive_at(datetime.now(UTC)).target
    assert t is not None and t.value == pytest.approx(0.30)  # the stale version changed nothing
    assert [r["data"]["known_modification_number"] for r in site.rows("event.stale", eid)] == [1]


async def test_unchanged_event_is_answered_the_same_without_acting_again(site: Site) -> None:
    """2.0b rule 62: the VEN "MUST reply with a createdEvent message for every EIEvent message in which
    the responseRequired is set to always ... The event is one in which the VEN is already aware."
    """
    first = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600)
    await site.vtn.wait_for_response(first, timeout_s=4.0)
    second = site.vtn.add_event(VEN, signal="SIMPLE", value=2, start=_soon(30), duration_s=600)
    await site.vtn.wait_for_response(second, timeout_s=4.0)
    assert site.codes(first) == [(0, 200, "optIn"), (0, 200, "optIn")]
    assert len(site.rows("opt.decided", first)) == 1 and len(site.rows("event.repeat", first)) == 1


async def test_explicit_cancellation_stops_the_event(site: Site) -> None:
    """2.0b rule 36: "An event cancellation received by the VEN must be acknowledged with an
    oadrCreatedEvent with the optType element set as follows ...: optIn = Confirm to cancellation".
    """
    eid = site.vtn.add_event(VEN, signal="SIMPLE", value=2, start=_soon(-1), duration_s=600)
    await site.vtn.wait_for_response(eid, timeout_s=4.0)
    assert _active(site.book) == eid
    site.vtn.cancel_event(VEN, eid)
    assert await site.vtn.wait_for_response(eid, timeout_s=4.0, modification_number=1) is Opt.IN
    assert _active(site.book) is None
    assert site.rows("event.stopped", eid)[0]["data"]["reason"] == "cancelled by the utility"


async def test_implied_cancellation(site: Site) -> None:
    """2.0b rule 61: "If the VTN sends the oadrDistributeEvent payload and it does not contain an event
    for which the VEN is aware (i.e. in its list of known events) then the VEN must delete it from its
    list of known event (i.e. implied cancel)."
    """
    gone = site.vtn.add_event(VEN, signal="SIMPLE", value=3, start=_soon(-1), duration_s=600, priority=1)
    kept = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(-1), duration_s=600, priority=2)
    await site.vtn.wait_for_response(kept, timeout_s=4.0)
    assert _active(site.book) == gone
    site.vtn.drop_event(VEN, gone)
    await until(lambda: _active(site.book) == kept, timeout_s=4.0)
    (stopped,) = site.rows("event.stopped", gone)
    assert "implied cancellation" in stopped["data"]["reason"]
    site.vtn.drop_event(VEN, kept)  # now the VTN lists nothing: an empty distribution
    await until(lambda: _active(site.book) is None, timeout_s=4.0)


async def test_cancelled_event_the_ven_never_saw_is_confirmed(site: Site) -> None:
    """2.0b rule 60: a cancelled event "that the VEN is not aware of ... should ignore the event ...,
    but still must respond with the createdEvent if required to do so by oadrResponseRequired."
    """
    eid = site.vtn.add_event(VEN, signal="SIMPLE", value=2, start=_soon(), duration_s=600)
    site.vtn.event(VEN, eid).event_descriptor.event_status = "cancelled"
    assert await site.vtn.wait_for_response(eid, timeout_s=4.0) is Opt.IN
    assert site.codes(eid) == [(0, 200, "optIn")]
    assert _active(site.book) is None


async def test_events_for_others_and_unsupported_signals_get_4xx(db: AuditLog) -> None:
    """2.0b rules 19 and 48: "If an oadrDistributeEvent payload has as mix of valid and invalid events,
    the implementation shall only respond to the relevant valid events and not reject the entire
    message." Logical errors the VEN must detect: "VEN receives non-matching market context",
    "VEN receives non-matching eiTarget", "VEN receives unsupported signalName"; each is reported
    "in the eventResponse element of oadrCreatedEvent" with a 4xx code.
    """
    s = await _site(db, market_contexts=["oadr://drgw.sim/program"], resource_ids=["hall-a"])
    try:
        vtn = s.vtn
        ok = vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600,
                           targets=[{"resource_id": "hall-a"}])  # fmt: skip
        market = vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600,
                               market_context="oadr://other/program")  # fmt: skip
        target = vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600,
                               targets=[{"resource_id": "hall-b"}])  # fmt: skip
        price = vtn.add_event(VEN, signal="ELECTRICITY_PRICE", value=0.9, start=_soon(), duration_s=600)
        bid = vtn.add_event(VEN, signal="BID_LOAD", signal_type="setpoint", value=5, start=_soon(), duration_s=600)
        await vtn.wait_for(lambda: all(s.codes(e) for e in (ok, market, target, price, bid)), timeout_s=4.0)
        assert s.codes(ok) == [(0, 200, "optIn")]
        assert s.codes(market) == [(0, 453, "optOut")]
        assert s.codes(target) == [(0, 462, "optOut")]
        assert s.codes(price) == [(0, 460, "optOut")]  # no price levels configured
        assert s.codes(bid) == [(0, 460, "optOut")]
        assert "not supported" in s.rows("event.rejected", bid)[0]["data"]["reason"]
    finally:
        await s.ven.stop()
        await s.vtn.stop()


async def test_response_never_means_no_answer(site: Site) -> None:
    """2.0b rule 12: "Never - The VEN shall not respond to the event with a oadrCreatedEvent eventResponse"."""
    quiet = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600, response_required="never")
    loud = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(20), duration_s=600)
    await site.vtn.wait_for_response(loud, timeout_s=4.0)
    assert site.codes(quiet) == []
    assert site.rows("opt.decided", quiet)  # decided and recorded all the same


async def test_test_event_is_acknowledged_not_acted_on_and_comment_kept(site: Site) -> None:
    """2.0b rule 6: any testEvent value but "false" makes a test event; it is answered, not acted on."""
    eid = site.vtn.add_event(VEN, signal="SIMPLE", value=3, start=_soon(-1), duration_s=600, test_event=True,
                             vtn_comment="annual drill")  # fmt: skip
    assert await site.vtn.wait_for_response(eid, timeout_s=4.0) is Opt.IN
    assert _active(site.book) is None
    received = site.rows("event.received", eid)[0]["data"]
    assert (received["test_event"], received["vtn_comment"]) == (True, "annual drill")


async def test_startafter_offset_is_drawn_once_and_persisted(site: Site) -> None:
    """2.0b rule 30: "The VEN must randomize the dtstart time of the event if a value is present in the
    startafter element. ... Modifications to an event should maintain the same random offset, unless
    the startafter element itself is modified."
    """
    eid = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600, start_after_s=300)
    await site.vtn.wait_for_response(eid, timeout_s=4.0)
    first = await site.store.get(eid, 0)
    assert first is not None and 0 <= first.start_delay_s <= 300 and first.event.start_after_s == 300
    site.vtn.modify_event(VEN, eid, value=2)
    await site.vtn.wait_for_response(eid, timeout_s=4.0, modification_number=1)
    second = await site.store.get(eid, 1)
    assert second is not None and second.start_delay_s == first.start_delay_s


async def test_overlapping_events_resolve_by_priority(site: Site) -> None:
    """2.0b rule 18: "DR events for programs with higher priorities supersede the events of programs
    with lower priorities. If two programs with overlapping events have the same priority then the
    program whose event was activated first takes priority."
    """
    low = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(-2), duration_s=900, priority=5,
                             market_context="oadr://a")  # fmt: skip
    high = site.vtn.add_event(VEN, signal="LOAD_DISPATCH", value=20, start=_soon(-1), duration_s=900, priority=1,
                              market_context="oadr://b")  # fmt: skip
    await site.vtn.wait_for(lambda: site.codes(low) and site.codes(high), timeout_s=4.0)
    t = site.book.directive_at(datetime.now(UTC)).target
    assert t is not None and t.event_id == high and t.value == 20_000.0


async def test_operator_opt_out_reaches_the_vtn_through_eiopt(site: Site) -> None:
    eid = site.vtn.add_event(VEN, signal="SIMPLE", value=2, start=_soon(-1), duration_s=600)
    await site.vtn.wait_for_response(eid, timeout_s=4.0)
    await site.book.override_opt(eid, Opt.OUT, actor="operator", reason="chiller fault")
    assert _active(site.book) is None
    assert await site.ven.send_opt(eid, Opt.OUT, "chiller fault", 0) is True
    (opt,) = site.vtn.opts
    assert (opt["opt_type"], opt["opt_reason"], str(opt["event_id"])) == ("optOut", "overrideStatus", eid)
    (sent,) = site.rows("opt.sent_to_vtn", eid)
    assert sent["data"]["via"] == "EiOpt" and sent["data"]["reason"] == "chiller fault"
    # The VTN re-sends the event (another event makes it distribute again): the answer is now optOut.
    other = site.vtn.add_event(VEN, signal="SIMPLE", value=1, start=_soon(30), duration_s=600)
    await site.vtn.wait_for_response(other, timeout_s=4.0)
    assert site.codes(eid)[-1] == (0, 200, "optOut")


async def test_opt_change_falls_back_to_created_event_without_eiopt(db: AuditLog) -> None:
    """2.0b rule 42: the distribution's requestID is used in "any and all subsequent EiCreatedEvent
    messages that may be sent to change the opt status of the VEN."
    """
    s = await _site(db, vtn=SimVtn(poll_interval_s=1.0, opt_service=False))
    try:
        eid = s.vtn.add_event(VEN, signal="SIMPLE", value=2, start=_soon(-1), duration_s=600)
        await s.vtn.wait_for_response(eid, timeout_s=4.0)
        await s.book.override_opt(eid, Opt.OUT, actor="operator", reason="maintenance")
        assert await s.ven.send_opt(eid, Opt.OUT, "maintenance", 0) is True
        assert s.codes(eid) == [(0, 200, "optIn"), (0, 200, "optOut")]
        first, second = [r["request_id"] for r in s.vtn.event_responses if r["event_id"] == eid]
        assert first == second
        assert s.rows("opt.sent_to_vtn", eid)[0]["data"]["via"] == "EiEvent"
    finally:
        await s.ven.stop()
        await s.vtn.stop()


async def test_distribution_from_another_vtn_is_refused(db: AuditLog) -> None:
    """2.0b rule 21: "If venID, vtnID, or EventID is included in payloads, the receiving entity must
    validate the ID values are as expected and generate an error if no ID is present or an unexpected
    value is received."
    """
    event = objects.Event(
        event_descriptor=objects.EventDescriptor(event_id="x1", modification_number=0,
                                                 market_context="oadr://m", event_status="far"),
        active_period=objects.ActivePeriod(dtstart=_soon(), duration=timedelta(minutes=10)),
        event_signals=[objects.EventSignal(intervals=[objects.Interval(dtstart=_soon(), duration=timedelta(
            minutes=10), signal_payload=1)], signal_name="SIMPLE", signal_type="level", signal_id="s")],
        targets=[objects.Target(ven_id=VEN)],
    )  # fmt: skip
    evil = create_message("oadrDistributeEvent", response=OK, request_id="d1", vtn_id="EvilVTN", events=[event])
    async with one_distribution(evil, VEN, "GoodVTN") as vtn:
        audit = RecordingAudit()
        book = EventBook(OpenAdrConfig(opt_policy="always"), EventStore(db.engine), audit)
        ven = Ven(OpenAdrConfig(vtn_url=vtn.url, ven_name=VEN), book.answer, audit, SystemClock())
        await ven.start()
        try:
            await until(lambda: vtn.answers, timeout_s=4.0)
            (answer,) = vtn.answers
            assert answer["response"]["response_code"] == 452 and not answer.get("event_responses")
            assert book.events() == []
            assert "EvilVTN" in audit.of_kind("event.distribution_refused")[0]["data"]["reason"]
        finally:
            await ven.stop()
