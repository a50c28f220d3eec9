"""The VTN's reports and the operator's report commands (R1_3060-3120), through openleadr's VTN.

The VEN answers the VTN's oadrRegisterReport, asks for the VTN's METADATA report on the operator's
word (once or periodically) and cancels that; the operator can make the VEN publish its own report
metadata again, through the management endpoint (authenticated, audited) or the Ven itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openleadr import objects

from protocols.openadr import STATUS_ID, SimVtn
from protocols.openadr.reports import REGISTER_TEMPLATE
from tests.doubles import until
from tests.protocols.oadr_report_helpers import VEN, ReportLog, start_ven

from .test_mgmt_hostile import AUTH, running_site


@pytest.fixture
async def vtn() -> AsyncIterator[tuple[SimVtn, ReportLog, str]]:
    sim = SimVtn(poll_interval_s=1.0)
    log = ReportLog(sim)
    url = await sim.start()
    yield sim, log, url
    await sim.stop()


def publish(sim: SimVtn, report_request_id: str | None = None) -> None:
    """Queue the VTN's own oadrRegisterReport (naming the VEN's METADATA request, if given)."""
    description = objects.ReportDescription(
        r_id="vtn-price", reading_type="x-notApplicable", report_type="x-resourceStatus",
        report_subject=objects.Target(resource_id="grid"), report_data_source=objects.Target(resource_id="grid"),
        sampling_rate=objects.SamplingRate(min_period=timedelta(minutes=1), max_period=timedelta(minutes=1),
                                           on_change=False),
        market_context=None, measurement=None,
    )  # fmt: skip
    report = objects.Report(report_specifier_id="VTN_RS", report_name="METADATA_TELEMETRY_STATUS",
                            report_descriptions=[description], created_date_time=datetime.now(UTC),
                            duration=timedelta(hours=1))  # fmt: skip
    sim.queue(VEN, REGISTER_TEMPLATE, {"reports": [report], "ven_id": VEN, "report_request_id": report_request_id})


def spec(create: dict[str, Any]) -> dict[str, Any]:
    """Return the reportSpecifier of the one request in an oadrCreateReport."""
    (req,) = create["report_requests"]
    return dict(req["report_specifier"])


async def test_r1_3070_one_shot_request_for_the_vtn_metadata(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, audit = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        result = await ven.operator_action("request-vtn-reports", {})
        assert result["ok"], result
        (create,) = log.of("oadrCreateReport")
        assert spec(create)["report_specifier_id"] == "METADATA" and spec(create)["granularity"] == timedelta(0)
        publish(sim, result["report_request_id"])
        await sim.wait_for(lambda: log.of("oadrRegisteredReport"), 10.0)
        await until(lambda: audit.of_kind("report.vtn_registered"), 10.0)
    finally:
        await ven.stop()
    (registered,) = log.of("oadrRegisteredReport")
    assert not registered.get("report_requests")
    (row,) = audit.of_kind("report.vtn_registered")
    assert row["data"]["answering"] == result["report_request_id"] and row["data"]["reports"] == {
        "VTN_RS": ["vtn-price"]
    }


async def test_r1_3080_r1_3090_r1_3100_periodic_requests_then_cancel(vtn: tuple[SimVtn, ReportLog, str]) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    try:
        await until(lambda: ven.registered)
        result = await ven.operator_action("request-vtn-reports", {"every_s": 60.0, "for_s": 300.0})
        second = await ven.operator_action("request-vtn-reports", {"every_s": 60.0, "for_s": 300.0})  # R1_3090
        publish(sim, result["report_request_id"])
        publish(sim, second["report_request_id"])
        publish(sim, result["report_request_id"])
        await sim.wait_for(lambda: len(log.of("oadrRegisteredReport")) == 3, 10.0)
        cancelled = await ven.operator_action("cancel-vtn-reports", {})
        again = await ven.operator_action("cancel-vtn-reports", {})
    finally:
        await ven.stop()
    s = spec(log.of("oadrCreateReport")[0])
    assert (s["granularity"], s["report_back_duration"]) == (timedelta(minutes=1), timedelta(minutes=1))
    assert s["report_interval"]["duration"] == timedelta(minutes=5)
    both = [result["report_request_id"], second["report_request_id"]]
    assert cancelled["ok"] and cancelled["report_request_ids"] == both
    assert [(c["report_request_id"], c["report_to_follow"]) for c in log.of("oadrCancelReport")] == [
        (both[0], False), (both[1], False)
    ]  # fmt: skip
    assert again == {"ok": False, "error": "no request of the VTN's reports is outstanding"}


async def test_r1_3120_piggy_backed_metadata_request_on_registered_report(
    vtn: tuple[SimVtn, ReportLog, str],
) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url, request_vtn_metadata="on-register")
    try:
        await until(lambda: ven.registered)
        publish(sim)
        await sim.wait_for(lambda: log.of("oadrRegisteredReport"), 10.0)
        (req,) = log.of("oadrRegisteredReport")[0]["report_requests"]
        assert req["report_specifier"]["report_specifier_id"] == "METADATA"
        publish(sim, req["report_request_id"])  # the VTN answers the request
        await sim.wait_for(lambda: len(log.of("oadrRegisteredReport")) == 2, 10.0)
    finally:
        await ven.stop()
    assert not log.of("oadrRegisteredReport")[1].get("report_requests")  # no request answering an answer


async def test_r1_3060_operator_republishes_metadata_through_the_management_endpoint(
    vtn: tuple[SimVtn, ReportLog, str], tmp_path: Path
) -> None:
    sim, log, url = vtn
    ven, _ = await start_ven(url)
    async with running_site(tmp_path) as site:
        site.gw.ven = ven
        try:
            await until(lambda: ven.registered)
            await sim.wait_for(lambda: log.of("oadrRegisterReport"), 10.0)
            rid = sim.ask_reports_on_registration(STATUS_ID, ["facility-status"], 0, 0)  # piggy-backed request
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{site.url}/openadr/register-reports", data=b"{}", headers=AUTH) as r:
                    assert r.status == 200, await r.text()
                plain = {"Content-Type": "application/json"}
                async with http.post(f"{site.url}/openadr/register-reports", data=b"{}", headers=plain) as r:
                    assert r.status == 401  # no credentials: refused, nothing sent
                async with http.post(f"{site.url}/openadr/request-vtn-reports", data=b'{"every_s": -1}',
                                     headers=AUTH) as r:  # fmt: skip
                    assert r.status == 400 and "every_s" in await r.text()
            await sim.wait_for(lambda: log.updates_for(rid), 10.0)
        finally:
            await ven.stop()
            site.gw.ven = None
        rows = [(k, d) for k, _, _, d in await site.rows() if k == "operator.openadr"]
    assert len(log.of("oadrRegisterReport")) == 2  # at start, and on the operator's word
    kinds = [k for k in log.kinds() if k in ("oadrCreatedReport", "oadrUpdateReport")]
    assert kinds[:2] == ["oadrCreatedReport", "oadrUpdateReport"]
    assert [d["action"] for _, d in rows] == ["register-reports"] and "alice" in rows[0][1]["peer"]
