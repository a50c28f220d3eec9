"""The gateway's OpenADR 2.0b VEN: openleadr's message builders under a supervisor that never gives up.

openleadr's ``run()`` stops for good when the first registration fails, so the supervisor here
drives the pieces itself: register (exponential backoff; the registration and venID are kept in
the VEN state so a restart re-registers as the same VEN), offer reports, request the events the
VTN holds, then poll at the VTN's requested frequency (or ``poll_interval_s``, never faster than
``min_poll_interval_s``), polling again at once while the VTN has more queued.

The parts: ``client.OadrClient`` owns the request path (guard, TLS, signatures, evidence),
``wirelog.WireLog`` records every message, ``eventsvc.EventService`` answers distributions
(and later opt changes), ``reports.Reporter`` runs the reports. Every state change of the link
is logged and audited once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from datetime import datetime
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import Opt
from protocols.openadr.client import OadrClient
from protocols.openadr.eventsvc import EventService, OnCancel, OnDistribution, OnEvent
from protocols.openadr.reports import History, Reporter, Telemetry
from protocols.openadr.wirelog import EvidenceSink, WireLog
from protocols.openadr.xmlguard import harden_openleadr_parser

# openleadr's client module sets its logger to INFO at import (it logs every poll); the
# application decides: keep it at WARNING unless someone asked for debug logging.
if logging.getLogger().level > logging.DEBUG:
    logging.getLogger("openleadr").setLevel(logging.WARNING)

_log = get_logger("openadr.ven")
_MAX_POLL_S = 86_400.0  # openleadr's own ceiling
_MAX_BURST = 8  # polls in a row while the VTN keeps having messages queued
_KEYS = ("ven_id", "registration_id", "vtn_id")
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
        self._reports = Reporter(self._client, config, clock, self._audit, telemetry, history)
        self._client.add_hook("after_parse_xml", self._on_parsed)
        self._last_parsed: tuple[str, dict[str, Any]] | None = None
        self._noise = _QuietOpenleadr()
        self._task: asyncio.Task[None] | None = None
        self._state = "stopped"
        self._registration_id: str | None = None  # the last one granted (kept across restarts)
        self._poll_s = config.poll_interval_s
        self._poll_failures = 0  # polls in a row that did not reach the VTN (they back off)
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
        """Return the registered VTN's id ('' before the first registration)."""
        return self._events.vtn_id

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
        await self._load_identity()
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

    # -- identity -----------------------------------------------------------------------------

    async def _load_identity(self) -> None:
        """Take venID, registration and VTN id from the VEN state (a configured venID wins)."""
        saved = {k: await self._get_state(f"openadr.{k}") for k in _KEYS}
        if self._config.ven_id is None and saved["ven_id"]:
            self._client.ven_id = saved["ven_id"]
        if saved["ven_id"] in (None, self._client.ven_id):
            self._registration_id = saved["registration_id"] or None
            self._events.vtn_id = saved["vtn_id"] or ""

    async def _save_identity(self) -> None:
        """Persist venID, registration id and VTN id."""
        values = {"ven_id": self._client.ven_id, "registration_id": self._registration_id, "vtn_id": self.vtn_id}
        for key, value in values.items():
            await self._set_state(f"openadr.{key}", value or "")

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
                if not self.registered:
                    if not await self._register():
                        await self._clock.sleep(delay)
                        delay = min(delay * 2, cfg.registration_retry_max_s)
                        continue
                    delay = cfg.registration_retry_initial_s
                    await self._reports.register()
                    rtype, payload = await _call(self._client.request_event())
                    if rtype == "oadrDistributeEvent":
                        await self._events.distribution(payload)
                await self._poll_round()
                if self._state == "registered" and self._events.unanswered:
                    await self._answer_again()
                if self.registered:
                    await self._clock.sleep(self._poll_wait_s())
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug here must not end the VEN: log it and carry on
                _log.exception("ven supervisor error", error=repr(err))
                await self._clock.sleep(delay)
                delay = min(delay * 2, cfg.registration_retry_max_s)

    async def _register(self) -> bool:
        """Query and create the registration (re-using ours); record why it failed; return success."""
        self._client.registration_id = None
        self._last_parsed = None
        rtype, _ = await _call(self._client.query_registration())
        if rtype is None:
            await self._set_state_link("unreachable", self._failure("no answer from the VTN"))
            return False
        rtype, payload = await _call(
            self._client.create_party_registration(ven_id=self._client.ven_id, registration_id=self._registration_id)
        )
        if not self.registered:
            await self._set_state_link("refused", self._refusal(rtype, payload))
            return False
        self._registration_id = self._client.registration_id
        self._events.vtn_id = str(payload.get("vtn_id") or self._events.vtn_id)
        freq = payload.get("requested_oadr_poll_freq")
        seconds = freq.total_seconds() if freq is not None else self._config.poll_interval_s
        self._poll_s = min(max(seconds, self._config.min_poll_interval_s), _MAX_POLL_S)
        await self._save_identity()
        await self._set_state_link("registered", "")
        return True

    def _failure(self, default: str) -> str:
        """Return the reason of the last failed request."""
        failure = self._client.last_failure
        return failure.reason if failure is not None else default

    def _refusal(self, rtype: str | None, payload: dict[str, Any]) -> str:
        """Describe why the last registration attempt got no registration id."""
        if rtype is None and self._last_parsed is not None:
            rtype, payload = self._last_parsed
        if rtype != "oadrCreatedPartyRegistration":
            return self._failure("no answer to oadrCreatePartyRegistration")
        resp = payload.get("response") or {}
        code = resp.get("response_code")
        if code not in (None, 200):
            return f"VTN answered {code} {resp.get('response_description', '')}".strip()
        return "VTN returned no registrationID"

    async def _poll_round(self) -> None:
        """Poll, handle what comes back, and poll again at once while messages keep coming."""
        for _ in range(_MAX_BURST):
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
            if self._state == "link_lost":
                await self._set_state_link("registered", "")
                await self._resync()
            if rtype == "oadrResponse" or not await self._dispatch(rtype, payload):
                return

    def _poll_wait_s(self) -> float:
        """Return the wait before the next poll (s): the poll interval, doubled for every poll in a row
        that did not reach the VTN, up to ``registration_retry_max_s`` (never below the interval)."""
        if self._poll_failures == 0:
            return self._poll_s
        ceiling = max(self._poll_s, self._config.registration_retry_max_s)
        return min(self._poll_s * 2.0 ** min(self._poll_failures, 32), ceiling)

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

    async def _dispatch(self, rtype: str, payload: dict[str, Any]) -> bool:
        """Handle one message from a poll; return whether to poll again at once."""
        if rtype == "oadrDistributeEvent":
            await self._events.distribution(payload)
            return True
        if rtype == "oadrCreateReport":
            await self._reports.create(payload)
            return True
        if rtype == "oadrCancelReport":
            await self._reports.cancel(payload)
            return True
        if rtype == "oadrRegisterReport":  # the VTN offers reports: this VEN requests none
            message = self._client._create_message(
                "oadrRegisteredReport",
                report_requests=[],
                ven_id=self._client.ven_id,
                response={"response_code": 200, "response_description": "OK", "request_id": payload.get("request_id")},
            )
            await _call(self._client._perform_request("EiReport", message))
            return True
        if rtype == "oadrRequestReregistration":
            await _call(self._client.send_response(service="EiRegisterParty"))
            await self._drop_registration("VTN requested re-registration")
            return False
        if rtype == "oadrCancelPartyRegistration":
            await self._answer_cancel_registration(payload)
            return False
        _log.warning("openadr message not handled", message=rtype)
        await self._audit("ven.message_ignored", {"message": rtype}, "utility")
        return True

    async def _answer_cancel_registration(self, payload: dict[str, Any]) -> None:
        """Confirm the VTN's cancellation of our registration (452 when it names another)."""
        theirs = payload.get("registration_id")
        ours = self._client.registration_id
        code = 200 if theirs in (None, ours) else 452
        message = self._client._create_message(
            "oadrCanceledPartyRegistration",
            response={"response_code": code, "response_description": "OK" if code == 200 else "ERROR",
                      "request_id": payload.get("request_id")},
            ven_id=self._client.ven_id,
            registration_id=ours,
        )  # fmt: skip
        await _call(self._client._perform_request("EiRegisterParty", message))
        if code == 200:
            self._registration_id = None
            await self._drop_registration("VTN cancelled the registration")

    async def _drop_registration(self, reason: str) -> None:
        """Forget the registration (reports stop; events stay with the gateway) and re-register."""
        self._client.registration_id = None
        await self._reports.stop()
        await self._save_identity()
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
        elif state == "refused":
            _log.warning("vtn refused registration, retrying", vtn_url=url, reason=reason)
            await self._audit("ven.registration_refused", {"vtn_url": url, "reason": reason})
        else:  # unreachable (never registered since the last attempt) or link_lost (polls fail)
            _log.warning("vtn unreachable, retrying", vtn_url=url, reason=reason, state=state)
            await self._audit("ven.link_lost", {"vtn_url": url, "reason": reason, "state": state})

    async def _on_parsed(self, message_type: str, payload: dict[str, Any]) -> None:
        """Remember the last parsed message (for refusal reasons)."""
        self._last_parsed = (message_type, payload)

    async def _audit(
        self, kind: str, data: dict[str, Any], actor: str = "gateway", event_id: str | None = None
    ) -> None:
        """Append to the audit log; a failing log is reported, not allowed to break the protocol."""
        try:
            await self._audit_sink.append(kind, data, actor=actor, event_id=event_id)
        except Exception as err:
            _log.error("audit append failed", kind=kind, error=repr(err))


async def _call(coro: Awaitable[Any]) -> tuple[str | None, dict[str, Any]]:
    """Await an openleadr request; return (None, {}) for any failure, including a bare None."""
    try:
        result = await coro
    except asyncio.CancelledError:
        raise
    except Exception as err:
        _log.debug("openadr request failed", error=repr(err))
        return None, {}
    if not isinstance(result, tuple) or len(result) != 2:
        return None, {}
    rtype, payload = result
    return rtype, payload if isinstance(payload, dict) else {}


__all__ = ["StateStore", "Ven"]
