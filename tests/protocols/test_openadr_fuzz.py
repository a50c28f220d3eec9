"""A time-boxed fuzz (hypothesis) of the OpenADR XML ingress: the guard, the client's request path, the VEN.

Bodies are random bytes, or real VTN messages rendered by openleadr's own ``create_message`` and
then mutated: elements dropped, duplicated, re-namespaced or nested deep; text replaced by huge
numbers, bad dates and bad durations; the bytes truncated, given DTDs, entities and external
entities, broken UTF-8, NUL bytes or another encoding. Each body is served by a loopback VTN as
the answer to a real poll of a real VEN (``OadrClient`` through ``xmlguard``), and what parses is
dispatched the way the VEN's poll loop does. Properties:

- the guard raises nothing but ``XmlRejected``, and what it passes carries no DTD (an independent
  parser, expat, looks for one before lxml may see the body: lxml segfaults on DTD entities);
- the request path raises nothing: it returns a message, or refuses the body once, saying why;
- a refused body changes nothing: no event, cancellation or opt reaches the gateway, no message
  is sent to the VTN, the VEN's registration is untouched, and the refusal is audited;
- dispatching what parsed raises nothing, never hangs, and hands the gateway only events it can
  act on (aware times, finite values, ends that exist); every audit row encodes as the real
  audit log would store it.

Time-boxed for CI: moderate ``max_examples``, no example database, a per-example deadline.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import os
import pyexpat
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import openleadr.messaging
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lxml import etree
from lxml.etree import XMLSyntaxError
from openleadr import objects
from openleadr.messaging import create_message

from gateway.audit.chain import encode_data
from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt, SignalName
from protocols.openadr import MAX_XML_BYTES, Ven, XmlRejected, check_xml
from protocols.openadr.reports import STATUS_ID
from protocols.openadr.testing import make_pki
from protocols.openadr.xmlguard import harden_openleadr_parser

VEN, VTN_ID, REG = "fuzz-ven", "FuzzVTN", "reg-fuzz"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
OADR_NS = "http://openadr.org/oadr-2.0b/2012/07"
DSIG = b"http://www.w3.org/2000/09/xmldsig#"
REFUSALS = frozenset({"rejected", "schema", "signature", "parse"})
EXAMPLES = int(os.environ.get("DRGW_FUZZ_EXAMPLES", "150"))  # raise it to fuzz longer by hand
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])  # fmt: skip
GUARD_FUZZ = settings(FUZZ, max_examples=EXAMPLES * 3)

# -- seeds: real VTN-to-VEN messages from openleadr's own templates ------------------------------


def _event(event_id: str, signal: objects.EventSignal, status: str = "far", **period: Any) -> dict[str, Any]:
    """Return one oadrEvent (as openleadr's templates take it); the active period spans the intervals."""
    duration = sum((iv.duration for iv in signal.intervals), timedelta(0))
    oadr_event = objects.Event(
        event_descriptor=objects.EventDescriptor(
            event_id=event_id,
            modification_number=1,
            market_context="oadr://fuzz",
            event_status=status,
            created_date_time=T0 - timedelta(hours=1),
            priority=1,
            vtn_comment="fuzz",
        ),
        active_period=objects.ActivePeriod(dtstart=T0, duration=duration, **period),
        event_signals=[signal],
        targets=[objects.Target(ven_id=VEN)],
    )
    oadr_event.event_descriptor.event_status = status  # openleadr derives it from the times; keep ours
    return asdict(oadr_event)


def _signal(name: str, signal_type: str, values: list[float], **kw: Any) -> objects.EventSignal:
    """Return one eiEventSignal with 15-minute intervals."""
    intervals = [
        objects.Interval(dtstart=T0 + timedelta(minutes=15 * i), duration=timedelta(minutes=15), signal_payload=v)
        for i, v in enumerate(values)
    ]
    return objects.EventSignal(intervals=intervals, signal_name=name, signal_type=signal_type, signal_id=name, **kw)


@cache
def seeds() -> dict[str, bytes]:
    """Render one of each message a VTN sends a VEN, with openleadr's create_message."""
    power = objects.Measurement(
        name="powerReal",
        description="RealPower",
        unit="W",
        scale="k",
        power_attributes=objects.PowerAttributes(hertz=60, voltage=480, ac=True),
    )
    price = objects.Measurement(name="currencyPerKWh", description="currencyPerKWh", unit="USD", scale="none")
    ok = {"response_code": 200, "response_description": "OK", "request_id": "req-1"}
    events = [
        _event("ev-simple", _signal("SIMPLE", "level", [1, 2])),
        _event("ev-dispatch", _signal("LOAD_DISPATCH", "delta", [250.0, 750.0], measurement=power),
               ramp_up_period=timedelta(minutes=2), recovery_period=timedelta(minutes=3),
               tolerance={"startafter": timedelta(seconds=90)}),
        _event("ev-capacity", _signal("LOAD_CONTROL", "x-loadControlCapacity", [0.5])),
        _event("ev-price", _signal("ELECTRICITY_PRICE", "price", [0.4], measurement=price)),
        _event("ev-gone", _signal("SIMPLE", "level", [1]), status="cancelled"),
    ]  # fmt: skip
    request = objects.ReportRequest(
        report_request_id="rr-1",
        report_specifier=objects.ReportSpecifier(
            report_specifier_id=STATUS_ID,
            granularity=timedelta(seconds=10),
            report_back_duration=timedelta(seconds=10),
            report_interval=objects.Interval(dtstart=T0, duration=timedelta(hours=1), signal_payload=0),
            specifier_payloads=[objects.SpecifierPayload(r_id="status", reading_type="Direct Read")],
        ),
    )
    messages = {
        "distribute": create_message("oadrDistributeEvent", request_id="req-1", vtn_id=VTN_ID, events=events,
                                     response=ok),
        "response": create_message("oadrResponse", response=ok, ven_id=VEN),
        "create-report": create_message("oadrCreateReport", request_id="req-2", ven_id=VEN,
                                        report_requests=[asdict(request)]),
        "cancel-report": create_message("oadrCancelReport", request_id="req-3", ven_id=VEN,
                                        report_request_id="rr-1", report_to_follow=False),
        "reregister": create_message("oadrRequestReregistration", ven_id=VEN),
        "cancel-registration": create_message("oadrCancelPartyRegistration", request_id="req-4",
                                              registration_id=REG, ven_id=VEN),
        "created-registration": create_message(
            "oadrCreatedPartyRegistration", response=ok, ven_id=VEN, registration_id=REG, vtn_id=VTN_ID,
            profiles=[{"profile_name": "2.0b", "transports": [{"transport_name": "simpleHttp"}]}],
            requested_oadr_poll_freq=timedelta(seconds=10)),
    }  # fmt: skip
    out = {name: text.encode("utf-8") for name, text in messages.items()}
    out["signed-distribute"] = signed_distribution()
    return out


@cache
def _vtn_key() -> tuple[bytes, bytes]:
    """Return a throwaway VTN certificate and key (PEM)."""
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        return pki.server_cert.read_bytes(), pki.server_key.read_bytes()


def signed_distribution() -> bytes:
    """Return an oadrDistributeEvent signed now (openleadr refuses signatures older than 5 s, or replayed)."""
    cert, key = _vtn_key()
    signed = _event("ev-signed", _signal("SIMPLE", "level", [1]))
    ok = {"response_code": 200, "response_description": "OK", "request_id": "req-5"}
    text = create_message("oadrDistributeEvent", cert=cert, key=key, request_id="req-5", vtn_id=VTN_ID,
                          events=[signed], response=ok)  # fmt: skip
    return text.encode("utf-8")


def signed_objects(body: bytes) -> list[bytes]:
    """Return the canonical form (C14N, as signed) of every oadrSignedObject in a body lxml may parse."""
    root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True))
    return [etree.tostring(e, method="c14n") for e in root.iter(f"{{{OADR_NS}}}oadrSignedObject")]


