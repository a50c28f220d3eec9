"""OpenADR 2.0b reports offered by the VEN: TELEMETRY_USAGE, TELEMETRY_STATUS and HISTORY_USAGE.

What is offered (the catalogue, under fixed ``reportSpecifierID`` and ``rID`` values), how it is
described (the METADATA reports of oadrRegisterReport) and how a report goes on the wire (the
update and register templates). ``reporter.Reporter`` runs the requests.

Reading and report types per report, as the 2.0b profile's conformance rules and the
certification tool require: TELEMETRY_USAGE and HISTORY_USAGE points are ``usage`` with reading
type ``Direct Read`` and a powerReal or energyReal item; TELEMETRY_STATUS points are
``x-resourceStatus`` with reading type ``x-notApplicable`` and no item.

openleadr's own templates cannot carry what 2.0b needs here, so the gateway renders its own:
an interval holds one oadrReportPayload for EVERY requested rID (openleadr's holds one), a
payload may be an oadrPayloadResourceStatus, durations are formatted here (openleadr writes a
zero duration as the invalid ``P``; ``iso_duration`` writes ``PT0S``), and an oadrRegisterReport
answering a METADATA request names that request (openleadr's has no such field).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from jinja2 import ChoiceLoader, DictLoader
from openleadr import enums, messaging, objects

from gateway.config import OpenAdrConfig
from gateway.model import TelemetrySample

USAGE_ID = "drgw-telemetry-usage"  # the metered site: one powerReal and one energyReal point
DEVICE_USAGE_ID = "drgw-telemetry-usage-devices"  # the battery's and the GPUs' power
STATUS_ID = "drgw-telemetry-status"
HISTORY_ID = "drgw-history-usage"
METADATA_ID = "METADATA"  # the reportSpecifierID a VTN uses to ask for the METADATA reports
UPDATE_TEMPLATE = "drgwUpdateReport"
REGISTER_TEMPLATE = "drgwRegisterReport"
QUALITY = "Quality Good - Non Specific"

Telemetry = Callable[[], TelemetrySample | None]
History = Callable[[datetime, datetime], Awaitable[Sequence[TelemetrySample]]]


@dataclass(frozen=True)
class Point:
    """One data point of a report: its fixed rID, the resource role it describes, and its unit."""

    r_id: str
    role: str  # facility, battery or gpus: the resource id comes from [openadr.report_resources]
    measurement: objects.Measurement | None
    read: Callable[[TelemetrySample], float | None]


@dataclass(frozen=True)
class Offer:
    """One report the VEN offers: its name and its points."""

    name: str  # TELEMETRY_USAGE, TELEMETRY_STATUS, HISTORY_USAGE
    points: tuple[Point, ...]

    @property
    def status(self) -> bool:
        """Return whether this is the status report (x-resourceStatus points)."""
        return self.name == "TELEMETRY_STATUS"


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


# The site's TELEMETRY_USAGE holds one powerReal and one energyReal point; the devices' power points go
# in a second TELEMETRY_USAGE report. The certification tool (R1_3150, R1_3160) asks for every point of
# the first TELEMETRY_USAGE report it was offered and accepts, in the updates, only its energyReal rID
# and the last of its powerReal rIDs: one report with three powerReal points cannot pass.
USAGE_POINTS = (
    Point("facility-power", "facility", _power(), lambda s: s.facility_w),
    Point("facility-energy", "facility", _energy(), lambda s: s.facility_energy_wh),
)
DEVICE_USAGE_POINTS = (
    Point("battery-power", "battery", _power(), lambda s: s.battery_w),
    Point("gpu-power", "gpus", _power(), lambda s: s.gpu_w),
)
STATUS_POINTS = (Point("facility-status", "facility", None, lambda s: None),)
HISTORY_POINTS = (
    Point("facility-power-history", "facility", _power(), lambda s: s.facility_w),
    Point("facility-energy-history", "facility", _energy(), lambda s: s.facility_energy_wh),
)


def catalogue(telemetry: bool, history: bool) -> dict[str, Offer]:
    """Return the offered reports by reportSpecifierID (telemetry and history as the site can serve)."""
    out: dict[str, Offer] = {}
    if telemetry:
        out[USAGE_ID] = Offer("TELEMETRY_USAGE", USAGE_POINTS)
        out[DEVICE_USAGE_ID] = Offer("TELEMETRY_USAGE", DEVICE_USAGE_POINTS)
        out[STATUS_ID] = Offer("TELEMETRY_STATUS", STATUS_POINTS)
    if history:
        out[HISTORY_ID] = Offer("HISTORY_USAGE", HISTORY_POINTS)
    return out


def reading_type(offer: Offer) -> str:
    """Return the reading type of an offer's points (x-notApplicable for status, else Direct Read)."""
    return enums.READING_TYPE.X_NOT_APPLICABLE if offer.status else enums.READING_TYPE.DIRECT_READ


