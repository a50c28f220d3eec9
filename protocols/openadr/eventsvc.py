"""The VEN's EiEvent side: answer every oadrDistributeEvent, and change an opt later.

openleadr's own handling re-sends a cached answer for a version it has seen (so an operator's
later opt-out would be contradicted), treats a lower modification number as an update, only
knows one "not supported" code, and never notices an event that vanished. Here every event in a
distribution goes to the gateway, which answers from its own store, and each answer carries the
2.0b code for what happened (rules 19, 25, 36, 42, 48, 58, 60, 62):

====================  ====  =====================================================
outcome               code  opt
====================  ====  =====================================================
accepted, repeated    200   the gateway's decision (the same one for a repeat)
cancellation          200   optIn (unknown or unreadable cancellations too)
stale version         450   the opt already in force for the event
wrong market context  453   optOut
signal not supported  460   optOut
eiTarget not ours     462   optOut
invalid event         454   optOut
decision not stored   none  (held: no answer until the decision is stored)
====================  ====  =====================================================

What the VTN hears is only ever what the gateway stored: when the gateway cannot store a decision
(its database refuses writes), the version gets no answer at all, and the VEN asks for the events
again (oadrRequestEvent) after each poll until it can answer from the store. openleadr's VTN does
not send an unanswered event again by itself. An answer or opt change that got no reply from the
VTN is given again the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from xml.sax.saxutils import escape

from gateway.errors import GatewayError
from gateway.events import Answer, Outcome
from gateway.logs import get_logger
from gateway.model import DemandEvent, Opt
from protocols.openadr.client import OadrClient
from protocols.openadr.convert import InvalidEvent, to_demand_event

_log = get_logger("openadr.events")
OK = 200
OUT_OF_SEQUENCE = 450
INVALID_ID = 452
NOT_RECOGNIZED = 453
TARGET_MISMATCH = 462
NO_REPLY = frozenset({"unreachable", "timeout", "tls", "http", "transport"})  # failures the VTN may not have seen
_CODES = {Outcome.STALE: OUT_OF_SEQUENCE, Outcome.NOT_TARGETED: TARGET_MISMATCH, Outcome.WRONG_MARKET: NOT_RECOGNIZED}

OnEvent = Callable[[DemandEvent], Awaitable[Opt | Answer]]
OnCancel = Callable[[str, str], Awaitable[Any]]  # (event_id, reason)
OnDistribution = Callable[[str, frozenset[str]], Awaitable[Any]]  # (vtn_id, event ids listed)
AuditFn = Callable[..., Awaitable[None]]


class EventService:
    """Turns distributions into gateway decisions and oadrCreatedEvent answers."""

    def __init__(
        self,
        client: OadrClient,
        on_event: OnEvent,
        audit: AuditFn,
        price_types: frozenset[str],
        on_cancel: OnCancel | None = None,
        on_distribution: OnDistribution | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._client = client
        self._now = now or _utcnow
        self._on_event = on_event
        self._audit = audit
        self._price_types = price_types
        self._on_cancel = on_cancel
        self._on_distribution = on_distribution
        self.vtn_id = ""  # the registered VTN; distributions from another are refused (rule 21)
        self.expected_vtn_id = ""  # the configured VTN id (openadr.vtn_id): when set, it is the one checked
        self._request_ids: dict[str, str] = {}  # event id -> requestID of its last distribution
        # Events whose stored answer the VTN may not have: the decision could not be stored (answer
        # held), or the answer got no reply. The VEN asks for the events again while any remain.
        self.unanswered: dict[str, Any] = {}  # event id -> modification number

    async def distribution(self, payload: dict[str, Any]) -> None:
        """Answer one oadrDistributeEvent: decide every event, then send one oadrCreatedEvent."""
        request_id = _text(payload.get("request_id"))
        sender = _text(payload.get("vtn_id"))
        expected = self.expected_vtn_id or self.vtn_id
        if expected and same_id(sender, expected):
            sender = expected  # openleadr reads a digit-only id as a number (leading zeros lost)
        elif expected:
            which = "configured" if self.expected_vtn_id else "registered"
            reason = f"vtnID {sender!r} is not the {which} VTN {expected!r}"
            _log.warning("distribution refused", reason=reason)
            await self._audit("event.distribution_refused", {"reason": reason}, "utility")
            await self._created([], {"response_code": INVALID_ID, "response_description": "invalid vtnID",
                                     "request_id": escape(request_id)})  # fmt: skip
            return
        raw_events = payload.get("events") or []
        if isinstance(raw_events, dict):
            raw_events = [raw_events]
        responses: list[dict[str, Any]] = []
        listed: set[str] = set()
        held = dict(self.unanswered)
        self.unanswered.clear()  # a distribution lists every event: what is still unanswered is found again
        for raw in raw_events:
            reply = await self._one(raw if isinstance(raw, dict) else {}, sender, held)
            if reply is None:
                continue
            event_id, mod, opt, code, description, required = reply
            listed.add(event_id)
            self._request_ids[event_id] = request_id
            if required and opt is not None:
                responses.append(_response(code, description, request_id, event_id, mod, opt))
        if self._on_distribution is not None:
            try:
                await self._on_distribution(sender, frozenset(listed))
            except Exception as err:
                _log.exception("implied cancellation check failed", error=repr(err))
        if responses:  # rule 62: one oadrCreatedEvent for every event that asks for a response
            ok = await self._created(responses, {"response_code": OK, "response_description": "OK", "request_id": None})
            if ok is None:  # no reply: the VTN may not have these answers; they are given again
                self.unanswered.update({str(r["event_id"]): r["modification_number"] for r in responses})

    async def _one(
        self, raw: dict[str, Any], vtn_id: str, held: dict[str, Any]
    ) -> tuple[str, Any, Opt | None, int, str, bool] | None:
        """Decide one event: (id, modification number, opt, code, description, response required).

        The opt is None when the answer is held: the gateway could not store its decision."""
        desc = raw.get("event_descriptor") if isinstance(raw.get("event_descriptor"), dict) else {}
        assert isinstance(desc, dict)
        if desc.get("event_id") in (None, ""):
            await self._audit("event.rejected", {"reason": "event without an eventID"}, "utility")
            return None
        event_id = str(desc["event_id"])
        mod = desc.get("modification_number")
        required = raw.get("response_required", "always") != "never"
        cancelled = desc.get("event_status") == "cancelled"
        try:
            demand = to_demand_event(raw, vtn_id, self._client.ven_id or "", self._price_types)
        except InvalidEvent as err:
            _log.warning("event refused", event_id=event_id, reason=str(err), code=err.code)
            await self._audit("event.rejected", {"reason": str(err), "code": err.code, "modification_number": mod},
                              "utility", event_id)  # fmt: skip
            if cancelled:  # stopping is the safe direction: honour a cancellation we cannot read
                await self._cancel(event_id, f"unreadable cancellation: {err}")
                return await self._sent(event_id, mod, Opt.IN, OK, "OK", required)
            return await self._sent(event_id, mod, Opt.OUT, err.code, str(err), required)
        await self._audit("event.received", summary(demand), "utility", event_id)
        try:
            result = await self._on_event(demand)
        except Exception as err:  # not decided and stored: promise nothing now, answer once it is stored
            await self._hold(demand, err, first=held.get(event_id) != mod)
            return event_id, mod, None, OK, "", required
        if isinstance(result, Answer):
            opt, code = result.opt, _CODES.get(result.outcome, OK)
            description = "OK" if code == OK else result.reason
        else:
            opt, code, description = Opt(result), OK, "OK"
        if demand.cancelled:
            opt = Opt.IN  # rule 36: optIn confirms a cancellation
        return await self._sent(event_id, mod, opt, code, description, required)

    async def _hold(self, demand: DemandEvent, err: Exception, first: bool) -> None:
        """Leave a version unanswered: what the VTN is told must be what the gateway stored.

        The VEN asks for the events again at its next poll and answers once the decision is stored.
        A cancellation is still obeyed at once (stopping is the safe direction)."""
        event_id, mod = demand.event_id, demand.modification_number
        self.unanswered[event_id] = mod
        if first:
            _log.error("event answer held: decision not stored", event_id=event_id, modification_number=mod,
                       error=str(err) if isinstance(err, GatewayError) else repr(err))  # fmt: skip
            if not isinstance(err, GatewayError):
                _log.exception("event decision failed", event_id=event_id)
        data = {"modification_number": mod, "error": str(err)[:500], "retry": "next poll"}
        await self._audit("opt.held", data, "gateway", event_id)
        if demand.cancelled:
            await self._cancel(event_id, "cancellation received; not stored yet")

    async def _cancel(self, event_id: str, reason: str) -> None:
        """Tell the gateway to stop an event; its failure must not block the answer."""
        if self._on_cancel is None:
            return
        try:
            await self._on_cancel(event_id, reason)
        except Exception as err:
            _log.exception("cancel callback failed", event_id=event_id, error=repr(err))

    async def _sent(
        self, event_id: str, mod: Any, opt: Opt, code: int, description: str, required: bool
    ) -> tuple[str, Any, Opt, int, str, bool]:
        """Audit the answer about to be sent and return it."""
        data = {"opt": opt.value, "code": code, "modification_number": mod, "response_required": required}
        await self._audit("opt.sent", data, "gateway", event_id)
        return event_id, mod, opt, code, description, required

    async def _created(self, responses: list[dict[str, Any]], response: dict[str, Any]) -> bool | None:
        """Send oadrCreatedEvent; return whether the VTN acknowledged it (None: no reply at all)."""
        message = self._client._create_message(
            "oadrCreatedEvent",
            response=response,
            event_responses=responses or None,
            ven_id=escape(self._client.ven_id or ""),
        )
        rtype, payload = await self._client._perform_request("EiEvent", message)
        if rtype is None and _no_reply(self._client):
            return None
        return rtype == "oadrResponse" and _code(payload) == OK

    async def send_opt(self, event_id: str, opt: Opt, reason: str, modification_number: int) -> bool:
        """Tell the VTN the opt changed: oadrCreateOpt, else a new oadrCreatedEvent; return success."""
        opt = Opt(opt)
        via = "EiOpt"
        ok: bool | None = await self._create_opt(event_id, opt, modification_number)
        if not ok:  # rule 42: a later oadrCreatedEvent may change the opt status
            via = "EiEvent"
            request_id = self._request_ids.get(event_id, "")
            ok = await self._created(
                [_response(OK, "OK", request_id, event_id, modification_number, opt)],
                {"response_code": OK, "response_description": "OK", "request_id": None},
            )
        data = {"opt": opt.value, "reason": reason, "modification_number": modification_number,
                "via": via, "acknowledged": bool(ok)}  # fmt: skip
        if ok is None:  # no reply: answered again, from the store, once the VTN is reached
            self.unanswered[event_id] = modification_number
            data["retry"] = "next poll"
        await self._audit("opt.sent_to_vtn" if ok else "opt.send_failed", data, "gateway", event_id)
        return bool(ok)

    async def _create_opt(self, event_id: str, opt: Opt, modification_number: int) -> bool:
        """Send oadrCreateOpt for one event; return whether the VTN acknowledged it."""
        ven_id = escape(self._client.ven_id or "")
        message = self._client._create_message(
            "oadrCreateOpt",
            opt_id=f"opt-{uuid.uuid4().hex[:12]}",
            opt_type=opt.value,
            opt_reason="overrideStatus" if opt is Opt.OUT else "participating",
            ven_id=ven_id,
            created_date_time=self._now(),
            request_id=uuid.uuid4().hex[:12],
            event_id=escape(event_id),
            modification_number=modification_number,
            targets=[{"ven_id": ven_id}],
        )
        rtype, payload = await self._client._perform_request("EiOpt", message)
        return rtype == "oadrCreatedOpt" and _code(payload) == OK


def _no_reply(client: OadrClient) -> bool:
    """Return whether the client's last request got no reply at all (transport failure)."""
    failure = client.last_failure
    return failure is not None and failure.kind in NO_REPLY


