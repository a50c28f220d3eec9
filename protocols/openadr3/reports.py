"""OpenADR 3.1 reports: the telemetry the 2.0b VEN reports, as report objects when events ask for them.

An event (or its programme) asks for reports with ``reportDescriptors`` (Definition: reportDescriptor;
User Guide 7.5). Payload types served, from the telemetry sample the control loop keeps:

==============  =================================  ==========================
payload type    value                              units
==============  =================================  ==========================
USAGE           facility energy over the interval  KWH (default), WH, MWH
DEMAND          mean facility power                KW (default), W, MW
READING         last facility power                KW (default), W, MW
SETPOINT        facility limit in force            KW (default), W, MW
DELTA_USAGE     reduction below the baseline       PERCENT (-1..1, negative = less)
OPERATING_STATE NORMAL, RUNNING_CURTAILED or ERROR  (strings)
==============  =================================  ==========================

Schedule: with the defaults (startInterval -1, numIntervals -1, frequency -1, repeat 1,
historical true) one report covering every interval when the last one ends; otherwise report k is
due at the end of interval ``startInterval + k * frequency`` and covers the ``numIntervals`` before
it, ``repeat`` times (-1: while intervals remain). ``frequency`` 0 is an ad hoc report, sent at
once. A frequency written as a duration (field drift, see ``drift``) reports every that many
seconds while the event lasts. Report intervals carry the event's interval ids and periods; an
interval without a sample carries 0 with a ``DATA_QUALITY`` ``MISSING`` payload. Of the reports
already due when an event (version) is received, only the latest is sent, at once. Forecasts
(``historical`` false), ``SUB_INTERVALS`` beyond the event's own sub-intervals, and payload types or
units not in the table are refused and audited once.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.clock import Clock
from gateway.logs import get_logger
from gateway.model import TelemetrySample
from protocols.openadr3.client import Oadr3Client, RequestFailed
from protocols.openadr3.convert import Slot
from protocols.openadr3.drift import FREQUENCY_S
from protocols.openadr3.timing import format_datetime, format_duration, shift

_log = get_logger("openadr3.reports")
Telemetry = Callable[[], TelemetrySample | None]
History = Callable[[datetime, datetime], Awaitable[Sequence[TelemetrySample]]]
AuditFn = Callable[..., Awaitable[None]]
_POWER = {"KW": 1e-3, "W": 1.0, "MW": 1e-6}
_ENERGY = {"KWH": 1e-3, "WH": 1.0, "MWH": 1e-6}
_UNITS: dict[str, tuple[dict[str, float], str | None]] = {
    "USAGE": (_ENERGY, "KWH"),
    "DEMAND": (_POWER, "KW"),
    "READING": (_POWER, "KW"),
    "SETPOINT": (_POWER, "KW"),
    "DELTA_USAGE": ({"PERCENT": 1.0}, "PERCENT"),
    "OPERATING_STATE": ({}, None),
}
_MAX_SAMPLES = 200_000
POST_GRACE_S = 15.0  # at stop, how long a report already on the wire may take to be answered and recorded


@dataclass(frozen=True)
class Plan:
    """One report request as this VEN serves it."""

    event_id: str
    payload_type: str
    reading_type: str | None
    units: str | None
    aggregate: bool
    windows: tuple[tuple[datetime, tuple[Slot, ...]], ...]  # (due time, intervals covered)
    every_s: float | None = None  # drift: report every this many seconds instead


def plan(event: dict[str, Any], slots: Sequence[Slot], descriptor: dict[str, Any]) -> Plan:
    """Return the reports one reportDescriptor asks for; raise ValueError naming what cannot be served."""
    ptype = descriptor["payloadType"]
    if ptype not in _UNITS:
        raise ValueError(f"payload type {ptype!r} is not one this VEN reports")
    table, default = _UNITS[ptype]
    units = descriptor.get("units") or default
    if table and units not in table:
        raise ValueError(f"{ptype} in units {units!r}: this VEN reports {', '.join(table)}")
    if descriptor.get("historical", True) is False:
        raise ValueError(f"{ptype}: forecasts (historical false) are not reported")
    common = (str(event["id"]), ptype, descriptor.get("readingType"), units, bool(descriptor.get("aggregate")))
    if FREQUENCY_S in descriptor:
        return Plan(*common, windows=(), every_s=max(float(descriptor[FREQUENCY_S]), 1.0))
    slots = list(slots) or _implied(event, descriptor)
    freq = int(descriptor.get("frequency", -1))
    if freq == 0:
        return Plan(*common, windows=(), every_s=0.0)
    if not slots:
        raise ValueError(f"{ptype}: the event has no intervals to report on")
    num = int(descriptor.get("numIntervals", -1))
    start = int(descriptor.get("startInterval", -1))
    repeat = int(descriptor.get("repeat", 1))
    anchor = len(slots) - 1 if start < 0 else start
    windows = []
    k = 0
    while anchor < len(slots) and (repeat < 0 or k < repeat):
        first = 0 if num < 0 else max(0, anchor - num + 1)
        covered = tuple(slots[first : anchor + 1])
        end = shift(slots[anchor].start, slots[anchor].duration_s)
        if not math.isinf(slots[anchor].duration_s):
            windows.append((end, covered))
        if freq <= 0:
            break
        anchor += freq
        k += 1
    return Plan(*common, windows=tuple(windows))


def _implied(event: dict[str, Any], descriptor: dict[str, Any]) -> list[Slot]:
    """Return the intervals implied by a report-only event's intervalPeriod (User Guide 7.5)."""
    from protocols.openadr3.timing import duration_s, parse_datetime

    period = event.get("intervalPeriod") or {}
    if not period.get("start") or not period.get("duration"):
        return []
    start = parse_datetime(period["start"]) or parse_datetime(event["createdDateTime"])
    length = duration_s(period["duration"])
    if start is None or length <= 0 or math.isinf(length):
        return []
    count = max(int(descriptor.get("numIntervals", -1)), 1)
    if int(descriptor.get("repeat", 1)) < 0:
        count = 4096
    return [Slot(i, shift(start, i * length), length, {}) for i in range(count)]


