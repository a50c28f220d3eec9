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
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import openleadr.messaging
import pytest
from aiohttp import web
from hypothesis import event, given
from lxml.etree import XMLSyntaxError

from gateway.audit.chain import encode_data
from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt
from protocols.openadr import MAX_XML_BYTES, Ven, XmlRejected, check_xml
from protocols.openadr.xmlguard import harden_openleadr_parser
from tests.protocols.openadr_fuzz_inputs import (
    BODIES,
    DSIG,
    FUZZ,
    GUARD_FUZZ,
    REFUSALS,
    REG,
    VEN,
    VTN_ID,
    check_event,
    dtd_seen_by_expat,
    seeds,
    signed_distribution,
    signed_objects,
)


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
        self.ven._reg.registration_id, self.ven._reg.held, self.ven._state = REG, "", "registered"
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
