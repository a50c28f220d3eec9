"""The 3.1 VEN against the simulated 3.1 VTN in-process on 127.0.0.1: registration, polling, tokens.

The simulator validates every request and response against the vendored 3.1.0 definition; each
test ends by asserting it saw no departure, so a VEN that drifts from the spec fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.model import SignalName
from protocols.openadr3 import SimVtn3
from protocols.openadr3.timing import format_datetime
from tests.doubles import until
from tests.protocols.oadr3_helpers import VEN_NAME, config, make_ven, simple_event


@pytest.fixture
async def sim() -> AsyncIterator[SimVtn3]:
    """Run a simulated VTN on an ephemeral port; fail the test on any departure it saw."""
    vtn = SimVtn3(allow_http_callbacks=True)
    await vtn.start()
    yield vtn
    await vtn.stop()
    assert vtn.all_violations() == []


def soon(minutes: float = 5) -> str:
    """Return an RFC 3339 time ``minutes`` from now."""
    return format_datetime(datetime.now(UTC) + timedelta(minutes=minutes))


async def test_registers_reads_programmes_and_polls_events(sim: SimVtn3, tmp_path: Path) -> None:
    program = await sim.add_program("dr")
    await sim.add_program("other")
    ev = await sim.add_event(simple_event(program["id"], soon()))
    ven, gw, audit, _ = make_ven(config(sim.base_url, tmp_path, programs=["dr", "absent"]))
    await ven.start()
    try:
        await until(lambda: gw.events)
        assert ven.registered and ven.state == "registered"
        [missing] = audit.of_kind("oadr3.programs_missing")  # once, not at every poll
        assert missing["data"]["programs"] == ["absent"]
        assert [v["venName"] for v in sim.objects["VEN"].values()] == [VEN_NAME]
        assert [r["resourceName"] for r in sim.objects["RESOURCE"].values()] == ["facility"]
        got = gw.events[0]
        assert got.event_id == ev["id"] and got.market_context == "dr"
        assert got.signals[0].name is SignalName.SIMPLE and got.signals[0].intervals[0].value == 2
        await until(lambda: len(gw.listings) >= 3)
        assert len(gw.events) == 1  # the same version is acted on once
        assert audit.of_kind("oadr3.exchange") and audit.of_kind("ven.registered")
        # ETag: a quiet VTN answers 304 to the repeated listing.
        assert any(status == 304 for _, path, status in sim.requests if path.startswith("/events"))
    finally:
        await ven.stop()


async def test_token_refreshed_before_expiry_and_after_a_401_mid_event(sim: SimVtn3, tmp_path: Path) -> None:
    """Definition, Security: "The VTN verifies the token and returns an Unauthorized response if invalid or
    expired"; the VEN trades its credentials for a new one and carries on."""
    program = await sim.add_program("dr")
    sim.token_ttl_s = 2.0  # refreshed a tenth of its life before expiry
    ev = await sim.add_event(simple_event(program["id"], soon()))
    ven, gw, audit, _ = make_ven(config(sim.base_url, tmp_path))
    await ven.start()
    try:
        await until(lambda: gw.events)
        await until(lambda: sim.tokens_issued >= 2, timeout_s=6.0)  # refreshed on time, before any 401
        assert not any(status == 401 for _, _, status in sim.requests)
        issued = sim.tokens_issued
        sim.expire_tokens()  # the VTN forgets every token mid-event
        await sim.update_event(ev["id"], {"priority": 1})
        await until(lambda: len(gw.events) == 2)
        assert sim.tokens_issued > issued and ven.state == "registered"
        assert any(status == 401 for _, _, status in sim.requests)
        assert not audit.of_kind("ven.link_lost")  # the 401 was absorbed by one refresh, inside the request
    finally:
        await ven.stop()


async def test_a_second_401_after_a_fresh_token_is_a_link_fault(sim: SimVtn3, tmp_path: Path) -> None:
    await sim.add_program("dr")
    ven, gw, audit, _ = make_ven(config(sim.base_url, tmp_path))
    await ven.start()
    try:
        await until(lambda: ven.state == "registered")
        sim.refuse_tokens = True
        await until(lambda: ven.state == "link_lost")
        [lost] = audit.of_kind("ven.link_lost")
        assert "refused a freshly issued token" in lost["data"]["reason"]
        sim.refuse_tokens = False
        await until(lambda: ven.state == "registered")
        assert audit.of_kind("ven.link_restored")
    finally:
        await ven.stop()