# -- mutations -------------------------------------------------------------------------------------

TEXTS = [
    # numbers: huge, tiny, not finite, not numbers
    "1e400", "-1e400", "9" * 400, "18446744073709551617", "-1", "-0", "NaN", "INF", "-INF", "0x10", "1,5", "",
    # date-times: impossible, extreme, naive, odd offsets
    "2026-13-45T99:99:99Z", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
    "99999-01-01T00:00:00Z", "2030-01-01T00:00:00", "2030-01-01T00:00:00+25:00", "2030-01-01T00:00:00.9999999999Z",
    # durations: huge, negative, empty, calendar units
    "P99999999999D", "P999999999Y", "PT99999999999999999999S", "-PT1H", "PT-1S", "P", "PT", "P1Y2M", "PT0S",
    "P0D", "PT1.5S", "P1W",
    # text: markup-looking, control and odd characters, long
    "<", "&amp;&lt;", "]]>", "\u202e\u0301", "x" * 10_000, "optIn", "cancelled", "true", "SIMPLE",
]  # fmt: skip
DTDS = [
    b'<!DOCTYPE a [<!ENTITY e "x">]>',
    b'<!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>',
    b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
    b'<!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd">',
    b'<!DOCTYPE r [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>',
    b"<!ENTITY x 'y'>",
    b"<!ELEMENT a ANY>",
    b"<!ATTLIST a b CDATA #IMPLIED>",
    b"<!doctype a>",
    b"<! DOCTYPE a>",
]
# Values of the right lexical type for their element (so the schema passes them) but extreme.
TYPED = {
    "date-time": ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
                  "2030-01-01T12:00:00+14:00", "2030-01-01T12:00:00", "1970-01-01T00:00:00Z"],
    "createdDateTime": ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2030-01-01T12:00:00"],
    "duration": ["P99999999D", "P999999999Y", "PT99999999999S", "P9999Y", "PT0S", "P0D", "PT1S", "P1Y2M3DT4H"],
    "startafter": ["P99999999D", "P999999999Y", "PT0S"],
    "value": ["1e38", "-1e38", "3.4e38", "1e-45", "INF", "-INF", "NaN", "0", "-1", "3", "4", "1.5", "-0"],
    "modificationNumber": ["-1", "0", "99999999999999999999", "2147483648"],
    "priority": ["-1", "0", "99999999999999999999"],
    "eventStatus": ["cancelled", "active", "completed", "none", "near"],
    "eventID": ["", "42", "ev-simple", "x" * 300],
    "signalName": ["SIMPLE", "LOAD_DISPATCH", "ELECTRICITY_PRICE", "BID_LOAD"],
    "signalType": ["level", "delta", "setpoint", "price", "priceRelative", "x-loadControlCapacity"],
    "siScaleCode": ["p", "G", "T", "none", "micro"],
    "itemUnits": ["W", "kW", "GW", "VA"],
    "testEvent": ["true", "false", "1"],
    "oadrResponseRequired": ["never", "always"],
    "vtnID": ["FuzzVTN", "OtherVTN", ""],
    "reportRequestID": ["rr-1", "0", ""],
    "granularity": ["PT0S", "P99999999D", "PT1S"],
    "reportBackDuration": ["PT0S", "P99999999D"],
}  # fmt: skip
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xbc"]  # incl. a surrogate, overlong "<"
WRONG_NS = ["urn:wrong", "http://openadr.org/oadr-2.0a/2012/07", "http://openadr.org/oadr-2.0b/2012/07", ""]