class Reporter:
    """Runs the report requests of the events this VEN follows and posts the reports."""

    def __init__(
        self,
        client: Oadr3Client,
        clock: Clock,
        audit: AuditFn,
        telemetry: Telemetry | None,
        history: History | None,
        client_name: str,
        resource_name: str,
        min_period_s: float,
    ) -> None:
        self._client = client
        self._clock = clock
        self._audit = audit
        self._telemetry = telemetry
        self._history = history
        self._client_name = client_name
        self._resource = resource_name
        self._min_period_s = min_period_s
        self._jobs: dict[str, list[asyncio.Task[None]]] = {}
        self._samples: collections.deque[TelemetrySample] = collections.deque(maxlen=_MAX_SAMPLES)
        self._sampler: asyncio.Task[None] | None = None
        self._posts: set[asyncio.Task[None]] = set()  # reports on the wire: let finish and recorded, even at stop
        self.sent = 0

    def jobs(self) -> list[str]:
        """Return the ids of events with reports still to send."""
        return [eid for eid, tasks in self._jobs.items() if any(not t.done() for t in tasks)]

    async def track(self, event: dict[str, Any], slots: Sequence[Slot]) -> None:
        """(Re)start the reports an event version asks for."""
        eid = str(event["id"])
        self.forget(eid)
        tasks = []
        for n, desc in enumerate(event.get("reportDescriptors") or []):
            try:
                p = plan(event, slots, desc)
            except ValueError as err:
                await self._audit("report.refused", {"descriptor": n, "reason": str(err)}, "utility", eid)
                continue
            await self._audit("report.requested", _describe(p), "utility", eid)
            tasks.append(asyncio.create_task(self._run(p), name=f"oadr3-report-{eid}-{n}"))
        if tasks:
            self._jobs[eid] = tasks
            self._start_sampler()

    def forget(self, event_id: str) -> None:
        """Stop the reports of an event (deleted, cancelled or replaced)."""
        for task in self._jobs.pop(event_id, []):
            task.cancel()

    async def stop(self) -> None:
        """Stop every report and the sampler; a report already on the wire is let finish and recorded.

        A report the VTN has taken is recorded as sent (or as failed), never dropped half-way: the
        wait is the client's own request timeout at most, bounded by ``POST_GRACE_S``.
        """
        tasks = [t for ts in self._jobs.values() for t in ts] + ([self._sampler] if self._sampler else [])
        self._jobs, self._sampler = {}, None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        posts = set(self._posts)
        if posts:
            _done, late = await asyncio.wait(posts, timeout=POST_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*posts, return_exceptions=True)

    def _start_sampler(self) -> None:
        """Keep telemetry samples while reports are pending (when no history store is given)."""
        if self._history is None and self._telemetry is not None and (self._sampler is None or self._sampler.done()):
            self._sampler = asyncio.create_task(self._sample_loop(), name="oadr3-report-sampler")

    async def _sample_loop(self) -> None:
        """Append the latest telemetry sample every min period while any report is pending."""
        while self.jobs():
            sample = self._sample()
            if sample is not None and (not self._samples or sample.t > self._samples[-1].t):
                self._samples.append(sample)
            await self._clock.sleep(self._min_period_s)

    def _sample(self) -> TelemetrySample | None:
        """Return the latest telemetry sample; a failing provider yields nothing."""
        if self._telemetry is None:
            return None
        try:
            return self._telemetry()
        except Exception as err:
            _log.error("telemetry provider failed", error=repr(err))
            return None

    async def _run(self, p: Plan) -> None:
        """Send the reports of one plan at their times; no error ends the VEN."""
        try:
            if p.every_s == 0.0:
                await self._post(p, [self._now_slot()])
            elif p.every_s is not None:
                last = self._clock.now()
                while True:
                    await self._clock.sleep(max(p.every_s, self._min_period_s))
                    now = self._clock.now()
                    await self._post(p, [Slot(0, last, (now - last).total_seconds(), {})])
                    last = now
            else:
                now = self._clock.now()
                past = [w for w in p.windows if w[0] <= now]
                # User Guide 7.5, 'do it now' reporting: of the reports already due, only the latest is sent.
                for due, covered in past[-1:] + [w for w in p.windows if w[0] > now]:
                    delay = (due - self._clock.now()).total_seconds()
                    if delay > 0:
                        await self._clock.sleep(delay)
                    await self._post(p, list(covered))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            _log.exception("report failed", event_id=p.event_id, error=repr(err))
            await self._audit("report.failed", {"payload_type": p.payload_type, "error": repr(err)}, "gateway",
                              p.event_id)  # fmt: skip

    def _now_slot(self) -> Slot:
        """Return a zero-length interval at this moment (ad hoc reports)."""
        return Slot(0, self._clock.now(), 0.0, {})

    async def _post(self, p: Plan, covered: list[Slot]) -> None:
        """Build and POST one report."""
        intervals = [await self._interval(p, s) for s in covered]
        descriptor: dict[str, Any] = {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": p.payload_type}
        if p.reading_type:
            descriptor["readingType"] = p.reading_type
        if p.units:
            descriptor["units"] = p.units
        body = {
            "eventID": p.event_id,
            "clientName": self._client_name,
            "reportName": f"{p.payload_type.lower()}-{p.event_id}",
            "payloadDescriptors": [descriptor],
            "resources": [
                {"resourceName": "AGGREGATED_REPORT" if p.aggregate else self._resource, "intervals": intervals}
            ],
        }
        # On the wire in a task of its own: cancelling the plan (a stop, a new event version) does
        # not cut the report off half-way, and its outcome is recorded either way.
        task = asyncio.create_task(self._deliver(p, body, len(intervals)), name=f"oadr3-report-post-{p.event_id}")
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)
        await asyncio.shield(task)

    async def _deliver(self, p: Plan, body: dict[str, Any], intervals: int) -> None:
        """POST one report and record what came of it."""
        try:
            reply = await self._client.call("POST", "/reports", body=body, expect=(201,))
        except RequestFailed as err:
            await self._audit("report.send_failed", {"payload_type": p.payload_type, "error": str(err)}, "gateway",
                              p.event_id)  # fmt: skip
            return
        self.sent += 1
        await self._audit("report.sent", {"payload_type": p.payload_type, "intervals": intervals,
                          "report_id": reply.body.get("id")}, "gateway", p.event_id)  # fmt: skip

    async def _interval(self, p: Plan, slot: Slot) -> dict[str, Any]:
        """Return one report interval: the event interval's id and period, the value and its quality."""
        end = shift(slot.start, slot.duration_s)
        samples = await self._window(slot.start, end if slot.duration_s > 0 else shift(slot.start, 1e-6))
        if slot.duration_s == 0:
            latest = self._sample()
            samples = [latest] if latest is not None else []
        value = _value(p, samples, slot.duration_s)
        payloads: list[dict[str, Any]] = []
        if value is None:
            missing: Any = "ERROR" if p.payload_type == "OPERATING_STATE" else 0
            payloads = [{"type": p.payload_type, "values": [missing]}, {"type": "DATA_QUALITY", "values": ["MISSING"]}]
        else:
            payloads = [{"type": p.payload_type, "values": [value]}]
        period = {"start": format_datetime(slot.start), "duration": format_duration(slot.duration_s)}
        return {"id": slot.interval_id, "intervalPeriod": period, "payloads": payloads}

    async def _window(self, start: datetime, end: datetime) -> list[TelemetrySample]:
        """Return the samples taken in [start, end)."""
        if self._history is not None:
            try:
                return list(await asyncio.wait_for(self._history(start, end), 30.0))
            except Exception as err:
                _log.error("history provider failed", error=repr(err))
                return []
        return [s for s in self._samples if start <= s.t < end]


