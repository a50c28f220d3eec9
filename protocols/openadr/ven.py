"""The gateway's OpenADR 2.0b VEN: openleadr's client under a supervisor that never gives up.

openleadr's ``run()`` stops for good when the first registration fails, so the supervisor here
drives the client's pieces itself: register (with exponential backoff), request pending events,
then poll at the VTN's requested frequency. Every event goes through ``to_demand_event`` and the
gateway's ``on_event`` callback, which decides the opt quickly and never actuates. Every response
body is checked by ``xmlguard`` before openleadr parses it, and the wire traffic that matters is
audited by digest (empty poll round trips are not: one a poll would swamp the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import aiohttp
from openleadr import OpenADRClient

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from gateway.errors import InputRejected
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import DemandEvent, Opt
from protocols.openadr.convert import to_demand_event
from protocols.openadr.xmlguard import guarded_response_class, harden_openleadr_parser

# openleadr's client module sets its logger to INFO at import (it logs every poll); the
# application decides: keep it at WARNING unless someone asked for debug logging.
if logging.getLogger().level > logging.DEBUG:
    logging.getLogger("openleadr").setLevel(logging.WARNING)

_log = get_logger("openadr.ven")
_MIN_POLL_S = 1.0  # a VTN asking for PT0S must not turn the VEN into a busy loop
_MAX_POLL_S = 86_400.0  # openleadr's own ceiling
_MAX_BURST = 8  # polls in a row while the VTN keeps having messages queued
_CLEANUP_S = 300.0  # how often openleadr's memory of finished events is pruned
_MSG_TYPE = re.compile(r"<(?:[\w.-]+:)?(oadr\w+)")
_ENVELOPE = frozenset({"oadrPayload", "oadrSignedObject"})
# openleadr logs every failed request at ERROR; the supervisor logs state changes instead.
_NOISE = (
    "Could not connect to server",
    "ClientConnector",
    "Request error",
    "Non-OK status",
    "Incoming message did not pass",
    "The incoming message could not be parsed",
    "We got a non-OK OpenADR response",
    "Got error on Create Party Registration",
    "No registration ID received",
    "No venID received",
)

OnEvent = Callable[[DemandEvent], Awaitable[Opt]]
OnCancel = Callable[[str], Awaitable[None]]


class _QuietOpenleadr(logging.Filter):
    """Swallow openleadr's per-request error lines, keeping the last one as the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False (drop) for per-request noise, after remembering it."""
        msg = record.getMessage()
        if not msg.startswith(_NOISE):
            return True
        if not msg.startswith("Could not connect"):
            self.last = msg.split(" with data ")[0][:200]
        return False


class _Answers(dict[str, str]):
    """openleadr's memory of its answers; a re-sent event it already forgot is confirmed.

    openleadr drops a cancelled event's answer once it confirms it, then raises KeyError (and
    opts out of every event in the message) if the VTN re-sends that same version.
    """

    def __missing__(self, key: str) -> str:
        return Opt.IN.value


class _Client(OpenADRClient):
    """openleadr's client whose HTTP session checks every body before openleadr parses it."""

    client_session: aiohttp.ClientSession | None

    def __init__(self, *args: Any, response_class: type[aiohttp.ClientResponse], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._response_class = response_class

    async def _ensure_client_session(self) -> None:
        """Create the session as openleadr does (headers, timeouts), with the guarded response."""
        if not self.client_session:
            self.client_session = aiohttp.ClientSession(
                headers={"content-type": "application/xml"},
                timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=10),
                response_class=self._response_class,
            )


