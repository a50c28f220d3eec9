"""The VEN's registration with its VTN (2.0b EiRegisterParty): who we are, and whether we may poll.

What it keeps across restarts (the VEN state): the venID, the last registrationID granted, the
vtnID learned at registration, and whether the registration is *held*: cancelled by the VTN
(oadrCancelPartyRegistration) or by the operator. A held VEN answers nothing, polls nothing and does
not re-register until the operator registers it again (``drgw openadr register``) or, when
``openadr.reregister_after_cancel_s`` is set, that long after the cancellation.

A start with a stored registration does not register again: it sends one oadrQueryRegistration
(to learn the VTN's poll period; the certification cases N1_0010/0015 expect exactly that) and polls
with the registration it holds. A VTN that no longer knows it says so (oadrRequestReregistration),
and the VEN registers then, re-using its registrationID.

The venID is ours once we have one (configured, persisted or assigned at the first registration):
a registration answer naming another venID is refused and audited, never adopted.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.config import OpenAdrConfig
from gateway.logs import get_logger
from protocols.openadr.client import OadrClient
from protocols.openadr.eventsvc import EventService

_log = get_logger("openadr.registration")
_MAX_POLL_S = 86_400.0  # openleadr's own ceiling
_KEYS = ("ven_id", "registration_id", "vtn_id", "held")
OK = 200
INVALID_ID = 452

GetState = Callable[[str], Awaitable[str | None]]
SetState = Callable[[str, str], Awaitable[None]]
AuditFn = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    """What one registration exchange gave: ok, why not (the link state and reason), the poll period."""

    ok: bool
    state: str = ""  # when not ok: "unreachable" (no answer) or "refused"
    reason: str = ""
    poll_s: float | None = None


class Registrar:
    """Registers, resumes, queries and cancels; keeps the identity and the hold."""

    def __init__(
        self,
        client: OadrClient,
        config: OpenAdrConfig,
        events: EventService,
        audit: AuditFn,
        get_state: GetState,
        set_state: SetState,
    ) -> None:
        self._client = client
        self._config = config
        self._events = events
        self._audit = audit
        self._get = get_state
        self._set = set_state
        self.registration_id: str | None = None  # the last one granted (kept across restarts)
        self.held = ""  # why the registration is held off (cancelled); "" when the VEN may register
        self.resumable = False  # a stored registration to resume with a query only
        self._last_parsed: tuple[str, dict[str, Any]] | None = None
        client.add_hook("after_parse_xml", self._on_parsed)

    # -- identity -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Take venID, registration, VTN id and hold from the VEN state (a configured venID wins)."""
        saved = {k: await self._get(f"openadr.{k}") for k in _KEYS}
        if self._config.ven_id is None and saved["ven_id"]:
            self._client.ven_id = saved["ven_id"]
        if saved["ven_id"] in (None, self._client.ven_id):
            self.registration_id = saved["registration_id"] or None
            self._events.vtn_id = saved["vtn_id"] or ""
            self.held = saved["held"] or ""
        self.resumable = self.registration_id is not None and not self.held

    async def save(self) -> None:
        """Persist venID, registration id, VTN id and hold."""
        values = {"ven_id": self._client.ven_id, "registration_id": self.registration_id,
                  "vtn_id": self._events.vtn_id, "held": self.held}  # fmt: skip
        for key, value in values.items():
            await self._set(f"openadr.{key}", value or "")

    # -- exchanges ----------------------------------------------------------------------------

    async def query(self) -> tuple[str | None, dict[str, Any]]:
        """Send oadrQueryRegistration; return the answer (its venID, if any, is never adopted)."""
        ven_id = self._client.ven_id
        try:
            return await call(self._client.query_registration())
        finally:
            self._client.ven_id = ven_id

    async def resume(self) -> Outcome:
        """Resume the stored registration after a start: one query, no new registration (tried again while
        the VTN cannot be reached; a VTN that answers otherwise gets a registration instead)."""
        rtype, payload = await self.query()
        if rtype is None:
            return Outcome(False, "unreachable", self._failure("no answer from the VTN"))
        self.resumable = False
        if rtype != "oadrCreatedPartyRegistration" or _code(payload) not in (None, OK):
            return Outcome(False, "refused", f"VTN answered the query with {rtype} {_code(payload) or ''}".strip())
        self._client.registration_id = self.registration_id
        await self._learn_vtn(payload)
        await self.save()
        return Outcome(True, poll_s=self._poll_s(payload))

    async def register(self, fresh: bool = False) -> Outcome:
        """Query, then create the registration (re-using ours unless ``fresh``); return the outcome."""
        self._client.registration_id = None
        self._last_parsed = None
        rtype, _ = await self.query()
        if rtype is None:
            return Outcome(False, "unreachable", self._failure("no answer from the VTN"))
        ours = self._client.ven_id
        rtype, payload = await call(self._client.create_party_registration(
            ven_id=ours, registration_id=None if fresh else self.registration_id))  # fmt: skip
        theirs = self._client.ven_id
        if fresh and theirs and theirs != ours and self._config.ven_id is None:
            # A new registration the operator asked for (N1_0060): the VTN may grant a new venID;
            # only a configured venID or an unsolicited change is refused below.
            _log.warning("fresh registration: the VTN granted a new venID", ours=ours, theirs=theirs)
            ours = theirs
        if ours and theirs != ours:  # openleadr adopts whatever venID the answer carries: we do not
            self._client.ven_id, self._client.registration_id = ours, None
            reason = f"VTN answered with venID {theirs!r}, not ours ({ours!r}): registration refused"
            _log.warning("registration refused: venID mismatch", ours=ours, theirs=theirs)
            await self._audit("ven.ven_id_refused", {"ours": ours, "theirs": theirs}, "utility")
            return Outcome(False, "refused", reason)
        if self._client.registration_id is None:
            return Outcome(False, "refused", self._refusal(rtype, payload))
        self.registration_id = self._client.registration_id
        await self._learn_vtn(payload)
        await self.save()
        return Outcome(True, poll_s=self._poll_s(payload))

    async def cancel(self) -> tuple[bool, str]:
        """Cancel our registration (VEN-initiated oadrCancelPartyRegistration); return (done, why not)."""
        ours = self._client.registration_id
        if ours is None:
            return False, "not registered"
        message = self._client._create_message("oadrCancelPartyRegistration", request_id=uuid.uuid4().hex[:12],
                                               registration_id=ours, ven_id=self._client.ven_id)  # fmt: skip
        rtype, payload = await call(self._client._perform_request("EiRegisterParty", message))
        if rtype is None:
            return False, self._failure("no answer from the VTN")
        if rtype != "oadrCanceledPartyRegistration" or _code(payload) not in (None, OK):
            return False, f"VTN answered {rtype} {_code(payload) or ''}".strip()
        await self.hold("cancelled by the operator")
        return True, ""

    async def answer_cancel(self, payload: dict[str, Any]) -> bool:
        """Answer the VTN's oadrCancelPartyRegistration (452 when it names another registration);
        return whether our registration is now cancelled (and held)."""
        theirs = payload.get("registration_id")
        ours = self._client.registration_id
        code = OK if theirs in (None, ours) or str(theirs) == str(ours) else INVALID_ID
        message = self._client._create_message(
            "oadrCanceledPartyRegistration",
            response={"response_code": code, "response_description": "OK" if code == OK else "ERROR",
                      "request_id": payload.get("request_id")},
            ven_id=self._client.ven_id,
            registration_id=ours,
        )  # fmt: skip
        await call(self._client._perform_request("EiRegisterParty", message))
        if code != OK:
            await self._audit("ven.cancel_refused", {"registration_id": str(theirs), "ours": ours, "code": code},
                              "utility")  # fmt: skip
            return False
        await self.hold("cancelled by the VTN")
        return True

    async def hold(self, reason: str) -> None:
        """Forget the registration and hold off re-registering (persisted)."""
        self._client.registration_id = None
        self.registration_id = None
        self.held = reason
        await self.save()

    async def release(self) -> None:
        """End a hold: the VEN may register again."""
        self.held = ""
        await self.save()

    # -- helpers ------------------------------------------------------------------------------

    async def _learn_vtn(self, payload: dict[str, Any]) -> None:
        """Record the vtnID the VTN gave; a configured one that differs is reported once per change."""
        learned = "" if payload.get("vtn_id") is None else str(payload["vtn_id"])
        if learned and learned != self._events.vtn_id:
            self._events.vtn_id = learned
            expected = self._config.vtn_id
            if expected and learned != expected:
                _log.warning("VTN registered under another vtnID than configured", learned=learned, expected=expected)
                await self._audit("ven.vtn_id_differs", {"learned": learned, "configured": expected}, "utility")

    def _poll_s(self, payload: dict[str, Any]) -> float:
        """Return the poll period the answer requests, within the configured floor and openleadr's ceiling."""
        freq = payload.get("requested_oadr_poll_freq")
        seconds = freq.total_seconds() if freq is not None else self._config.poll_interval_s
        return min(max(seconds, self._config.min_poll_interval_s), _MAX_POLL_S)

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
        code = _code(payload)
        if code not in (None, OK):
            resp = payload.get("response") or {}
            return f"VTN answered {code} {resp.get('response_description', '')}".strip()
        return "VTN returned no registrationID"

    async def _on_parsed(self, message_type: str, payload: dict[str, Any]) -> None:
        """Remember the last parsed message (for refusal reasons)."""
        self._last_parsed = (message_type, payload)


def _code(payload: dict[str, Any]) -> int | None:
    """Return the eiResponse code of a parsed answer."""
    response = payload.get("response")
    return response.get("response_code") if isinstance(response, dict) else None


async def call(coro: Awaitable[Any]) -> tuple[str | None, dict[str, Any]]:
    """Await an openleadr request; return (None, {}) for any failure (not cancellation), including a bare None."""
    try:
        result = await coro
    except Exception as err:
        _log.debug("openadr request failed", error=repr(err))
        return None, {}
    if not isinstance(result, tuple) or len(result) != 2:
        return None, {}
    rtype, payload = result
    return rtype, payload if isinstance(payload, dict) else {}


__all__ = ["Outcome", "Registrar", "call"]
