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
from protocols.openadr.testing import until
from protocols.openadr3 import SimVtn3
from protocols.openadr3.timing import format_datetime
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
    ven, gw, audit, _ = make_ven(config(sim.base_url, tmp_path))
    await ven.start()
    try:
        await until(lambda: gw.events)
        assert ven.registered and ven.state == "registered"
        assert [v["venName"] for v in sim.objects["VEN"].values()] == [VEN_NAME]
        assert [r["resourceName"] for r in sim.objects["RESOURCE"].values()] == ["facility"]
        got = gw.events[0]
        assert got.event_id == ev["id"] and got.market_context == "dr"
        assert got.signals[0].name is SignalName.SIMPLE and got.signals[0].intervals[0].value == 2
        await until(lambda: len(gw.listings) >= 3)
        assert len(gw.events) == 1  # the same version is acted on once
        assert audit.kinds("oadr3.exchange") and audit.kinds("ven.registered")
        # ETag: a quiet VTN answers 304 to the repeated listing.
        assert any(status == 304 for _, path, status in sim.requests if path.startswith("/events"))
    finally:
        await ven.stop()