class Ven:
    """A supervised OpenADR 2.0b VEN that hands DemandEvents to the gateway."""

    def __init__(
        self,
        config: OpenAdrConfig,
        on_event: OnEvent,
        audit: AuditSink,
        clock: Clock,
        on_cancel: OnCancel | None = None,
    ) -> None:
        self._config = config
        self._on_event = on_event
        self._on_cancel = on_cancel
        self._audit_sink = audit
        self._clock = clock
        self._client = _Client(
            ven_name=config.ven_name,
            vtn_url=config.vtn_url,
            ven_id=config.ven_id,
            show_fingerprint=False,
            response_class=guarded_response_class(self._on_xml_rejected),
        )
        self._client.responded_events = _Answers()
        self._client.add_handler("on_event", self._handle_event)
        self._client.add_handler("on_update_event", self._handle_event)
        self._client.add_hook("before_send_xml", self._on_xml_out)
        self._client.add_hook("after_receive_xml", self._on_xml_in)
        self._client.add_hook("after_parse_xml", self._on_parsed)
        self._noise = _QuietOpenleadr()
        self._task: asyncio.Task[None] | None = None
        self._state = "stopped"
        self._vtn_id = ""
        self._poll_s = 10.0
        self._polling = False
        self._last_parsed: tuple[str, dict[str, Any]] | None = None
        self.last_poll_ok: datetime | None = None

    @property
    def registered(self) -> bool:
        """Return whether the VEN holds a registration with the VTN."""
        return self._client.registration_id is not None

    @property
    def ven_id(self) -> str | None:
        """Return the venID (configured, or assigned by the VTN at registration)."""
        return self._client.ven_id

    @property
    def state(self) -> str:
        """Return the link state: stopped, starting, unreachable, refused, registered or link_lost."""
        return self._state

    async def start(self) -> None:
        """Start the supervisor task and return at once."""
        if self._task is not None:
            return
        harden_openleadr_parser()
        logging.getLogger("openleadr").addFilter(self._noise)
        self._state = "starting"
        self._task = asyncio.create_task(self._supervise(), name="openadr-ven")

    async def stop(self) -> None:
        """Stop polling and close the HTTP session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client.client_session is not None:
            await self._client.client_session.close()
            self._client.client_session = None
        logging.getLogger("openleadr").removeFilter(self._noise)
        self._state = "stopped"

    # -- supervisor ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Register with backoff, then poll forever; no error ends this loop."""
        cfg = self._config
        delay = cfg.registration_retry_initial_s
        next_cleanup = self._clock.monotonic() + _CLEANUP_S
        while True:
            try:
                if not self.registered:
                    if not await self._register():
                        await self._clock.sleep(delay)
                        delay = min(delay * 2, cfg.registration_retry_max_s)
                        continue
                    delay = cfg.registration_retry_initial_s
                    await self._sync_events()
                await self._poll_round()
                if self._clock.monotonic() >= next_cleanup:
                    next_cleanup = self._clock.monotonic() + _CLEANUP_S
                    await self._client._event_cleanup()
                if self.registered:
                    await self._clock.sleep(self._poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug here must not end the VEN: log it and carry on
                _log.exception("ven supervisor error", error=repr(err))
                await self._clock.sleep(delay)
                delay = min(delay * 2, cfg.registration_retry_max_s)

    async def _register(self) -> bool:
        """Query and create the registration; record why it failed; return success."""
        self._client.registration_id = None
        self._noise.last = ""
        self._last_parsed = None
        rtype, _ = await _call(self._client.query_registration())
        if rtype is None:
            await self._set_state("unreachable", self._noise.last or "no answer from the VTN")
            return False
        await _call(self._client.create_party_registration(ven_id=self._client.ven_id))
        if not self.registered:
            await self._set_state("refused", self._refusal())
            return False
        freq = self._client.poll_frequency
        seconds = freq.total_seconds() if freq is not None else 10.0
        self._poll_s = min(max(seconds, _MIN_POLL_S), _MAX_POLL_S)
        await self._set_state("registered", "")
        return True

    def _refusal(self) -> str:
        """Describe why the last registration attempt got no registration id."""
        if self._last_parsed is None or self._last_parsed[0] != "oadrCreatedPartyRegistration":
            return self._noise.last or "no answer to oadrCreatePartyRegistration"
        resp = self._last_parsed[1].get("response") or {}
        code = resp.get("response_code")
        if code not in (None, 200):
            return f"VTN answered {code} {resp.get('response_description', '')}".strip()
        return "VTN returned no registrationID"

    async def _sync_events(self) -> None:
        """Ask for the events the VTN already holds for this VEN."""
        rtype, payload = await _call(self._client.request_event())
        if rtype == "oadrDistributeEvent" and payload.get("events"):
            await self._client._on_event(payload)

    async def _poll_round(self) -> None:
        """Poll, handle what comes back, and poll again at once while messages keep coming."""
        for _ in range(_MAX_BURST):
            self._polling = True
            try:
                rtype, payload = await _call(self._client.poll())
            finally:
                self._polling = False
            if rtype is None:
                if self._state == "registered":
                    await self._set_state("link_lost", self._noise.last or "poll failed")
                return
            self.last_poll_ok = self._clock.now()
            if self._state == "link_lost":
                await self._set_state("registered", "")
            if rtype == "oadrResponse" or not await self._dispatch(rtype, payload):
                return

    async def _dispatch(self, rtype: str, payload: dict[str, Any]) -> bool:
        """Handle one message from a poll; return whether to poll again at once."""
        if rtype == "oadrDistributeEvent":
            if payload.get("events"):
                await self._client._on_event(payload)
            return True
        if rtype == "oadrRequestReregistration":
            await _call(self._client.send_response(service="EiRegisterParty"))
            self._client.registration_id = None
            await self._set_state("unregistered", "VTN requested re-registration")
            return False
        if rtype == "oadrCancelPartyRegistration":
            await _call(self._client.on_cancel_party_registration(payload))
            self._client.registration_id = None
            await self._set_state("unregistered", "VTN cancelled the registration")
            return False
        _log.warning("openadr message not handled yet", message=rtype)
        return True

    async def _set_state(self, state: str, reason: str) -> None:
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
                "vtn_id": self._vtn_id,
                "ven_id": self.ven_id,
                "registration_id": self._client.registration_id,
                "poll_s": self._poll_s,
            }
            _log.info("registered", **data)
            await self._audit("ven.registered", data)
        elif state == "unregistered":
            _log.warning("registration dropped", vtn_url=url, reason=reason)
            await self._audit("ven.unregistered", {"vtn_url": url, "reason": reason}, actor="utility")
        elif state == "refused":
            _log.warning("vtn refused registration, retrying", vtn_url=url, reason=reason)
            await self._audit("ven.registration_refused", {"vtn_url": url, "reason": reason})
        else:  # unreachable (never registered since the last attempt) or link_lost (polls fail)
            _log.warning("vtn unreachable, retrying", vtn_url=url, reason=reason, state=state)
            await self._audit("ven.link_lost", {"vtn_url": url, "reason": reason, "state": state})

    # -- events -------------------------------------------------------------------------------

    async def _handle_event(self, event: dict[str, Any]) -> str:
        """Convert, audit and decide one event version; return openleadr's opt string."""
        raw_desc = event.get("event_descriptor")
        desc: dict[str, Any] = raw_desc if isinstance(raw_desc, dict) else {}
        event_id = str(desc.get("event_id"))
        mod = desc.get("modification_number")
        cancelled = desc.get("event_status") == "cancelled"
        try:
            demand = to_demand_event(event, self._vtn_id)
        except InputRejected as err:
            _log.warning("event rejected", event_id=event_id, reason=str(err))
            await self._audit(
                "event.rejected", {"reason": str(err), "modification_number": mod}, "utility", event_id
            )
            # A cancellation we cannot read is still honoured: stopping is the safe direction.
            opt = Opt.IN if cancelled else Opt.OUT
            if cancelled and self._on_cancel is not None:
                await self._notify_cancel(event_id)
            return await self._answer(event_id, mod, opt, event)
        await self._audit("event.received", _summary(demand), "utility", demand.event_id)
        try:
            opt = Opt(await self._on_event(demand))
        except Exception as err:  # the decision failed: do not promise anything
            _log.exception("event decision failed", event_id=event_id, error=repr(err))
            opt = Opt.OUT
        if demand.cancelled:
            if self._on_cancel is not None:
                await self._notify_cancel(event_id)
            opt = Opt.IN  # 2.0b: a cancellation is confirmed with optIn
        return await self._answer(event_id, mod, opt, event)

    async def _notify_cancel(self, event_id: str) -> None:
        """Tell the gateway an event was cancelled; its failure must not block the answer."""
        assert self._on_cancel is not None
        try:
            await self._on_cancel(event_id)
        except Exception as err:
            _log.exception("cancel callback failed", event_id=event_id, error=repr(err))

    async def _answer(self, event_id: str, mod: Any, opt: Opt, event: dict[str, Any]) -> str:
        """Audit the opt about to be sent and return it in openleadr's form."""
        data = {
            "opt": opt.value,
            "modification_number": mod,
            "response_required": event.get("response_required", "always") == "always",
        }
        await self._audit("opt.sent", data, "gateway", event_id)
        return opt.value

    # -- wire evidence ------------------------------------------------------------------------

    async def _on_xml_out(self, message: str) -> None:
        """Audit an outgoing message by digest (poll requests are not audited)."""
        if not self._polling:
            await self._audit("xml.out", _digest(message), "gateway")

    async def _on_xml_in(self, content: str) -> None:
        """Audit an incoming message by digest (empty poll answers are not audited)."""
        data = _digest(content)
        if not (self._polling and data["message"] == "oadrResponse"):
            await self._audit("xml.in", data, "utility")

    async def _on_parsed(self, message_type: str, payload: dict[str, Any]) -> None:
        """Remember the VTN's id and the last parsed message (for refusal reasons)."""
        self._last_parsed = (message_type, payload)
        vtn_id = payload.get("vtn_id") if isinstance(payload, dict) else None
        if vtn_id:
            self._vtn_id = str(vtn_id)

    async def _on_xml_rejected(self, reason: str, size: int, sha256: str) -> None:
        """Audit a body the guard refused before any parser saw it."""
        _log.warning("xml rejected", reason=reason, size=size)
        await self._audit("xml.rejected", {"reason": reason, "size": size, "sha256": sha256}, "utility")

    async def _audit(
        self, kind: str, data: dict[str, Any], actor: str = "gateway", event_id: str | None = None
    ) -> None:
        """Append to the audit log; a failing log is reported, not allowed to break the protocol."""
        try:
            await self._audit_sink.append(kind, data, actor=actor, event_id=event_id)
        except Exception as err:
            _log.error("audit append failed", kind=kind, error=repr(err))


