"""The event dossier: everything the log knows about one event, response times and performance.

Every version received (when, from which VTN), what was answered and when, every command with
its read-back, faults, overrides, cancellation and release, the measurements against the
baseline (method and inputs included) and the integrity of the event's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit import baseline as bl
from gateway.audit import shadow_report
from gateway.audit.chain import AuditRow, format_ts, parse_ts, row_hash_of
from gateway.audit.measurements import POINTS, rows_between, series_of
from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_checkpoints, audit_log, demand_events, table_exists
from gateway.errors import AuditError
from gateway.eventstore import event_from_json
from gateway.model import DemandEvent

REACHED_TOLERANCE = 0.01  # facility within 1 % above the limit counts as "reduction reached"
OVERRIDE_ACTORS = ("operator", "bms")
NOT_OVERRIDES = ("config.", "performance.", "audit.")  # operator records that override nothing
QUIET_KINDS = ("control.tick", "measurements.batch")  # summarised, not listed, in the timeline


@dataclass(frozen=True)
class Options:
    """How performance is computed: baseline method, site time zone, levels and windows."""

    method: bl.Method = bl.Method("like-days", 10, 10)
    tz: ZoneInfo = ZoneInfo("UTC")
    simple_levels: dict[str, float] | None = None
    lookback_days: int = 45
    window_s: float = bl.DEFAULT_WINDOW_S


async def dossier(db: str | Path | AsyncEngine, event_id: str, opts: Options | None = None) -> dict[str, Any]:
    """Return the dossier of one event as plain JSON-able data; raise AuditError if it is unknown."""
    engine, own = open_existing(db)
    try:
        async with engine.connect() as conn:
            return await build(conn, event_id, opts or Options())
    except sa.exc.SQLAlchemyError as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        if own:
            await engine.dispose()


async def build(conn: AsyncConnection, event_id: str, opts: Options) -> dict[str, Any]:
    """Assemble the dossier over an open connection."""
    rows = await event_audit_rows(conn, event_id)
    versions = await event_versions(conn, event_id)
    if not rows and not versions:
        raise AuditError(f"event {event_id} is not in this audit log")
    ev, cancelled_at = definition(versions)
    out: dict[str, Any] = {
        "event_id": event_id,
        "versions": [_version(v, rows) for v in versions],
        "answers": [_brief(r) for r in rows if r.kind.startswith("opt.")],
        "commands": commands(rows),
        "faults": [_brief(r) for r in rows if r.kind.startswith("fault.") or r.kind == "device.recovered"],
        "overrides": [override_entry(r) for r in rows if is_override(r)],
        "cancellation": _cancellation(versions, rows),
        "release": [_brief(r) for r in rows if r.kind.startswith("release.")],
        "timeline": [_brief(r) for r in rows if r.kind not in QUIET_KINDS and not r.kind.startswith("command.")],
        "ticks": sum(1 for r in rows if r.kind == "control.tick"),
        "integrity": await integrity(conn, rows),
    }
    if ev is None:
        out.update(event=None, response=None, performance=None, series={})
        return out
    out["event"] = {
        "modification_number": ev.modification_number,
        "status": ev.status,
        "start": format_ts(ev.start),
        "end": format_ts(ev.end),
        "duration_s": ev.duration_s,
        "ramp_up_s": ev.ramp_up_s,
        "recovery_s": ev.recovery_s,
        "vtn_id": ev.vtn_id,
        "market_context": ev.market_context,
        "cancelled_at": format_ts(cancelled_at) if cancelled_at else None,
    }
    lo = ev.start - timedelta(seconds=ev.ramp_up_s + opts.window_s)
    hi = ev.end + timedelta(seconds=ev.recovery_s + opts.window_s)
    meas = await rows_between(conn, lo, hi) if await table_exists(conn, "measurements") else []
    source = "measurement store"
    if not meas:  # no measurement store for this event: the control loop's tick rows carry the essentials
        meas = tick_measurements(rows)
        source = "control.tick rows (no measurement store for this event)"
    facility = series_of(meas, "facility_w").points
    periods = bl.periods_of(ev, opts.simple_levels, cancelled_at)
    base = await baseline_for(conn, ev, periods, facility, opts)
    if all(w is None for w in base.per_period_w):
        base = operational_baseline(rows, periods, base) or base
    out["performance"] = bl.performance(periods, base, facility)
    out["response"] = response_times(ev, rows, meas, cancelled_at)
    out["measurements_source"] = source
    out["series"] = {name: [[r[1], r[3 + POINTS.index(name)]] for r in meas] for name in POINTS}
    out["baseline_steps"] = [
        [format_ts(p.start), format_ts(p.end), base.per_period_w[i] if i < len(base.per_period_w) else None]
        for i, p in enumerate(periods)
    ]
    out["planned"] = shadow_report.planned(rows, out["series"])  # shadow mode: what it would have done
    out["mode"] = "shadow" if out["planned"] else "live"
    return out


async def event_audit_rows(conn: AsyncConnection, event_id: str) -> list[AuditRow]:
    """Return every audit row carrying ``event_id``, in seq order."""
    res = await conn.execute(sa.select(audit_log).where(audit_log.c.event_id == event_id).order_by(audit_log.c.seq))
    return [AuditRow(**m) for m in res.mappings()]


async def event_versions(conn: AsyncConnection, event_id: str) -> list[dict[str, Any]]:
    """Return the stored versions of an event (payload parsed), oldest first."""
    res = await conn.execute(
        sa.select(demand_events)
        .where(demand_events.c.event_id == event_id)
        .order_by(demand_events.c.modification_number)
    )
    out = []
    for m in res.mappings():
        try:
            ev = event_from_json(m["payload"])
        except ValueError:
            ev = None
        out.append({**dict(m), "event": ev})
    return out


def definition(versions: Sequence[dict[str, Any]]) -> tuple[DemandEvent | None, datetime | None]:
    """Return the newest non-cancelled version (times and signals) and when a cancellation arrived."""
    ev = None
    cancelled_at = None
    for v in versions:
        e = v["event"]
        if e is None:
            continue
        if e.cancelled:
            cancelled_at = cancelled_at or parse_ts(v["received_at"])
            ev = ev or e
        else:
            ev = e
    return ev, cancelled_at


def commands(rows: Sequence[AuditRow]) -> list[dict[str, Any]]:
    """Return every command with what was asked, what the device reported and whether they matched."""
    out = []
    for r in rows:
        if not r.kind.startswith("command."):
            continue
        d = r.data_obj()
        asked = d.get("requested_w")
        back = d.get("readback_w", d.get("enforced_w"))
        out.append(
            {
                "seq": r.seq,
                "ts": r.ts,
                "kind": r.kind,
                "device_id": r.device_id,
                "requested": asked,
                "readback": back,
                "matched": _matched(asked, back),
                "lease_s": d.get("lease_s"),
            }
        )
    return out


def _matched(asked: Any, back: Any) -> bool | None:
    """Return whether a read-back matches the request within 1 W (per GPU for mappings)."""
    if isinstance(asked, int | float) and isinstance(back, int | float):
        return abs(float(asked) - float(back)) <= 1.0
    if isinstance(asked, dict) and isinstance(back, dict):
        return all(
            isinstance(back.get(k), int | float) and abs(float(v) - float(back[k])) <= 1.0 for k, v in asked.items()
        )
    return None


def is_override(r: AuditRow) -> bool:
    """Return whether a row records someone other than the utility or policy overriding the gateway."""
    if r.kind.startswith(NOT_OVERRIDES):
        return False
    return r.actor in OVERRIDE_ACTORS or "override" in r.kind or r.kind.startswith("operator.")


def override_entry(r: AuditRow) -> dict[str, Any]:
    """Return who overrode what, when and why."""
    d = r.data_obj()
    return {
        "seq": r.seq,
        "ts": r.ts,
        "kind": r.kind,
        "who": d.get("user") or d.get("who") or d.get("peer") or r.actor,
        "actor": r.actor,
        "why": d.get("reason") or d.get("why"),
        "event_id": r.event_id,
        "opt": d.get("opt"),
    }


def _brief(r: AuditRow) -> dict[str, Any]:
    """Return a row as a short dict for listings."""
    return {"seq": r.seq, "ts": r.ts, "kind": r.kind, "actor": r.actor, "device_id": r.device_id, "data": r.data_obj()}


def _version(v: dict[str, Any], rows: Sequence[AuditRow]) -> dict[str, Any]:
    """Return one stored version with when it was answered."""
    mod = v["modification_number"]
    ev: DemandEvent | None = v["event"]
    sent = next((r for r in rows if r.kind == "opt.sent" and r.data_obj().get("modification_number") == mod), None)
    return {
        "modification_number": mod,
        "received_at": v["received_at"],
        "from": ev.vtn_id if ev else None,
        "status": ev.status if ev else None,
        "start": format_ts(ev.start) if ev else None,
        "duration_s": ev.duration_s if ev else None,
        "signals": [
            {"name": s.name.value, "type": s.signal_type, "values": [iv.value for iv in s.intervals]}
            for s in (ev.signals if ev else ())
        ],
        "opt": v["opt"],
        "opt_reason": v["opt_reason"],
        "answered_at": sent.ts if sent else None,
        "answer": sent.data_obj().get("opt") if sent else None,
    }


def _cancellation(versions: Sequence[dict[str, Any]], rows: Sequence[AuditRow]) -> dict[str, Any] | None:
    """Return how and when the event was cancelled or stopped, or None."""
    for v in versions:
        if v["event"] is not None and v["event"].cancelled:
            return {"by": "utility", "received_at": v["received_at"], "modification_number": v["modification_number"]}
    stop = next((r for r in rows if r.kind == "event.stopped"), None)
    if stop is not None:
        d = stop.data_obj()
        return {"by": stop.actor, "received_at": stop.ts, "reason": d.get("reason"), "stop_at": d.get("stop_at")}
    return None


def response_times(
    ev: DemandEvent, rows: Sequence[AuditRow], meas: Sequence[Sequence[Any]], cancelled_at: datetime | None
) -> dict[str, Any]:
    """Return notification to first command, start to reduction reached, end to release (seconds)."""
    notified = next((r.ts for r in rows if r.kind in ("event.received", "opt.decided")), None)
    first_cmd = next((r.ts for r in rows if r.kind.startswith("command.")), None)
    started = next((r.ts for r in rows if r.kind == "event.start"), None)
    start = parse_ts(started) if started else ev.start
    reached = None
    for r in meas:
        f, lim = r[3], r[4]
        if r[2] == ev.event_id and f is not None and lim is not None and parse_ts(r[1]) >= start:
            if f <= lim * (1 + REACHED_TOLERANCE):
                reached = r[1]
                break
    if reached is None:  # no measurement store: fall back to the control loop's own tick rows
        for row in rows:
            if row.kind == "control.tick":
                d = row.data_obj()
                f, lim = d.get("facility_w"), d.get("limit_w")
                if isinstance(f, int | float) and isinstance(lim, int | float) and f <= lim * (1 + REACHED_TOLERANCE):
                    reached = row.ts
                    break
    end = min(ev.end, cancelled_at) if cancelled_at else ev.end
    # A restart mid-event writes an earlier end and release (the stopping process's): the event's
    # own are the last event.end and the first release at or after its end.
    ended = next((r.ts for r in reversed(rows) if r.kind == "event.end"), None)
    releases = [r.ts for r in rows if r.kind.startswith("release.")]
    released = next((ts for ts in releases if parse_ts(ts) >= end), releases[-1] if releases else None)
    return {
        "notified_at": notified,
        "first_command_at": first_cmd,
        "notification_to_first_command_s": _secs(notified, first_cmd),
        "start": format_ts(start),
        "reduction_reached_at": reached,
        "start_to_reduction_s": _secs(format_ts(start), reached),
        "end": format_ts(end),
        "event_end_row_at": ended,
        "released_at": released,
        "end_to_release_s": _secs(format_ts(end), released),
    }


def tick_measurements(rows: Sequence[AuditRow]) -> list[tuple[Any, ...]]:
    """Return measurement-shaped rows (see ``measurements``) built from the event's control.tick rows."""
    out: list[tuple[Any, ...]] = []
    for r in rows:
        if r.kind != "control.tick":
            continue
        d = r.data_obj()
        vals = [d.get(k) if isinstance(d.get(k), int | float) else None for k in ("facility_w", "limit_w", "battery_w")]
        out.append((0, r.ts, r.event_id, *vals, None, None, "{}"))
    return out