def _tree_ops(draw: st.DrawFn, root: Any) -> None:
    """Apply one to three structural mutations to ``root`` in place (the seed is trusted and DTD-free)."""
    for _ in range(draw(st.integers(1, 3))):
        nodes = list(root.iter())
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        parent = node.getparent()
        op = draw(st.sampled_from(["typed"] * 4 + ["text", "drop", "duplicate", "namespace", "nest", "attribute"]))
        if op == "typed":
            typed = [n for n in nodes if etree.QName(n).localname in TYPED and len(n) == 0]
            if typed:
                leaf = typed[draw(st.integers(0, len(typed) - 1))]
                leaf.text = draw(st.sampled_from(TYPED[etree.QName(leaf).localname]))
        elif op == "text" or parent is None:
            leaves = [n for n in nodes if len(n) == 0]
            leaf = leaves[draw(st.integers(0, len(leaves) - 1))]
            leaf.text = draw(st.sampled_from(TEXTS) | st.text(XML_CHARS, max_size=40))
        elif op == "drop":
            parent.remove(node)
        elif op == "duplicate":
            for _ in range(draw(st.integers(1, 20))):
                node.addnext(copy.deepcopy(node))
        elif op == "namespace":
            local = etree.QName(node).localname
            ns = draw(st.sampled_from(WRONG_NS))
            node.tag = f"{{{ns}}}{local}" if ns else local
        elif op == "nest":  # wrap the node in copies of its own tag, built as a chain and moved once
            top = inner = etree.Element(node.tag)
            for _ in range(draw(st.sampled_from([2, 50, 300, 3000])) - 1):
                inner = etree.SubElement(inner, node.tag)
            node.addprevious(top)
            inner.append(node)
        else:
            node.set(draw(st.sampled_from(["Id", "schemaVersion", "{urn:x}y"])), draw(st.sampled_from(TEXTS[:12])))


