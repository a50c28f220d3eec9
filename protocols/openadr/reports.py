"""OpenADR 2.0b reports: TELEMETRY_USAGE, TELEMETRY_STATUS and HISTORY_USAGE, with fixed ids.

openleadr's own report machinery generates ids at every start, runs callbacks on its scheduler
(a slow one stalls every report) and cannot send oadrPayloadResourceStatus. This engine offers
the reports under fixed ``reportSpecifierID`` and ``rID`` values, answers oadrCreateReport and
oadrCancelReport, and runs one task per report request:

- periodic: a sample every ``granularity``, a report every ``reportBackDuration``;
- one-shot: ``granularity`` or ``reportBackDuration`` of zero, or a HISTORY_USAGE request, which
  reads the measurement store over its ``reportInterval`` and sends interval means (W) and
  energies (Wh) at ``granularity``.

The telemetry provider is a plain function returning the latest sample (the control loop keeps
it; it must return at once). The history provider is awaited in the report's own task, under a
time limit, so neither can hold up polling or another report.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jinja2 import ChoiceLoader, DictLoader
from openleadr import enums, messaging, objects

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from gateway.logs import get_logger
from gateway.model import TelemetrySample
from protocols.openadr.client import OadrClient

_log = get_logger("openadr.reports")

USAGE_ID = "drgw-telemetry-usage"
STATUS_ID = "drgw-telemetry-status"
HISTORY_ID = "drgw-history-usage"
_HISTORY_TIMEOUT_S = 30.0
_UPDATE = "drgwUpdateReport"

Telemetry = Callable[[], TelemetrySample | None]
History = Callable[[datetime, datetime], Awaitable[Sequence[TelemetrySample]]]
AuditFn = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class Point:
    """One data point of a report: its fixed rID, the resource it describes, and its unit."""

    r_id: str
    resource_id: str
    measurement: objects.Measurement | None
    read: Callable[[TelemetrySample], float | None]


def _power() -> objects.Measurement:
    """Return the powerReal measurement (W)."""
    return objects.Measurement(
        name="powerReal",
        description="RealPower",
        unit="W",
        scale="none",
        power_attributes=objects.PowerAttributes(hertz=60, voltage=480, ac=True),
    )


def _energy() -> objects.Measurement:
    """Return the energyReal measurement (Wh)."""
    return objects.Measurement(name="energyReal", description="RealEnergy", unit="Wh", scale="none")


USAGE_POINTS = (
    Point("facility-power", "facility", _power(), lambda s: s.facility_w),
    Point("facility-energy", "facility", _energy(), lambda s: s.facility_energy_wh),
    Point("battery-power", "battery", _power(), lambda s: s.battery_w),
    Point("gpu-power", "gpus", _power(), lambda s: s.gpu_w),
)
STATUS_POINTS = (Point("facility-status", "facility", None, lambda s: None),)
HISTORY_POINTS = (
    Point("facility-power-history", "facility", _power(), lambda s: s.facility_w),
    Point("facility-energy-history", "facility", _energy(), lambda s: s.facility_energy_wh),
)

# openleadr's oadrUpdateReport template knows only payloadFloat; this one adds the resource status.
_TEMPLATE = """<oadr:oadrSignedObject xmlns:oadr="http://openadr.org/oadr-2.0b/2012/07" \
xmlns:pyld="http://docs.oasis-open.org/ns/energyinterop/201110/payloads" oadr:Id="oadrSignedObject">\
<oadr:oadrUpdateReport ei:schemaVersion="2.0b" xmlns:ei="http://docs.oasis-open.org/ns/energyinterop/201110">\
<pyld:requestID>{{ request_id }}</pyld:requestID>\
{% for report in reports %}<oadr:oadrReport xmlns:xcal="urn:ietf:params:xml:ns:icalendar-2.0">\
<xcal:dtstart><xcal:date-time>{{ report.dtstart|datetimeformat }}</xcal:date-time></xcal:dtstart>\
<xcal:duration><xcal:duration>{{ report.duration|timedeltaformat }}</xcal:duration></xcal:duration>\
<strm:intervals xmlns:strm="urn:ietf:params:xml:ns:icalendar-2.0:stream">\
{% for iv in report.intervals %}<ei:interval>\
<xcal:dtstart><xcal:date-time>{{ iv.dtstart|datetimeformat }}</xcal:date-time></xcal:dtstart>\
{% if iv.duration is not none %}<xcal:duration><xcal:duration>{{ iv.duration|timedeltaformat }}</xcal:duration>\
</xcal:duration>{% endif %}\
<oadr:oadrReportPayload><ei:rID>{{ iv.r_id }}</ei:rID>\
{% if iv.status is not none %}<oadr:oadrPayloadResourceStatus>\
<oadr:oadrOnline>{{ iv.status.online|booleanformat }}</oadr:oadrOnline>\
<oadr:oadrManualOverride>{{ iv.status.manual_override|booleanformat }}</oadr:oadrManualOverride>\
{% if iv.status.percent_offset is not none or iv.status.setpoint is not none %}<oadr:oadrLoadControlState>\
{% if iv.status.percent_offset is not none %}<oadr:oadrPercentOffset><oadr:oadrCurrent>{{ iv.status.percent_offset }}\
</oadr:oadrCurrent><oadr:oadrNormal>0</oadr:oadrNormal></oadr:oadrPercentOffset>{% endif %}\
{% if iv.status.setpoint is not none %}<oadr:oadrSetPoint><oadr:oadrCurrent>{{ iv.status.setpoint }}</oadr:oadrCurrent>\
</oadr:oadrSetPoint>{% endif %}</oadr:oadrLoadControlState>{% endif %}</oadr:oadrPayloadResourceStatus>\
{% else %}<ei:payloadFloat><ei:value>{{ iv.value }}</ei:value></ei:payloadFloat>{% endif %}\
<oadr:oadrDataQuality>{{ iv.quality }}</oadr:oadrDataQuality></oadr:oadrReportPayload></ei:interval>{% endfor %}\
</strm:intervals>\
<ei:eiReportID>{{ report.report_id }}</ei:eiReportID>\
<ei:reportRequestID>{{ report.report_request_id }}</ei:reportRequestID>\
<ei:reportSpecifierID>{{ report.report_specifier_id }}</ei:reportSpecifierID>\
<ei:reportName>{{ report.report_name }}</ei:reportName>\
<ei:createdDateTime>{{ report.created_date_time|datetimeformat }}</ei:createdDateTime>\
</oadr:oadrReport>{% endfor %}<ei:venID>{{ ven_id }}</ei:venID></oadr:oadrUpdateReport></oadr:oadrSignedObject>"""


def install_template() -> None:
    """Add the status-capable update template to openleadr's template environment (idempotent)."""
    env = messaging.TEMPLATES
    if isinstance(env.loader, ChoiceLoader):
        return
    assert env.loader is not None
    env.loader = ChoiceLoader([DictLoader({f"{_UPDATE}.xml": _TEMPLATE}), env.loader])


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
        install_template()
        self._client = client
        self._cfg = cfg
        self._clock = clock
        self._audit = audit
        self._telemetry = telemetry
        self._history = history
        self._catalogue: dict[str, tuple[str, tuple[Point, ...]]] = {}
        if telemetry is not None:
            self._catalogue[USAGE_ID] = ("TELEMETRY_USAGE", USAGE_POINTS)
            self._catalogue[STATUS_ID] = ("TELEMETRY_STATUS", STATUS_POINTS)
        if history is not None:
            self._catalogue[HISTORY_ID] = ("HISTORY_USAGE", HISTORY_POINTS)
        self._jobs: dict[str, asyncio.Task[None]] = {}

    @property
    def offered(self) -> bool:
        """Return whether there is any report to offer."""
        return bool(self._catalogue)

    def running(self) -> list[str]:
        """Return the report request ids being served."""
        return [rid for rid, task in self._jobs.items() if not task.done()]

    def metadata(self) -> list[objects.Report]:
        """Return the METADATA reports for oadrRegisterReport (fixed ids)."""
        lo, hi = timedelta(seconds=self._cfg.report_min_period_s), timedelta(seconds=self._cfg.report_max_period_s)
        reports = []
        for specifier_id, (name, points) in self._catalogue.items():
            descriptions = [
                objects.ReportDescription(
                    r_id=p.r_id,
                    market_context=None,
                    reading_type=enums.READING_TYPE.DIRECT_READ,
                    report_subject=objects.Target(resource_id=p.resource_id),
                    report_data_source=objects.Target(resource_id=p.resource_id),
                    report_type="x-resourceStatus" if p.measurement is None else enums.REPORT_TYPE.USAGE,
                    sampling_rate=objects.SamplingRate(min_period=lo, max_period=hi, on_change=False),
                    measurement=p.measurement,
                )
                for p in points
            ]
            duration = self._cfg.history_s if name == "HISTORY_USAGE" else self._cfg.report_max_period_s
            reports.append(
                objects.Report(
                    report_specifier_id=specifier_id,
                    report_name=f"METADATA_{name}",
                    report_descriptions=descriptions,
                    created_date_time=self._clock.now(),
                    duration=timedelta(seconds=duration),
                )
            )
        return reports

    async def register(self) -> None:
        """Offer the reports (oadrRegisterReport) and start whatever the answer requests."""
        if not self.offered:
            return
        message = self._client._create_message(
            "oadrRegisterReport",
            request_id=uuid.uuid4().hex[:12],
            ven_id=self._client.ven_id,
            reports=self.metadata(),
            report_request_id=0,
        )
        rtype, payload = await self._client._perform_request("EiReport", message)
        if rtype == "oadrRegisteredReport" and payload.get("report_requests"):
            await self.create(payload)

    async def create(self, payload: dict[str, Any]) -> None:
        """Start the requested reports (oadrCreateReport / oadrRegisteredReport) and confirm them."""
        accepted: list[str] = []
        code, description = 200, "OK"
        raw = payload.get("report_requests") or []
        for item in raw if isinstance(raw, list) else [raw]:
            try:
                req = self._request(item)
            except ValueError as err:
                code, description = 452, str(err)[:200]
                await self._audit("report.refused", {"reason": str(err)}, "utility")
                continue
            self._start(req)
            accepted.append(req.report_request_id)
            await self._audit("report.requested", _describe(req), "utility")
        request_id = payload.get("request_id") or (payload.get("response") or {}).get("request_id")
        message = self._client._create_message(
            "oadrCreatedReport",
            response={"response_code": code, "response_description": description, "request_id": request_id},
            pending_reports=[{"report_request_id": rid} for rid in self.running()],
            ven_id=self._client.ven_id,
        )
        await self._client._perform_request("EiReport", message)

    async def cancel(self, payload: dict[str, Any]) -> None:
        """Stop a report request (oadrCancelReport), sending a last report first if asked."""
        ids = payload.get("report_request_id")
        for rid in ids if isinstance(ids, list) else [ids]:
            rid = str(rid)
            task = self._jobs.pop(rid, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._audit("report.cancelled", {"report_request_id": rid, "known": task is not None}, "utility")
        message = self._client._create_message(
            "oadrCanceledReport",
            response={"response_code": 200, "response_description": "OK", "request_id": payload.get("request_id")},
            pending_reports=[{"report_request_id": rid} for rid in self.running()],
            ven_id=self._client.ven_id,
        )
        await self._client._perform_request("EiReport", message)

    async def stop(self) -> None:
        """Stop every report task."""
        jobs, self._jobs = self._jobs, {}
        for task in jobs.values():
            task.cancel()
        for task in jobs.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _request(self, item: Any) -> Request:
        """Read one oadrReportRequest; raise ValueError when it names no report of ours."""
        spec = item.get("report_specifier") if isinstance(item, dict) else None
        if not isinstance(spec, dict):
            raise ValueError("report request without a reportSpecifier")
        specifier_id = str(spec.get("report_specifier_id"))
        if specifier_id not in self._catalogue:
            raise ValueError(f"reportSpecifierID {specifier_id!r} is not offered by this VEN")
        known = {p.r_id for p in self._catalogue[specifier_id][1]}
        payloads = spec.get("specifier_payloads") or []
        r_ids = tuple(str(p.get("r_id")) for p in (payloads if isinstance(payloads, list) else [payloads]))
        if not r_ids or not set(r_ids) <= known:
            raise ValueError(f"rIDs {sorted(set(r_ids) - known)} are not in report {specifier_id}")
        interval = spec.get("report_interval") or {}
        granularity = spec.get("granularity")
        back = spec.get("report_back_duration")
        return Request(
            report_request_id=str(item.get("report_request_id")),
            specifier_id=specifier_id,
            r_ids=r_ids,
            granularity_s=granularity.total_seconds() if isinstance(granularity, timedelta) else 0.0,
            report_back_s=back.total_seconds() if isinstance(back, timedelta) else None,
            start=interval.get("dtstart") if isinstance(interval.get("dtstart"), datetime) else None,
            duration_s=_seconds(interval.get("duration")),
        )

    def _start(self, req: Request) -> None:
        """Run one report request in its own task (replacing an earlier one with the same id)."""
        old = self._jobs.pop(req.report_request_id, None)
        if old is not None:
            old.cancel()
        self._jobs[req.report_request_id] = asyncio.create_task(self._run(req), name=f"report-{req.report_request_id}")

    async def _run(self, req: Request) -> None:
        """Serve one report request until it completes or is cancelled; no error ends the VEN."""
        try:
            if req.specifier_id == HISTORY_ID:
                await self._history_report(req)
            elif req.granularity_s <= 0 or (req.report_back_s is not None and req.report_back_s <= 0):
                await self._sleep_until(req.start)
                await self._send(req, self._now_intervals(req, None), timedelta(0))
            else:
                await self._periodic(req)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            _log.exception("report failed", report_request_id=req.report_request_id, error=repr(err))
            await self._audit("report.failed", {"report_request_id": req.report_request_id, "error": repr(err)})

    async def _periodic(self, req: Request) -> None:
        """Sample every granularity and report every reportBackDuration until the interval ends."""
        g = min(max(req.granularity_s, self._cfg.report_min_period_s), self._cfg.report_max_period_s)
        per_report = max(1, round((req.report_back_s or g) / g))
        await self._sleep_until(req.start)
        end = None if req.start is None or not req.duration_s else req.start + timedelta(seconds=req.duration_s)
        buffered: list[dict[str, Any]] = []
        taken = 0
        while True:
            buffered += self._now_intervals(req, timedelta(seconds=g))
            taken += 1
            if taken >= per_report:
                await self._send(req, buffered, timedelta(seconds=g * taken))
                buffered, taken = [], 0
            if end is not None and self._clock.now() >= end:
                return
            await self._clock.sleep(g)

    def _now_intervals(self, req: Request, duration: timedelta | None) -> list[dict[str, Any]]:
        """Return this moment's report intervals, one per requested rID (none without a sample)."""
        sample = self._sample()
        if sample is None:
            return []
        points = {p.r_id: p for p in self._catalogue[req.specifier_id][1]}
        out = []
        for r_id in req.r_ids:
            point = points[r_id]
            if point.measurement is None:
                out.append(_interval(sample.t, duration, r_id, None, _status(sample)))
            elif (value := point.read(sample)) is not None:
                out.append(_interval(sample.t, duration, r_id, value, None))
        return out

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
        """Read the measurement store over the requested window and send interval values once."""
        assert self._history is not None
        now = self._clock.now()
        span = req.duration_s or req.report_back_s or req.granularity_s or 3600.0
        start = req.start or now - timedelta(seconds=span)
        end = start + timedelta(seconds=span)
        await self._sleep_until(end if end > now else None)
        samples = await asyncio.wait_for(self._history(start, end), _HISTORY_TIMEOUT_S)
        step = req.granularity_s if req.granularity_s > 0 else span
        intervals: list[dict[str, Any]] = []
        t = start
        while t < end:
            t_next = min(end, t + timedelta(seconds=step))
            inside = [s for s in samples if t <= s.t < t_next]
            power, energy = _aggregate(inside, t, t_next)
            for r_id in req.r_ids:
                value = power if r_id == "facility-power-history" else energy
                if value is not None:
                    intervals.append(_interval(t, t_next - t, r_id, round(value, 3), None))
            t = t_next
        await self._send(req, intervals, end - start, dtstart=start)

    async def _send(
        self, req: Request, intervals: list[dict[str, Any]], duration: timedelta, dtstart: datetime | None = None
    ) -> None:
        """Send one oadrUpdateReport; stop the request if the VTN cancels it in its answer."""
        name = self._catalogue[req.specifier_id][0]
        now = self._clock.now()
        report = {
            "report_id": f"rpt-{uuid.uuid4().hex[:12]}",
            "report_request_id": req.report_request_id,
            "report_specifier_id": req.specifier_id,
            "report_name": name,
            "created_date_time": now,
            "dtstart": dtstart or (min(iv["dtstart"] for iv in intervals) if intervals else now),
            "duration": duration,
            "intervals": intervals,
        }
        message = self._client._create_message(
            _UPDATE, request_id=uuid.uuid4().hex[:12], ven_id=self._client.ven_id, reports=[report]
        )
        _rtype, payload = await self._client._perform_request("EiReport", message)
        if isinstance(payload.get("cancel_report"), dict):
            asyncio.get_running_loop().create_task(self.cancel(payload["cancel_report"]))

    async def _sleep_until(self, t: datetime | None) -> None:
        """Wait until ``t`` on the injected clock (at once when None or past)."""
        if t is not None:
            delay = (t - self._clock.now()).total_seconds()
            if delay > 0:
                await self._clock.sleep(delay)


def _aggregate(samples: Sequence[TelemetrySample], t0: datetime, t1: datetime) -> tuple[float | None, float | None]:
    """Return the mean facility power (W) and the energy (Wh) of one interval from its samples."""
    powers = [(s.t, s.facility_w) for s in samples if s.facility_w is not None]
    if not powers:
        return None, None
    mean = sum(w for _, w in powers) / len(powers)
    counters = [s.facility_energy_wh for s in samples if s.facility_energy_wh is not None]
    if len(counters) >= 2:
        return mean, counters[-1] - counters[0]
    return mean, mean * (t1 - t0).total_seconds() / 3600.0


def _interval(
    t: datetime, duration: timedelta | None, r_id: str, value: float | None, status: dict[str, Any] | None
) -> dict[str, Any]:
    """Return one report interval for the update template."""
    return {"dtstart": t, "duration": duration, "r_id": r_id, "value": value, "status": status,
            "quality": "Quality Good - Non Specific"}  # fmt: skip


def _status(sample: TelemetrySample) -> dict[str, Any]:
    """Return the oadrPayloadResourceStatus fields of a sample."""
    return {
        "online": sample.online,
        "manual_override": sample.manual_override,
        "percent_offset": None if sample.shed_pct is None else round(-sample.shed_pct, 3),
        "setpoint": None if sample.limit_w is None else round(sample.limit_w, 1),
    }


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
