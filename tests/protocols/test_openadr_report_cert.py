"""The 2.0b certification tool's report cases (R1_*, G1_4015), driven through openleadr's VTN.

Each test is named after the case it stands for (docs/conformance.md); the tool's minutes become
seconds here, its checks the same: what the VEN sends, in what order, and how many.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from protocols.openadr import DEVICE_USAGE_ID, HISTORY_ID, STATUS_ID, USAGE_ID, SimVtn
from tests.doubles import MemoryEvidence, until
from tests.protocols.oadr_report_helpers import (
    VEN,
    ReportLog,
    create_report,
    request,
    sent_update_durations,
    start_ven,
)  # fmt: skip
from tests.protocols.test_openadr_reports import Site, payloads

DEVICE_POWER = ["battery-power", "gpu-power"]


def tool_view_of_usage(log: ReportLog) -> tuple[str, list[tuple[str, str]]]:
    """The certification tool's view of the VEN's TELEMETRY_USAGE offer (R1_3150, R1_3160): the first
    report of that name in the oadrRegisterReport, as (specifierID, [(rID, measurement name)...])."""
    (offer,) = log.of("oadrRegisterReport")
    first = next(r for r in offer["reports"] if r["report_name"] == "METADATA_TELEMETRY_USAGE")
    points = [(d["r_id"], d["measurement"]["name"]) for d in first["report_descriptions"]]
    return first["report_specifier_id"], points


def tool_accepts(points: list[tuple[str, str]]) -> set[str]:
    """The rIDs the tool accepts in the updates: the energyReal one and the *last* powerReal one."""
    last = {name: r_id for r_id, name in points}  # a later point of the same measurement wins
    return {r for r in (last.get("energyReal"), last.get("powerReal")) if r is not None}


@pytest.fixture
async def vtn() -> AsyncIterator[tuple[SimVtn, ReportLog, str]]:
    sim = SimVtn(poll_interval_s=1.0)
    log = ReportLog(sim)
    url = await sim.start()
    yield sim, log, url
    await sim.stop()


async def test_n1_register_report_reading_types_and_configured_resources(
    vtn: tuple[SimVtn, ReportLog, str],
) -> None:
    sim, log, url = vtn
    resources = {"facility": "site-7", "battery": "bess-1", "gpus": "hall-a"}
    ven, _ = await start_ven(url, report_resources=resources)
    try:
        await sim.wait_for(lambda: log.of("oadrRegisterReport"), 10.0)
    finally:
        await ven.stop()
    (offer,) = log.of("oadrRegisterReport")
    seen = {
        r["report_specifier_id"]: {
            (d["r_id"], d["reading_type"], d["report_type"], d["report_data_source"]["resource_id"])
            for d in r["report_descriptions"]
        }
        for r in offer["reports"]
    }
    names = {r["report_specifier_id"]: r["report_name"] for r in offer["reports"]}
    assert seen[STATUS_ID] == {("facility-status", "x-notApplicable", "x-resourceStatus", "site-7")}
    # Two TELEMETRY_USAGE reports: the site's (first), and the devices' power
    assert [names[USAGE_ID], names[DEVICE_USAGE_ID]] == ["METADATA_TELEMETRY_USAGE"] * 2
    assert [r["report_specifier_id"] for r in offer["reports"]].index(USAGE_ID) < [
        r["report_specifier_id"] for r in offer["reports"]
    ].index(DEVICE_USAGE_ID)
    assert seen[USAGE_ID] == {
        ("facility-power", "Direct Read", "usage", "site-7"), ("facility-energy", "Direct Read", "usage", "site-7"),
    }  # fmt: skip
    assert seen[DEVICE_USAGE_ID] == {
        ("battery-power", "Direct Read", "usage", "bess-1"), ("gpu-power", "Direct Read", "usage", "hall-a"),
    }  # fmt: skip
    assert {d[1] for d in seen[HISTORY_ID]} == {"Direct Read"}
    assert offer.get("report_request_id") is None  # not answering a METADATA request


async def test_r1_3010_one_shot_created_before_update_valid_duration(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    evidence = MemoryEvidence()
    ven, _ = await start_ven(url, evidence=evidence)
    try:
        await until(lambda: ven.registered)
        (rid,) = create_report(sim, request(STATUS_ID, ["facility-status"], 0, 0))
        await sim.wait_for(lambda: log.updates_for(rid), 10.0)
    finally:
        await ven.stop()
    kinds = [k for k in log.kinds() if k in ("oadrCreatedReport", "oadrUpdateReport")]
    assert kinds[:2] == ["oadrCreatedReport", "oadrUpdateReport"]  # the answer before the report
    (created,) = log.of("oadrCreatedReport")
    assert [p["report_request_id"] for p in created["pending_reports"]] == [rid]
    (report,) = log.updates_for(rid)
    assert report["duration"] == timedelta(0) and report["dtstart"] == report["intervals"][0]["dtstart"]
    durations = sent_update_durations(evidence)
    assert durations and "P" not in durations and set(durations) == {"PT0S"}


async def test_r1_3150_usage_one_shot_every_rid_in_one_interval(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    """As the tool asks: every rID of the first TELEMETRY_USAGE report offered; it then accepts only that
    report's energyReal rID and its last powerReal rID in the update ("CreateReport rIDs are not found
    in XML database" otherwise)."""
    sim, log, url = vtn
    evidence = MemoryEvidence()
    ven, _ = await start_ven(url, evidence=evidence)
    try:
        await until(lambda: ven.registered and log.of("oadrRegisterReport"))
        specifier, points = tool_view_of_usage(log)
        (rid,) = create_report(sim, request(specifier, [r for r, _ in points], 1, 0))
        await sim.wait_for(lambda: log.updates_for(rid), 10.0)
    finally:
        await ven.stop()
    assert points == [("facility-power", "powerReal"), ("facility-energy", "energyReal")]
    (report,) = log.updates_for(rid)
    (interval,) = report["intervals"]
    assert [p["r_id"] for p in payloads(interval)] == ["facility-power", "facility-energy"]
    assert {p["r_id"] for p in payloads(interval)} <= tool_accepts(points)
    assert set(sent_update_durations(evidence)) == {"PT1S"}


