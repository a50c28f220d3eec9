"""Certification cases on the wire between the VEN and openleadr's VTN (SimVtn): what is sent, in
which order and how often (2.0b test tool families A_E1, E1). Each test names the tool's case."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.clock import ManualClock, SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt
from protocols.openadr import SimVtn, Ven
from tests.doubles import RecordingAudit, until

VEN = "drgw-cert"


class Gateway:
    """Records events and answers optIn."""

    def __init__(self) -> None:
        self.events: list[DemandEvent] = []

    async def on_event(self, event: DemandEvent) -> Opt:
        """Record the event and opt in."""
        self.events.append(event)
        return Opt.IN


def config(url: str, **kw: Any) -> OpenAdrConfig:
    """Return a VEN config with fast retries."""
    return OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05,
                         registration_retry_max_s=0.2, **kw)  # fmt: skip


def sent(audit: RecordingAudit) -> list[str]:
    """Return the message types the VEN sent, in order."""
    return [r["data"]["message"] for r in audit.of_kind("xml.out")]


def soon(minutes: float = 10) -> datetime:
    """Return a whole-second UTC time ``minutes`` from now."""
    return (datetime.now(UTC) + timedelta(minutes=minutes)).replace(microsecond=0)


@pytest.fixture
async def vtn() -> AsyncIterator[tuple[SimVtn, str]]:
    """Run a SimVtn on an ephemeral port."""
    sim = SimVtn(poll_interval_s=1.0)
    url = await sim.start()
    yield sim, url
    await sim.stop()


@asynccontextmanager
async def link_lost(sim: SimVtn, url: str) -> AsyncIterator[tuple[Ven, RecordingAudit, int]]:
    """Yield a VEN that registered with ``sim`` and then lost it (the VTN stopped), the audit, the port."""
    port = int(url.split(":")[2].split("/")[0])
    audit = RecordingAudit()
    ven = Ven(config(url), Gateway().on_event, audit, SystemClock())
    await ven.start()
    try:
        await until(lambda: ven.state == "registered" and ven.last_poll_ok is not None)
        await sim.stop()
        await until(lambda: ven.state == "link_lost", timeout_s=4.0)
        yield ven, audit, port
    finally:
        await ven.stop()


async def two_more_polls(audit: RecordingAudit) -> None:
    """Wait until the VEN has polled twice more (time for anything it would send after a poll)."""
    polls = len(audit.of_kind("xml.poll"))
    await until(lambda: len(audit.of_kind("xml.poll")) >= polls + 2, timeout_s=6.0)


async def test_after_a_lost_link_the_polled_event_is_answered_once_and_no_request_follows(
    vtn: tuple[SimVtn, str],
) -> None:
    """E1_1020-1070, A_E1_*: the tool restarts its VTN between cases; the event the first poll after the
    outage brings asks for an answer (responseRequired=always) and gets it before anything else is sent.
    That distribution lists every event the VTN holds, so no oadrRequestEvent follows: it would bring
    the same list and a second oadrCreatedEvent (E1_1070 counts exactly one)."""
    sim, url = vtn
    async with link_lost(sim, url) as (_ven, audit, port):
        eid = sim.add_event(VEN, signal="SIMPLE", value=1, start=soon(), duration_s=600)
        mark = len(audit.of_kind("xml.out"))
        await sim.start(port=port)
        assert await sim.wait_for_response(eid, timeout_s=6.0) is Opt.IN
        await two_more_polls(audit)
        after = [m for m in sent(audit)[mark:] if m != "oadrPoll"]
        assert after == ["oadrCreatedEvent"], after


async def test_after_a_lost_link_an_empty_poll_is_followed_by_a_request_for_every_event(
    vtn: tuple[SimVtn, str],
) -> None:
    """What the VTN sent into the dead connection may be lost: when the first poll after an outage
    brings no distribution, the VEN asks for every event (oadrRequestEvent) once."""
    sim, url = vtn
    async with link_lost(sim, url) as (_ven, audit, port):
        mark = len(audit.of_kind("xml.out"))
        await sim.start(port=port)
        await until(lambda: "oadrRequestEvent" in sent(audit)[mark:], timeout_s=6.0)
        await two_more_polls(audit)
        assert [m for m in sent(audit)[mark:] if m != "oadrPoll"] == ["oadrRequestEvent"]


async def test_after_a_lost_link_a_distribution_refused_whole_is_not_followed_by_a_request() -> None:
    """E1_1080: the first poll after an outage brings a distribution whose vtnID differs in case; the VEN
    answers the whole payload 452 and then only polls: an oadrRequestEvent would make the tool count the
    event (responseRequired=always) as unanswered. The polled distribution lists every event anyway."""
    sim = SimVtn(vtn_id="Th_Vtn", poll_interval_s=1.0)
    url = await sim.start()
    port = int(url.split(":")[2].split("/")[0])
    audit = RecordingAudit()
    ven = Ven(config(url, vtn_id="TH_VTN"), Gateway().on_event, audit, SystemClock())
    await ven.start()
    try:
        await until(lambda: ven.state == "registered" and ven.last_poll_ok is not None)
        await sim.stop()
        await until(lambda: ven.state == "link_lost", timeout_s=4.0)
        sim.add_event(VEN, signal="SIMPLE", value=1, start=soon(), duration_s=600)
        mark = len(audit.of_kind("xml.out"))
        await sim.start(port=port)
        await until(lambda: "oadrCreatedEvent" in sent(audit)[mark:], timeout_s=6.0)
        assert audit.of_kind("event.distribution_refused")
        polls = len(audit.of_kind("xml.poll"))
        await until(lambda: len(audit.of_kind("xml.poll")) >= polls + 2, timeout_s=6.0)
        assert "oadrRequestEvent" not in sent(audit)[mark:]
    finally:
        await ven.stop()
        await sim.stop()


class StampedAudit(RecordingAudit):
    """Audit rows stamped with a clock's monotonic time (the ManualClock's virtual seconds)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock

    async def append(self, kind: str, data: Any, **kw: Any) -> int:
        """Record one row with the time it was written."""
        n = await super().append(kind, data, **kw)
        self.rows[-1]["t"] = self.clock.monotonic()
        return n