def _value(p: Plan, samples: Sequence[TelemetrySample], length_s: float) -> Any:
    """Return the report value for one interval, or None when there is no data."""
    scale = _UNITS[p.payload_type][0].get(p.units or "", 1.0)
    if p.payload_type == "OPERATING_STATE":
        if not samples:
            return None
        last = samples[-1]
        return "ERROR" if not last.online else "RUNNING_CURTAILED" if last.limit_w is not None else "NORMAL"
    if p.payload_type == "SETPOINT":
        limits = [s.limit_w for s in samples if s.limit_w is not None]
        return round(limits[-1] * scale, 6) if limits else None
    if p.payload_type == "DELTA_USAGE":
        sheds = [s.shed_pct for s in samples if s.shed_pct is not None]
        return round(-sum(sheds) / len(sheds) / 100.0, 6) if sheds else None
    powers = [s.facility_w for s in samples if s.facility_w is not None]
    if not powers:
        return None
    if p.payload_type == "READING":
        return round(powers[-1] * scale, 6)
    mean_w = sum(powers) / len(powers)
    if p.payload_type == "DEMAND":
        return round(mean_w * scale, 6)
    counters = [s.facility_energy_wh for s in samples if s.facility_energy_wh is not None]
    energy_wh = counters[-1] - counters[0] if len(counters) >= 2 else mean_w * length_s / 3600.0
    return round(energy_wh * scale, 6)


def _describe(p: Plan) -> dict[str, Any]:
    """Return the audit record of a report plan."""
    return {
        "payload_type": p.payload_type,
        "units": p.units,
        "reports": len(p.windows) if p.every_s is None else None,
        "every_s": p.every_s,
        "due": [w[0].isoformat() for w in p.windows[:8]],
    }
