"""The VEN against openleadr's own VTN (SimVtn) in-process on 127.0.0.1, ephemeral ports, 1 s polls.

Hostile bodies are only ever handed to the guard: the tests that serve them also replace the
client's schema validator with a tripwire, so lxml never parses them in this process.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from logging import WARNING
from typing import Any

import openleadr.messaging
import pytest
from aiohttp import web
from openleadr.messaging import create_message
from openleadr.messaging import validate_xml_schema as real_schema_validation
from structlog.testing import capture_logs

from drgw_tools.ports import free_port
from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt, SignalName
from protocols.openadr import MAX_XML_BYTES, SimVtn, Ven, XmlRejected, check_xml
from tests.doubles import MemoryEvidence, MemoryState, until
from tests.doubles import RecordingAudit as FakeAudit

VEN = "drgw-test"


class Gateway:
    """The gateway side of the callbacks: records events, answers a fixed opt."""

    def __init__(self, answer: Opt = Opt.IN) -> None:
        self.answer = answer
        self.events: list[DemandEvent] = []
        self.cancelled: list[str] = []

    async def on_event(self, event: DemandEvent) -> Opt:
        """Record the event and answer."""
        self.events.append(event)
        return self.answer

    async def on_cancel(self, event_id: str, reason: str) -> None:
        """Record a cancellation."""
        self.cancelled.append(event_id)


def _config(url: str, **kw: Any) -> OpenAdrConfig:
    """Return a VEN config with fast retries."""
    return OpenAdrConfig(
        vtn_url=url,
        ven_name=VEN,
        registration_retry_initial_s=0.05,
        registration_retry_max_s=0.2,
        **kw,
    )


@pytest.fixture
async def vtn() -> AsyncIterator[tuple[SimVtn, str]]:
    """Run a SimVtn on an ephemeral port."""
    sim = SimVtn(poll_interval_s=1.0)
    url = await sim.start()
    yield sim, url
    await sim.stop()


MakeVen = Callable[..., Awaitable[tuple[Ven, Gateway, FakeAudit]]]


@pytest.fixture
async def make_ven() -> AsyncIterator[MakeVen]:
    """Start VENs against a URL; stop them all afterwards."""
    started: list[Ven] = []

    async def make(url: str, answer: Opt = Opt.IN) -> tuple[Ven, Gateway, FakeAudit]:
        gw, audit = Gateway(answer), FakeAudit()
        ven = Ven(_config(url), gw.on_event, audit, SystemClock(), on_cancel=gw.on_cancel)
        await ven.start()
        started.append(ven)
        return ven, gw, audit

    yield make
    for ven in started:
        await ven.stop()


def _soon(minutes: float = 10) -> datetime:
    """Return a whole-second UTC time ``minutes`` from now."""
    return (datetime.now(UTC) + timedelta(minutes=minutes)).replace(microsecond=0)


# -- registration and supervision ---------------------------------------------------------------


async def test_registers_and_polls(vtn: tuple[SimVtn, str], make_ven: MakeVen) -> None:
    sim, url = vtn
    ven, _, audit = await make_ven(url)
    await until(lambda: ven.registered and ven.last_poll_ok is not None)
    assert ven.ven_id == VEN and sim.registered == {VEN: VEN}
    (row,) = audit.of_kind("ven.registered")
    assert row["data"]["vtn_id"] == "DrgwVTN" and row["data"]["poll_s"] == 1.0
    assert ven.state == "registered"
    await ven.stop()
    assert ven.state == "stopped"


async def test_unreachable_vtn_is_retried_logged_once_then_registers(
    make_ven: MakeVen, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there yet
    url = f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b"
    with capture_logs() as logs:
        ven, _, audit = await make_ven(url)
        attempts = lambda: [  # noqa: E731
            r for r in audit.of_kind("xml.out") if r["data"]["message"] == "oadrQueryRegistration"
        ]
        await until(lambda: len(attempts()) >= 4)  # backoff 0.05, 0.1, 0.2, 0.2 ...
        assert not ven.registered and ven.state == "unreachable"
        assert [e["event"] for e in logs].count("vtn unreachable, retrying") == 1
        assert len(audit.of_kind("ven.link_lost")) == 1

        sim = SimVtn(poll_interval_s=1.0)
        assert await sim.start(port=port) == url
        try:
            await until(lambda: ven.state == "registered", timeout_s=3.0)
        finally:
            await sim.stop()
    # openleadr's own per-request error lines are kept out of the log.
    assert [r.getMessage() for r in caplog.records if r.name == "openleadr" and r.levelno >= WARNING] == []
    assert len(audit.of_kind("ven.registered")) == 1
    assert len(audit.of_kind("ven.link_lost")) == 1


async def test_lost_link_is_logged_once_and_restored(vtn: tuple[SimVtn, str], make_ven: MakeVen) -> None:
    sim, url = vtn
    port = int(url.split(":")[2].split("/")[0])
    ven, _, audit = await make_ven(url)
    await until(lambda: ven.registered)
    await sim.stop()
    await until(lambda: ven.state == "link_lost", timeout_s=3.0)
    assert ven.registered  # still registered: the VTN has not said otherwise
    await sim.start(port=port)
    await until(lambda: ven.state == "registered", timeout_s=3.0)
    counts = {k: len(audit.of_kind(k)) for k in ("ven.link_lost", "ven.link_restored", "ven.registered")}
    assert counts == {"ven.link_lost": 1, "ven.link_restored": 1, "ven.registered": 1}


async def test_vtn_that_forgot_the_ven_gets_a_new_registration(vtn: tuple[SimVtn, str], make_ven: MakeVen) -> None:
    sim, url = vtn
    port = int(url.split(":")[2].split("/")[0])
    ven, _, audit = await make_ven(url)
    await until(lambda: ven.registered)
    await sim.stop()
    fresh = SimVtn(poll_interval_s=1.0)  # a restarted VTN with no memory: it asks for re-registration
    await fresh.start(port=port)
    try:
        await fresh.wait_for_registration(VEN, timeout_s=4.0)
        await until(lambda: ven.registered and len(audit.of_kind("ven.registered")) == 2)
        assert [r["data"]["reason"] for r in audit.of_kind("ven.unregistered")] == ["VTN requested re-registration"]
    finally:
        await fresh.stop()


async def test_refused_registration_is_retried_and_reported_once(make_ven: MakeVen) -> None:
    refusal = create_message(
        "oadrCreatedPartyRegistration",
        response={"response_code": 200, "response_description": "OK", "request_id": "r"},
        vtn_id="PickyVTN",
        profiles=[{"profile_name": "2.0b", "transports": [{"transport_name": "simpleHttp"}]}],
    )

    async def picky(request: web.Request) -> web.Response:
        return web.Response(text=refusal, content_type="application/xml")

    runner, url = await _serve(picky)
    try:
        ven, _, audit = await make_ven(url)
        await until(lambda: sum(r["data"]["message"] == "oadrCreatePartyRegistration"
                                for r in audit.of_kind("xml.out")) >= 3)  # fmt: skip
        assert not ven.registered and ven.state == "refused"
        (row,) = audit.of_kind("ven.registration_refused")
        assert row["data"]["reason"] == "VTN returned no registrationID"
    finally:
        await runner.cleanup()


# -- events ---------------------------------------------------------------------------------------


async def test_simple_event_reaches_gateway_and_its_opt_reaches_vtn(vtn: tuple[SimVtn, str], make_ven: MakeVen) -> None:
    sim, url = vtn
    ven, gw, audit = await make_ven(url, answer=Opt.OUT)  # OUT: proves the gateway's answer is sent
    await until(lambda: ven.registered)
    start = _soon()
    eid = sim.add_event(VEN, signal="SIMPLE", value=2, start=start, duration_s=1800)
    assert await sim.wait_for_response(eid, timeout_s=4.0) is Opt.OUT
    (ev,) = gw.events
    assert (ev.event_id, ev.modification_number, ev.status, ev.vtn_id) == (eid, 0, "far", "DrgwVTN")
    assert (ev.start, ev.duration_s) == (start, 1800.0)
    (sig,) = ev.signals
    assert (sig.name, sig.signal_type, sig.intervals[0].value) == (SignalName.SIMPLE, "level", 2.0)
    (received,) = audit.of_kind("event.received")
    assert received["actor"] == "utility" and received["event_id"] == eid
    assert received["data"]["signals"][0]["intervals"][0][2] == 2.0
    (sent,) = audit.of_kind("opt.sent")
    assert sent["data"] == {"opt": "optOut", "code": 200, "modification_number": 0, "response_required": True}
    wire = {r["data"]["message"] for r in audit.rows if r["kind"] in ("xml.in", "xml.out")}
    assert {"oadrDistributeEvent", "oadrCreatedEvent"} <= wire
    assert all(len(r["data"]["sha256"]) == 64 and r["data"]["size"] > 0 for r in audit.of_kind("xml.in"))


async def test_load_dispatch_kw_becomes_watts_and_ramps_survive_the_wire(
    vtn: tuple[SimVtn, str], make_ven: MakeVen
) -> None:
    sim, _url = vtn
    start = _soon(30)
    shed = sim.add_event(VEN, signal="LOAD_DISPATCH", value=500, start=start, duration_s=3600,
                         ramp_up_s=900, recovery_s=600)  # fmt: skip
    cap = sim.add_event(VEN, signal="LOAD_DISPATCH", value=2.5, signal_type="setpoint", scale="M",
                        start=start, duration_s=600)  # fmt: skip
    _ven, gw, _ = await make_ven(_url)  # events queued first: delivered by the initial oadrRequestEvent
    await sim.wait_for_response(cap, timeout_s=4.0)
    by_id = {e.event_id: e for e in gw.events}
    d = by_id[shed]
    assert (d.signals[0].signal_type, d.signals[0].unit, d.signals[0].intervals[0].value) == (
        "delta",
        "W",
        500_000.0,
    )
    assert (d.ramp_up_s, d.recovery_s) == (900.0, 600.0)
    c = by_id[cap]
    assert (c.signals[0].signal_type, c.signals[0].intervals[0].value) == ("setpoint", 2_500_000.0)
    assert (c.ramp_up_s, c.recovery_s) == (0.0, 0.0)


async def test_resent_event_goes_to_the_gateway_again_and_gets_the_same_answer(
    vtn: tuple[SimVtn, str], make_ven: MakeVen
) -> None:
    sim, url = vtn
    first = sim.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600)
    ven, gw, _ = await make_ven(url, answer=Opt.OUT)
    await sim.wait_for_response(first, timeout_s=4.0)
    # A second event makes the VTN distribute both again; the first at the same modification number.
    second = sim.add_event(VEN, signal="SIMPLE", value=3, start=_soon(20), duration_s=600)
    await sim.wait_for_response(second, timeout_s=4.0)
    answers = [opt for eid, mod, opt in sim.responses if (eid, mod) == (first, 0)]
    assert len(answers) >= 2 and set(answers) == {Opt.OUT}  # re-sent, answered again the same way
    # openleadr would answer a re-sent version from its own cache; here the gateway (its store) answers.
    assert [e.event_id for e in gw.events].count(first) == len(answers)


async def test_cancellation_reaches_gateway_and_is_confirmed_with_opt_in(
    vtn: tuple[SimVtn, str], make_ven: MakeVen
) -> None:
    sim, url = vtn
    eid = sim.add_event(VEN, signal="SIMPLE", value=2, start=_soon(), duration_s=600)
    ven, gw, audit = await make_ven(url, answer=Opt.OUT)
    assert await sim.wait_for_response(eid, timeout_s=4.0, modification_number=0) is Opt.OUT
    sim.cancel_event(VEN, eid)
    assert await sim.wait_for_response(eid, timeout_s=4.0, modification_number=1) is Opt.IN
    assert [(e.modification_number, e.status) for e in gw.events] == [(0, "far"), (1, "cancelled")]
    assert gw.cancelled == []  # a readable cancellation travels as the event itself
    assert [r["data"]["opt"] for r in audit.of_kind("opt.sent")] == ["optOut", "optIn"]


async def test_unsupported_event_is_rejected_and_opted_out(vtn: tuple[SimVtn, str], make_ven: MakeVen) -> None:
    sim, url = vtn
    eid = sim.add_event(VEN, signal="LOAD_DISPATCH", value=1, signal_type="level", start=_soon(),
                        duration_s=600)  # fmt: skip
    _ven, gw, audit = await make_ven(url, answer=Opt.IN)
    assert await sim.wait_for_response(eid, timeout_s=4.0) is Opt.OUT
    assert gw.events == []
    (row,) = audit.of_kind("event.rejected")
    assert row["event_id"] == eid and "signalType 'level' is not 'delta' or 'setpoint'" in row["data"]["reason"]


# -- hostile XML ----------------------------------------------------------------------------------

DOCTYPE = (
    b'<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaa">]>'
    b'<oadr:oadrPayload xmlns:oadr="http://openadr.org/oadr-2.0b/2012/07">&a;</oadr:oadrPayload>'
)
ENTITY_ONLY = b'<?xml version="1.0"?><!ENTITY x SYSTEM "file:///etc/passwd"><a>&x;</a>'
OVERSIZED = b"<a>" + b"x" * (MAX_XML_BYTES + 10) + b"</a>"


@pytest.fixture
def lxml_tripwire(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replace the client's schema validation (lxml) with a recorder that refuses to parse."""
    seen: list[bytes] = []

    def tripwire(content: Any) -> None:
        seen.append(content)
        raise AssertionError("a body reached lxml")

    monkeypatch.setattr(openleadr.messaging, "validate_xml_schema", tripwire)
    return seen