def operational_baseline(
    rows: Sequence[AuditRow], periods: Sequence[bl.Period], tried: bl.Baseline
) -> bl.Baseline | None:
    """Return the control loop's own baseline (event.start baseline_w) when no settlement method had data."""
    start = next((r for r in rows if r.kind == "event.start"), None)
    w = start.data_obj().get("baseline_w") if start is not None else None
    if not isinstance(w, int | float):
        return None
    inputs = {
        "method": "operational",
        "baseline_w": float(w),
        "source": f"event.start row seq {start.seq if start else '?'} (the control loop's baseline at event start)",
        "fallback_from": tried.method,
        "fallback_reason": "no measurements for the settlement method",
        "tried": tried.inputs,
    }
    return bl.Baseline("operational", [float(w)] * len(periods), inputs)


def _secs(a: str | None, b: str | None) -> float | None:
    """Return b - a in seconds, or None when either is missing."""
    if a is None or b is None:
        return None
    return round((parse_ts(b) - parse_ts(a)).total_seconds(), 3)


async def baseline_for(
    conn: AsyncConnection,
    ev: DemandEvent,
    periods: Sequence[bl.Period],
    facility: bl.Samples,
    opts: Options,
) -> bl.Baseline:
    """Return the baseline by the chosen method; X-of-Y falls back to meter-before-after, saying why."""
    mba = bl.meter_before_after(facility, ev, opts.window_s, periods)
    if opts.method.name == "meter-before-after":
        return mba
    windows, event_days = await like_day_windows(conn, ev, periods, opts)
    res = bl.like_days(windows, ev.start, periods, opts.method, opts.tz, event_days, opts.lookback_days)
    if res is not None:
        return res
    inputs = {**mba.inputs, "fallback_from": str(opts.method), "fallback_reason": "no like day with measurements"}
    return bl.Baseline(mba.method, mba.per_period_w, inputs)