XML_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xD7FF)  # what lxml lets into element text


def _byte_ops(draw: st.DrawFn, body: bytes) -> bytes:
    """Apply zero to two byte-level mutations: truncation, DTDs, broken UTF-8, NUL, other encodings, size."""
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        at = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["truncate", "dtd", "dtd-inside", "utf8", "nul", "encoding", "utf16", "huge"]))
        if op == "truncate":
            body = body[:at]
        elif op == "dtd":
            decl, rest = (body.split(b"?>", 1) + [b""])[:2] if body.startswith(b"<?xml") else (b"", body)
            body = (decl + b"?>" if decl else b"") + draw(st.sampled_from(DTDS)) + rest
        elif op == "dtd-inside":
            body = body[:at] + draw(st.sampled_from(DTDS)) + body[at:]
        elif op == "utf8":
            body = body[:at] + draw(st.sampled_from(BAD_UTF8)) + body[at:]
        elif op == "nul":
            body = body[:at] + b"\x00" + body[at:]
        elif op == "encoding":
            enc = draw(st.sampled_from([b"UTF-16", b"ISO-8859-1", b"UTF-7", b"ebcdic-cp-us", b"utf_8", b"UTF8"]))
            body = b'<?xml version="1.0" encoding="' + enc + b'"?>' + body.split(b"?>", 1)[-1]
        elif op == "utf16":
            body = body.decode("utf-8", "replace").encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])))
        else:
            body = body + b" " * (MAX_XML_BYTES + 1 - len(body))
    return body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """Draw a real VTN message, mutated in structure and then in bytes."""
    names = sorted(seeds())
    body = seeds()[draw(st.sampled_from(["distribute"] * len(names) + names))]  # events: half the draws
    if draw(st.integers(0, 3)) > 0:
        root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True))
        _tree_ops(draw, root)
        body = etree.tostring(root, xml_declaration=draw(st.booleans()), encoding="UTF-8")
    return _byte_ops(draw, body)


BODIES = st.one_of(st.binary(max_size=2048), mutated(), mutated())

# -- oracles ---------------------------------------------------------------------------------------


