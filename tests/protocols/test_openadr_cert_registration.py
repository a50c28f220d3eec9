"""Certification registration cases (2.0b test tool, pull VEN: N1_*) through openleadr's VTN (SimVtn):
cancellation by either side and the hold after it, the operator's register/query/cancel, and the venID
that is ours. Each test names the tool's cases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt
from protocols.openadr import SimVtn, Ven
from tests.doubles import MemoryState, RecordingAudit, until

VEN = "drgw-cert"


async def _opt_in(event: DemandEvent) -> Opt:
    return Opt.IN


def config(url: str, **kw: Any) -> OpenAdrConfig:
    """Return a VEN config with fast retries."""
    return OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05,
                         registration_retry_max_s=0.2, **kw)  # fmt: skip


def wire(audit: RecordingAudit) -> list[str]:
    """Return every message the VEN sent, polls answered empty included, in order."""
    return [r["data"]["out"]["message"] if r["kind"] == "xml.poll" else r["data"]["message"]
            for r in audit.rows if r["kind"] in ("xml.out", "xml.poll")]  # fmt: skip


@pytest.fixture
async def vtn() -> AsyncIterator[tuple[SimVtn, str]]:
    """Run a SimVtn on an ephemeral port."""
    sim = SimVtn(vtn_id="TH_VTN", poll_interval_s=1.0)
    url = await sim.start()
    yield sim, url
    await sim.stop()


async def start_ven(url: str, state: MemoryState | None = None, **kw: Any) -> tuple[Ven, RecordingAudit]:
    """Start a registered VEN."""
    audit = RecordingAudit()
    ven = Ven(config(url, **kw), _opt_in, audit, SystemClock(), state=state or MemoryState())
    await ven.start()
    await until(lambda: ven.state == "registered" and ven.last_poll_ok is not None)
    return ven, audit


async def test_vtn_cancel_is_answered_and_holds_the_ven(vtn: tuple[SimVtn, str]) -> None:
    """N1_0040, N1_0070, N1_0080: a cancel naming another registrationID is answered 452 and changes
    nothing; ours is answered 200, and then the VEN sends nothing more (no re-registration, no poll)
    until the operator registers it again (it stays held across a restart)."""
    sim, url = vtn
    state = MemoryState()
    ven, audit = await start_ven(url, state)
    try:
        sim.cancel_registration(VEN, registration_id="INVALID_REGISTRATION_ID")
        await sim.wait_for(lambda: len(sim.canceled) == 1, timeout_s=4.0)
        assert sim.canceled[0]["response"]["response_code"] == 452 and ven.registered
        sim.cancel_registration(VEN)
        sim.cancel_registration(VEN)  # the tool queues a third: a held VEN never polls for it
        await sim.wait_for(lambda: len(sim.canceled) == 2, timeout_s=4.0)
        assert sim.canceled[1]["response"]["response_code"] == 200
        await until(lambda: ven.state == "cancelled")
        mark = len(wire(audit))
        with pytest.raises(TimeoutError):
            await until(lambda: len(wire(audit)) > mark, timeout_s=2.5)  # 2 poll periods: silence
        assert not ven.registered and len(sim.registrations) == 1
        assert state.values["openadr.held"] == "cancelled by the VTN"
        (row,) = audit.of_kind("ven.registration_cancelled")
        assert row["actor"] == "utility"
    finally:
        await ven.stop()
    again = Ven(config(url), _opt_in, RecordingAudit(), SystemClock(), state=state)
    await again.start()
    try:
        assert again.state in ("starting", "cancelled")
        result = await again.register_again("test operator")
        assert result["ok"] and again.registered and len(sim.registrations) == 2
        assert sim.registrations[1].get("registration_id") is None  # the cancelled one is not re-used
        await until(lambda: again.last_poll_ok is not None)
        assert state.values["openadr.held"] == ""
    finally:
        await again.stop()


async def test_operator_cancels_then_registers(vtn: tuple[SimVtn, str]) -> None:
    """N1_0030 (the VEN cancels its registration), then N1_0020 (a new registration on the operator's
    word); both audited as the operator's."""
    sim, url = vtn
    ven, audit = await start_ven(url)
    try:
        result = await ven.cancel_registration("127.0.0.1 as token ops")
        assert result == {"ok": True, "state": "cancelled"} and not ven.registered
        (cancel,) = sim.ven_cancels
        assert cancel["ven_id"] == VEN and cancel["registration_id"]
        assert audit.of_kind("ven.registration_cancelled")[0]["actor"] == "operator"
        assert (await ven.cancel_registration("ops"))["error"] == "not registered"
        assert (await ven.register_again("ops"))["ok"]
        await until(lambda: ven.state == "registered" and len(sim.registrations) == 2)
        assert [r["data"]["peer"] for r in audit.of_kind("operator.cancel_registration")][0].endswith("token ops")
    finally:
        await ven.stop()


