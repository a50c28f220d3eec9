"""Helpers for the 2.0b report certification tests: openleadr's VTN (SimVtn) with every report
message recorded in arrival order, report requests as the certification tool builds them, and
the VEN's outgoing XML kept (MemoryEvidence) for checks openleadr's parser would hide."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from lxml import etree
from openleadr import objects

from gateway.clock import SystemClock
from gateway.config import OpenAdrConfig
from gateway.model import DemandEvent, Opt
from protocols.openadr import SimVtn, Ven
from tests.doubles import MemoryEvidence, RecordingAudit
from tests.protocols.test_openadr_reports import Site

VEN = "drgw-cert"
_XCAL = "urn:ietf:params:xml:ns:icalendar-2.0"
_OADR = "http://openadr.org/oadr-2.0b/2012/07"


class ReportLog:
    """Records every report message the VEN sends to a SimVtn, in order; can piggy-back a cancel."""

    def __init__(self, sim: SimVtn) -> None:
        self.sim = sim
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.cancel_on_update: dict[str, Any] | None = None  # piggy-backed on the next oadrUpdatedReport
        self.vtn_metadata: list[objects.Report] = []  # what this VTN offers when a VEN asks (METADATA)
        svc = sim.server.services["report_service"]
        self._update = svc.handlers["oadrUpdateReport"]
        self._register = svc.handlers["oadrRegisterReport"]
        svc.handlers["oadrUpdateReport"] = self._on_update
        svc.handlers["oadrRegisterReport"] = self._on_register
        for kind in ("oadrCreatedReport", "oadrCanceledReport", "oadrRegisteredReport", "oadrCreateReport",
                     "oadrCancelReport"):  # fmt: skip
            svc.handlers[kind] = self._recorder(kind)

    def _recorder(self, kind: str) -> Any:
        async def record(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            self.log.append((kind, dict(payload)))
            await self.sim._notify()
            if kind == "oadrCreateReport":
                return "oadrCreatedReport", {
                    "pending_reports": [
                        {"report_request_id": r["report_request_id"]} for r in payload.get("report_requests") or []
                    ]
                }
            if kind == "oadrCancelReport":
                return "oadrCanceledReport", {"pending_reports": []}
            return "oadrResponse", {}

        return record

    async def _on_update(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.log.append(("oadrUpdateReport", dict(payload)))
        rtype, answer = await self._update(payload)
        if self.cancel_on_update is not None:
            answer = {**answer, "cancel_report": self.cancel_on_update}
            self.cancel_on_update = None
        return rtype, answer

    async def _on_register(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.log.append(("oadrRegisterReport", dict(payload)))
        return await self._register(payload)  # type: ignore[no-any-return]

    def kinds(self) -> list[str]:
        """Return the message types received, in order."""
        return [k for k, _ in self.log]

    def of(self, kind: str) -> list[dict[str, Any]]:
        """Return the payloads of one message type, in order."""
        return [p for k, p in self.log if k == kind]

    def updates_for(self, rid: str) -> list[dict[str, Any]]:
        """Return the oadrReports delivered for one report request."""
        return [r for p in self.of("oadrUpdateReport") for r in p.get("reports") or [] if r["report_request_id"] == rid]


def request(
    specifier_id: str,
    r_ids: Sequence[str],
    granularity_s: float,
    report_back_s: float,
    interval: tuple[datetime, float] | None = None,
    rid: str | None = None,
) -> objects.ReportRequest:
    """Return one oadrReportRequest, as the certification tool's request files build them."""
    return objects.ReportRequest(
        report_request_id=rid or f"rr-{datetime.now(UTC).timestamp():.6f}",
        report_specifier=objects.ReportSpecifier(
            report_specifier_id=specifier_id,
            granularity=timedelta(seconds=granularity_s),
            report_back_duration=timedelta(seconds=report_back_s),
            report_interval=None
            if interval is None
            else objects.Interval(dtstart=interval[0], duration=timedelta(seconds=interval[1]), signal_payload=0),
            specifier_payloads=[objects.SpecifierPayload(r_id=r, reading_type="x-notApplicable") for r in r_ids],
        ),
    )


def create_report(sim: SimVtn, *requests: objects.ReportRequest) -> list[str]:
    """Queue one oadrCreateReport holding these requests; return their reportRequestIDs."""
    sim.queue(VEN, "oadrCreateReport", {"report_requests": list(requests), "request_id": "cr-1"})
    return [r.report_request_id for r in requests]


async def start_ven(
    url: str, site: Site | None = None, evidence: MemoryEvidence | None = None, **cfg: Any
) -> tuple[Ven, RecordingAudit]:
    """Start a VEN with telemetry and history against the SimVtn at ``url``."""

    async def on_event(ev: DemandEvent) -> Opt:
        return Opt.IN

    site = site or Site()
    audit = RecordingAudit()
    config = OpenAdrConfig(vtn_url=url, ven_name=VEN, registration_retry_initial_s=0.05, **cfg)
    ven = Ven(config, on_event, audit, SystemClock(), telemetry=site.telemetry, history=site.history,
              evidence=evidence)  # fmt: skip
    await ven.start()
    return ven, audit


def sent_update_durations(evidence: MemoryEvidence) -> list[str]:
    """Return every xcal duration in the oadrUpdateReports the VEN sent (report and interval)."""
    out = []
    for body in evidence.blobs.values():
        if b"oadrUpdateReport" not in body:
            continue
        tree = etree.fromstring(body)
        for report in tree.iter(f"{{{_OADR}}}oadrReport"):
            out += [d.text or "" for d in report.iter(f"{{{_XCAL}}}duration") if len(d) == 0]
    return out
