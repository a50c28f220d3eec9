"""One way to opt out of an event, whoever asks (operator, BMS, any later console): decided, stored
and audited, then sent to the VTN, in that order.

``EventBook.override_opt`` decides and records: the override and its ``opt.override`` row (actor
and who asked in the reason) are one transaction, so an opt-out the log cannot take is refused and
changes nothing; the event stops at once. Only then is the VTN told (``oadrCreateOpt``, else a new
``oadrCreatedEvent``). An opt-out that got no reply from the VTN is answered again from the store
after the VEN's next poll, so the utility hears only what the gateway stored. Asking again for an
opt-out already in force decides nothing and sends nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import AuditError
from gateway.events import EventBook, Outcome
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import Opt

log = get_logger("gateway.optout")

SendOpt = Callable[[str, Opt, str, int], Awaitable[bool]]  # (event id, opt, reason, modification number)


class OptOuts:
    """The opt-out path every actor takes."""

    def __init__(self, book: EventBook, audit: AuditSink) -> None:
        self._book = book
        self._audit = audit
        self.send: SendOpt | None = None  # the VEN's send_opt, once it runs

    async def opt_out(self, event_id: str, actor: str, reason: str, origin: str) -> dict[str, Any]:
        """Opt out of ``event_id`` for ``actor`` (asked from ``origin``); return what was done.

        Raise InputRejected for a bad request about a known event, AuditError when the decision
        cannot be stored (nothing changed then, nothing sent)."""
        known = {ev.event_id: ev for ev, _ in self._book.events()}
        ev = known.get(event_id)
        if ev is None:
            try:
                await self._audit.append(
                    f"{actor}.opt_out_rejected",
                    {"reason": "unknown event", "peer": origin},
                    actor=actor,
                    event_id=event_id,
                )
            except AuditError as err:
                log.error("opt-out refusal not recorded", event_id=event_id, actor=actor, error=str(err))
            return {"ok": False, "error": f"event {event_id} is not known to this gateway"}
        answer = await self._book.override_opt(event_id, Opt.OUT, actor=actor, reason=f"{reason} (from {origin})")
        result: dict[str, Any] = {"ok": True, "event_id": event_id, "opt": Opt.OUT.value}
        if answer.outcome is Outcome.REPEAT:
            return {**result, "sent_to_vtn": False, "note": answer.reason}
        sent = False
        if self.send is not None:
            sent = bool(await self.send(event_id, Opt.OUT, reason, ev.modification_number))
        return {**result, "sent_to_vtn": sent}


__all__ = ["OptOuts", "SendOpt"]
