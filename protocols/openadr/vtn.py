"""A simulated utility VTN on openleadr's own OpenADRServer, for ``drgw demo`` and the tests.

It accepts every VEN that registers, queues events for the next poll, and records every answer:
opt responses (``responses``, and in full ``event_responses``), opt changes (``opts``, through
an EiOpt service openleadr's server lacks), offered and delivered reports. Beyond openleadr's
server it can also change, re-number or silently drop an event, queue any message for the next
poll (report requests, re-registration), serve TLS with client certificates, sign messages, and
run its clock off by some seconds (the HTTP Date it sends).

Events are built here rather than with ``OpenADRServer.add_event``, which drops the ramp-up and
recovery periods (and ``add_raw_event`` drops them too: see add_event). Durations travel in whole
seconds (openleadr's formatter drops fractions), so the requested poll interval is rounded to
whole seconds, at least 1 s.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
import uuid
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from aiohttp import web
from openleadr import OpenADRServer, objects, utils

from gateway.logs import get_logger
from gateway.model import Opt
from protocols.openadr.vtnparts import OptService, add_cancellation_handlers
from protocols.openadr.xmlguard import harden_openleadr_parser

_log = get_logger("openadr.sim_vtn")
# What the poll being answered in this request's task hands over: (message type, [(event id, modification)]).
_POLL_ANSWER: ContextVar[tuple[str, list[tuple[str, int]]] | None] = ContextVar("sim_vtn_poll_answer", default=None)
PollObserver = Callable[[str, list[tuple[str, int]], float], None]
_DEFAULT_TYPES = {"SIMPLE": "level", "LOAD_DISPATCH": "delta", "LOAD_CONTROL": "x-loadControlCapacity",
                  "ELECTRICITY_PRICE": "price", "ENERGY_PRICE": "price"}  # fmt: skip


class SimVtn:
    """The simulated utility: registers any VEN, sends events, records answers and reports."""

    def __init__(
        self,
        vtn_id: str = "DrgwVTN",
        poll_interval_s: float = 1.0,
        *,
        opt_service: bool = True,
        http_cert: str | None = None,
        http_key: str | None = None,
        http_ca_file: str | None = None,
        sign_cert: str | None = None,
        sign_key: str | None = None,
    ) -> None:
        if vtn_id.islower():
            # An all-lowercase vtnID makes openleadr's VEN answer 452 (invalid id).
            raise ValueError(f"vtn_id {vtn_id!r} must not be all lowercase")
        self.vtn_id = vtn_id
        self.poll_interval_s = max(1.0, float(round(poll_interval_s)))
        self.responses: list[tuple[str, int, Opt]] = []
        self.event_responses: list[dict[str, Any]] = []  # every eventResponse, with its code
        self.opts: list[dict[str, Any]] = []  # every oadrCreateOpt received
        self.opt_cancels: list[dict[str, Any]] = []  # every oadrCancelOpt received
        self.ven_cancels: list[dict[str, Any]] = []  # every oadrCancelPartyRegistration from a VEN
        self.canceled: list[dict[str, Any]] = []  # every oadrCanceledPartyRegistration (answers to ours)
        self.registered: dict[str, str] = {}  # ven_name -> ven_id
        self.registrations: list[dict[str, Any]] = []  # every oadrCreatePartyRegistration payload
        self.offered_reports: list[dict[str, Any]] = []  # oadrRegisterReport payloads
        self.reports: list[dict[str, Any]] = []  # every oadrReport delivered (oadrUpdateReport)
        self.report_requests: list[objects.ReportRequest] = []  # answered to oadrRegisterReport
        self._regs: dict[str, str] = {}  # ven_id -> registration_id
        self._fingerprints: dict[str, str | None] = {}
        self._queued: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._empty_pending: set[str] = set()
        self._changed = asyncio.Condition()
        # Called with (message type, [(event id, modification number)], time.monotonic()) as each
        # poll answer is handed to HTTP: when an event leaves the utility (latency benchmarks).
        self.poll_observers: list[PollObserver] = []
        # Seconds this VTN's clock is off: every answer's HTTP Date is shifted by it (clock skew tests).
        self.date_offset_s = 0.0
        self._runner: web.AppRunner | None = None
        with warnings.catch_warnings():  # openleadr keys its aiohttp app with a plain string
            warnings.simplefilter("ignore", web.NotAppKeyWarning)
            self.server = OpenADRServer(
                vtn_id=vtn_id,
                requested_poll_freq=timedelta(seconds=self.poll_interval_s),
                http_host="127.0.0.1",
                ven_lookup=self._ven_lookup,
                http_cert=http_cert,
                http_key=http_key,
                http_ca_file=http_ca_file,
                cert=sign_cert,
                key=sign_key,
                show_fingerprint=False,
            )
        if opt_service:
            opts = OptService(vtn_id, self._on_opt, self._on_cancel_opt)
            self.server.services["opt_service"] = opts
            self.server.app.router.add_post(f"{self.server.http_path_prefix}/EiOpt", opts.handler)
        self.server.app.on_response_prepare.append(self._on_response_prepare)
        # openleadr stores ven_lookup on the VTNService class (shared by every server in the
        # process); instance attributes keep two simulated VTNs from answering for each other.
        for svc in self.server.services.values():
            svc.ven_lookup = self._ven_lookup
        self.server.add_handler("on_create_party_registration", self._on_register)
        add_cancellation_handlers(self.server.services["registration_service"], self._on_ven_cancel, self._on_canceled)
        events = self.server.services["event_service"]
        self._created_event = events.handlers["oadrCreatedEvent"]
        events.handlers["oadrCreatedEvent"] = self._on_created_event
        poll = self.server.services["poll_service"]
        self._poll = poll.handlers["oadrPoll"]
        poll.handlers["oadrPoll"] = self._on_poll
        reports = self.server.services["report_service"]
        reports.handlers["oadrRegisterReport"] = self._on_register_report
        reports.handlers["oadrUpdateReport"] = self._on_update_report
        reports.handlers["oadrCreatedReport"] = self._on_quiet
        reports.handlers["oadrCanceledReport"] = self._on_quiet

    @property
    def ssl_context(self) -> Any:
        """Return the server's TLS context (None without TLS); tests may restrict it before start."""
        return self.server.ssl_context

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port); return the VTN URL with the real port."""
        harden_openleadr_parser()
        # openleadr's run() prints a banner and cannot report an ephemeral port: run the app here.
        runner = web.AppRunner(self.server.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host=host, port=port, ssl_context=self.server.ssl_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.server.app_runner = runner
        bound = runner.addresses[0][1]
        scheme = "https" if self.server.ssl_context else "http"
        url = f"{scheme}://{host}:{bound}{self.server.http_path_prefix}"
        _log.info("sim vtn listening", url=url, vtn_id=self.vtn_id)
        return url

    async def stop(self) -> None:
        """Stop serving; queued events and registrations are kept in memory."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- events -------------------------------------------------------------------------------

    def add_event(
        self,
        ven_id: str,
        *,
        signal: str,
        value: float,
        start: datetime,
        duration_s: float,
        ramp_up_s: float = 0,
        recovery_s: float = 0,
        signal_type: str | None = None,
        event_id: str | None = None,
        scale: str = "k",
        priority: int = 0,
        market_context: str = "oadr://drgw.sim/program",
        intervals: list[tuple[float, float]] | None = None,
        start_after_s: float = 0,
        test_event: bool = False,
        targets: list[dict[str, str]] | None = None,
        vtn_comment: str | None = None,
        response_required: str = "always",
    ) -> str:
        """Queue an event for ``ven_id``; value is a level (SIMPLE) or power in ``scale``W; return its id.

        ``intervals`` (duration_s, value) pairs replace the single interval of ``duration_s``.
        """
        if start.tzinfo is None:
            raise ValueError("start must be an aware datetime")
        event_id = event_id or f"evt-{uuid.uuid4().hex[:12]}"
        spans = intervals or [(duration_s, value)]
        total = timedelta(seconds=sum(d for d, _ in spans))
        ivs, t = [], start.astimezone(UTC)
        for n, (d, v) in enumerate(spans):
            ivs.append(objects.Interval(dtstart=t, duration=timedelta(seconds=d), signal_payload=v, uid=n))
            t += timedelta(seconds=d)
        now = datetime.now(UTC)
        period = objects.ActivePeriod(
            dtstart=start.astimezone(UTC),
            duration=total,
            ramp_up_period=timedelta(seconds=ramp_up_s) if ramp_up_s else None,
            recovery_period=timedelta(seconds=recovery_s) if recovery_s else None,
            tolerance={"startafter": timedelta(seconds=start_after_s)} if start_after_s else None,
        )
        kind = signal_type or _DEFAULT_TYPES.get(signal, "level")
        event = objects.Event(
            event_descriptor=objects.EventDescriptor(
                event_id=event_id,
                modification_number=0,
                market_context=market_context,
                event_status="far",
                created_date_time=now,
                modification_date_time=now,
                priority=priority,
                test_event=test_event,
                vtn_comment=vtn_comment,
            ),
            active_period=period,
            event_signals=[
                objects.EventSignal(
                    intervals=ivs,
                    signal_name=signal,
                    signal_type=kind,
                    signal_id=f"sig-{event_id}",
                    measurement=_measurement(signal, kind, scale),
                )
            ],
            targets=[objects.Target(**t) for t in targets] if targets is not None else [objects.Target(ven_id=ven_id)],
            response_required=response_required,
        )
        self.add_raw_event(ven_id, event)
        _log.info("sim vtn event queued", event_id=event_id, ven_id=ven_id, signal=signal, value=value)
        return event_id

    def add_raw_event(self, ven_id: str, event: objects.Event) -> str:
        """Queue a ready-made openleadr Event, keeping its active period intact; return its id."""
        period = event.active_period
        self.server.add_raw_event(ven_id=ven_id, event=event, callback=_ignore_opt)
        # add_raw_event looks for the period under 'event_descriptor.active_period', never finds
        # it, and rebuilds it from the intervals without ramp-up, recovery and tolerance: put ours back.
        event.active_period = period
        self._empty_pending.discard(ven_id)
        return str(event.event_descriptor.event_id)

    def event(self, ven_id: str, event_id: str) -> objects.Event:
        """Return a queued event (to inspect or change it)."""
        found = utils.find_by(self.server.events.get(ven_id, []), "event_descriptor.event_id", event_id)
        if found is None:
            raise KeyError(f"no event {event_id} for {ven_id}")
        return cast(objects.Event, found)

    def modify_event(
        self, ven_id: str, event_id: str, *, value: float | None = None, modification_number: int | None = None
    ) -> int:
        """Change an event (payload of every interval) and re-send it; return its modification number.

        Without ``modification_number`` the number goes up by one; with it, it is set as given
        (lower numbers make a stale version for conformance tests).
        """
        ev = self.event(ven_id, event_id)
        if value is not None:
            for sig in ev.event_signals:
                for iv in sig.intervals:
                    iv.signal_payload = value
        if modification_number is None:
            mod = utils.increment_event_modification_number(ev)
        else:
            ev.event_descriptor.modification_number = mod = modification_number
        self.server.events_updated[ven_id] = True
        return int(mod)

    def cancel_event(self, ven_id: str, event_id: str) -> None:
        """Mark a queued event cancelled (new modification number) for the next poll."""
        self.server.cancel_event(ven_id, event_id)

    def drop_event(self, ven_id: str, event_id: str) -> None:
        """Forget an event without cancelling it: later distributions leave it out (implied cancel)."""
        utils.pop_by(self.server.events.get(ven_id, []), "event_descriptor.event_id", event_id)
        self.server.events_updated[ven_id] = True
        if not self.server.events.get(ven_id):
            self._empty_pending.add(ven_id)  # openleadr would send nothing: send an empty list

    # -- anything else for the next poll ------------------------------------------------------

    def queue(self, ven_id: str, message_type: str, payload: dict[str, Any]) -> None:
        """Answer the VEN's next poll with this message (before any event distribution)."""
        self._queued.setdefault(ven_id, []).append((message_type, payload))

    def request_reregistration(self, ven_id: str) -> None:
        """Ask the VEN to register again at its next poll."""
        self.queue(ven_id, "oadrRequestReregistration", {"ven_id": ven_id})

    def cancel_registration(self, ven_id: str, registration_id: str | None = None) -> None:
        """Cancel the VEN's registration at its next poll (another ``registration_id`` tests the 452)."""
        reg = registration_id or self._regs.get(ven_id, "")
        self.queue(ven_id, "oadrCancelPartyRegistration", {"registration_id": reg, "ven_id": ven_id,
                                                           "request_id": uuid.uuid4().hex[:10]})  # fmt: skip

    def request_report(
        self,
        ven_id: str,
        specifier_id: str,
        r_ids: list[str],
        granularity_s: float,
        report_back_s: float,
        interval: tuple[datetime, float] | None = None,
    ) -> str:
        """Queue an oadrCreateReport for the VEN's next poll; return the reportRequestID."""
        request_id = f"rr-{uuid.uuid4().hex[:10]}"
        self.queue(ven_id, "oadrCreateReport", {"report_requests": [_report_request(request_id, specifier_id, r_ids,
                   granularity_s, report_back_s, interval)]})  # fmt: skip
        return request_id

    def cancel_report(self, ven_id: str, report_request_id: str, report_to_follow: bool = False) -> None:
        """Queue an oadrCancelReport for the VEN's next poll."""
        self.queue(ven_id, "oadrCancelReport", {"report_request_id": report_request_id,
                                                "report_to_follow": report_to_follow, "request_id": "cr"})  # fmt: skip

    def ask_reports_on_registration(
        self, specifier_id: str, r_ids: list[str], granularity_s: float, report_back_s: float
    ) -> str:
        """Request this report in every oadrRegisteredReport answer; return the reportRequestID."""
        request_id = f"rr-{uuid.uuid4().hex[:10]}"
        self.report_requests.append(_report_request(request_id, specifier_id, r_ids, granularity_s, report_back_s))
        return request_id

    # -- waiting ------------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], Any], timeout_s: float) -> Any:
        """Wait until ``predicate()`` is truthy (checked on every recorded change); return it."""
        async with asyncio.timeout(timeout_s), self._changed:
            return await self._changed.wait_for(predicate)

    async def wait_for_response(self, event_id: str, timeout_s: float, modification_number: int | None = None) -> Opt:
        """Wait until the VEN answers ``event_id`` (at that modification, if given); return the opt."""

        def found() -> Opt | None:
            for eid, mod, opt in reversed(self.responses):
                if eid == event_id and modification_number in (None, mod):
                    return opt
            return None

        return cast(Opt, await self.wait_for(found, timeout_s))

    async def wait_for_registration(self, ven_name: str, timeout_s: float) -> str:
        """Wait until a VEN called ``ven_name`` registers; return its ven_id."""
        await self.wait_for(lambda: ven_name in self.registered, timeout_s)
        return self.registered[ven_name]

    async def _notify(self) -> None:
        """Wake every waiter."""
        async with self._changed:
            self._changed.notify_all()

    # -- handlers -----------------------------------------------------------------------------

    async def _on_register(self, payload: dict[str, Any]) -> tuple[str, str]:
        """Accept every VEN: keep the venID it asks for, else use its name."""
        ven_name = str(payload.get("ven_name") or "ven")
        ven_id = str(payload.get("ven_id") or ven_name)
        reg_id = self._regs.setdefault(ven_id, f"reg-{uuid.uuid4().hex[:12]}")
        self._fingerprints[ven_id] = payload.get("fingerprint")
        self.registered[ven_name] = ven_id
        self.registrations.append(dict(payload))
        await self._notify()
        _log.info("sim vtn registered ven", ven_name=ven_name, ven_id=ven_id)
        return ven_id, reg_id

    async def _ven_lookup(self, ven_id: str) -> dict[str, Any] | None:
        """Return what the VTN knows about a VEN; unknown VENs are asked to re-register."""
        reg_id = self._regs.get(ven_id)
        if reg_id is None:
            return None
        return {"ven_id": ven_id, "registration_id": reg_id, "fingerprint": self._fingerprints.get(ven_id)}

    async def _on_poll(self, payload: dict[str, Any]) -> Any:
        """Answer a poll with a queued message first, then openleadr's event queue."""
        ven_id = str(payload.get("ven_id"))
        queued = self._queued.get(ven_id)
        if queued:
            return queued.pop(0)
        if ven_id in self._empty_pending and self.server.events_updated.get(ven_id):
            self._empty_pending.discard(ven_id)
            self.server.events_updated[ven_id] = False
            return "oadrDistributeEvent", {"events": [], "request_id": uuid.uuid4().hex[:10]}
        answer = await self._poll(payload)
        if self.poll_observers and isinstance(answer, tuple) and answer:
            events = answer[1].get("events") if answer[0] == "oadrDistributeEvent" else None
            _POLL_ANSWER.set((str(answer[0]), [_event_version(ev) for ev in events or []]))
        return answer

    async def _on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Shift the HTTP Date by ``date_offset_s``; tell the poll observers what this answer hands over."""
        if self.date_offset_s:
            stamp = time.time() + self.date_offset_s
            response.headers["Date"] = email.utils.formatdate(stamp, usegmt=True)
        seen = _POLL_ANSWER.get()
        if seen is None:
            return
        _POLL_ANSWER.set(None)
        sent_at = time.monotonic()
        for observe in self.poll_observers:
            try:
                observe(seen[0], seen[1], sent_at)
            except Exception as err:  # an observer must not break the VTN
                _log.error("poll observer failed", error=repr(err))

    async def _on_created_event(self, payload: dict[str, Any]) -> Any:
        """Record each answer, then let openleadr's event service do its bookkeeping."""
        for resp in payload.get("event_responses") or []:
            self.responses.append((str(resp["event_id"]), int(resp["modification_number"]), Opt(resp["opt_type"])))
            self.event_responses.append(dict(resp))
        await self._notify()
        return await self._created_event(payload)

    async def _on_opt(self, payload: dict[str, Any]) -> None:
        """Record an oadrCreateOpt."""
        self.opts.append(dict(payload))
        await self._notify()

    async def _on_cancel_opt(self, payload: dict[str, Any]) -> None:
        """Record an oadrCancelOpt."""
        self.opt_cancels.append(dict(payload))
        await self._notify()

    async def _on_ven_cancel(self, payload: dict[str, Any]) -> None:
        """Record a VEN's oadrCancelPartyRegistration and forget its registration."""
        self.ven_cancels.append(dict(payload))
        self._regs.pop(str(payload.get("ven_id")), None)
        await self._notify()

    async def _on_canceled(self, payload: dict[str, Any]) -> None:
        """Record a VEN's oadrCanceledPartyRegistration; a 200 ends its registration here too."""
        self.canceled.append(dict(payload))
        if (payload.get("response") or {}).get("response_code") == 200:
            self._regs.pop(str(payload.get("ven_id")), None)
        await self._notify()

    async def _on_register_report(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Record the offered reports and request the ones set up with ask_reports_on_registration."""
        self.offered_reports.append(dict(payload))
        await self._notify()
        return "oadrRegisteredReport", {"report_requests": list(self.report_requests)}

    async def _on_update_report(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Record every delivered report."""
        self.reports.extend(payload.get("reports") or [])
        await self._notify()
        return "oadrUpdatedReport", {}

    async def _on_quiet(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Acknowledge a message the simulation only needs to accept."""
        return "oadrResponse", {}


def _measurement(signal: str, signal_type: str, scale: str) -> objects.Measurement | None:
    """Return the unit block a signal of this kind carries (None for unitless signals)."""
    if signal == "LOAD_DISPATCH" or signal_type == "x-loadControlSetpoint":
        return objects.Measurement(
            name="powerReal",
            description="RealPower",
            unit="W",
            scale=scale,
            power_attributes=objects.PowerAttributes(hertz=60, voltage=480, ac=True),
        )
    if signal_type == "price":
        return objects.Measurement(name="currencyPerKWh", description="currencyPerKWh", unit="USD", scale="none")
    return None


def _report_request(
    request_id: str,
    specifier_id: str,
    r_ids: list[str],
    granularity_s: float,
    report_back_s: float,
    interval: tuple[datetime, float] | None = None,
) -> objects.ReportRequest:
    """Return one oadrReportRequest."""
    return objects.ReportRequest(
        report_request_id=request_id,
        report_specifier=objects.ReportSpecifier(
            report_specifier_id=specifier_id,
            granularity=timedelta(seconds=granularity_s),
            report_back_duration=timedelta(seconds=report_back_s),
            report_interval=None
            if interval is None
            else objects.Interval(dtstart=interval[0], duration=timedelta(seconds=interval[1]), signal_payload=0),
            specifier_payloads=[objects.SpecifierPayload(r_id=r, reading_type="Direct Read") for r in r_ids],
        ),
    )


def _event_version(ev: Any) -> tuple[str, int]:
    """Return (event id, modification number) of an event in a distribution (object or dict)."""
    return (
        str(utils.getmember(ev, "event_descriptor.event_id")),
        int(utils.getmember(ev, "event_descriptor.modification_number") or 0),
    )


def _ignore_opt(ven_id: str, event_id: str, opt_type: str) -> None:
    """Accept openleadr's per-event opt callback; answers are recorded in SimVtn.responses."""
