"""The VEN's event side: believe an event only once it validates, act once per version, hand it on.

Events arrive by poll and by push (webhook, MQTT), at least once each and in any order. Here:

- every event is first corrected for known drift (``drift``) and validated against the 3.1.0
  schema; one that fails is audited (``event.rejected``) and changes nothing;
- events of programmes this VEN does not follow are ignored (audited once per event version);
- a version is (event id, ``modificationDateTime``); the same version again is a duplicate and is
  not acted on again. The event book keys versions by an integer, so each new version of an event
  gets the next number (an older ``modificationDateTime`` gets one below the newest, which the book
  rejects as stale); the numbering is kept in the VEN state, so it survives restarts;
- a version that cannot be acted on (``convert.EventRefused``) is audited and changes nothing;
  report-only events (no intervals) only start their reports;
- a deleted event, and one a full listing no longer shows (implied cancellation), are handed to
  ``on_cancel`` / ``on_distribution``, as the 2.0b path does.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gateway.clock import Clock
from gateway.config import OpenAdrConfig
from gateway.logs import get_logger
from gateway.model import DemandEvent, Opt
from protocols.openadr3 import drift, schema
from protocols.openadr3.convert import EventRefused, resolve, to_demand_event
from protocols.openadr3.reports import Reporter
from protocols.openadr3.wirelog import WireLog

_log = get_logger("openadr3.events")
OnEvent = Callable[[DemandEvent], Awaitable[Any]]  # returns the book's Answer (or an Opt)
OnCancel = Callable[[str, str], Awaitable[Any]]  # (event_id, reason)
OnDistribution = Callable[[str, frozenset[str]], Awaitable[Any]]  # (vtn_id, event ids listed)
AuditFn = Callable[..., Awaitable[None]]
_VERSION_KEY = "openadr3.version:"


class StateStore(Protocol):
    """Where the VEN keeps what must survive a restart (the event store's key/value state)."""

    async def get_state(self, key: str) -> str | None: ...
    async def set_state(self, key: str, value: str) -> None: ...


class EventFollower:
    """Turns 3.1 event objects into DemandEvents for the gateway, once per version."""

    def __init__(
        self,
        cfg: OpenAdrConfig,
        clock: Clock,
        audit: AuditFn,
        wire: WireLog,
        reporter: Reporter,
        on_event: OnEvent,
        on_cancel: OnCancel | None,
        on_distribution: OnDistribution | None,
        state: StateStore | None,
        vtn_id: str,
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._audit = audit
        self._wire = wire
        self._reporter = reporter
        self._on_event = on_event
        self._on_cancel = on_cancel
        self._on_distribution = on_distribution
        self._state = state
        self.vtn_id = vtn_id
        self.programs: dict[str, dict[str, Any]] = {}  # programme id -> programme object (followed ones)
        self._versions: dict[str, tuple[str, int]] = {}  # event id -> (newest modificationDateTime, number)
        self._seen: dict[str, str] = {}  # event id -> modificationDateTime last handled (this run)
        self._ignored: set[tuple[str, str]] = set()
        self._price_types = frozenset({"price"} if cfg.price_levels else set())
        self.handled = 0  # event versions handed to the gateway
        self.duplicates = 0  # versions received again and not acted on again

    async def accept(self, obj: Any, source: str) -> str:
        """Handle one event object from a poll or a notification; return what was done."""
        fixed, notes = drift.normalise("EVENT", obj)
        eid = str(fixed.get("id")) if isinstance(fixed, dict) and fixed.get("id") else None
        try:
            schema.validate("event", fixed)
        except schema.SchemaRejected as err:
            await self._wire.rejected(f"event from {source}", str(err), json.dumps(obj).encode())
            await self._audit("event.rejected", {"reason": str(err), "source": source}, "utility", eid)
            return "invalid"
        assert eid is not None
        mdt = fixed["modificationDateTime"]
        if self._seen.get(eid) == mdt:
            self.duplicates += 1
            return "duplicate"
        program = self.programs.get(fixed["programID"])
        if program is None:
            if (eid, mdt) not in self._ignored:
                self._ignored.add((eid, mdt))
                await self._audit("event.ignored", {"reason": f"programme {fixed['programID']} is not followed",
                                  "source": source}, "utility", eid)  # fmt: skip
            return "not_followed"
        if notes:
            await self._audit("oadr3.drift", {"object": "event", "corrections": notes}, "utility", eid)
        self._seen[eid] = mdt
        version = await self._version(eid, mdt)
        if not fixed.get("intervals"):
            await self._audit("event.report_only", {"modification": mdt, "source": source}, "utility", eid)
            await self._track_reports(fixed)
            return "report_only"
        try:
            converted = to_demand_event(
                fixed,
                version=version,
                now=self._clock.now(),
                vtn_id=self.vtn_id,
                ven_name=self._cfg.ven_name,
                program_name=str(program.get("programName", "")),
                descriptors=_descriptors(program, fixed),
                price_types=self._price_types,
                our_targets=frozenset(self._cfg.v3.targets) | {self._cfg.ven_name, *self._cfg.v3.resource_names},
            )
        except EventRefused as err:
            _log.warning("event refused", event_id=eid, reason=str(err))
            await self._audit("event.rejected", {"reason": str(err), "problem": err.problem(), "modification": mdt,
                              "source": source}, "utility", eid)  # fmt: skip
            return "refused"
        demand = converted.event
        await self._audit("event.received", {**_summary(demand), "modification": mdt, "source": source,
                          "ignored_payloads": list(converted.ignored)}, "utility", eid)  # fmt: skip
        try:
            answer = await self._on_event(demand)
        except Exception as err:  # the decision failed: it is audited; the VTN has no opt to hear it
            _log.exception("event decision failed", event_id=eid, error=repr(err))
            await self._audit("event.decision_failed", {"error": repr(err)}, "gateway", eid)
            return "failed"
        self.handled += 1
        opt = answer if isinstance(answer, Opt) else getattr(answer, "opt", None)
        outcome = getattr(answer, "outcome", None)
        await self._audit("event.answered", {"modification_number": version, "opt": getattr(opt, "value", opt),
                          "outcome": getattr(outcome, "value", outcome)}, "gateway", eid)  # fmt: skip
        if demand.cancelled:
            self._reporter.forget(eid)
        else:
            await self._track_reports(fixed)
        return "handled"

    def seen_ids(self) -> set[str]:
        """Return the ids of events handled in this run."""
        return set(self._seen)

    async def deleted(self, event_id: str, source: str) -> None:
        """Stop an event the VTN deleted (User Guide 7.9: deletion is a cancellation)."""
        self._reporter.forget(event_id)
        self._seen.pop(event_id, None)
        await self._audit("event.deleted", {"source": source}, "utility", event_id)
        if self._on_cancel is not None:
            try:
                await self._on_cancel(event_id, f"deleted on the VTN ({source})")
            except Exception as err:
                _log.exception("cancel callback failed", event_id=event_id, error=repr(err))

    async def listing_complete(self, listed: frozenset[str]) -> None:
        """Tell the gateway which events a full poll showed (it cancels the ones that vanished)."""
        for gone in set(self._reporter.jobs()) - listed:
            self._reporter.forget(gone)
        if self._on_distribution is not None:
            try:
                await self._on_distribution(self.vtn_id, listed)
            except Exception as err:
                _log.exception("implied cancellation check failed", error=repr(err))

    async def _track_reports(self, event: dict[str, Any]) -> None:
        """Start the reports the event (or its programme) asks for."""
        if event.get("reportDescriptors"):
            try:
                slots = resolve(event)
            except EventRefused:
                slots = []
            await self._reporter.track(event, slots)

    async def _version(self, event_id: str, mdt: str) -> int:
        """Return the integer version of (event, modificationDateTime), persisted for restarts."""
        known = self._versions.get(event_id)
        if known is None and self._state is not None:
            try:
                raw = await self._state.get_state(_VERSION_KEY + event_id)
                if raw:
                    stored = json.loads(raw)
                    known = (str(stored[0]), int(stored[1]))
            except Exception as err:
                _log.error("ven state not readable", key=_VERSION_KEY + event_id, error=repr(err))
        if known is None:
            number = 0
        elif mdt == known[0]:
            return known[1]
        elif _later(mdt, known[0]):
            number = known[1] + 1
        else:
            return known[1] - 1  # older than what the book has: stale, keep the newest
        self._versions[event_id] = (mdt, number)
        if self._state is not None:
            try:
                await self._state.set_state(_VERSION_KEY + event_id, json.dumps([mdt, number]))
            except Exception as err:
                _log.error("ven state not written", key=_VERSION_KEY + event_id, error=repr(err))
        return number


def _later(a: str, b: str) -> bool:
    """Return whether date-time ``a`` is after ``b``."""
    from protocols.openadr3.timing import parse_datetime

    ta, tb = parse_datetime(a), parse_datetime(b)
    if ta is None or tb is None:
        return a > b
    return ta > tb


def _descriptors(program: dict[str, Any], event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return payload type -> eventPayloadDescriptor, the event's over its programme's."""
    out: dict[str, dict[str, Any]] = {}
    for source in (program.get("payloadDescriptors") or [], event.get("payloadDescriptors") or []):
        for d in source:
            if isinstance(d, dict) and d.get("objectType") == "EVENT_PAYLOAD_DESCRIPTOR":
                out[d["payloadType"]] = d
    return out


def _summary(ev: DemandEvent) -> dict[str, Any]:
    """Return the audit record of a received event (as the 2.0b path records it)."""
    return {
        "modification_number": ev.modification_number,
        "status": ev.status,
        "start": ev.start.isoformat(),
        "duration_s": ev.duration_s,
        "start_after_s": ev.start_after_s,
        "priority": ev.priority,
        "market_context": ev.market_context,
        "targets": [list(t) for t in ev.targets],
        "signals": [
            {"name": s.name.value, "type": s.signal_type, "unit": s.unit,
             "intervals": [[iv.start.isoformat(), iv.duration_s, iv.value] for iv in s.intervals[:64]]}
            for s in ev.signals
        ],
    }  # fmt: skip