def _response(code: int, description: str, request_id: str, event_id: str, mod: Any, opt: Opt) -> dict[str, Any]:
    """Return one eventResponse for openleadr's oadrCreatedEvent template (values XML-escaped)."""
    return {
        "response_code": code,
        "response_description": escape(description[:240]),
        "request_id": escape(request_id),
        "event_id": escape(event_id),
        "modification_number": mod if isinstance(mod, int) else 0,
        "opt_type": opt.value,
    }


def _utcnow() -> datetime:
    """Return the current UTC time."""
    from datetime import UTC

    return datetime.now(UTC)


def _code(payload: dict[str, Any]) -> int | None:
    """Return the eiResponse code of a parsed answer."""
    response = payload.get("response")
    return response.get("response_code") if isinstance(response, dict) else None


def same_id(received: str, expected: str) -> bool:
    """Return whether a received id is the expected one; openleadr turns a digit-only id into a number,
    so "0123" arrives as "123": digit-only ids compare by value."""
    if received == expected:
        return True
    return received.isdigit() and expected.isdigit() and int(received) == int(expected)


def _text(value: Any) -> str:
    """Return an id field as text (openleadr turns digit-only ids into numbers)."""
    return "" if value is None else str(value)


def summary(ev: DemandEvent) -> dict[str, Any]:
    """Return the audit record of a received event: versions, times, targets and signals."""
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
        "vtn_comment": ev.vtn_comment,
        "targets": [list(t) for t in ev.targets],
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