async def like_day_windows(
    conn: AsyncConnection, ev: DemandEvent, periods: Sequence[bl.Period], opts: Options
) -> tuple[dict[date, list[tuple[datetime, float]]], set[date]]:
    """Load the event's window on each candidate like day, shifted onto the event day, until Y qualify."""
    event_days = await days_with_events(conn, opts.tz, exclude=ev.event_id)
    local_start = ev.start.astimezone(opts.tz)
    lo, hi = periods[0].start, periods[-1].end
    out: dict[date, list[tuple[datetime, float]]] = {}
    found = 0
    for d in bl.candidate_days(local_start.date(), opts.lookback_days):
        if found >= opts.method.y:
            break
        if d in event_days:
            continue
        same_time = datetime.combine(d, local_start.timetz()).replace(tzinfo=opts.tz)
        shift = ev.start - same_time  # whole days, DST-aware in the site's zone
        rows = await rows_between(conn, lo - shift, hi - shift)
        samples = [(t + shift, v) for t, v in series_of(rows, "facility_w").points]
        out[d] = samples
        if samples and all(bl.mean_in(samples, p.start, p.end)[1] for p in periods):
            found += 1
    return out, event_days


async def days_with_events(conn: AsyncConnection, tz: ZoneInfo, exclude: str | None = None) -> set[date]:
    """Return the local dates touched by any stored, not cancelled event (except ``exclude``)."""
    res = await conn.execute(sa.select(demand_events.c.event_id, demand_events.c.payload))
    latest: dict[str, DemandEvent] = {}
    for eid, payload in res:
        try:
            e = event_from_json(payload)
        except ValueError:
            continue
        if eid not in latest or e.modification_number > latest[eid].modification_number:
            latest[eid] = e
    days: set[date] = set()
    for eid, e in latest.items():
        if eid == exclude or e.cancelled:
            continue
        d = e.start.astimezone(tz).date()
        while d <= e.end.astimezone(tz).date():
            days.add(d)
            d += timedelta(days=1)
    return days


