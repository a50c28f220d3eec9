"""The VEN's side of OpenADR 2.0b reporting: what the VTN requests, run to the 2.0b rules.

The ``Reporter`` offers the catalogue of ``reports`` (oadrRegisterReport), answers oadrCreateReport
(and the requests piggy-backed on oadrRegisteredReport) and oadrCancelReport, and runs one task
per report request:

- periodic: a sample every ``granularity`` (``reportBackDuration`` when the granularity is 0, "on
  change"), a report every ``reportBackDuration``, only while the report interval lasts: a
  report whose time is at or past the end is not sent;
- one-shot: ``reportBackDuration`` of zero: one report at the interval's start (or now);
- HISTORY_USAGE: the measurement store read over ``reportInterval`` and sent at once as interval
  means (W) and energies (Wh); a window reaching into the future is sent when it has passed;
- METADATA (``reportSpecifierID`` METADATA): the oadrRegisterReport sent again, naming the request.

Every interval holds one payload for every requested rID (a missing value is sent as 0 with
quality "No Quality - No Value"), interval and report durations are never the invalid ``P``,
the oadrCreatedReport acknowledging a request goes out before any oadrUpdateReport for it, and
oadrPendingReports lists only the requests still live. A cancel with ``reportToFollow`` answers
oadrCanceledReport (the request still pending) and then sends the last report.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from gateway.logs import get_logger
from gateway.model import TelemetrySample
from protocols.openadr.client import OadrClient
from protocols.openadr.reports import (
    HISTORY_ID,
    METADATA_ID,
    QUALITY,
    REGISTER_TEMPLATE,
    UPDATE_TEMPLATE,
    History,
    Offer,
    Telemetry,
    aggregate,
    catalogue,
    install_templates,
    iso_duration,
    metadata,
    status_of,
)  # fmt: skip

_log = get_logger("openadr.reports")
_HISTORY_TIMEOUT_S = 30.0
_ALL_DATA_S = 3600.0  # "all data" of a HISTORY_USAGE request: the last hour (bounded by history_s)
_HISTORY_STEP_S = 60.0  # interval of a HISTORY_USAGE answer when the request leaves it to the VEN
_NO_VALUE = "No Quality - No Value"

AuditFn = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class Request:
    """One report request from the VTN, as this engine runs it."""

    report_request_id: str
    specifier_id: str
    r_ids: tuple[str, ...]
    granularity_s: float
    report_back_s: float | None
    start: datetime | None
    duration_s: float | None

    @property
    def end(self) -> datetime | None:
        """Return the end of the report interval (None: open-ended)."""
        if self.start is None or not self.duration_s:
            return None
        return self.start + timedelta(seconds=self.duration_s)

    @property
    def one_shot(self) -> bool:
        """Return whether one report answers the request (reportBackDuration zero or absent)."""
        return not self.report_back_s or self.report_back_s <= 0


@dataclass
class _Job:
    """A running request: its task, the samples taken since its last report, how long it stays live."""

    req: Request
    task: asyncio.Task[None] | None = None
    buffered: list[dict[str, Any]] = field(default_factory=list)
    live_until: datetime | None = None  # METADATA requests: pending until their interval ends

    def live(self, now: datetime) -> bool:
        """Return whether the request is still pending."""
        if self.task is not None and not self.task.done():
            return True
        return self.live_until is not None and now < self.live_until


class Reporter:
    """Offers the gateway's reports and runs what the VTN requests."""

    def __init__(
        self,
        client: OadrClient,
        cfg: OpenAdrConfig,
        clock: Clock,
        audit: AuditFn,
        telemetry: Telemetry | None,
        history: History | None,
    ) -> None:
        install_templates()
        self._client = client
        self._cfg = cfg
        self._clock = clock
        self._audit = audit
        self._telemetry = telemetry
        self._history = history
        self._offers: dict[str, Offer] = catalogue(telemetry is not None, history is not None)
        self._jobs: dict[str, _Job] = {}
        self._spawned: set[asyncio.Task[None]] = set()
        # One report exchange at a time: the tool pairs each oadrUpdatedReport with the last
        # request it got, so two updates in flight look like a requestID mismatch (R1_3180).
        self._exchange_lock = asyncio.Lock()

    @property
    def offered(self) -> bool:
        """Return whether there is any report to offer."""
        return bool(self._offers)

    def running(self) -> list[str]:
        """Return the report request ids still pending (oadrPendingReports)."""
        now = self._clock.now()
        return [rid for rid, job in self._jobs.items() if job.live(now)]

    def metadata(self) -> list[Any]:
        """Return the METADATA reports for oadrRegisterReport (fixed ids)."""
        return metadata(self._offers, self._cfg, self._clock.now())

    async def register(self, report_request_id: str | None = None) -> bool:
        """Offer the reports (oadrRegisterReport) and start whatever the answer requests; return
        whether the VTN acknowledged. ``report_request_id`` names the METADATA request answered."""
        if not self.offered:
            return False
        message = self._client._create_message(
            REGISTER_TEMPLATE,
            request_id=uuid.uuid4().hex[:12],
            ven_id=self._client.ven_id,
            reports=self.metadata(),
            report_request_id=report_request_id,
        )
        rtype, payload = await self._exchange(message)
        if rtype == "oadrRegisteredReport" and payload.get("report_requests"):
            await self.create(payload)
        return rtype == "oadrRegisteredReport"

    async def create(self, payload: dict[str, Any]) -> None:
        """Confirm the requested reports (oadrCreateReport / oadrRegisteredReport), then start them."""
        accepted: list[Request] = []
        code, description = 200, "OK"
        raw = payload.get("report_requests") or []
        for item in raw if isinstance(raw, list) else [raw]:
            try:
                req = self._request(item)
            except ValueError as err:
                code, description = 452, str(err)[:200]
                await self._audit("report.refused", {"reason": str(err)}, "utility")
                continue
            accepted.append(req)
            await self._audit("report.requested", _describe(req), "utility")
        for req in accepted:  # replaced requests stop before the answer lists what is pending
            await self._drop(req.report_request_id)
        fresh = [r.report_request_id for r in accepted]
        request_id = payload.get("request_id") or (payload.get("response") or {}).get("request_id")
        # This payload's requests first: the tool (R1_3170) reads the first entry as the request answered.
        pending = fresh + [rid for rid in self.running() if rid not in fresh]
        await self._answer("oadrCreatedReport", request_id, code, description, pending)
        for req in accepted:
            self._start(req)

    async def cancel(self, payload: dict[str, Any], answer: bool = True) -> None:
        """Stop report requests (oadrCancelReport); with reportToFollow, answer and then send the last report.
        A cancel piggy-backed on oadrUpdatedReport (``answer`` False) is not answered: that exchange was the
        answer, and the test tool (TH 1.0.2, R1_3050) refuses an oadrCanceledReport it cannot pair."""
        ids = payload.get("report_request_id")
        follow = payload.get("report_to_follow") in (True, "true", "1")
        last: list[_Job] = []
        for rid in [str(i) for i in (ids if isinstance(ids, list) else [ids])]:
            job = self._jobs.get(rid)
            live = job is not None and job.live(self._clock.now())
            await self._drop(rid)
            if follow and live and job is not None and not job.req.one_shot and job.req.specifier_id in self._offers:
                last.append(job)
            await self._audit("report.cancelled", {"report_request_id": rid, "known": job is not None,
                              "report_to_follow": follow}, "utility")  # fmt: skip
        pending = self.running() + [job.req.report_request_id for job in last]
        if answer:
            await self._answer("oadrCanceledReport", payload.get("request_id"), 200, "OK", pending)
        for job in last:
            await self._send(job.req, job.buffered + self._sample_interval(job.req, self._clock.now(), 0.0))

    async def stop(self) -> None:
        """Stop every report task."""
        jobs, self._jobs = self._jobs, {}
        tasks = [j.task for j in jobs.values() if j.task is not None] + list(self._spawned)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- requests -----------------------------------------------------------------------------

    def _request(self, item: Any) -> Request:
        """Read one oadrReportRequest; raise ValueError when it names no report of ours."""
        spec = item.get("report_specifier") if isinstance(item, dict) else None
        if not isinstance(spec, dict):
            raise ValueError("report request without a reportSpecifier")
        specifier_id = str(spec.get("report_specifier_id"))
        payloads = spec.get("specifier_payloads") or []
        r_ids = tuple(str(p.get("r_id")) for p in (payloads if isinstance(payloads, list) else [payloads]))
        if specifier_id != METADATA_ID:
            if specifier_id not in self._offers:
                raise ValueError(f"reportSpecifierID {specifier_id!r} is not offered by this VEN")
            known = {p.r_id for p in self._offers[specifier_id].points}
            if not r_ids or not set(r_ids) <= known:
                raise ValueError(f"rIDs {sorted(set(r_ids) - known)} are not in report {specifier_id}")
        interval = spec.get("report_interval") or {}
        start = interval.get("dtstart")
        return Request(
            report_request_id=str(item.get("report_request_id")),
            specifier_id=specifier_id,
            r_ids=r_ids,
            granularity_s=_seconds(spec.get("granularity")) or 0.0,
            report_back_s=_seconds(spec.get("report_back_duration")),
            start=start if isinstance(start, datetime) else None,
            duration_s=_seconds(interval.get("duration")),
        )

    def _start(self, req: Request) -> None:
        """Run one report request in its own task."""
        job = _Job(req)
        if req.specifier_id == METADATA_ID:
            job.live_until = None if req.one_shot else req.end
        self._jobs[req.report_request_id] = job
        job.task = asyncio.create_task(self._run(job), name=f"report-{req.report_request_id}")

    async def _drop(self, rid: str) -> None:
        """Stop a request's task and forget it."""
        job = self._jobs.pop(rid, None)
        task = job.task if job is not None else None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, job: _Job) -> None:
        """Serve one report request until it completes or is cancelled; no error ends the VEN."""
        req = job.req
        try:
            if req.specifier_id == METADATA_ID:
                await self._sleep_until(req.start)
                await self.register(req.report_request_id)
            elif req.specifier_id == HISTORY_ID:
                await self._history_report(req)
            elif req.one_shot:
                await self._sleep_until(req.start)
                await self._send(req, self._sample_interval(req, self._clock.now(), req.granularity_s))
            else:
                await self._periodic(job)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            _log.exception("report failed", report_request_id=req.report_request_id, error=repr(err))
            await self._audit("report.failed", {"report_request_id": req.report_request_id, "error": repr(err)})

    async def _periodic(self, job: _Job) -> None:
        """Sample every granularity and report every reportBackDuration while the interval lasts."""
        req = job.req
        back = req.report_back_s or 0.0
        g = req.granularity_s if req.granularity_s > 0 else back  # granularity 0: one sample per report
        g = min(max(g, self._cfg.report_min_period_s), self._cfg.report_max_period_s)
        per_report = max(1, round(back / g))
        end, now = req.end, self._clock.now()
        start = req.start or now
        # On the request's grid; a request that arrives late samples at once for the slot under way.
        k = max(0, math.floor((now - start).total_seconds() / g))
        taken = 0
        while True:
            t = max(start + timedelta(seconds=g * k), now)
            if end is not None and t >= end:  # checked before sampling: no report past the end
                return
            await self._sleep_until(t)
            job.buffered += self._sample_interval(req, t, g)
            taken, k = taken + 1, k + 1
            if taken >= per_report:
                intervals, job.buffered, taken = job.buffered, [], 0
                await self._send(req, intervals)

    def _sample_interval(self, req: Request, t: datetime, duration_s: float) -> list[dict[str, Any]]:
        """Return this moment's interval holding a payload for every requested rID (none without a sample)."""
        sample = self._sample()
        if sample is None:
            return []
        points = {p.r_id: p for p in self._offers[req.specifier_id].points}
        payloads = []
        for r_id in req.r_ids:
            point = points[r_id]
            if point.measurement is None:
                payloads.append(_payload(r_id, None, status_of(sample)))
            else:
                payloads.append(_payload(r_id, point.read(sample), None))
        return [{"dtstart": t, "duration_s": max(0.0, duration_s), "payloads": payloads}]

    def _sample(self) -> TelemetrySample | None:
        """Return the telemetry provider's latest sample; a failing provider yields nothing."""
        if self._telemetry is None:
            return None
        try:
            return self._telemetry()
        except Exception as err:
            _log.error("telemetry provider failed", error=repr(err))
            return None

    async def _history_report(self, req: Request) -> None:
        """Read the measurement store over the requested window and send every interval at once.

        Without a duration the request asks for all data: from a past dtstart up to now, or (dtstart
        now, later, or less than one history interval ago: the request took a while to reach us, R1_3130)
        the last hour counted back from now, newest interval first.
        """
        assert self._history is not None
        now = self._clock.now()
        newest_first = False
        if req.duration_s:
            start = req.start or now - timedelta(seconds=req.duration_s)
            end = start + timedelta(seconds=req.duration_s)
        elif req.start is not None and req.start < now - timedelta(seconds=_HISTORY_STEP_S):
            start, end = req.start, now
        else:
            span = min(_ALL_DATA_S, self._cfg.history_s)
            start, end, newest_first = now - timedelta(seconds=span), now, True
        await self._sleep_until(end if end > now else None)
        samples = await asyncio.wait_for(self._history(start, end), _HISTORY_TIMEOUT_S)
        step = req.granularity_s if req.granularity_s > 0 else max(self._cfg.report_min_period_s, _HISTORY_STEP_S)
        intervals: list[dict[str, Any]] = []
        t = start
        while t < end:
            t_next = min(end, t + timedelta(seconds=step))
            power, energy = aggregate([s for s in samples if t <= s.t < t_next], t, t_next)
            # A window asked for is covered whole: where the store has nothing, "no value" (R1_3140).
            if power is not None or req.duration_s:
                values = {"facility-power-history": power, "facility-energy-history": energy}
                payloads = [_payload(r, _rounded(values[r]), None) for r in req.r_ids]
                intervals.append({"dtstart": t, "duration_s": (t_next - t).total_seconds(), "payloads": payloads})
            t = t_next
        # The report spans the window asked for even where the store holds no data yet (R1_3140: the
        # tool wants dtstart within 2 min of the requested start).
        window = (start, float(req.duration_s)) if req.duration_s else None
        await self._send(req, intervals[::-1] if newest_first else intervals, window)

    async def _send(
        self, req: Request, intervals: list[dict[str, Any]], window: tuple[datetime, float] | None = None
    ) -> None:
        """Send one oadrUpdateReport (dtstart and duration: ``window``, else its first interval's and
        their sum); stop the request if the VTN cancels it in its answer."""
        if not intervals:
            await self._audit("report.no_data", {"report_request_id": req.report_request_id})
            return
        total_s = window[1] if window else sum(iv["duration_s"] for iv in intervals)
        report = {
            "report_id": f"rpt-{uuid.uuid4().hex[:12]}",
            "report_request_id": req.report_request_id,
            "report_specifier_id": req.specifier_id,
            "report_name": self._offers[req.specifier_id].name,
            "created_date_time": self._clock.now(),
            "dtstart": window[0] if window else intervals[0]["dtstart"],
            "duration": iso_duration(total_s),
            "intervals": [{**iv, "duration": iso_duration(iv["duration_s"])} for iv in intervals],
        }
        message = self._client._create_message(
            UPDATE_TEMPLATE, request_id=uuid.uuid4().hex[:12], ven_id=self._client.ven_id, reports=[report]
        )
        _rtype, payload = await self._exchange(message)
        piggy = payload.get("cancel_report")
        if isinstance(piggy, dict):  # a cancel piggy-backed on oadrUpdatedReport (answered on its own task)
            task = asyncio.get_running_loop().create_task(self.cancel(piggy, answer=False))
            self._spawned.add(task)
            task.add_done_callback(self._spawned.discard)

    async def _answer(
        self, message_type: str, request_id: Any, code: int, description: str, pending: list[str]
    ) -> None:
        """Send oadrCreatedReport or oadrCanceledReport with the pending request ids."""
        message = self._client._create_message(
            message_type,
            response={"response_code": code, "response_description": description, "request_id": request_id},
            pending_reports=[{"report_request_id": rid} for rid in dict.fromkeys(pending)],
            ven_id=self._client.ven_id,
        )
        await self._exchange(message)

    async def _exchange(self, message: Any) -> tuple[str | None, dict[str, Any]]:
        """Send one EiReport message once no other report exchange is in flight; return the answer."""
        async with self._exchange_lock:
            return await self._client._perform_request("EiReport", message)

    async def _sleep_until(self, t: datetime | None) -> None:
        """Wait until ``t`` on the injected clock (at once when None or past)."""
        if t is not None:
            delay = (t - self._clock.now()).total_seconds()
            if delay > 0:
                await self._clock.sleep(delay)


def _payload(r_id: str, value: float | None, status: dict[str, Any] | None) -> dict[str, Any]:
    """Return one oadrReportPayload for the update template (a missing value is sent as 0, "no value")."""
    if status is None and (value is None or not math.isfinite(value)):
        return {"r_id": r_id, "value": 0.0, "status": None, "quality": _NO_VALUE}
    return {"r_id": r_id, "value": value, "status": status, "quality": QUALITY}


def _rounded(value: float | None) -> float | None:
    """Return a value rounded to 0.001 (None stays None)."""
    return None if value is None else round(value, 3)


def _seconds(value: Any) -> float | None:
    """Return a timedelta in seconds, None for anything else."""
    return value.total_seconds() if isinstance(value, timedelta) else None


def _describe(req: Request) -> dict[str, Any]:
    """Return the audit record of a report request."""
    return {
        "report_request_id": req.report_request_id,
        "report_specifier_id": req.specifier_id,
        "r_ids": list(req.r_ids),
        "granularity_s": req.granularity_s,
        "report_back_s": req.report_back_s,
        "start": req.start.isoformat() if req.start else None,
        "duration_s": req.duration_s,
    }


__all__ = ["Reporter", "Request"]