def poll_times(audit: RecordingAudit) -> list[float]:
    """Return when each oadrPoll was recorded."""
    return [r["t"] for r in audit.rows
            if r["kind"] == "xml.poll" or (r["kind"] == "xml.out" and r["data"]["message"] == "oadrPoll")]  # fmt: skip


async def test_a_non_empty_poll_answer_does_not_bring_the_next_poll_forward(vtn: tuple[SimVtn, str]) -> None:
    """Issue 15 item 9 (every case of the tool checks the poll rate): oadrPollFreq means at most one
    oadrPoll per period, and 2.0b has no way for a VTN to say it holds more, so four queued messages
    take four periods. The VEN runs on a virtual clock: its sleeps move time, so spacing is exact."""
    sim, url = vtn
    clock = ManualClock(datetime.now(UTC))
    audit = StampedAudit(clock)
    ven = Ven(config(url), Gateway().on_event, audit, clock)
    for n in range(4):
        sim.queue(VEN, "oadrDistributeEvent", {"events": [], "request_id": f"q{n}"})
    await ven.start()
    try:
        await until(lambda: len(poll_times(audit)) >= 7, timeout_s=10.0)
    finally:
        await ven.stop()
    times = poll_times(audit)
    assert all(b - a >= ven.poll_interval_s for a, b in zip(times, times[1:], strict=False)), times


async def test_events_are_requested_at_start_before_the_first_poll(vtn: tuple[SimVtn, str]) -> None:
    """A_E1_0020: the tool answers only an oadrRequestEvent (with no events) and expects no
    oadrCreatedEvent: the VEN asks for the events once registered, before its first oadrPoll."""
    _, url = vtn
    audit = RecordingAudit()
    ven = Ven(config(url), Gateway().on_event, audit, SystemClock())
    await ven.start()
    try:
        await until(lambda: ven.last_poll_ok is not None)
    finally:
        await ven.stop()
    wire = [r["data"]["out"]["message"] if r["kind"] == "xml.poll" else r["data"]["message"]
            for r in audit.rows if r["kind"] in ("xml.out", "xml.poll")]  # fmt: skip
    assert wire.index("oadrCreatePartyRegistration") < wire.index("oadrRequestEvent") < wire.index("oadrPoll")
    assert "oadrCreatedEvent" not in wire