def resource_id(cfg: OpenAdrConfig, role: str) -> str:
    """Return the configured resource id of a point's role."""
    return str(getattr(cfg.report_resources, role))


def metadata(offers: dict[str, Offer], cfg: OpenAdrConfig, now: datetime) -> list[objects.Report]:
    """Return the METADATA reports for oadrRegisterReport (fixed ids, reading types per report)."""
    lo, hi = timedelta(seconds=cfg.report_min_period_s), timedelta(seconds=cfg.report_max_period_s)
    reports = []
    for specifier_id, offer in offers.items():
        descriptions = [
            objects.ReportDescription(
                r_id=p.r_id,
                market_context=None,
                reading_type=reading_type(offer),
                report_subject=objects.Target(resource_id=resource_id(cfg, p.role)),
                report_data_source=objects.Target(resource_id=resource_id(cfg, p.role)),
                report_type="x-resourceStatus" if offer.status else enums.REPORT_TYPE.USAGE,
                sampling_rate=objects.SamplingRate(min_period=lo, max_period=hi, on_change=False),
                measurement=p.measurement,
            )
            for p in offer.points
        ]
        duration = cfg.history_s if offer.name == "HISTORY_USAGE" else cfg.report_max_period_s
        reports.append(
            objects.Report(
                report_specifier_id=specifier_id,
                report_name=f"METADATA_{offer.name}",
                report_descriptions=descriptions,
                created_date_time=now,
                duration=timedelta(seconds=duration),
            )
        )
    return reports