async def test_a_held_ven_sends_only_the_query_the_operator_asks_for(vtn: tuple[SimVtn, str]) -> None:
    """N1_0010 as the tool runs it after N1_0030 (the VEN cancelled its registration and is held; the
    tool's VTN knows no registration): the operator's query sends one oadrQueryRegistration and
    nothing after it (no registration, no report offer, no poll), and the VEN stays held. A restart
    with a stored registration queries first too, but then offers its reports and polls under a
    registration the tool no longer knows, which fails the case."""
    sim, url = vtn
    ven, audit = await start_ven(url)
    try:
        assert (await ven.cancel_registration("ops"))["ok"]
        mark = len(wire(audit))
        answer = await ven.query_registration("ops")
        assert answer["ok"] and answer["vtn_id"] == "TH_VTN"
        with pytest.raises(TimeoutError):
            await until(lambda: len(wire(audit)) > mark + 1, timeout_s=2.5)  # 2 poll periods: nothing more
        assert wire(audit)[mark:] == ["oadrQueryRegistration"]
        assert not ven.registered and len(sim.registrations) == 1
    finally:
        await ven.stop()


async def test_operator_query_and_reregistration_while_registered(vtn: tuple[SimVtn, str]) -> None:
    """N1_0015 (query while registered: one oadrQueryRegistration, polling goes on), N1_0065
    (re-registration: our registrationID) and N1_0060 (a new registration while registered)."""
    sim, url = vtn
    ven, audit = await start_ven(url)
    try:
        first = ven.registration_id
        answer = await ven.query_registration("ops")
        assert answer["ok"] and answer["vtn_id"] == "TH_VTN" and answer["poll_s"] == 1.0
        assert ven.registered and len(sim.registrations) == 1
        assert (await ven.register_again("ops"))["ok"]
        assert sim.registrations[1]["registration_id"] == first
        assert (await ven.register_again("ops", fresh=True))["ok"]
        assert sim.registrations[2].get("registration_id") is None and ven.registered
    finally:
        await ven.stop()


async def test_a_registration_answer_with_another_ven_id_is_refused(vtn: tuple[SimVtn, str]) -> None:
    """The tool's placeholder venID (VEN_123) in an answer is never adopted: the VEN keeps its venID,
    refuses the registration and audits why."""
    sim, url = vtn
    sim.server.services["registration_service"].on_create_party_registration = lambda payload: ("VEN_123", "r1")
    audit = RecordingAudit()
    ven = Ven(config(url, ven_id=VEN), _opt_in, audit, SystemClock())
    await ven.start()
    try:
        await until(lambda: audit.of_kind("ven.ven_id_refused"))
        assert ven.ven_id == VEN and not ven.registered and ven.state == "refused"
        assert audit.of_kind("ven.ven_id_refused")[0]["data"] == {"ours": VEN, "theirs": "VEN_123"}
    finally:
        await ven.stop()


async def test_a_fresh_registration_adopts_the_new_ven_id_the_vtn_grants(vtn: tuple[SimVtn, str]) -> None:
    """N1_0060: a new registration the operator asks for (drgw openadr register --fresh) may get a new
    venID and registrationID; the VEN takes both and polls with them (only unsolicited changes are refused)."""
    sim, url = vtn
    ven, audit = await start_ven(url)
    first = ven.ven_id
    service = sim.server.services["registration_service"]
    grant = service.on_create_party_registration

    async def new_id(payload: dict[str, Any]) -> Any:
        return await grant({**payload, "ven_id": "VEN_NEW"})

    service.on_create_party_registration = new_id
    try:
        assert (await ven.register_again("ops", fresh=True))["ok"]
        assert ven.ven_id == "VEN_NEW" != first and ven.registered
        assert not audit.of_kind("ven.ven_id_refused")
        mark = len(audit.rows)
        await until(lambda: any(r["kind"] == "xml.poll" for r in audit.rows[mark:]))
        assert ven.state == "registered" and ven.ven_id == "VEN_NEW"
    finally:
        await ven.stop()


async def test_reregister_after_cancel_when_configured(vtn: tuple[SimVtn, str]) -> None:
    """openadr.reregister_after_cancel_s: a site that must not stay off the program registers again on
    its own, that long after the VTN cancelled."""
    sim, url = vtn
    ven, audit = await start_ven(url, reregister_after_cancel_s=0.5)
    try:
        sim.cancel_registration(VEN)
        await until(lambda: audit.of_kind("ven.registration_cancelled"), timeout_s=4.0)
        await until(lambda: ven.state == "registered" and len(sim.registrations) == 2, timeout_s=4.0)
        assert audit.of_kind("ven.hold_ended")
    finally:
        await ven.stop()


async def test_a_restart_while_the_vtn_is_down_resumes_with_a_query_once_it_is_back(vtn: tuple[SimVtn, str]) -> None:
    """N1_0010/0015 after an outage: the stored registration is resumed (queries only) once the VTN
    answers, however many attempts the outage took."""
    sim, url = vtn
    port = int(url.split(":")[2].split("/")[0])
    state = MemoryState()
    ven, _ = await start_ven(url, state)
    await ven.stop()
    await sim.stop()
    audit = RecordingAudit()
    again = Ven(config(url), _opt_in, audit, SystemClock(), state=state)
    await again.start()
    try:
        await until(lambda: len(audit.of_kind("xml.out")) >= 2)  # two queries into the void
        await sim.start(port=port)
        await until(lambda: again.state == "registered" and again.last_poll_ok is not None, timeout_s=5.0)
        sent = {r["data"]["message"] for r in audit.of_kind("xml.out")}
        assert "oadrCreatePartyRegistration" not in sent and len(sim.registrations) == 1
    finally:
        await again.stop()
