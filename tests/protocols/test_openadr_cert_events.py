"""Certification event cases (2.0b test tool, pull VEN: A_E1_*, E1_*) through openleadr's VTN (SimVtn)
and the real event book, wired the way the gateway wires them. Each test names the tool's cases."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.events import EventBook
from gateway.eventstore import EventStore
from protocols.openadr import SimVtn, Ven
from tests.doubles import RecordingAudit, until

VEN = "drgw-cert"
MARKET = "http://MarketContext1"  # the tool's DR_MarketContext_1_Name


@dataclass
class Site:
    """One VTN, VEN and event book."""

    vtn: SimVtn
    ven: Ven
    book: EventBook
    audit: RecordingAudit

    def codes(self, event_id: str) -> list[tuple[int, int, str]]:
        """Return (modification number, response code, opt) of every answer the VTN got for an event."""
        return [(int(r["modification_number"]), int(r["response_code"]), r["opt_type"])
                for r in self.vtn.event_responses if str(r["event_id"]) == event_id]  # fmt: skip

    def event(self, **kw: Any) -> str:
        """Queue an event for this VEN in the tool's market context, starting in 10 minutes."""
        args: dict[str, Any] = {"signal": "simple", "value": 1, "start": soon(), "duration_s": 600,
                                "market_context": MARKET, **kw}  # fmt: skip
        return self.vtn.add_event(VEN, **args)


def soon(minutes: float = 10) -> datetime:
    """Return a whole-second UTC time ``minutes`` from now."""
    return (datetime.now(UTC) + timedelta(minutes=minutes)).replace(microsecond=0)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = await AuditLog.open(str(tmp_path / "audit.db"))
    yield log
    await log.close()


async def start_site(db: AuditLog, sim_id: str = "TH_VTN", **cfg: Any) -> Site:
    """Start a VTN and a VEN wired to a fresh event book."""
    vtn = SimVtn(vtn_id=sim_id, poll_interval_s=1.0)
    url = await vtn.start()
    audit = RecordingAudit()
    config = OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05,
                           registration_retry_max_s=0.2, **{"opt_policy": "always",
                                                            "market_contexts": [MARKET], **cfg})  # fmt: skip
    store = EventStore(db.engine)
    book = EventBook(config, store, audit, rng=random.Random(1))
    ven = Ven(config, book.answer, audit, SystemClock(), on_cancel=book.cancel,
              on_distribution=book.on_distribution, state=store)  # fmt: skip
    await ven.start()
    await until(lambda: ven.registered)
    return Site(vtn, ven, book, audit)


@pytest.fixture
async def site(db: AuditLog) -> AsyncIterator[Site]:
    s = await start_site(db)
    yield s
    await s.ven.stop()
    await s.vtn.stop()


async def test_lower_case_simple_signal_is_simple(site: Site) -> None:
    """A_E1_* (the tool's events say signalName "simple", 2.0a's name, which the 2.0b schema allows)."""
    eid = site.event()
    await site.vtn.wait_for(lambda: site.codes(eid), timeout_s=5.0)
    assert site.codes(eid) == [(0, 200, "optIn")]
    ((ev, _),) = site.book.events()
    assert ev.signals[0].name.value == "SIMPLE"


async def test_non_matching_targets_get_462_for_the_target_not_the_signal(site: Site) -> None:
    """A_E1_0300: a "simple" event whose eiTarget names another venID and other resources: optOut, 462."""
    eid = site.event(targets=[{"ven_id": "NoMatchVenID"}, {"resource_id": "NoMatchResourceID"},
                              {"resource_id": "NoMatch_1_ResourceID"}])  # fmt: skip
    await site.vtn.wait_for(lambda: site.codes(eid), timeout_s=5.0)
    assert site.codes(eid) == [(0, 462, "optOut")]


async def test_non_matching_market_context_gets_453_for_the_market_not_the_signal(site: Site) -> None:
    """A_E1_0325: a "simple" event in a market context the VEN is not enrolled in: optOut, 453."""
    eid = site.event(market_context="http://nonMatchingContext")
    await site.vtn.wait_for(lambda: site.codes(eid), timeout_s=5.0)
    assert site.codes(eid) == [(0, 453, "optOut")]


LONG_VTN = "01234567890123456789012345678901234567890123456789"  # the tool's MaxLen_VTN_ID
LONG_MARKET = "http://A" + "".join(str(n % 10) for n in range(8, 100))  # MaxLen_MarketContext, 100 chars


async def test_configured_vtn_id_long_ids_and_market_context_are_accepted(db: AuditLog) -> None:
    """A_E1_0200 (limit values): the VEN is configured with the tool's 50-digit vtnID and 100-character
    market context; the VTN, registered as TH_VTN, distributes four events with 50-character eventIDs
    under the long vtnID: all four are opted in."""
    s = await start_site(db, sim_id="TH_VTN", vtn_id=LONG_VTN, market_contexts=[LONG_MARKET])
    try:
        for svc in s.vtn.server.services.values():
            svc.vtn_id = LONG_VTN  # from now on the VTN speaks as the long id
        ids = [f"{c}{'0123456789' * 5}"[:50] for c in "ABCD"]
        for eid in ids:
            s.event(event_id=eid, market_context=LONG_MARKET)
        await s.vtn.wait_for(lambda: all(s.codes(e) for e in ids), timeout_s=6.0)
        assert [s.codes(e)[-1] for e in ids] == [(0, 200, "optIn")] * 4
        assert {ev.vtn_id for ev, _ in s.book.events()} == {LONG_VTN}
    finally:
        await s.ven.stop()
        await s.vtn.stop()


