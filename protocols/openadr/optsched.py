"""Opt schedules (2.0b EiOpt, certification cases P1_2010-2050): the VEN tells the VTN ahead of time
when it will (optIn) or will not (optOut) take part, as availability windows.

``oadrCreateOpt`` carries an optID, the opt, a reason, the windows (xcal vavailability: a start and a
duration each; duration 0 is open-ended, P1_2015) and the target (this venID, or one resource). The
same optID sent again replaces that schedule (P1_2040). ``oadrCancelOpt`` withdraws one.

Decided, stored and audited, then sent, in that order (as every opt decision, gateway/optout.py):
the schedule is audited (``opt.schedule`` with who asked) and kept in the VEN state
(``openadr.opt_schedules``, JSON) before the VTN hears of it; a schedule the log cannot take is
refused and nothing is sent. The VTN's answer is audited too (``opt.schedule_sent``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

from gateway.errors import AuditError, InputRejected
from gateway.interfaces import AuditSink
from gateway.logs import get_logger
from gateway.model import Opt
from protocols.openadr.client import OadrClient

_log = get_logger("openadr.optsched")
KEY = "openadr.opt_schedules"
REASONS = frozenset({"economic", "emergency", "mustRun", "notParticipating", "outageRunStatus", "overrideStatus",
                     "participating", "x-schedule"})  # fmt: skip
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_WINDOWS = 32
OK = 200

GetState = Callable[[str], Awaitable[str | None]]
SetState = Callable[[str, str], Awaitable[None]]


def duration_text(seconds: float) -> str:
    """Return an xcal duration for whole seconds (PT0S for 0: openleadr's formatter writes a bare "P")."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = "PT" + (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "") + (f"{secs}S" if secs else "")
    return text if text != "PT" else "PT0S"


class OptSchedules:
    """Creates, revises and cancels the VEN's opt schedules with the VTN."""

    def __init__(
        self,
        client: OadrClient,
        audit: AuditSink,
        get_state: GetState,
        set_state: SetState,
        now: Callable[[], datetime],
    ) -> None:
        self._client = client
        self._sink = audit
        self._get = get_state
        self._set = set_state
        self._now = now

    async def schedules(self) -> dict[str, dict[str, Any]]:
        """Return the schedules in force, by optID."""
        raw = await self._get(KEY)
        try:
            value = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            _log.error("opt schedules not readable; starting from none", key=KEY)
            return {}
        return value if isinstance(value, dict) else {}

    async def create(
        self,
        opt: Opt | str,
        windows: Sequence[tuple[datetime, float]],
        who: str,
        *,
        reason: str | None = None,
        opt_id: str | None = None,
        market_context: str | None = None,
        resource_id: str | None = None,
    ) -> dict[str, Any]:
        """Send (or, with an existing ``opt_id``, revise) an opt schedule; return what was done.

        Raise InputRejected naming what is wrong; nothing is stored or sent then."""
        opt = _opt(opt)
        reason = reason or ("participating" if opt is Opt.IN else "notParticipating")
        if reason not in REASONS:
            raise InputRejected(f"reason {reason!r} is not one of {', '.join(sorted(REASONS))}")
        opt_id = opt_id or f"opt-{uuid.uuid4().hex[:12]}"
        for what, value in (("opt_id", opt_id), ("resource_id", resource_id)):
            if value is not None and not _ID.match(value):
                raise InputRejected(f"{what}: 1-128 characters of letters, digits and ._:- only")
        if not windows or len(windows) > MAX_WINDOWS:
            raise InputRejected(f"windows: 1 to {MAX_WINDOWS} (start, duration) pairs are required")
        spans = []
        for n, (start, duration_s) in enumerate(windows):
            if start.tzinfo is None:
                raise InputRejected(f"window {n}: start {start.isoformat()} has no time zone")
            if not 0 <= duration_s <= 366 * 86_400:
                raise InputRejected(f"window {n}: duration {duration_s} s is not 0 (open-ended) to one year")
            spans.append({"start": start.astimezone(UTC).isoformat(), "duration_s": float(duration_s)})
        schedule = {"opt": opt.value, "reason": reason, "windows": spans, "market_context": market_context,
                    "resource_id": resource_id}  # fmt: skip
        stored = await self.schedules()
        revised = opt_id in stored
        if not await self._decided("opt.schedule", {"opt_id": opt_id, "revised": revised, "peer": who, **schedule}):
            return {"ok": False, "error": "the audit log cannot take the decision: nothing stored, nothing sent"}
        stored[opt_id] = schedule
        await self._set(KEY, json.dumps(stored, sort_keys=True))
        ven_id = escape(self._client.ven_id or "")
        target = {"ven_id": ven_id} if resource_id is None else {"ven_id": ven_id, "resource_id": escape(resource_id)}
        message = self._client._create_message(
            "oadrCreateOpt",
            opt_id=escape(opt_id),
            opt_type=opt.value,
            opt_reason=reason,
            market_context=None if market_context is None else escape(market_context),
            ven_id=ven_id,
            vavailability={"components": [
                {"dtstart": start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "duration": duration_text(d)}
                for start, d in windows]},
            created_date_time=self._now(),
            request_id=uuid.uuid4().hex[:12],
            targets=[target],
        )  # fmt: skip
        rtype, payload = await self._client._perform_request("EiOpt", message)
        return await self._answered("create", opt_id, rtype, payload, "oadrCreatedOpt", revised=revised)

    async def create_from(self, args: dict[str, Any], who: str) -> dict[str, Any]:
        """Create a schedule from an operator command's JSON (opt, windows, reason, opt_id, resource_id,
        market_context); raise InputRejected naming what is wrong."""
        known = {"opt", "windows", "reason", "opt_id", "resource_id", "market_context"}
        if unknown := sorted(set(args) - known):
            raise InputRejected(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        text = {k: args.get(k) for k in ("reason", "opt_id", "resource_id", "market_context")}
        for key, value in text.items():
            if value is not None and (not isinstance(value, str) or len(value) > 256):
                raise InputRejected(f"{key}: a string of at most 256 characters")
        return await self.create(
            str(args.get("opt")), parse_windows(args.get("windows")), who, reason=text["reason"],
            opt_id=text["opt_id"], resource_id=text["resource_id"], market_context=text["market_context"],
        )  # fmt: skip

    async def cancel(self, opt_id: str, who: str) -> dict[str, Any]:
        """Withdraw an opt schedule (oadrCancelOpt); return what was done."""
        if not _ID.match(opt_id):
            raise InputRejected("opt_id: 1-128 characters of letters, digits and ._:- only")
        stored = await self.schedules()
        if opt_id not in stored:
            await self._audit("opt.schedule_cancel_rejected", {"opt_id": opt_id, "peer": who,
                              "reason": "unknown opt schedule"}, "operator")  # fmt: skip
            return {"ok": False, "error": f"opt schedule {opt_id} is not known to this gateway"}
        if not await self._decided("opt.schedule_cancel", {"opt_id": opt_id, "peer": who}):
            return {"ok": False, "error": "the audit log cannot take the decision: nothing stored, nothing sent"}
        del stored[opt_id]
        await self._set(KEY, json.dumps(stored, sort_keys=True))
        ven_id = escape(self._client.ven_id or "")
        message = self._client._create_message(
            "oadrCancelOpt", request_id=uuid.uuid4().hex[:12], opt_id=escape(opt_id), ven_id=ven_id
        )
        rtype, payload = await self._client._perform_request("EiOpt", message)
        return await self._answered("cancel", opt_id, rtype, payload, "oadrCanceledOpt")

    async def _decided(self, kind: str, data: dict[str, Any]) -> bool:
        """Audit an operator's decision; return False (and log) when the log cannot take it."""
        try:
            await self._sink.append(kind, data, actor="operator")
        except AuditError as err:
            _log.error("opt schedule refused: not audited", kind=kind, error=str(err))
            return False
        return True

    async def _audit(self, kind: str, data: dict[str, Any], actor: str) -> None:
        """Audit what the VTN answered; a failing log is reported, not raised (the VTN already heard)."""
        try:
            await self._sink.append(kind, data, actor=actor)
        except Exception as err:
            _log.error("audit append failed", kind=kind, error=repr(err))

    async def _answered(
        self, action: str, opt_id: str, rtype: str | None, payload: dict[str, Any], expected: str, **extra: Any
    ) -> dict[str, Any]:
        """Audit the VTN's answer; return the result."""
        response = payload.get("response")
        code = response.get("response_code") if isinstance(response, dict) else None
        ok = rtype == expected and code in (None, OK)
        data = {"opt_id": opt_id, "action": action, "answer": rtype, "code": code, "acknowledged": ok, **extra}
        await self._audit("opt.schedule_sent" if ok else "opt.schedule_send_failed", data, "gateway")
        return {"ok": ok, "opt_id": opt_id, "acknowledged": ok, "answer": rtype, **extra}


def _opt(value: Opt | str) -> Opt:
    """Return an Opt, or refuse the text naming the choices."""
    try:
        return Opt(value)
    except ValueError:
        raise InputRejected(f"opt {value!r} is not optIn or optOut") from None


def parse_windows(raw: Any) -> list[tuple[datetime, float]]:
    """Read [{"start": ISO-8601 with zone, "duration_s": seconds}, ...]; raise InputRejected naming what is wrong."""
    if not isinstance(raw, list):
        raise InputRejected("windows: a list of {start, duration_s} objects is required")
    out = []
    for n, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InputRejected(f"window {n}: an object with start and duration_s is required")
        try:
            start = datetime.fromisoformat(str(item.get("start")))
        except ValueError:
            raise InputRejected(f"window {n}: start {item.get('start')!r} is not an ISO-8601 date-time") from None
        duration = item.get("duration_s")
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            raise InputRejected(f"window {n}: duration_s {duration!r} is not a number")
        out.append((start, float(duration)))
    return out


__all__ = ["KEY", "OptSchedules", "duration_text", "parse_windows"]
