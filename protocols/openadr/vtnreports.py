"""The VTN's reports, as this VEN sees them (OpenADR 2.0b, pull).

A VTN may publish reports of its own (oadrRegisterReport, delivered in a poll answer). The VEN
answers each with oadrRegisteredReport; with ``[openadr] request_vtn_metadata = "on-register"`` that
answer carries a one-shot request for the VTN's METADATA (a piggy-backed request). An operator can
ask for the VTN's METADATA report at any time (oadrCreateReport, one-shot or periodic) and cancel
what was asked (oadrCancelReport); the VTN then answers with oadrRegisterReport naming the
request. Every exchange is audited; the catalogue the VTN published last is kept in memory.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from protocols.openadr.client import OadrClient
from protocols.openadr.reports import METADATA_ID, iso_duration

AuditFn = Callable[..., Awaitable[None]]


class VtnReports:
    """Answers the VTN's report registrations and asks for its METADATA report."""

    def __init__(self, client: OadrClient, cfg: OpenAdrConfig, clock: Clock, audit: AuditFn) -> None:
        self._client = client
        self._cfg = cfg
        self._clock = clock
        self._audit = audit
        self.catalogue: dict[str, list[str]] = {}  # the VTN's reportSpecifierID -> its rIDs, as last published
        self.requested: list[str] = []  # this VEN's METADATA requests the VTN has not seen cancelled

    async def registered(self, payload: dict[str, Any]) -> None:
        """Answer a VTN's oadrRegisterReport with oadrRegisteredReport (a METADATA request piggy-backed
        when configured and the registration was not itself an answer to one)."""
        reports = payload.get("reports") or []
        self.catalogue = {
            str(r.get("report_specifier_id")): [str(d.get("r_id")) for d in r.get("report_descriptions") or []]
            for r in (reports if isinstance(reports, list) else [reports])
            if isinstance(r, dict)
        }
        answering = payload.get("report_request_id")
        requests = []
        if self._cfg.request_vtn_metadata == "on-register" and not answering:
            rid = self._new_id()
            requests.append(self._metadata_request(rid, 0.0, None, None))
            self.requested.append(rid)
        message = self._client._create_message(
            "oadrRegisteredReport",
            response={"response_code": 200, "response_description": "OK", "request_id": payload.get("request_id")},
            report_requests=requests,
            ven_id=self._client.ven_id,
        )
        await self._client._perform_request("EiReport", message)
        await self._audit("report.vtn_registered", {"reports": self.catalogue, "answering": answering,
                          "requested": [r["report_request_id"] for r in requests]}, "utility")  # fmt: skip

    async def request_metadata(self, every_s: float = 0.0, for_s: float | None = None) -> dict[str, Any]:
        """Ask the VTN for its METADATA report (oadrCreateReport): once, or every ``every_s`` for ``for_s``."""
        if every_s < 0 or (for_s is not None and for_s <= 0):
            raise ValueError("every_s must be >= 0 and for_s > 0")
        rid = self._new_id()
        start = self._clock.now() if for_s is not None else None
        message = self._client._create_message(
            "oadrCreateReport",
            request_id=uuid.uuid4().hex[:12],
            report_requests=[self._metadata_request(rid, every_s, start, for_s)],
            ven_id=self._client.ven_id,
        )
        rtype, answer = await self._client._perform_request("EiReport", message)
        ok = rtype == "oadrCreatedReport" and (answer.get("response") or {}).get("response_code") in (200, "200")
        if ok:
            self.requested.append(rid)
        await self._audit("report.vtn_requested", {"report_request_id": rid, "every_s": every_s, "for_s": for_s,
                          "answer": rtype, "ok": ok}, "operator")  # fmt: skip
        return {"ok": ok, "report_request_id": rid, "answer": rtype}

    async def cancel_requests(self) -> dict[str, Any]:
        """Cancel this VEN's outstanding METADATA requests (one oadrCancelReport each, no report to follow:
        openleadr's template cannot list several ids)."""
        if not self.requested:
            return {"ok": False, "error": "no request of the VTN's reports is outstanding"}
        done, answers = [], []
        for rid in list(self.requested):
            message = self._client._create_message(
                "oadrCancelReport",
                request_id=uuid.uuid4().hex[:12],
                report_request_id=rid,
                report_to_follow=False,
                ven_id=self._client.ven_id,
            )
            rtype, _answer = await self._client._perform_request("EiReport", message)
            answers.append(rtype)
            if rtype == "oadrCanceledReport":
                done.append(rid)
        self.requested = [r for r in self.requested if r not in done]
        ok = not self.requested
        await self._audit("report.vtn_cancelled", {"report_request_ids": done, "answers": answers, "ok": ok},
                          "operator")  # fmt: skip
        return {"ok": ok, "report_request_ids": done, "answers": answers}

    def _metadata_request(
        self, rid: str, every_s: float, start: datetime | None, for_s: float | None
    ) -> dict[str, Any]:
        """Return a METADATA oadrReportRequest (durations preformatted: never the bare ``P``)."""
        return {
            "report_request_id": rid,
            "report_specifier": {
                "report_specifier_id": METADATA_ID,
                "granularity": iso_duration(every_s),
                "report_back_duration": iso_duration(every_s),
                "report_interval": None
                if start is None or for_s is None
                else {"dtstart": start, "duration": iso_duration(for_s)},
                "specifier_payloads": [{"r_id": "0", "reading_type": "x-notApplicable"}],
            },
        }

    def _new_id(self) -> str:
        """Return a fresh reportRequestID."""
        return f"drgw-{uuid.uuid4().hex[:12]}"


__all__ = ["VtnReports"]