def dtd_seen_by_expat(body: bytes) -> str | None:
    """Return what DTD markup expat (not libxml2) finds in ``body``, or None; malformed XML counts as none."""
    found: list[str] = []
    parser = pyexpat.ParserCreate()
    parser.StartDoctypeDeclHandler = lambda *a: found.append("DOCTYPE")
    parser.EntityDeclHandler = lambda *a: found.append("ENTITY")
    parser.ElementDeclHandler = lambda *a: found.append("ELEMENT")
    parser.AttlistDeclHandler = lambda *a: found.append("ATTLIST")
    parser.SetParamEntityParsing(pyexpat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(body, True)
    except (pyexpat.ExpatError, ValueError):
        pass
    return found[0] if found else None


def check_event(ev: DemandEvent) -> None:
    """Fail unless ``ev`` is something the gateway can act on safely."""
    assert ev.start.tzinfo is not None and math.isfinite(ev.duration_s) and ev.duration_s > 0, ev
    ev.start - timedelta(seconds=ev.ramp_up_s)  # every time the gateway derives must exist (no OverflowError)
    ev.end + timedelta(seconds=ev.start_after_s + ev.recovery_s)
    for s in (ev.ramp_up_s, ev.recovery_s, ev.start_after_s):
        assert math.isfinite(s) and s >= 0, ev
    assert ev.signals, ev
    for signal in ev.signals:
        assert signal.intervals, ev
        for iv in signal.intervals:
            assert iv.start.tzinfo is not None and math.isfinite(iv.value) and iv.duration_s > 0, ev
            iv.end  # noqa: B018
        if signal.name is SignalName.SIMPLE:
            assert all(iv.value in (0, 1, 2, 3) for iv in signal.intervals), ev


# -- the rig: a loopback VTN and a VEN that is registered but not polling on its own -------------


@dataclass
class Rig:
    """The VTN's side (the body it answers polls with, the services it saw) and the VEN's records."""

    ven: Ven
    body: bytes = b""
    requests: list[str] = field(default_factory=list)
    answers: list[bytes] = field(default_factory=list)
    rows: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    unencodable: list[str] = field(default_factory=list)
    events: list[DemandEvent] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    distributions: list[str] = field(default_factory=list)
    lxml_saw_dtd: list[str] = field(default_factory=list)
    unsound: list[str] = field(default_factory=list)

    def reset(self, body: bytes) -> None:
        """Forget the last example and put the VEN back in its registered state."""
        self.body = body
        for records in (self.requests, self.answers, self.rows, self.unencodable, self.events, self.cancelled,
                        self.distributions, self.unsound):  # fmt: skip
            records.clear()
        client = self.ven._client
        client.registration_id, client.ven_id, client.last_failure = REG, VEN, None
        self.ven._registration_id, self.ven._state = REG, "registered"
        self.ven._events.vtn_id = VTN_ID
        self.ven._events._request_ids.clear()

    def state(self) -> tuple[Any, ...]:
        """Return what a refused message must leave unchanged."""
        ven = self.ven
        return (ven.state, ven.registration_id, ven.ven_id, ven.vtn_id, dict(ven._events._request_ids),
                ven._reports.running(), ven.poll_interval_s)  # fmt: skip


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    """Serve fuzzed poll answers on 127.0.0.1 to a VEN wired to recording callbacks."""
    holder: list[Rig] = []

    async def handle(request: web.Request) -> web.Response:
        rig = holder[0]
        service = request.match_info["service"]
        rig.requests.append(service)
        rig.answers.append(await request.read())
        if service == "OadrPoll":
            return web.Response(body=rig.body, content_type="application/xml")
        return web.Response(body=seeds()["response"], content_type="application/xml")

    app = web.Application()
    app.router.add_route("POST", "/OpenADR2/Simple/2.0b/{service}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/OpenADR2/Simple/2.0b"

    async def audit(kind: str, data: Any, *, actor: str = "gateway", event_id: str | None = None,
                    device_id: str | None = None) -> int:  # fmt: skip
        rig = holder[0]
        try:
            encode_data(data)  # what the real audit log stores; an AuditError would lose the row
        except Exception as err:
            rig.unencodable.append(f"{kind}: {err}")
        rig.rows.append((kind, dict(data), actor))
        return len(rig.rows)

    async def on_event(ev: DemandEvent) -> Opt:
        try:  # the VEN catches what the gateway raises (and opts out): keep the finding instead
            check_event(ev)
        except Exception as err:
            holder[0].unsound.append(f"{ev.event_id}: {type(err).__name__}: {err}")
        holder[0].events.append(ev)
        return Opt.IN

    async def on_cancel(event_id: str, reason: str) -> None:
        holder[0].cancelled.append(event_id)

    async def on_distribution(vtn_id: str, listed: frozenset[str]) -> None:
        holder[0].distributions.append(vtn_id)

    cfg = OpenAdrConfig(vtn_url=url, ven_name=VEN, ven_id=VEN, request_timeout_s=5.0, price_levels={"1": 0.3})
    audit_sink = type("Audit", (), {"append": staticmethod(audit)})()
    ven = Ven(cfg, on_event, audit_sink, SystemClock(), on_cancel=on_cancel, on_distribution=on_distribution)
    holder.append(Rig(ven))
    harden_openleadr_parser()
    real_validate = openleadr.messaging.validate_xml_schema

    def validate(content: bytes) -> Any:
        """Let lxml see a body only if expat finds no DTD in it (lxml segfaults on DTD entities)."""
        found = dtd_seen_by_expat(content)
        if found is not None:
            holder[0].lxml_saw_dtd.append(found)
            raise XMLSyntaxError(f"test tripwire: {found} reached lxml", 0, 0, 0)
        return real_validate(content)

    monkeypatch.setattr(openleadr.messaging, "validate_xml_schema", validate)
    try:
        yield holder[0]
    finally:
        await ven.stop()
        await runner.cleanup()


# -- properties ------------------------------------------------------------------------------------


@GUARD_FUZZ
@given(body=BODIES)
def test_the_guard_raises_only_xml_rejected_and_passes_no_dtd(body: bytes) -> None:
    """check_xml returns or raises XmlRejected (with size and digest); what it passes has no DTD."""
    try:
        check_xml(body)
    except XmlRejected as err:
        assert err.reason and err.size == len(body)
        assert err.sha256 == hashlib.sha256(body).hexdigest()
        return
    assert len(body) <= MAX_XML_BYTES
    body.decode("utf-8-sig")
    assert dtd_seen_by_expat(body) is None


@FUZZ
@given(body=BODIES)
async def test_the_ingress_refuses_cleanly_or_acts_only_on_sound_events(rig: Rig, body: bytes) -> None:
    """A poll answered with ``body``: refused once with a reason and nothing changed, or dispatched safely."""
    rig.reset(body)
    before = rig.state()
    client, ven = rig.ven._client, rig.ven
    poll = client._create_message("oadrPoll", ven_id=VEN)
    async with asyncio.timeout(30):  # never hangs (the client's own timeout is 5 s)
        rtype, payload = await client._perform_request("OadrPoll", poll)
        if rtype is None:
            assert rig.requests == ["OadrPoll"]  # nothing was sent in answer
            assert (rig.events, rig.cancelled, rig.distributions) == ([], [], [])
            assert rig.state() == before
            kinds = [kind for kind, _, _ in rig.rows]
            failure = client.last_failure
            event(f"refused: {failure.kind}" if failure else "empty")
            if body == b"":  # an empty answer is "no message": recorded as received, nothing else
                assert failure is None and kinds == ["xml.out", "xml.in"], kinds
            else:
                assert failure is not None and failure.kind in REFUSALS and failure.reason, failure
                # the guard refuses before anything is kept as received; schema and parser after (a
                # body that merely looks like an oadrResponse is kept as a quiet poll's answer first)
                assert kinds in (["xml.out", "xml.rejected"], ["xml.out", "xml.in", "xml.rejected"],
                                 ["xml.poll", "xml.rejected"]), kinds  # fmt: skip
                assert rig.rows[-1][1]["reason"] == failure.reason and rig.rows[-1][2] == "utility"
        else:
            assert isinstance(rtype, str) and isinstance(payload, dict)
            event(f"parsed: {rtype}")
            if DSIG in body:  # accepted as signed: it must carry exactly what the VTN signed
                signed = signed_objects(seeds()["signed-distribute"])
                assert signed_objects(body) == signed, "a changed signed message was accepted"
            await ven._dispatch(rtype, payload)
            await ven._reports.stop()
            if rtype == "oadrDistributeEvent":
                event(f"events acted on: {min(len(rig.events), 2)}+")
    assert rig.lxml_saw_dtd == [], "the guard let a DTD through to lxml"
    assert rig.unencodable == [], "the real audit log would have refused these rows"
    assert rig.unsound == [], "the gateway was handed events it cannot act on"


async def test_the_seeds_are_accepted_and_acted_on(rig: Rig) -> None:
    """Every unmutated seed parses, and the distribution reaches the gateway (the fuzz starts from sound input)."""
    for name, body in seeds().items():
        rig.reset(signed_distribution() if name == "signed-distribute" else body)
        rtype, payload = await rig.ven._client._perform_request("OadrPoll", rig.ven._client._create_message(
            "oadrPoll", ven_id=VEN))  # fmt: skip
        assert rtype is not None, (name, rig.ven._client.last_failure)
        await rig.ven._dispatch(rtype, payload)
        await rig.ven._reports.stop()
        if name == "distribute":
            got = {ev.event_id: ev.status for ev in rig.events}
            assert got == {"ev-simple": "far", "ev-dispatch": "far", "ev-capacity": "far", "ev-price": "far",
                           "ev-gone": "cancelled"}  # fmt: skip
            assert rig.requests == ["OadrPoll", "EiEvent"]  # one oadrCreatedEvent answers them all
        if name == "signed-distribute":
            assert [ev.event_id for ev in rig.events] == ["ev-signed"]
        assert rig.unencodable == [] and rig.unsound == []


async def test_an_interval_past_the_year_9999_is_refused_not_raised(rig: Rig) -> None:
    """Found by the fuzz: an interval starting 9999-12-31 made the conversion raise OverflowError, which
    left the whole distribution unanswered. Now that event alone is refused (454, optOut), audited with
    the reason, and the others in the distribution still reach the gateway."""
    first = b"<xcal:date-time>2030-01-01T12:00:00.000000Z</xcal:date-time>"  # ev-simple's first interval
    body = seeds()["distribute"].replace(first, b"<xcal:date-time>9999-12-31T23:59:59Z</xcal:date-time>", 1)
    rig.reset(body)
    rtype, payload = await rig.ven._client._perform_request("OadrPoll", rig.ven._client._create_message(
        "oadrPoll", ven_id=VEN))  # fmt: skip
    assert rtype == "oadrDistributeEvent"
    await rig.ven._dispatch(rtype, payload)
    assert sorted(ev.event_id for ev in rig.events) == ["ev-capacity", "ev-dispatch", "ev-gone", "ev-price"]
    (rejected,) = [data for kind, data, _ in rig.rows if kind == "event.rejected"]
    assert "signal SIMPLE interval 0 end is outside the representable years 1-9999" in rejected["reason"]
    assert rejected["code"] == 454
    answer = rig.answers[rig.requests.index("EiEvent")]
    assert re.search(rb"<ei:responseCode>454</ei:responseCode>.*?<ei:eventID>ev-simple</ei:eventID>.*?optOut",
                     answer, re.S)  # fmt: skip
    assert rig.unencodable == [] and rig.unsound == []