async def _serve(handler: Callable[[web.Request], Awaitable[web.Response]]) -> tuple[web.AppRunner, str]:
    """Serve one catch-all handler on an ephemeral port; return the runner and the VTN URL."""
    app = web.Application()
    app.router.add_route("POST", "/OpenADR2/Simple/2.0b/{service}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/OpenADR2/Simple/2.0b"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (DOCTYPE, "markup declaration '<!DOCTYPE' is not allowed"),
        (ENTITY_ONLY, "markup declaration '<!ENTITY' is not allowed"),
        (OVERSIZED, "exceeds the 1048576-byte limit"),
    ],
    ids=["doctype", "entity", "oversized"],
)
async def test_hostile_registration_answer_is_rejected_before_parsing(
    body: bytes, reason: str, make_ven: MakeVen, lxml_tripwire: list[bytes]
) -> None:
    async def hostile(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/xml")

    runner, url = await _serve(hostile)
    try:
        ven, _, audit = await make_ven(url)
        await until(lambda: len(audit.of_kind("xml.rejected")) >= 2)  # rejected, retried, rejected
        row = audit.of_kind("xml.rejected")[0]
        assert reason in row["data"]["reason"] and row["actor"] == "utility"
        if body is not OVERSIZED:
            assert row["data"] == {
                **row["data"],
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        assert not ven.registered and ven.state == "unreachable" and audit.of_kind("xml.in") == []
        (lost,) = audit.of_kind("ven.link_lost")
        assert "xml rejected" in lost["data"]["reason"]
    finally:
        await runner.cleanup()
    assert lxml_tripwire == []


async def test_hostile_poll_answer_is_rejected_and_the_ven_keeps_going(
    make_ven: MakeVen, lxml_tripwire: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    registration = create_message(
        "oadrCreatedPartyRegistration",
        response={"response_code": 200, "response_description": "OK", "request_id": "r"},
        ven_id=VEN,
        registration_id="reg-1",
        vtn_id="HostileVTN",
        profiles=[{"profile_name": "2.0b", "transports": [{"transport_name": "simpleHttp"}]}],
        requested_oadr_poll_freq=timedelta(seconds=1),
    )

    async def mostly_hostile(request: web.Request) -> web.Response:
        if request.match_info["service"] == "EiRegisterParty":
            return web.Response(text=registration, content_type="application/xml")
        return web.Response(body=DOCTYPE, content_type="application/xml")

    # The benign registration answer must still be validated: let only that one through to lxml.
    real = real_schema_validation
    monkeypatch.setattr(
        openleadr.messaging,
        "validate_xml_schema",
        lambda content: real(content) if b"<!DOCTYPE" not in content else lxml_tripwire.append(content),
    )
    runner, url = await _serve(mostly_hostile)
    try:
        ven, _, audit = await make_ven(url)
        await until(lambda: len(audit.of_kind("xml.rejected")) >= 3, timeout_s=4.0)  # oadrRequestEvent, 2 polls
        # A refused body is audited on its own; the VTN answered, so the link is not "lost", but no
        # poll has succeeded (readiness sees a stale last_poll_ok).
        assert ven.registered and ven.state == "registered" and ven.last_poll_ok is None
        assert ven._task is not None and not ven._task.done()
    finally:
        await runner.cleanup()
    assert lxml_tripwire == []


def test_guard_accepts_real_messages_comments_and_cdata() -> None:
    msg = create_message("oadrPoll", ven_id="v1").encode()
    check_xml(msg)
    check_xml(b"<?xml version='1.0' encoding='UTF-8'?><!-- note --><a><![CDATA[<b>]]></a>")
    check_xml(b"\xef\xbb\xbf<a/>")  # UTF-8 byte order mark


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<!doctype a><a/>", "markup declaration '<!doctype'"),
        (b"<a/><!ATTLIST a b CDATA #IMPLIED>", "markup declaration '<!ATTLIST'"),
        ("<?xml version='1.0' encoding='UTF-16'?><a/>".encode("utf-16"), "NUL bytes"),
        (b"<?xml version='1.0' encoding='ISO-8859-1'?><a/>", "encoding 'ISO-8859-1'"),
        (b"<a>\xff\xfe</a>", "not UTF-8"),
        (b"<a>" + b"x" * 20 + b"</a>", "exceeds the 16-byte limit"),
    ],
)
def test_guard_rejects(body: bytes, reason: str) -> None:
    with pytest.raises(XmlRejected) as info:
        check_xml(body, max_bytes=16 if b"x" * 20 in body else MAX_XML_BYTES)
    assert reason in str(info.value)
    assert info.value.size == len(body) and info.value.sha256 == hashlib.sha256(body).hexdigest()


# -- identity, re-registration, poll interval, evidence --------------------------------------------


async def test_registration_and_ven_id_survive_a_restart(vtn: tuple[SimVtn, str]) -> None:
    """N1_0010/0015, A_E1_0020: a restart with a stored registration queries (oadrQueryRegistration),
    asks for the events (oadrRequestEvent) and polls with the registration it holds: no new one."""
    sim, url = vtn
    state = MemoryState()
    audits = []
    for _ in range(2):
        gw, audit = Gateway(), FakeAudit()
        ven = Ven(_config(url), gw.on_event, audit, SystemClock(), state=state)
        await ven.start()
        audits.append(audit)
        try:
            await until(lambda v=ven: v.state == "registered" and v.last_poll_ok is not None)
            assert ven.registration_id == state.values["openadr.registration_id"]
        finally:
            await ven.stop()
    (first,) = sim.registrations
    assert first.get("registration_id") is None  # a fresh VEN asks for a registration
    sent = [r["data"]["message"] for r in audits[1].of_kind("xml.out")]
    assert sent[:2] == ["oadrQueryRegistration", "oadrRequestEvent"] and "oadrCreatePartyRegistration" not in sent
    assert state.values["openadr.ven_id"] == VEN and state.values["openadr.vtn_id"] == "DrgwVTN"


async def test_vtn_requested_reregistration(vtn: tuple[SimVtn, str], make_ven: MakeVen) -> None:
    sim, url = vtn
    ven, _, audit = await make_ven(url)
    await until(lambda: ven.state == "registered")
    sim.request_reregistration(VEN)
    await until(lambda: len(audit.of_kind("ven.registered")) == 2, timeout_s=4.0)
    assert [r["data"]["reason"] for r in audit.of_kind("ven.unregistered")] == ["VTN requested re-registration"]
    assert len(sim.registrations) == 2


async def test_poll_interval_never_below_the_configured_floor(vtn: tuple[SimVtn, str]) -> None:
    """2.0b rule 55: "HTTP PULL VEN's MUST NOT poll the VTN on average greater than some well defined and
    deterministic frequency. THE VEN SHOULD support the ability for the maximum polling frequency to be
    configured."
    """
    _, url = vtn
    gw, audit = Gateway(), FakeAudit()
    ven = Ven(_config(url, poll_interval_s=5.0, min_poll_interval_s=2.0), gw.on_event, audit, SystemClock())
    await ven.start()
    try:
        await until(lambda: ven.state == "registered")
        assert ven.poll_interval_s == 2.0  # the VTN asked for 1 s
        assert audit.of_kind("ven.registered")[0]["data"]["poll_s"] == 2.0
    finally:
        await ven.stop()


async def test_every_message_in_and_out_is_kept_as_evidence(vtn: tuple[SimVtn, str]) -> None:
    sim, url = vtn
    gw, audit, evidence = Gateway(), FakeAudit(), MemoryEvidence()
    ven = Ven(_config(url), gw.on_event, audit, SystemClock(), evidence=evidence)
    await ven.start()
    try:
        eid = sim.add_event(VEN, signal="SIMPLE", value=1, start=_soon(), duration_s=600)
        await sim.wait_for_response(eid, timeout_s=4.0)
        await until(lambda: audit.of_kind("xml.poll"))
    finally:
        await ven.stop()
    digests = [r["data"] for r in audit.rows if r["kind"] in ("xml.in", "xml.out")]
    digests += [r["data"][side] for r in audit.of_kind("xml.poll") for side in ("out", "in")]
    kinds = {d["message"] for d in digests}
    assert {"oadrQueryRegistration", "oadrCreatePartyRegistration", "oadrPoll", "oadrResponse",
            "oadrDistributeEvent", "oadrCreatedEvent"} <= kinds  # fmt: skip
    for d in digests:
        body = evidence.blobs[d["sha256"]]
        assert len(body) == d["size"] and hashlib.sha256(body).hexdigest() == d["sha256"]