def _negative_recovery(make: Any) -> Any:
    """Wrap a VTN service's message builder: a recovery of PT17M goes out as -PT1M."""

    def build(*args: Any, **kw: Any) -> str:
        return str(make(*args, **kw)).replace("<duration>PT17M</duration>", "<duration>-PT1M</duration>")

    return build


async def test_negative_recovery_is_no_recovery(site: Site) -> None:
    """A_E1_0060 (optional elements): the tool's event carries x-eiRecovery "-PT1M"; it is read as no
    recovery period and the event is opted in, not refused with 454."""
    for name in ("poll_service", "event_service"):  # a poll or an oadrRequestEvent may carry it
        svc = site.vtn.server.services[name]
        svc._create_message = _negative_recovery(svc._create_message)
    eid = site.event(ramp_up_s=60, recovery_s=17 * 60)
    await site.vtn.wait_for(lambda: site.codes(eid), timeout_s=5.0)
    assert site.codes(eid) == [(0, 200, "optIn")]
    ((ev, _),) = site.book.events()
    assert (ev.ramp_up_s, ev.recovery_s) == (60.0, 0.0)


async def test_an_event_carrying_a_baseline_is_taken_and_answered(db: AuditLog) -> None:
    """E1_1027: the event's eiEventSignals hold an eiEventBaseline beside its signal (the 2.0b schema
    allows one per event: the VTN's baseline for the event's period). openleadr's VTN cannot write
    one, so this VTN serves openleadr's own message with a baseline put in; the VEN reads the event,
    keeps its signal and answers it (optIn, 200)."""
    from openleadr import objects
    from openleadr.messaging import create_message, parse_message

    from tests.protocols.onedistribution import OK, one_distribution

    start = soon()
    event = objects.Event(
        event_descriptor=objects.EventDescriptor(event_id="with-baseline", modification_number=0,
                                                 market_context=MARKET, event_status="far"),
        active_period=objects.ActivePeriod(dtstart=start, duration=timedelta(hours=2)),
        event_signals=[objects.EventSignal(intervals=[objects.Interval(dtstart=start, duration=timedelta(
            hours=2), signal_payload=1)], signal_name="SIMPLE", signal_type="level", signal_id="s")],
        targets=[objects.Target(ven_id=VEN)],
    )  # fmt: skip
    plain = create_message("oadrDistributeEvent", response=OK, request_id="d1", vtn_id="TH_VTN", events=[event])
    closing = re.search(r"</(\w+):eiEventSignals>", plain)
    assert closing is not None
    ei, xcal, strm = closing.group(1), "xcal", "strm"
    baseline = (
        f'<{ei}:eiEventBaseline xmlns:{xcal}="urn:ietf:params:xml:ns:icalendar-2.0" '
        f'xmlns:{strm}="urn:ietf:params:xml:ns:icalendar-2.0:stream">'
        f"<{xcal}:dtstart><{xcal}:date-time>{(start - timedelta(days=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}"
        f"</{xcal}:date-time></{xcal}:dtstart><{xcal}:duration><{xcal}:duration>PT2H</{xcal}:duration>"
        f"</{xcal}:duration><{strm}:intervals><{ei}:interval><{xcal}:duration><{xcal}:duration>PT2H"
        f"</{xcal}:duration></{xcal}:duration><{xcal}:uid><{xcal}:text>0</{xcal}:text></{xcal}:uid>"
        f"<{ei}:signalPayload><{ei}:payloadFloat><{ei}:value>3.05</{ei}:value></{ei}:payloadFloat>"
        f"</{ei}:signalPayload></{ei}:interval></{strm}:intervals><{ei}:baselineID>b1</{ei}:baselineID>"
        f"<{ei}:baselineName>Price_Baseline</{ei}:baselineName></{ei}:eiEventBaseline>"
    )
    with_baseline = plain.replace(closing.group(0), baseline + closing.group(0))
    kind, parsed = parse_message(with_baseline)  # the 2.0b schema takes it
    assert kind == "oadrDistributeEvent" and parsed["events"][0]["event_descriptor"]["event_id"] == "with-baseline"
    async with one_distribution(with_baseline, VEN, "TH_VTN") as vtn:
        audit = RecordingAudit()
        book = EventBook(OpenAdrConfig(opt_policy="always", market_contexts=[MARKET]), EventStore(db.engine), audit)
        ven = Ven(OpenAdrConfig(vtn_url=vtn.url, ven_name=VEN), book.answer, audit, SystemClock())
        await ven.start()
        try:
            await until(lambda: vtn.answers, timeout_s=6.0)
            (response,) = vtn.answers[0]["event_responses"]
            answered = (response["event_id"], response["response_code"], response["opt_type"])
            assert answered == ("with-baseline", 200, "optIn")
            ((taken, opt),) = book.events()
            assert (taken.event_id, opt.value) == ("with-baseline", "optIn")
            assert [s.name.value for s in taken.signals] == ["SIMPLE"]
        finally:
            await ven.stop()
