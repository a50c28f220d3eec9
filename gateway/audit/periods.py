"""Auditor queries over a period: opt-outs and overrides, untraceable commands, link-loss and
fallback periods per device, config changes and security events.

Kinds these read (the convention every writer follows):
- opt-outs: ``opt.decided`` / ``opt.sent`` with ``opt: optOut``; overrides: rows by ``operator`` or
  ``bms``, ``opt.override``, ``override.*``, ``operator.*`` (who: ``data.user|who|peer`` else the actor;
  why: ``data.reason``);
- link loss: ``fault.device`` / ``ven.link_lost`` / ``link.lost`` / ``fallback.start`` open a period for
  the row's device (the VTN for ``ven.*``); ``device.recovered`` / ``ven.link_restored`` /
  ``link.restored`` / ``fallback.end`` or the device's next successful ``command.*`` close it;
- config: ``config.*`` and ``gateway.start``; security: ``xml.rejected``, ``event.rejected``,
  ``event.stale``, ``ven.registration_refused``, ``ven.ven_id_refused``, ``ven.cancel_refused``, ``auth.*``,
  ``login.*``, ``security.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit.chain import AuditRow, format_ts
from gateway.audit.dossier import is_override, override_entry
from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_log, demand_events
from gateway.errors import AuditError

LINK_DOWN = ("fault.device", "ven.link_lost", "link.lost", "fallback.start")
LINK_UP = ("device.recovered", "ven.link_restored", "link.restored", "fallback.end")
SECURITY_KINDS = ("xml.rejected", "event.rejected", "event.stale", "ven.registration_refused", "ven.ven_id_refused",
                  "ven.cancel_refused")  # fmt: skip
SECURITY_PREFIXES = ("auth.", "login.", "security.")


async def rows_in(
    conn: AsyncConnection,
    start: datetime | None,
    end: datetime | None,
    kinds: Sequence[str] = (),
    prefixes: Sequence[str] = (),
    actors: Sequence[str] = (),
) -> list[AuditRow]:
    """Return rows with start <= ts < end matching any of the kinds, kind prefixes or actors."""
    q = sa.select(audit_log)
    if start is not None:
        q = q.where(audit_log.c.ts >= format_ts(start))
    if end is not None:
        q = q.where(audit_log.c.ts < format_ts(end))
    conds: list[Any] = []
    if kinds:
        conds.append(audit_log.c.kind.in_(list(kinds)))
    conds += [audit_log.c.kind.startswith(p, autoescape=True) for p in prefixes]
    if actors:
        conds.append(audit_log.c.actor.in_(list(actors)))
    if conds:
        q = q.where(sa.or_(*conds))
    res = await conn.execute(q.order_by(audit_log.c.seq))
    return [AuditRow(**m) for m in res.mappings()]


async def run_query(db: str | Path | AsyncEngine, name: str, start: datetime | None, end: datetime | None) -> Any:
    """Run one named period query (``QUERIES``) and return its JSON-able result."""
    engine, own = open_existing(db)
    try:
        async with engine.connect() as conn:
            return await QUERIES[name](conn, start, end)
    except sa.exc.SQLAlchemyError as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        if own:
            await engine.dispose()


async def opt_outs(conn: AsyncConnection, start: datetime | None, end: datetime | None) -> dict[str, Any]:
    """Return opt-outs (who decided, why) and overrides (who, why) in the period."""
    rows = await rows_in(
        conn, start, end, kinds=("opt.decided", "opt.sent", "opt.override"), prefixes=("override.", "operator."),
        actors=("operator", "bms"),
    )  # fmt: skip
    outs = []
    for r in rows:
        d = r.data_obj()
        if r.kind in ("opt.decided", "opt.sent") and d.get("opt") == "optOut":
            outs.append(
                {"seq": r.seq, "ts": r.ts, "event_id": r.event_id, "kind": r.kind, "who": r.actor,
                 "why": d.get("reason"), "modification_number": d.get("modification_number")}
            )  # fmt: skip
    overrides = [override_entry(r) for r in rows if is_override(r)]
    return {"opt_outs": outs, "overrides": overrides}


async def untraced_commands(
    conn: AsyncConnection, start: datetime | None, end: datetime | None
) -> list[dict[str, Any]]:
    """Return commands that carry no event id, or one the event store never received."""
    rows = await rows_in(conn, start, end, prefixes=("command.",))
    known = {r[0] for r in await conn.execute(sa.select(demand_events.c.event_id).distinct())}
    out = []
    for r in rows:
        if r.event_id is None or r.event_id not in known:
            why = "no event id" if r.event_id is None else f"event {r.event_id} was never received"
            out.append({"seq": r.seq, "ts": r.ts, "kind": r.kind, "device_id": r.device_id, "actor": r.actor,
                        "event_id": r.event_id, "why": why, "data": r.data_obj()})  # fmt: skip
    return out


async def link_periods(conn: AsyncConnection, start: datetime | None, end: datetime | None) -> list[dict[str, Any]]:
    """Return link-loss and fallback periods per device: from, to (None while still down), length, cause."""
    rows = await rows_in(conn, start, end, kinds=(*LINK_DOWN, *LINK_UP), prefixes=("command.",))
    open_: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for r in rows:
        dev = _device(r)
        if r.kind in LINK_DOWN:
            if dev not in open_:
                d = r.data_obj()
                cause = d.get("error") or d.get("reason") or r.kind
                kind = "fallback" if r.kind.startswith("fallback") else "link_loss"
                open_[dev] = {
                    "device_id": dev,
                    "kind": kind,
                    "from": r.ts,
                    "from_seq": r.seq,
                    "cause": cause,
                    "faults": 0,
                }
            open_[dev]["faults"] += 1
        elif dev in open_:
            p = open_.pop(dev)
            p.update(to=r.ts, to_seq=r.seq, closed_by=r.kind, duration_s=_secs(p["from"], r.ts))
            out.append(p)
    for p in open_.values():
        p.update(to=None, to_seq=None, closed_by=None, duration_s=None)
        out.append(p)
    return sorted(out, key=lambda p: (p["device_id"], p["from"]))


def _device(r: AuditRow) -> str:
    """Return the device a link row is about (the VTN for VEN rows)."""
    if r.kind.startswith("ven."):
        return "vtn"
    return r.device_id or "(unknown)"


def _secs(a: str, b: str) -> float:
    """Return b - a in seconds."""
    from gateway.audit.chain import parse_ts

    return round((parse_ts(b) - parse_ts(a)).total_seconds(), 3)


async def config_changes(conn: AsyncConnection, start: datetime | None, end: datetime | None) -> list[dict[str, Any]]:
    """Return config loads and changes (and gateway starts, which load config) in the period."""
    rows = await rows_in(conn, start, end, kinds=("gateway.start",), prefixes=("config.",))
    return [{"seq": r.seq, "ts": r.ts, "kind": r.kind, "actor": r.actor, "data": r.data_obj()} for r in rows]


async def security_events(conn: AsyncConnection, start: datetime | None, end: datetime | None) -> list[dict[str, Any]]:
    """Return rejected messages, refused registrations, failed logins and other security rows."""
    rows = await rows_in(conn, start, end, kinds=SECURITY_KINDS, prefixes=SECURITY_PREFIXES)
    out = []
    for r in rows:
        d = r.data_obj()
        out.append({"seq": r.seq, "ts": r.ts, "kind": r.kind, "actor": r.actor, "event_id": r.event_id,
                    "reason": d.get("reason"), "peer": d.get("peer") or d.get("user"), "data": d})  # fmt: skip
    return out


async def events_in(conn: AsyncConnection, start: datetime | None, end: datetime | None) -> list[str]:
    """Return ids of events with any audit row in the period, in order of first appearance."""
    q = sa.select(audit_log.c.event_id, sa.func.min(audit_log.c.seq)).where(audit_log.c.event_id.is_not(None))
    if start is not None:
        q = q.where(audit_log.c.ts >= format_ts(start))
    if end is not None:
        q = q.where(audit_log.c.ts < format_ts(end))
    res = await conn.execute(q.group_by(audit_log.c.event_id).order_by(sa.func.min(audit_log.c.seq)))
    return [r[0] for r in res]


QUERIES = {
    "opt-outs": opt_outs,
    "untraced": untraced_commands,
    "links": link_periods,
    "config-changes": config_changes,
    "security": security_events,
}
