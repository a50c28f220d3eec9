"""OpenADR 2.0b reports against openleadr's VTN: fixed ids, telemetry, status, history, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt, TelemetrySample
from protocols.openadr import DEVICE_USAGE_ID, HISTORY_ID, STATUS_ID, USAGE_ID, SimVtn, Ven
from tests.doubles import RecordingAudit, until

VEN = "drgw-reports"


class Site:
    """Telemetry and history providers whose calls are counted."""

    def __init__(self) -> None:
        self.calls = 0
        self.windows: list[tuple[datetime, datetime]] = []
        self.history_delay_s = 0.0

    def telemetry(self) -> TelemetrySample:
        """Return the latest sample (cheap, as the control loop's cached one)."""
        self.calls += 1
        return TelemetrySample(
            t=datetime.now(UTC), facility_w=120_000.0, facility_energy_wh=5e6, battery_w=8_000.0, gpu_w=64_000.0,
            online=True, manual_override=False, limit_w=100_000.0, shed_pct=16.7,
        )  # fmt: skip

    async def history(self, start: datetime, end: datetime) -> Sequence[TelemetrySample]:
        """Return one sample every 10 s over the window: 100 kW rising by 1 kW per minute."""
        self.windows.append((start, end))
        await asyncio.sleep(self.history_delay_s)  # a slow measurement store: the behaviour under test
        n = int((end - start).total_seconds() // 10)
        return [
            TelemetrySample(t=start + timedelta(seconds=10 * i), facility_w=100_000.0 + 1_000.0 * (i // 6))
            for i in range(n)
        ]


@pytest.fixture
async def vtn() -> AsyncIterator[tuple[SimVtn, str]]:
    sim = SimVtn(poll_interval_s=1.0)
    url = await sim.start()
    yield sim, url
    await sim.stop()


async def _polls(ven: Ven, n: int, timeout_s: float = 15.0) -> None:
    """Wait until the VEN has completed ``n`` more polls of the VTN (time seen by the link, not a fixed sleep)."""
    seen: set[datetime] = set()
    if ven.last_poll_ok is not None:
        seen.add(ven.last_poll_ok)

    def polled() -> bool:
        if ven.last_poll_ok is not None:
            seen.add(ven.last_poll_ok)
        return len(seen) > n

    await until(polled, timeout_s)


async def _ven(url: str, site: Site, audit: RecordingAudit | None = None) -> Ven:
    async def on_event(ev: DemandEvent) -> Opt:
        return Opt.IN

    cfg = OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05)
    ven = Ven(cfg, on_event, audit or RecordingAudit(), SystemClock(), telemetry=site.telemetry, history=site.history)
    await ven.start()
    return ven


def payloads(interval: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the oadrReportPayloads of one interval as openleadr's VTN parsed them (one or a list)."""
    raw = interval["report_payload"]
    return raw if isinstance(raw, list) else [raw]


def value_of(payload: dict[str, Any]) -> Any:
    """Return a payload's float value (openleadr unwraps it only when alone) or resource status."""
    if "payload_resource_status" in payload:
        return payload["payload_resource_status"]
    if "value" in payload:
        return payload["value"]
    return float(payload["payload_float"]["value"])


def _values(reports: list[dict[str, Any]], r_id: str) -> list[Any]:
    """Return the payload values (or statuses) of every interval for one rID."""
    return [value_of(p) for rep in reports for iv in rep.get("intervals") or [] for p in payloads(iv)
            if p["r_id"] == r_id]  # fmt: skip


async def test_reports_are_offered_under_fixed_ids_across_restarts(vtn: tuple[SimVtn, str]) -> None:
    sim, url = vtn
    for n in (1, 2):  # a restart offers the same reportSpecifierIDs and rIDs
        ven = await _ven(url, Site())
        try:
            await sim.wait_for(lambda n=n: len(sim.offered_reports) >= n, 4.0)
        finally:
            await ven.stop()
    offers = [
        {r["report_specifier_id"]: (r["report_name"], [d["r_id"] for d in r["report_descriptions"]])
         for r in payload["reports"]}
        for payload in sim.offered_reports[:2]
    ]  # fmt: skip
    assert offers[0] == offers[1]
    assert offers[0] == {
        USAGE_ID: ("METADATA_TELEMETRY_USAGE", ["facility-power", "facility-energy"]),
        DEVICE_USAGE_ID: ("METADATA_TELEMETRY_USAGE", ["battery-power", "gpu-power"]),
        STATUS_ID: ("METADATA_TELEMETRY_STATUS", ["facility-status"]),
        HISTORY_ID: ("METADATA_HISTORY_USAGE", ["facility-power-history", "facility-energy-history"]),
    }


async def test_telemetry_usage_requested_at_registration(vtn: tuple[SimVtn, str]) -> None:
    sim, url = vtn
    rid = sim.ask_reports_on_registration(USAGE_ID, ["facility-power", "facility-energy"], 1, 2)
    devices = sim.ask_reports_on_registration(DEVICE_USAGE_ID, ["battery-power", "gpu-power"], 1, 2)
    site = Site()
    ven = await _ven(url, site)
    try:
        await sim.wait_for(lambda: {r["report_request_id"] for r in sim.reports} >= {rid, devices}, 6.0)
    finally:
        await ven.stop()
    for request_id, specifier_id in ((rid, USAGE_ID), (devices, DEVICE_USAGE_ID)):
        first = next(r for r in sim.reports if r["report_request_id"] == request_id)
        assert (first["report_specifier_id"], first["report_name"]) == (specifier_id, "TELEMETRY_USAGE")
        assert len(first["intervals"]) == 2  # 2 samples (granularity 1 s, report back 2 s), each with both rIDs
        assert all(len(payloads(iv)) == 2 for iv in first["intervals"])
    assert set(_values(sim.reports, "facility-power")) == {120_000.0}
    assert set(_values(sim.reports, "battery-power")) == {8_000.0}
    assert set(_values(sim.reports, "gpu-power")) == {64_000.0}


async def test_one_shot_status_report(vtn: tuple[SimVtn, str]) -> None:
    sim, url = vtn
    audit = RecordingAudit()
    ven = await _ven(url, Site(), audit)
    try:
        await until(lambda: ven.registered)
        rid = sim.request_report(VEN, STATUS_ID, ["facility-status"], granularity_s=0, report_back_s=0)
        await sim.wait_for(lambda: sim.reports, 4.0)
        await _polls(ven, 2)  # a one-shot report is sent once: none more while the VEN polls on
    finally:
        await ven.stop()
    (report,) = sim.reports
    assert (report["report_request_id"], report["report_name"]) == (rid, "TELEMETRY_STATUS")
    (status,) = _values(sim.reports, "facility-status")
    assert status == {
        "online": True,
        "manual_override": False,
        "load_control_state": {"percent_offset": {"current": -16.7, "normal": 0}, "set_point": {"current": 100_000.0}},
    }
    (requested,) = audit.of_kind("report.requested")
    assert requested["data"]["report_request_id"] == rid and requested["actor"] == "utility"


async def test_history_usage_over_the_requested_window(vtn: tuple[SimVtn, str]) -> None:
    sim, url = vtn
    site = Site()
    ven = await _ven(url, site)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    try:
        await until(lambda: ven.registered)
        sim.request_report(VEN, HISTORY_ID, ["facility-power-history", "facility-energy-history"],
                           granularity_s=60, report_back_s=0, interval=(start, 180))  # fmt: skip
        await sim.wait_for(lambda: sim.reports, 4.0)
    finally:
        await ven.stop()
    assert site.windows == [(start, start + timedelta(minutes=3))]
    (report,) = sim.reports
    assert report["report_name"] == "HISTORY_USAGE" and report["dtstart"] == start
    assert _values(sim.reports, "facility-power-history") == [100_000.0, 101_000.0, 102_000.0]
    assert _values(sim.reports, "facility-energy-history") == pytest.approx([100_000 / 60, 101_000 / 60, 102_000 / 60])


async def test_cancelled_report_stops(vtn: tuple[SimVtn, str]) -> None:
    sim, url = vtn
    audit = RecordingAudit()
    ven = await _ven(url, Site(), audit)
    try:
        await until(lambda: ven.registered)
        rid = sim.request_report(VEN, USAGE_ID, ["facility-power"], granularity_s=1, report_back_s=1)
        await sim.wait_for(lambda: len(sim.reports) >= 2, 5.0)
        sim.cancel_report(VEN, rid)
        await until(lambda: audit.of_kind("report.cancelled"), 4.0)
        count = len(sim.reports)
        # Three more polls (1 s apart) span two report periods: enough for a report the cancel missed to show.
        await _polls(ven, 3)
        assert len(sim.reports) <= count + 1  # at most one already on its way
    finally:
        await ven.stop()
    assert audit.of_kind("report.cancelled")[0]["data"] == {"report_request_id": rid, "known": True,
                                                            "report_to_follow": False}  # fmt: skip


async def test_unknown_report_is_refused_and_a_slow_history_does_not_block_events(
    vtn: tuple[SimVtn, str],
) -> None:
    sim, url = vtn
    site = Site()
    site.history_delay_s = 20.0  # a measurement store that hangs
    audit = RecordingAudit()
    ven = await _ven(url, site, audit)
    try:
        await until(lambda: ven.registered)
        sim.request_report(VEN, "no-such-report", ["x"], granularity_s=0, report_back_s=0)
        sim.request_report(VEN, HISTORY_ID, ["facility-power-history"], granularity_s=60, report_back_s=0,
                           interval=(datetime.now(UTC) - timedelta(minutes=5), 60))  # fmt: skip
        await until(lambda: site.windows, 4.0)
        eid = sim.add_event(VEN, signal="SIMPLE", value=1, start=datetime.now(UTC) + timedelta(minutes=5),
                            duration_s=600)  # fmt: skip
        assert await sim.wait_for_response(eid, timeout_s=4.0) is Opt.IN  # polling went on
    finally:
        await ven.stop()
    (refused,) = audit.of_kind("report.refused")
    assert "no-such-report" in refused["data"]["reason"]