async def _call(coro: Coroutine[Any, Any, Any]) -> tuple[str | None, dict[str, Any]]:
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


def _digest(text: str) -> dict[str, Any]:
    """Return the message type, size in bytes and sha256 of a wire message."""
    body = text.encode("utf-8")
    names = (m.group(1) for m in _MSG_TYPE.finditer(text, 0, 4096))
    return {
        "message": next((n for n in names if n not in _ENVELOPE), None),
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }


def _summary(ev: DemandEvent) -> dict[str, Any]:
    """Return the audit record of a received event: versions, times and signals."""
    return {
        "modification_number": ev.modification_number,
        "status": ev.status,
        "start": ev.start.isoformat(),
        "duration_s": ev.duration_s,
        "ramp_up_s": ev.ramp_up_s,
        "recovery_s": ev.recovery_s,
        "start_after_s": ev.start_after_s,
        "priority": ev.priority,
        "test_event": ev.test_event,
        "market_context": ev.market_context,
        "vtn_id": ev.vtn_id,
        "created": ev.created.isoformat() if ev.created else None,
        "signals": [
            {
                "name": s.name.value,
                "type": s.signal_type,
                "unit": s.unit,
                "intervals": [[iv.start.isoformat(), iv.duration_s, iv.value] for iv in s.intervals],
            }
            for s in ev.signals
        ],
    }