async def test_wrong_client_secret_is_refused_and_retried(sim: SimVtn3, tmp_path: Path) -> None:
    sim.clients = {"drgw-ven": "another-secret"}
    ven, _, audit, _ = make_ven(config(sim.base_url, tmp_path))
    await ven.start()
    try:
        await until(lambda: len(audit.of_kind("oadr3.exchange")) >= 2)
        await until(lambda: ven.state == "refused")
        assert not ven.registered
        # The secret never reaches the evidence: token exchanges are kept redacted.
        assert all(b"ven-secret" not in blob for blob in ven._wire._evidence.blobs.values())  # type: ignore[union-attr]
    finally:
        await ven.stop()


async def test_a_vtn_that_drops_keep_alive_connections_is_followed_without_a_gap(sim: SimVtn3, tmp_path: Path) -> None:
    """Field drift: a VTN closed HTTP/1.1 keep-alive connections after a couple of hundred requests
    without saying so; the next request on the pooled connection died. The VEN retries once on a new one."""
    program = await sim.add_program("dr")
    sim.drop_after_requests = 5
    cfg = config(sim.base_url, tmp_path).model_copy(update={"poll_interval_s": 0.05})
    ven, gw, audit, _ = make_ven(cfg)
    await ven.start()
    try:
        await until(lambda: sim.dropped >= 3, timeout_s=10.0)
        await sim.add_event(simple_event(program["id"], soon()))
        await until(lambda: gw.events)
        assert sim.dropped >= 3  # aiohttp repeats an idempotent GET once by itself; the VEN repeats the rest
        assert not audit.of_kind("ven.link_lost") and not audit.of_kind("ven.registration_refused")
    finally:
        await ven.stop()


async def test_implied_cancellation_when_a_poll_no_longer_lists_the_event(sim: SimVtn3, tmp_path: Path) -> None:
    program = await sim.add_program("dr")
    ev = await sim.add_event(simple_event(program["id"], soon()))
    ven, gw, _, _ = make_ven(config(sim.base_url, tmp_path))
    await ven.start()
    try:
        await until(lambda: gw.events)
        del sim.objects["EVENT"][ev["id"]]  # gone without a notification
        await until(lambda: bool(gw.listings) and ev["id"] not in gw.listings[-1])
    finally:
        await ven.stop()


async def test_restart_keeps_version_numbers(sim: SimVtn3, tmp_path: Path) -> None:
    program = await sim.add_program("dr")
    ev = await sim.add_event(simple_event(program["id"], soon()))
    cfg = config(sim.base_url, tmp_path)
    ven, gw, _, state = make_ven(cfg)
    await ven.start()
    await until(lambda: gw.events)
    await sim.update_event(ev["id"], {"priority": 2})
    await until(lambda: len(gw.events) == 2)
    await ven.stop()
    from gateway.clock import SystemClock
    from protocols.openadr3 import Ven3

    again = Ven3(cfg, gw.on_event, ven._audit_sink, SystemClock(), gw.on_cancel, state=state)
    await again.start()
    try:
        await until(lambda: len(gw.events) == 3)
        assert gw.versions(ev["id"]) == [0, 1, 1]  # the same version after a restart keeps its number
        assert len(sim.objects["VEN"]) == 1  # found, not created again
    finally:
        await again.stop()


async def test_versions_number_each_modification_and_an_older_one_is_stale(tmp_path: Path) -> None:
    """Deliveries are at least once and unordered: (id, modificationDateTime) is the version."""
    from protocols.openadr3.events import EventFollower
    from tests.doubles import MemoryState

    state = MemoryState()
    follower = EventFollower(config("http://x", tmp_path), None, None, None, None, None, None,  # type: ignore[arg-type]
                             None, state, "vtn")  # fmt: skip
    t10, t11, t09 = "2026-06-01T10:00:00.000Z", "2026-06-01T11:00:00Z", "2026-06-01T09:00:00Z"
    assert [await follower._version("e", t) for t in (t10, t11, t11, t09)] == [0, 1, 1, 0]
    again = EventFollower(config("http://x", tmp_path), None, None, None, None, None, None,  # type: ignore[arg-type]
                          None, state, "vtn")  # fmt: skip
    assert await again._version("e", t11) == 1 and await again._version("e", "2026-06-01T12:00:00Z") == 2
