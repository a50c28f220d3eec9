"""Inputs for the OpenADR XML ingress fuzz (tests/protocols/test_openadr_fuzz.py): real VTN messages rendered by
openleadr's ``create_message`` (the seeds), the mutations applied to them, and the checks of what parses."""

from __future__ import annotations

import copy
import math
import os
import pyexpat
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from lxml import etree
from openleadr import objects
from openleadr.messaging import create_message

from gateway.model import DemandEvent, SignalName
from protocols.openadr import MAX_XML_BYTES
from protocols.openadr.reports import STATUS_ID
from tests.doubles import make_pki

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
