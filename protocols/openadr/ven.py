"""The gateway's OpenADR 2.0b VEN: openleadr's message builders under a supervisor that never gives up.

openleadr's ``run()`` stops for good when the first registration fails, so the supervisor here
drives the pieces itself: register (exponential backoff; the registration and venID are kept in
the VEN state so a restart re-registers as the same VEN), offer reports, request the events the
VTN holds, then poll at the VTN's requested frequency (or ``poll_interval_s``, never faster than
``min_poll_interval_s``): at most one oadrPoll per period, whatever the answer.

The parts: ``client.OadrClient`` owns the request path (guard, TLS, signatures, evidence),
``wirelog.WireLog`` records every message, ``eventsvc.EventService`` answers distributions
(and later opt changes), ``reporter.Reporter`` runs the reports. Every state change of the link
is logged and audited once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import Opt
from protocols.openadr.client import OadrClient
from protocols.openadr.eventsvc import EventService, OnCancel, OnDistribution, OnEvent
from protocols.openadr.optsched import OptSchedules
from protocols.openadr.registration import Registrar
from protocols.openadr.registration import call as _call
from protocols.openadr.reporter import Reporter
from protocols.openadr.reports import History, Telemetry
from protocols.openadr.vtnreports import VtnReports
from protocols.openadr.wirelog import EvidenceSink, WireLog
from protocols.openadr.xmlguard import harden_openleadr_parser

# openleadr's client module sets its logger to INFO at import (it logs every poll); the
# application decides: keep it at WARNING unless someone asked for debug logging.
if logging.getLogger().level > logging.DEBUG:
    logging.getLogger("openleadr").setLevel(logging.WARNING)

_log = get_logger("openadr.ven")
_LINK_FAILURES = frozenset({"unreachable", "timeout", "tls", "http", "transport"})
# openleadr's registration code logs these at ERROR; the supervisor logs state changes instead.
_NOISE = ("Got error on Create Party Registration", "No registration ID received", "No venID received",
          "The venID that was received")  # fmt: skip


class StateStore(Protocol):
    """Where the VEN keeps its identity across restarts (the event store's key/value state)."""

    async def get_state(self, key: str) -> str | None: ...
    async def set_state(self, key: str, value: str) -> None: ...


class _QuietOpenleadr(logging.Filter):
    """Drop openleadr's per-attempt registration errors; the supervisor reports state changes."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False (drop) for registration noise."""
        return not record.getMessage().startswith(_NOISE)


class Ven:
    """A supervised OpenADR 2.0b VEN that hands DemandEvents to the gateway."""

    def __init__(
        self,
        config: OpenAdrConfig,
        on_event: OnEvent,
        audit: AuditSink,
        clock: Clock,
        on_cancel: OnCancel | None = None,
        *,
        on_distribution: OnDistribution | None = None,
        state: StateStore | None = None,
        telemetry: Telemetry | None = None,
        history: History | None = None,
        evidence: EvidenceSink | None = None,
    ) -> None:
        self._config = config
        self._audit_sink = audit
        self._clock = clock
        self._state_store = state
        self._wire = WireLog(self._audit, evidence, clock, config.max_clock_skew_s, config.vtn_url)
        self._client = OadrClient(config, self._wire, clock.now)
        price_types = frozenset(
            t
            for t, levels in (
                ("price", config.price_levels),
                ("priceRelative", config.price_relative_levels),
                ("priceMultiplier", config.price_multiplier_levels),
            )
            if levels
        )
        self._events = EventService(
            self._client, on_event, self._audit, price_types, on_cancel, on_distribution, clock.now
        )
        self._events.expected_vtn_id = config.vtn_id or ""
        self._reports = Reporter(self._client, config, clock, self._audit, telemetry, history)
        self._vtn_reports = VtnReports(self._client, config, clock, self._audit)
        self._reg = Registrar(self._client, config, self._events, self._audit, self._get_state, self._set_state)
        self.opt_schedules = OptSchedules(self._client, audit, self._get_state, self._set_state, clock.now)
        self._lock = asyncio.Lock()  # one exchange sequence at a time: the supervisor's, or an operator's
        self._wake = asyncio.Event()  # an operator action ends the supervisor's wait
        self._noise = _QuietOpenleadr()
        self._task: asyncio.Task[None] | None = None
        self._state = "stopped"
        self._poll_s = config.poll_interval_s
        self._poll_failures = 0  # polls in a row that did not reach the VTN (they back off)
        self._last_poll_at: float | None = None  # monotonic time the last oadrPoll was sent
        self.last_poll_ok: datetime | None = None

    # -- what the gateway reads ---------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """Return whether the VEN holds a registration with the VTN."""
        return self._client.registration_id is not None

    @property
    def ven_id(self) -> str | None:
        """Return the venID (configured, persisted, or assigned by the VTN at registration)."""
        return self._client.ven_id

    @property
    def vtn_id(self) -> str:
        """Return the VTN's id: the configured one, else the registered one ('' before the first registration)."""
        return self._config.vtn_id or self._events.vtn_id

    @property
    def registration_id(self) -> str | None:
        """Return the registration id in force."""
        return self._client.registration_id

    @property
    def poll_interval_s(self) -> float:
        """Return the poll interval in use (s)."""
        return self._poll_s

    @property
    def state(self) -> str:
        """Return the link state: stopped, starting, unreachable, refused, registered, unregistered or link_lost."""
        return self._state

    @property
    def clock_skew_s(self) -> float | None:
        """Return the last measured VTN clock minus local clock (s), from the HTTP Date header."""
        return self._wire.last_skew_s

    @property
    def clock_skewed(self) -> bool:
        """Return whether the VTN's clock is now too far from ours (beyond ``max_clock_skew_s``)."""
        return self._wire.skewed

    @property
    def max_clock_skew_s(self) -> float:
        """Return the clock difference (s) beyond which the VTN's clock counts as skewed."""
        return self._wire.max_skew_s

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the persisted identity and start the supervisor task; return at once."""
        if self._task is not None:
            return
        harden_openleadr_parser()
        logging.getLogger("openleadr").addFilter(self._noise)
        await self._reg.load()
        self._state = "starting"
        self._task = asyncio.create_task(self._supervise(), name="openadr-ven")

    async def stop(self) -> None:
        """Stop polling and reports and close the HTTP session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._reports.stop()
        await self._client.close()
        logging.getLogger("openleadr").removeFilter(self._noise)
        self._state = "stopped"

    async def send_opt(self, event_id: str, opt: Opt, reason: str, modification_number: int) -> bool:
        """Tell the VTN an opt changed (oadrCreateOpt, else oadrCreatedEvent); audited; return success."""
        if not self.registered:
            await self._audit("opt.send_failed", {"opt": Opt(opt).value, "reason": reason,
                              "modification_number": modification_number, "error": "not registered"},
                              "gateway", event_id)  # fmt: skip
            return False
        return await self._events.send_opt(event_id, opt, reason, modification_number)

    async def operator_action(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run an operator's OpenADR report command (management endpoint, ``drgw openadr``); return what happened.

        register-reports: publish the report metadata again (oadrRegisterReport); request-vtn-reports
        (``every_s``, ``for_s``): ask for the VTN's METADATA report; cancel-vtn-reports: cancel that.
        """
        if action not in ("register-reports", "request-vtn-reports", "cancel-vtn-reports"):
            return {"ok": False, "error": f"unknown OpenADR action {action!r}"}
        if not self.registered:
            return {"ok": False, "error": "not registered with the VTN"}
        async with self._lock:
            if action == "register-reports":
                return {"ok": await self._reports.register()}
            if action == "cancel-vtn-reports":
                return await self._vtn_reports.cancel_requests()
            return await self._vtn_reports.request_metadata(float(args.get("every_s", 0.0)), args.get("for_s"))

    # -- the operator's registration commands (certification cases N1_0010/0015/0030/0060/0065) ----

    async def cancel_registration(self, who: str) -> dict[str, Any]:
        """Cancel the registration (oadrCancelPartyRegistration) on the operator's word; hold it off."""
        async with self._lock:
            done, why = await self._reg.cancel()
            await self._audit("operator.cancel_registration", {"peer": who, "done": done, "error": why}, "operator")
            if not done:
                return {"ok": False, "error": why}
            await self._reports.stop()
            await self._set_state_link("cancelled", self._reg.held)
        return {"ok": True, "state": self._state}

    async def register_again(self, who: str, fresh: bool = False) -> dict[str, Any]:
        """Register on the operator's word: ends a hold; re-registers (our registrationID) or, with
        ``fresh``, asks for a new registration, also while registered."""
        async with self._lock:
            await self._audit("operator.register", {"peer": who, "fresh": fresh, "held": self._reg.held}, "operator")
            if self._reg.held:
                await self._reg.release()
            ok = await self._register(fresh=fresh)
        self._wake.set()
        return {"ok": ok, "state": self._state, "registration_id": self.registration_id}

    async def query_registration(self, who: str) -> dict[str, Any]:
        """Send oadrQueryRegistration on the operator's word; return what the VTN said."""
        async with self._lock:
            rtype, payload = await self._reg.query()
        await self._audit("operator.query_registration", {"peer": who, "answer": rtype}, "operator")
        freq = payload.get("requested_oadr_poll_freq")
        return {"ok": rtype == "oadrCreatedPartyRegistration", "answer": rtype,
                "vtn_id": None if payload.get("vtn_id") is None else str(payload["vtn_id"]),
                "poll_s": None if freq is None else freq.total_seconds()}  # fmt: skip

    async def request_events(self, who: str) -> dict[str, Any]:
        """Ask the VTN for every event now (oadrRequestEvent) on the operator's word; answer what comes."""
        async with self._lock:
            await self._audit("operator.request_events", {"peer": who}, "operator")
            if not self.registered:
                return {"ok": False, "error": "not registered"}
            rtype, payload = await _call(self._client.request_event())
            if rtype == "oadrDistributeEvent":
                await self._events.distribution(payload)
        return {"ok": rtype is not None, "answer": rtype}

    # -- identity -----------------------------------------------------------------------------

    async def _get_state(self, key: str) -> str | None:
        """Read one persisted value; a failing store is logged, not fatal."""
        if self._state_store is None:
            return None
        try:
            return await self._state_store.get_state(key)
        except Exception as err:
            _log.error("ven state not readable", key=key, error=repr(err))
            return None

    async def _set_state(self, key: str, value: str) -> None:
        """Write one persisted value; a failing store is logged, not fatal."""
        if self._state_store is None:
            return
        try:
            await self._state_store.set_state(key, value)
        except Exception as err:
            _log.error("ven state not written", key=key, error=repr(err))

    # -- supervisor ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Register with backoff, then poll forever; no error ends this loop."""
        cfg = self._config
        delay = cfg.registration_retry_initial_s
        while True:
            try:
                if self._reg.held:
                    if self._state == "starting":  # held since before this start: said once, not audited again
                        self._state = "cancelled"
                        _log.warning("registration held: not registering until the operator does",
                                     reason=self._reg.held)  # fmt: skip
                    await self._set_state_link("cancelled", self._reg.held)
                    await self._wait_held()
                    continue
                async with self._lock:
                    if not self.registered:
                        await self._register()
                    if self.registered:
                        delay = cfg.registration_retry_initial_s
                        await self._poll_round()
                        if self._state == "registered" and self._events.unanswered:
                            await self._answer_again()
                if not self.registered and not self._reg.held:
                    await self._nap(delay)
                    delay = min(delay * 2, cfg.registration_retry_max_s)
                elif self.registered:
                    await self._nap(self._poll_wait_s())
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug here must not end the VEN: log it and carry on
                _log.exception("ven supervisor error", error=repr(err))
                await self._clock.sleep(delay)
                delay = min(delay * 2, cfg.registration_retry_max_s)

    async def _register(self, fresh: bool = False) -> bool:
        """Resume the stored registration (a query only) or register; then offer reports and ask for
        every event before the first poll (A_E1_0020); record why it failed; return success."""
        resuming = self._reg.resumable and not fresh
        outcome = await (self._reg.resume() if resuming else self._reg.register(fresh))
        if not outcome.ok:
            await self._set_state_link(outcome.state, outcome.reason)
            return False
        self._poll_s = outcome.poll_s or self._poll_s
        await self._set_state_link("registered", "")
        await self._reports.register()
        rtype, payload = await _call(self._client.request_event())
        if rtype == "oadrDistributeEvent":
            await self._events.distribution(payload)
        return True

    async def _nap(self, seconds: float) -> None:
        """Sleep on the VEN's clock; an operator action wakes it early."""
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            self._wake.clear()

    async def _wait_held(self) -> None:
        """Wait while the registration is held: until the operator acts, or ``reregister_after_cancel_s``."""
        after_s = self._config.reregister_after_cancel_s
        if after_s is None:
            await self._wake.wait()
            self._wake.clear()
            return
        await self._nap(after_s)
        if self._reg.held:
            await self._reg.release()
            await self._audit("ven.hold_ended", {"reason": f"reregister_after_cancel_s {after_s:g} s elapsed"})

    async def _poll_round(self) -> None:
        """Poll once and handle what comes back (2.0b: at most one oadrPoll per oadrPollFreq, and a VTN
        has no way to say it holds more, so a non-empty answer does not make the VEN poll again early)."""
        self._last_poll_at = self._clock.monotonic()
        rtype, payload = await _call(self._client.poll())
        if rtype is None:
            # A refused body was audited on its own (xml.rejected); only transport failures
            # mean the link is down. last_poll_ok stays old either way.
            failure = self._client.last_failure
            if failure is not None and failure.kind in _LINK_FAILURES:
                self._poll_failures += 1
                if self._state == "registered":
                    await self._set_state_link("link_lost", failure.reason)
            return
        self.last_poll_ok = self._clock.now()
        self._poll_failures = 0
        restored = self._state == "link_lost"
        if restored:
            await self._set_state_link("registered", "")
        # The polled message first: an oadrCreatedEvent the VTN waits for must not queue behind
        # the resync's round trip. Then ask for every event (what a dead connection swallowed),
        # unless the polled message was itself a distribution: it lists every event the VTN holds
        # for this VEN, so a request would only bring the same list again and a second answer to
        # each event (E1_1070 counts exactly one), or, for a distribution refused whole (452),
        # make the VTN count its events as missed (E1_1080).
        if rtype != "oadrResponse":
            await self._dispatch(rtype, payload)
        if restored and self.registered and rtype != "oadrDistributeEvent":
            await self._resync()

    def _poll_wait_s(self) -> float:
        """Return the wait before the next poll (s): the poll interval from the start of the last poll
        (time spent handling its answer counts), doubled for every poll in a row that did not reach
        the VTN, up to ``registration_retry_max_s`` (never below the interval)."""
        period = self._poll_s
        if self._poll_failures:
            ceiling = max(self._poll_s, self._config.registration_retry_max_s)
            period = min(self._poll_s * 2.0 ** min(self._poll_failures, 32), ceiling)
        if self._last_poll_at is None:
            return period
        return max(0.0, self._last_poll_at + period - self._clock.monotonic())

    async def _resync(self) -> None:
        """Ask the VTN for every event it holds: what it sent while the link was down may never have
        arrived (a poll answered into a dead connection is lost), and a full distribution also shows
        which events it dropped meanwhile (implied cancellation)."""
        rtype, payload = await _call(self._client.request_event())
        if rtype == "oadrDistributeEvent":
            await self._events.distribution(payload)

    async def _answer_again(self) -> None:
        """Ask for every event again while one lacks an answer the VTN has heard (its decision could not
        be stored, or the answer got no reply); the new distribution is answered from the store."""
        rtype, payload = await _call(self._client.request_event())
        if rtype == "oadrDistributeEvent":
            await self._events.distribution(payload)
        elif rtype is not None:  # the VTN holds no events any more: nothing is left to answer
            self._events.unanswered.clear()

    async def _dispatch(self, rtype: str, payload: dict[str, Any]) -> None:
        """Handle one message from a poll."""
        if rtype == "oadrDistributeEvent":
            await self._events.distribution(payload)
            return
        if rtype == "oadrCreateReport":
            await self._reports.create(payload)
            return
        if rtype == "oadrCancelReport":
            await self._reports.cancel(payload)
            return
        if rtype == "oadrRegisterReport":  # the VTN publishes its reports
            await self._vtn_reports.registered(payload)
            return
        if rtype == "oadrRequestReregistration":
            await _call(self._client.send_response(service="EiRegisterParty"))
            await self._drop_registration("VTN requested re-registration")
            return
        if rtype == "oadrCancelPartyRegistration":
            await self._answer_cancel_registration(payload)
            return
        _log.warning("openadr message not handled", message=rtype)
        await self._audit("ven.message_ignored", {"message": rtype}, "utility")

    async def _answer_cancel_registration(self, payload: dict[str, Any]) -> None:
        """Confirm the VTN's cancellation of our registration (452 when it names another); then hold."""
        if await self._reg.answer_cancel(payload):
            await self._reports.stop()
            await self._set_state_link("cancelled", self._reg.held)

    async def _drop_registration(self, reason: str) -> None:
        """Forget the registration (reports stop; events stay with the gateway) and re-register."""
        self._client.registration_id = None
        await self._reports.stop()
        await self._reg.save()
        await self._set_state_link("unregistered", reason)

    async def _set_state_link(self, state: str, reason: str) -> None:
        """Log and audit a change of link state, once per change."""
        previous, self._state = self._state, state
        if state == previous:
            return
        url = self._config.vtn_url
        if state == "registered" and previous == "link_lost":
            _log.info("vtn reachable again", vtn_url=url)
            await self._audit("ven.link_restored", {"vtn_url": url})
        elif state == "registered":
            data = {
                "vtn_url": url,
                "vtn_id": self.vtn_id,
                "ven_id": self.ven_id,
                "registration_id": self._client.registration_id,
                "poll_s": self._poll_s,
            }
            _log.info("registered", **data)
            await self._audit("ven.registered", data)
        elif state == "unregistered":
            _log.warning("registration dropped", vtn_url=url, reason=reason)
            await self._audit("ven.unregistered", {"vtn_url": url, "reason": reason}, "utility")
        elif state == "cancelled":
            _log.warning("registration cancelled: not registering again until the operator does", vtn_url=url,
                         reason=reason)  # fmt: skip
            await self._audit("ven.registration_cancelled", {"vtn_url": url, "reason": reason},
                              "operator" if "operator" in reason else "utility")  # fmt: skip
        elif state == "refused":
            _log.warning("vtn refused registration, retrying", vtn_url=url, reason=reason)
            await self._audit("ven.registration_refused", {"vtn_url": url, "reason": reason})
        else:  # unreachable (never registered since the last attempt) or link_lost (polls fail)
            _log.warning("vtn unreachable, retrying", vtn_url=url, reason=reason, state=state)
            await self._audit("ven.link_lost", {"vtn_url": url, "reason": reason, "state": state})

    async def _audit(
        self, kind: str, data: dict[str, Any], actor: str = "gateway", event_id: str | None = None
    ) -> None:
        """Append to the audit log; a failing log is reported, not allowed to break the protocol."""
        try:
            await self._audit_sink.append(kind, data, actor=actor, event_id=event_id)
        except Exception as err:
            _log.error("audit append failed", kind=kind, error=repr(err))


__all__ = ["StateStore", "Ven"]