async def test_r1_3180_two_one_shot_requests_in_one_create(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        rids = create_report(sim, request(STATUS_ID, ["facility-status"], 0, 0, rid="rr-a"),
                             request(USAGE_ID, ["facility-power", "facility-energy"], 1, 0, rid="rr-b"))  # fmt: skip
        await sim.wait_for(lambda: all(log.updates_for(r) for r in rids), 10.0)
        await until(lambda: not ven._reports.running(), 10.0)
    finally:
        await ven.stop()
    assert [len(log.updates_for(r)) for r in rids] == [1, 1]
    (created,) = log.of("oadrCreatedReport")
    assert sorted(p["report_request_id"] for p in created["pending_reports"]) == ["rr-a", "rr-b"]


async def test_r1_3180_updates_are_sent_one_at_a_time(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    """The tool pairs each oadrUpdatedReport with the last request it got: two updates in flight at once
    read as a requestID mismatch. The VTN here holds each update until a second one arrives (or 0.5 s
    passed); the VEN must still send them one after the other."""
    sim, log, url = vtn
    svc = sim.server.services["report_service"]
    record = svc.handlers["oadrUpdateReport"]
    in_flight: list[int] = [0, 0]  # now, most
    second = asyncio.Event()

    async def held(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        if in_flight[0] > 1:
            second.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second.wait(), 0.5)
            return await record(payload)
        finally:
            in_flight[0] -= 1

    svc.handlers["oadrUpdateReport"] = held
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        rids = create_report(sim, request(STATUS_ID, ["facility-status"], 0, 0, rid="rr-a"),
                             request(USAGE_ID, ["facility-power", "facility-energy"], 1, 0, rid="rr-b"))  # fmt: skip
        await sim.wait_for(lambda: all(log.updates_for(r) for r in rids), 10.0)
    finally:
        await ven.stop()
    assert in_flight[1] == 1


async def test_r1_3027_short_periodic_sends_no_update_past_the_end(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        start = datetime.now(UTC) + timedelta(seconds=1)  # the poll that carries it takes up to 1 s
        (rid,) = create_report(sim, request(STATUS_ID, ["facility-status"], 1, 1, (start, 2)))
        await sim.wait_for(lambda: log.updates_for(rid), 10.0)
        await until(lambda: rid not in ven._reports.running(), 15.0)  # the interval has ended
    finally:
        await ven.stop()
    assert len(log.updates_for(rid)) == 2  # at its start and 1 s later; none at its end (2 s)


@pytest.mark.parametrize("follow", [True, False])
async def test_r1_3045_r1_3040_cancel_honours_report_to_follow(
    vtn: tuple[SimVtn, ReportLog, str], follow: bool
) -> None:
    sim, log, url = vtn
    ven, audit = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        (rid,) = create_report(sim, request(STATUS_ID, ["facility-status"], 60, 60, (datetime.now(UTC), 0)))
        await sim.wait_for(lambda: log.updates_for(rid), 10.0)  # the first report, at once
        sim.cancel_report(VEN, rid, report_to_follow=follow)
        await sim.wait_for(lambda: log.of("oadrCanceledReport"), 10.0)
        if follow:
            await sim.wait_for(lambda: len(log.updates_for(rid)) == 2, 10.0)  # the last report
        await until(lambda: audit.of_kind("report.cancelled") and not ven._reports.running(), 10.0)
    finally:
        await ven.stop()
    (canceled,) = log.of("oadrCanceledReport")
    assert [p["report_request_id"] for p in canceled["pending_reports"]] == ([rid] if follow else [])
    assert len(log.updates_for(rid)) == (2 if follow else 1)
    if follow:
        assert log.kinds().index("oadrCanceledReport") < len(log.kinds()) - 1  # the last report came after


async def test_r1_3050_piggy_backed_cancel_stops_the_report_unanswered(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, audit = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        (rid,) = create_report(sim, request(STATUS_ID, ["facility-status"], 1, 1, (datetime.now(UTC), 300)))
        log.cancel_on_update = {"request_id": "pb-1", "report_request_id": [rid], "report_to_follow": False,
                                "ven_id": VEN}  # fmt: skip
        await until(lambda: audit.of_kind("report.cancelled"), 10.0)
        await until(lambda: not ven._reports.running(), 10.0)
        polls = len(audit.of_kind("xml.poll"))
        await until(lambda: len(audit.of_kind("xml.poll")) >= polls + 1, 10.0)
        # An update sent before the cancel came back (a loaded machine: the 1 s period beat the
        # round trip) is legitimate; none may follow the cancel.
        sent = len(log.updates_for(rid))
        polls = len(audit.of_kind("xml.poll"))
        await until(lambda: len(audit.of_kind("xml.poll")) >= polls + 2, 10.0)  # two report periods on
    finally:
        await ven.stop()
    assert 1 <= sent == len(log.updates_for(rid))
    assert audit.of_kind("report.cancelled")[0]["data"]["report_request_id"] == rid
    # the oadrUpdatedReport exchange answered it: the tool (R1_3050) refuses an oadrCanceledReport here
    assert not log.of("oadrCanceledReport")


async def test_r1_3160_periodic_every_rid_in_every_interval(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    """As the tool asks: every powerReal rID of the first TELEMETRY_USAGE report offered; it accepts only
    the last of them in the updates."""
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered and log.of("oadrRegisterReport"))
        specifier, points = tool_view_of_usage(log)
        power = [r for r, name in points if name == "powerReal"]
        (rid,) = create_report(sim, request(specifier, power, 1, 2, (datetime.now(UTC), 10)))
        await sim.wait_for(lambda: len(log.updates_for(rid)) >= 2, 15.0)
    finally:
        await ven.stop()
    assert power == ["facility-power"]
    for report in log.updates_for(rid)[:2]:
        assert len(report["intervals"]) == 2  # two samples per report, each holding every requested rID
        assert all([p["r_id"] for p in payloads(iv)] == power for iv in report["intervals"])
        assert {p["r_id"] for iv in report["intervals"] for p in payloads(iv)} <= tool_accepts(points)
        assert report["duration"] == timedelta(seconds=2)


async def test_devices_power_in_one_periodic_report(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    """The battery's and the GPUs' power, in their own TELEMETRY_USAGE report: every interval holds both."""
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        (rid,) = create_report(sim, request(DEVICE_USAGE_ID, DEVICE_POWER, 1, 2, (datetime.now(UTC), 10)))
        await sim.wait_for(lambda: len(log.updates_for(rid)) >= 2, 15.0)
    finally:
        await ven.stop()
    for report in log.updates_for(rid)[:2]:
        assert all([p["r_id"] for p in payloads(iv)] == DEVICE_POWER for iv in report["intervals"])


async def test_r1_3130_history_all_data_from_now_answers_at_once(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    r_ids = ["facility-power-history", "facility-energy-history"]
    try:
        await until(lambda: ven.registered)
        (rid,) = create_report(sim, request(HISTORY_ID, r_ids, 0, 0, (datetime.now(UTC), 0)))
        await sim.wait_for(lambda: log.updates_for(rid), 15.0)
    finally:
        await ven.stop()
    (report,) = log.updates_for(rid)
    assert len(report["intervals"]) >= 5
    assert all([p["r_id"] for p in payloads(iv)] == r_ids for iv in report["intervals"])
    assert report["dtstart"] == report["intervals"][0]["dtstart"]
    assert abs((report["dtstart"] - datetime.now(UTC)).total_seconds()) < 120  # the tool's window: now +- 2 min


async def test_r1_3130_all_data_asked_a_few_seconds_ago_still_gets_all_data(
    vtn: tuple[SimVtn, ReportLog, str],
) -> None:
    """The tool stamps dtstart = now when it queues the request; the VEN's poll brings it seconds later.
    That is still "all data from now", not an empty window from dtstart to now."""
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    r_ids = ["facility-power-history", "facility-energy-history"]
    try:
        await until(lambda: ven.registered)
        asked = datetime.now(UTC) - timedelta(seconds=20)
        (rid,) = create_report(sim, request(HISTORY_ID, r_ids, 0, 0, (asked, 0)))
        await sim.wait_for(lambda: log.updates_for(rid), 15.0)
    finally:
        await ven.stop()
    (report,) = log.updates_for(rid)
    assert len(report["intervals"]) >= 5


async def test_r1_3140_history_subset_over_the_last_half_hour(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    try:
        await until(lambda: ven.registered)
        (rid,) = create_report(sim, request(HISTORY_ID, ["facility-energy-history"], 0, 0, (start, 1800)))
        await sim.wait_for(lambda: log.updates_for(rid), 15.0)
    finally:
        await ven.stop()
    (report,) = log.updates_for(rid)
    assert report["dtstart"] == start and len(report["intervals"]) == 30
    assert report["duration"] == timedelta(minutes=30)


async def test_r1_3140_history_subset_spans_the_window_asked_for(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    """A gateway up for 9 minutes holds no data for the first 21 of the 30 asked for: the report still
    starts at the requested dtstart and lasts 30 minutes (the tool's check: dtstart = now - 30 min +- 2 min)."""
    sim, log, url = vtn
    site = Site()
    stored = site.history
    since = datetime.now(UTC) - timedelta(minutes=9)

    async def short_history(start: datetime, end: datetime) -> Any:
        return [s for s in await stored(start, end) if s.t >= since]

    site.history = short_history  # type: ignore[method-assign]
    ven, _ = await start_ven(url, site=site)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    try:
        await until(lambda: ven.registered)
        (rid,) = create_report(sim, request(HISTORY_ID, ["facility-energy-history"], 0, 0, (start, 1800)))
        await sim.wait_for(lambda: log.updates_for(rid), 15.0)
    finally:
        await ven.stop()
    (report,) = log.updates_for(rid)
    assert report["dtstart"] == start and report["duration"] == timedelta(minutes=30)
    intervals = report["intervals"]
    assert len(intervals) == 30 and intervals[0]["dtstart"] == start  # the tool: report dtstart = first's
    qualities = [payloads(iv)[0]["data_quality"] for iv in intervals]
    assert qualities[:20] == ["No Quality - No Value"] * 20 and qualities[-1] == "Quality Good - Non Specific"


async def test_r1_3170_metadata_request_and_pending_reports(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        done = create_report(sim, request(STATUS_ID, ["facility-status"], 0, 0, rid="rr-old"))  # one-shot: done
        await sim.wait_for(lambda: log.updates_for("rr-old"), 10.0)
        await until(lambda: not ven._reports.running(), 10.0)
        create_report(sim, request(STATUS_ID, ["facility-status"], 60, 60, (datetime.now(UTC), 300), rid="rr-1"))
        await sim.wait_for(lambda: len(log.of("oadrCreatedReport")) == 2, 10.0)
        create_report(sim, request("METADATA", ["0"], 0, 60, (datetime.now(UTC), 300), rid="rr-meta"))
        await sim.wait_for(lambda: len(log.of("oadrRegisterReport")) == 2, 10.0)
        sim.cancel_report(VEN, "rr-1")
        await sim.wait_for(lambda: log.of("oadrCanceledReport"), 10.0)
    finally:
        await ven.stop()
    created = [sorted(p["report_request_id"] for p in c["pending_reports"]) for c in log.of("oadrCreatedReport")]
    assert created == [done, ["rr-1"], ["rr-1", "rr-meta"]]
    assert log.of("oadrRegisterReport")[1]["report_request_id"] == "rr-meta"
    (canceled,) = log.of("oadrCanceledReport")
    assert [p["report_request_id"] for p in canceled["pending_reports"]] == ["rr-meta"]


async def test_r1_3170_created_report_lists_the_new_request_first(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    """The tool reads the first oadrPendingReports entry of an oadrCreatedReport as the request it answers:
    with an older request still live, the new one must come first."""
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        create_report(sim, request(STATUS_ID, ["facility-status"], 60, 60, (datetime.now(UTC), 300), rid="rr-1"))
        await sim.wait_for(lambda: len(log.of("oadrCreatedReport")) == 1, 10.0)
        create_report(sim, request(STATUS_ID, ["facility-status"], 60, 60, (datetime.now(UTC), 300), rid="rr-2"))
        await sim.wait_for(lambda: len(log.of("oadrCreatedReport")) == 2, 10.0)
    finally:
        await ven.stop()
    second = log.of("oadrCreatedReport")[1]
    assert [p["report_request_id"] for p in second["pending_reports"]] == ["rr-2", "rr-1"]


async def test_r1_3190_unknown_specifier_and_rid_answer_452(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        create_report(sim, request("INVALID_REPORT_SPECIFIER_ID", ["facility-status"], 0, 0))
        await sim.wait_for(lambda: log.of("oadrCreatedReport"), 10.0)
        create_report(sim, request(STATUS_ID, ["INVALID_RID"], 0, 0))
        await sim.wait_for(lambda: len(log.of("oadrCreatedReport")) == 2, 10.0)
    finally:
        await ven.stop()
    assert [c["response"]["response_code"] for c in log.of("oadrCreatedReport")] == [452, 452]
    assert not log.of("oadrUpdateReport")


async def test_g1_4015_event_and_one_shot_report_dequeued_by_polls(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    evidence = MemoryEvidence()
    ven, _ = await start_ven(url, evidence=evidence)
    try:
        await until(lambda: ven.registered)
        eid = sim.add_event(VEN, signal="SIMPLE", value=1, start=datetime.now(UTC) + timedelta(minutes=5),
                            duration_s=600)  # fmt: skip
        (rid,) = create_report(sim, request(STATUS_ID, ["facility-status"], 0, 0))
        await sim.wait_for(lambda: log.updates_for(rid), 10.0)
        await sim.wait_for_response(eid, timeout_s=10.0)
    finally:
        await ven.stop()
    assert log.kinds().index("oadrCreatedReport") < log.kinds().index("oadrUpdateReport")
    assert "P" not in sent_update_durations(evidence)