def iso_duration(value: timedelta | float) -> str:
    """Return an RFC 5545 / xs:duration for a span (``PT0S`` for zero, never the bare ``P``)."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"negative duration {seconds} s")
    whole = round(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = "P" + (f"{days}D" if days else "")
    clock = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "") + (f"{secs}S" if secs else "")
    if clock or not days:
        out += "T" + (clock or "0S")
    return out


# An oadrUpdateReport whose every interval holds one payload per requested rID (float or status).
_UPDATE = """<oadr:oadrSignedObject xmlns:oadr="http://openadr.org/oadr-2.0b/2012/07" \
xmlns:pyld="http://docs.oasis-open.org/ns/energyinterop/201110/payloads" oadr:Id="oadrSignedObject">\
<oadr:oadrUpdateReport ei:schemaVersion="2.0b" xmlns:ei="http://docs.oasis-open.org/ns/energyinterop/201110">\
<pyld:requestID>{{ request_id }}</pyld:requestID>\
{% for report in reports %}<oadr:oadrReport xmlns:xcal="urn:ietf:params:xml:ns:icalendar-2.0">\
<xcal:dtstart><xcal:date-time>{{ report.dtstart|datetimeformat }}</xcal:date-time></xcal:dtstart>\
<xcal:duration><xcal:duration>{{ report.duration }}</xcal:duration></xcal:duration>\
<strm:intervals xmlns:strm="urn:ietf:params:xml:ns:icalendar-2.0:stream">\
{% for iv in report.intervals %}<ei:interval>\
<xcal:dtstart><xcal:date-time>{{ iv.dtstart|datetimeformat }}</xcal:date-time></xcal:dtstart>\
<xcal:duration><xcal:duration>{{ iv.duration }}</xcal:duration></xcal:duration>\
{% for p in iv.payloads %}<oadr:oadrReportPayload><ei:rID>{{ p.r_id }}</ei:rID>\
{% if p.status is not none %}<oadr:oadrPayloadResourceStatus>\
<oadr:oadrOnline>{{ p.status.online|booleanformat }}</oadr:oadrOnline>\
<oadr:oadrManualOverride>{{ p.status.manual_override|booleanformat }}</oadr:oadrManualOverride>\
{% if p.status.percent_offset is not none or p.status.setpoint is not none %}<oadr:oadrLoadControlState>\
{% if p.status.percent_offset is not none %}<oadr:oadrPercentOffset><oadr:oadrCurrent>{{ p.status.percent_offset }}\
</oadr:oadrCurrent><oadr:oadrNormal>0</oadr:oadrNormal></oadr:oadrPercentOffset>{% endif %}\
{% if p.status.setpoint is not none %}<oadr:oadrSetPoint><oadr:oadrCurrent>{{ p.status.setpoint }}</oadr:oadrCurrent>\
</oadr:oadrSetPoint>{% endif %}</oadr:oadrLoadControlState>{% endif %}</oadr:oadrPayloadResourceStatus>\
{% else %}<ei:payloadFloat><ei:value>{{ p.value }}</ei:value></ei:payloadFloat>{% endif %}\
<oadr:oadrDataQuality>{{ p.quality }}</oadr:oadrDataQuality></oadr:oadrReportPayload>{% endfor %}\
</ei:interval>{% endfor %}\
</strm:intervals>\
<ei:eiReportID>{{ report.report_id }}</ei:eiReportID>\
<ei:reportRequestID>{{ report.report_request_id }}</ei:reportRequestID>\
<ei:reportSpecifierID>{{ report.report_specifier_id }}</ei:reportSpecifierID>\
<ei:reportName>{{ report.report_name }}</ei:reportName>\
<ei:createdDateTime>{{ report.created_date_time|datetimeformat }}</ei:createdDateTime>\
</oadr:oadrReport>{% endfor %}<ei:venID>{{ ven_id }}</ei:venID></oadr:oadrUpdateReport></oadr:oadrSignedObject>"""

# An oadrRegisterReport that may name the METADATA request it answers (schema: after venID).
_REGISTER = """<oadr:oadrSignedObject xmlns:oadr="http://openadr.org/oadr-2.0b/2012/07" \
xmlns:pyld="http://docs.oasis-open.org/ns/energyinterop/201110/payloads" oadr:Id="oadrSignedObject">\
<oadr:oadrRegisterReport ei:schemaVersion="2.0b" xmlns:ei="http://docs.oasis-open.org/ns/energyinterop/201110">\
<pyld:requestID>{{ request_id }}</pyld:requestID>\
{% for report in reports %}<oadr:oadrReport xmlns:xcal="urn:ietf:params:xml:ns:icalendar-2.0" \
xmlns:strm="urn:ietf:params:xml:ns:icalendar-2.0:stream">\
<xcal:duration><xcal:duration>{{ report.duration|timedeltaformat }}</xcal:duration></xcal:duration>\
{% for report_description in report.report_descriptions %}{% include 'parts/oadrReportDescription.xml' %}{% endfor %}\
<ei:reportRequestID>0</ei:reportRequestID>\
<ei:reportSpecifierID>{{ report.report_specifier_id }}</ei:reportSpecifierID>\
<ei:reportName>{{ report.report_name }}</ei:reportName>\
<ei:createdDateTime>{{ report.created_date_time|datetimeformat }}</ei:createdDateTime>\
</oadr:oadrReport>{% endfor %}<ei:venID>{{ ven_id }}</ei:venID>\
{% if report_request_id %}<ei:reportRequestID>{{ report_request_id }}</ei:reportRequestID>{% endif %}\
</oadr:oadrRegisterReport></oadr:oadrSignedObject>"""


def install_templates() -> None:
    """Add the gateway's report templates to openleadr's template environment (idempotent)."""
    env = messaging.TEMPLATES
    if isinstance(env.loader, ChoiceLoader):
        return
    assert env.loader is not None
    own = DictLoader({f"{UPDATE_TEMPLATE}.xml": _UPDATE, f"{REGISTER_TEMPLATE}.xml": _REGISTER})
    env.loader = ChoiceLoader([own, env.loader])


def status_of(sample: TelemetrySample) -> dict[str, Any]:
    """Return the oadrPayloadResourceStatus fields of a sample."""
    return {
        "online": sample.online,
        "manual_override": sample.manual_override,
        "percent_offset": None if sample.shed_pct is None else round(-sample.shed_pct, 3),
        "setpoint": None if sample.limit_w is None else round(sample.limit_w, 1),
    }


def aggregate(samples: Sequence[TelemetrySample], t0: datetime, t1: datetime) -> tuple[float | None, float | None]:
    """Return the mean facility power (W) and the energy (Wh) of one interval from its samples."""
    powers = [s.facility_w for s in samples if s.facility_w is not None]
    if not powers:
        return None, None
    mean = sum(powers) / len(powers)
    counters = [s.facility_energy_wh for s in samples if s.facility_energy_wh is not None]
    if len(counters) >= 2:
        return mean, counters[-1] - counters[0]
    return mean, mean * (t1 - t0).total_seconds() / 3600.0