async def integrity(conn: AsyncConnection, rows: Sequence[AuditRow]) -> dict[str, Any]:
    """Return whether the event's rows hash correctly and which signed checkpoint seals them."""
    bad = [r.seq for r in rows if _bad(r)]
    last = rows[-1].seq if rows else None
    sealed_by = None
    if last is not None and await table_exists(conn, "audit_checkpoints"):
        res = await conn.execute(
            sa.select(audit_checkpoints.c.seq, audit_checkpoints.c.signed_at, audit_checkpoints.c.key_id)
            .where(audit_checkpoints.c.seq >= last)
            .order_by(audit_checkpoints.c.seq)
            .limit(1)
        )
        cp = res.first()
        if cp is not None:
            sealed_by = {"seq": int(cp[0]), "signed_at": cp[1], "key_id": cp[2]}
    return {
        "rows": len(rows),
        "first_seq": rows[0].seq if rows else None,
        "last_seq": last,
        "rows_with_bad_hash": bad,
        "sealed_by_checkpoint": sealed_by,
        "note": "row hashes only; run 'drgw audit verify' for the chain, guards and signatures",
    }


def _bad(r: AuditRow) -> bool:
    """Return whether a row's own hash fails."""
    try:
        return row_hash_of(r) != r.row_hash
    except ValueError:
        return True


async def response_of(conn: AsyncConnection, event_id: str) -> dict[str, Any]:
    """Return the response times of one event (without the baseline work of a full dossier)."""
    rows = await event_audit_rows(conn, event_id)
    ev, cancelled_at = definition(await event_versions(conn, event_id))
    if ev is None:
        return {"event_id": event_id, "error": "no stored version of this event"}
    meas = []
    if await table_exists(conn, "measurements"):
        meas = await rows_between(conn, ev.start, ev.end + timedelta(seconds=ev.recovery_s))
    return {"event_id": event_id, **response_times(ev, rows, meas, cancelled_at)}
