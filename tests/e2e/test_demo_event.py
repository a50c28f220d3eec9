"""End to end on the simulated site: a real VTN's event reaches the battery and the GPUs, and back.

openleadr's own VTN on an ephemeral port, the battery behind a real pymodbus server, the
simulated GPUs, and the gateway between them; the audit log must verify afterwards.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path

from gateway.audit import event_rows
from gateway.audit.verify import verify
from gateway.demo import DemoSite, _result
from gateway.model import Opt
from tests.gwproc import until

SPEED = 240.0
# The tracking test checks the mean error against 2 %: at x240 a loaded CI machine's scheduling
# delays become minutes of simulated time between ticks, so it runs at half that speed.
TRACKING_SPEED = 120.0


async def _until_sim(site: DemoSite, t: datetime) -> None:
    """Wait until the demo's (scaled) clock reaches ``t``: the site's own time, not a real-time guess."""
    await until(lambda: site.clock.now() >= t, 120.0, f"{t} on the site's clock")


async def _sample_during(site: DemoSite, until_s: float) -> tuple[float, int]:
    """Return the highest battery setpoint and most capped GPUs seen for ``until_s`` simulated seconds."""
    assert site.fleet is not None
    best_setpoint, most_capped = 0.0, 0
    t0 = site.clock.monotonic()
    while site.clock.monotonic() - t0 < until_s:
        best_setpoint = max(best_setpoint, float(site.bsim.setpoint_w))
        gpus = await site.fleet.read()
        most_capped = max(most_capped, sum(1 for g in gpus if g.cap_w < g.default_cap_w))
        await asyncio.sleep(0.05)  # the sampling period over a stretch of simulated time, not a wait for a change
    return best_setpoint, most_capped


async def test_event_from_vtn_to_battery_and_gpus_and_release(tmp_path: Path) -> None:
    db = str(tmp_path / "audit.db")
    async with DemoSite(TRACKING_SPEED, db) as site:
        assert site.gateway is not None and site.fleet is not None
        event_id, start, end = site.issue_event(level=2, duration_min=10.0, lead_s=240.0)
        opt = await site.vtn.wait_for_response(event_id, timeout_s=20.0)
        assert opt is Opt.IN
        # Nothing moves before the event starts (2 s of real time ahead; on a machine so loaded that
        # the answer came later than that, there is no "before" left to look at).
        setpoint, still_before = site.bsim.setpoint_w, site.clock.now() < start
        assert setpoint == 0 or not still_before
        await _until_sim(site, start)
        best_setpoint, most_capped = await _sample_during(site, 240.0)
        assert best_setpoint > 1000.0, "the battery's setpoint register never moved"
        assert most_capped > 0, "no GPU cap changed"
        released = await site.run_until_released(end, None)
        assert released
        res = _result(event_id, db, site.gateway, released)
        # Facility power reaches the target: within 2 % once settled.
        assert res.limit_w < res.baseline_w * 0.85
        assert abs(res.mean_facility_w - res.limit_w) < 0.02 * res.limit_w
        assert res.battery_energy_wh > 0
        assert res.throughput_kept is not None and 0.5 < res.throughput_kept < 1.0
        # Released: battery back to 0 W in local mode, every GPU back to its default cap.
        await until(lambda: site.bsim.setpoint_w == 0 and site.bsim.control_mode == 0, 10.0, "battery released")
        fleet = site.fleet

        async def gpus_released() -> bool:
            return all(g.cap_w == g.default_cap_w for g in await fleet.read())

        await until(gpus_released, 10.0, "every GPU back to its default cap")
    result = await verify(db)
    assert result.ok, result.reason
    kinds = [r.kind for r in await event_rows(db, event_id)]
    for kind in (
        "event.received",
        "opt.decided",
        "opt.sent",
        "event.start",
        "command.battery",
        "command.gpus",
        "release.battery",
        "release.gpus",
        "event.end",
    ):
        assert kind in kinds, f"audit log lacks {kind}"
    assert kinds.index("event.received") < kinds.index("event.start") < kinds.index("release.battery")


async def test_battery_that_stops_answering_is_an_audited_fault_and_gpus_carry_on(tmp_path: Path) -> None:
    db = str(tmp_path / "audit.db")
    # Modbus timeouts are real seconds while the demo clock runs x240: keep them short here, but not
    # so short that a read on a loaded machine times out before the battery is taken off line (0.1 s
    # did once, under the parallel suite: the battery looked unreadable at the decision, an opt-out).
    async with DemoSite(SPEED, db, battery_timeout_s=0.5) as site:
        assert site.gateway is not None and site.fleet is not None
        event_id, start, end = site.issue_event(level=2, duration_min=20.0, lead_s=120.0)
        assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
        await _until_sim(site, start + timedelta(seconds=0.3 * SPEED))  # 72 s into the event: under way
        site.bsim.set_offline(True)
        _, capped_while_offline = await _sample_during(site, 600.0)
        site.bsim.set_offline(False)
        assert capped_while_offline > 0
        assert await site.run_until_released(end, None)
    rows = await event_rows(db, event_id)
    faults = [r for r in rows if r.kind == "fault.device" and r.device_id == "bess1"]
    assert faults, "the unanswered battery was not audited as a fault"
    assert any(r.kind == "command.gpus" for r in rows if r.seq > faults[0].seq)
    assert (await verify(db)).ok


async def test_event_the_site_cannot_deliver_is_opted_out_and_nothing_moves(tmp_path: Path) -> None:
    db = str(tmp_path / "audit.db")
    async with DemoSite(SPEED, db) as site:
        assert site.fleet is not None
        # Level 3 asks for 30 % of ~65 kW; battery plus tier-allowed GPU flexibility is ~19 kW.
        event_id, start, end = site.issue_event(level=3, duration_min=10.0, lead_s=60.0)
        assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.OUT
        await _until_sim(site, start)
        best_setpoint, most_capped = await _sample_during(site, 120.0)
        assert best_setpoint == 0 and most_capped == 0
    rows = await event_rows(db, event_id)
    decided = [r.data_obj() for r in rows if r.kind == "opt.decided"]
    assert decided and decided[0]["opt"] == "optOut" and "shortfall" in decided[0]["reason"]


async def test_flexibility_offered_by_the_bms_turns_a_shortfall_into_an_opt_in(tmp_path: Path) -> None:
    db = str(tmp_path / "audit.db")
    async with DemoSite(SPEED, db) as site:
        assert site.gateway is not None
        site.gateway.bms_flex_w = lambda: 15_000.0  # what the BMS face's writable register offers
        event_id, _start, _end = site.issue_event(level=3, duration_min=10.0, lead_s=120.0)
        assert await site.vtn.wait_for_response(event_id, timeout_s=20.0) is Opt.IN
    rows = await event_rows(db, event_id)
    decided = [r.data_obj() for r in rows if r.kind == "opt.decided"]
    assert decided and decided[0]["opt"] == "optIn" and "BMS offers 15000 W" in decided[0]["reason"]
