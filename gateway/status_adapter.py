"""The one place that reads what the control loop publishes each tick, for the live console.

Each tick the control loop publishes a typed ``ControlStatus`` (``gateway.status``: the tick's
``TickRecord``, the site's snapshot, the event under control, typed device faults, the running
accounting), which metrics, the BMS face and /readyz read too. This module turns it into plain
JSON-able data: ``chart_point`` (one point of the console's chart, from the record alone) and
``site_status`` (the whole page's state). The dispatcher's last commands (``caps_w``,
``battery_w``) are read as they stand.

Read on the gateway's loop only; nothing here does I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from gateway.model import Role
from gateway.standby.role import role_status
from gateway.status import TickRecord

if TYPE_CHECKING:
    from gateway.app import Gateway

MAX_PAST_EVENTS = 20  # past events shown, newest first


def _r(x: float | None, nd: int = 1) -> float | None:
    """Round a value for the page (None stays None)."""
    return None if x is None else round(float(x), nd)


def _iso(t: datetime | None) -> str | None:
    """Return a datetime as RFC 3339 text (None stays None)."""
    return None if t is None else t.isoformat()


def chart_point(rec: TickRecord) -> dict[str, Any]:
    """Return one chart point from a tick: time (ms), target, measured, battery and GPU draw (W)."""
    return {
        "t_ms": int(rec.t.timestamp() * 1000),
        "target_w": _r(rec.limit_w),
        "facility_w": _r(rec.facility_w),
        "battery_w": _r(rec.battery_w),
        "gpu_w": _r(rec.gpu_w),
        "gpu_shed_w": _r(max(0.0, rec.gpu_natural_w - rec.gpu_w)) if rec.gpu_natural_w is not None else None,
    }


def site_status(gw: Gateway, reasons: dict[str, dict[str, Any]], links: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return everything the console shows, as plain data (``reasons``/``links`` kept by the feed)."""
    return {
        "site": gw.cfg.site.name,
        "mode": gw.cfg.control.mode,
        "role": role_status(gw.lease),  # hot standby: this node's role, node and fencing token
        "now": _iso(gw.clock.now()),
        "power": _power(gw),
        "jobs": _jobs(gw),
        "events": _events(gw, reasons),
        "links": links,
        "audit": _audit(gw),
    }


def _power(gw: Gateway) -> dict[str, Any]:
    """Return facility power against limit and baseline, battery, GPUs and work per watt."""
    status = gw.status.latest
    snap = status.snapshot if status is not None else None
    gpus = snap.gpus if snap is not None else ()
    known = [g for g in gpus if g.throughput is not None]
    work = sum(g.throughput or 0.0 for g in known)
    known_w = sum(g.power_w for g in known)
    natural_tput = status.site.natural_tput if status is not None and status.site is not None else {}
    natural = sum(natural_tput.get(g.gpu_id, g.throughput or 0.0) for g in known)
    b = snap.battery if snap is not None else None
    active = status.event_id if status is not None else None
    return {
        "t": _iso(snap.t if snap is not None else None),
        "event_id": active,
        "phase": status.phase if status is not None and active else "",
        "facility_w": _r(snap.facility_w if snap is not None else None),
        "limit_w": _r(status.limit_w if status is not None else None),
        "baseline_w": _r(status.baseline_w if status is not None else None),
        "battery": None
        if b is None
        else {
            "device_id": b.device_id,
            "power_w": _r(b.power_w),
            "soc_pct": _r(b.soc_pct),
            "setpoint_w": _r(b.setpoint_w),
        },
        "battery_planned_w": _r(gw.dispatcher.battery_w),
        "gpus": len(gpus),
        "gpus_capped": len(gw.dispatcher.caps_w),  # shadow mode: the caps it would hold
        "gpus_capped_now": sum(1 for g in gpus if g.cap_w < g.default_cap_w - 1.0),  # what the GPUs enforce
        "gpu_w": _r(sum(g.power_w for g in gpus)),
        "throughput": _r(work),
        "throughput_kept": _r(work / natural, 4) if natural > 0 else None,
        "tokens_per_s_per_w": _r(work / known_w, 3) if known_w > 0 else None,
        "faults": [str(f) for f in snap.faults] if snap is not None else [],
    }


def _jobs(gw: Gateway) -> list[dict[str, Any]]:
    """Return per job the throughput lost so far in the event against what its tier allows."""
    status = gw.status.latest
    account = status.account if status is not None else None
    if account is None:
        return []
    return [
        {
            "job": str(j["job"]),
            "tier": str(j["tier"]),
            "job_class": str(j["job_class"]),
            "gpus": int(j["gpus"]),
            "lost": _r(float(j["throughput_lost_fraction"]), 4),
            "allowed": _r(float(j["max_loss_fraction"]), 4),
        }
        for j in account.summary()["jobs"]
    ]


def _events(gw: Gateway, reasons: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Return every event the book knows: when, its opt and why, modification, priority, where it stands."""
    now = gw.clock.now()
    status = gw.status.latest
    active = status.event_id if status is not None else None
    out = []
    for ev, opt in gw.book.events():
        if ev.event_id == active:
            when = "active"
        elif ev.cancelled or ev.end <= now:
            when = "past"
        elif ev.start <= now:
            when = "active" if opt.value == "optIn" else "past"
        else:
            when = "upcoming"
        why = reasons.get(ev.event_id, {})
        out.append(
            {
                "event_id": ev.event_id,
                "when": when,
                "status": ev.status,
                "start": _iso(ev.start),
                "end": _iso(ev.end),
                "opt": opt.value,
                "reason": why.get("reason", ""),
                "decided_by": why.get("actor", ""),
                "modification_number": ev.modification_number,
                "priority": ev.priority,
                "test_event": ev.test_event,
            }
        )
    order = {"active": 0, "upcoming": 1}
    current = sorted((e for e in out if e["when"] != "past"), key=lambda e: (order[e["when"]], e["start"]))
    past = sorted((e for e in out if e["when"] == "past"), key=lambda e: e["start"], reverse=True)
    return current + past[:MAX_PAST_EVENTS]


def link_states(gw: Gateway) -> dict[str, bool]:
    """Return whether each configured peer answers: meter, battery, GPUs, VTN, BMS face, audit writer."""
    status = gw.status.latest
    down = {d.fault.role for d in status.down} if status is not None else set()
    roles = status.roles if status is not None else frozenset()
    states = {role.value: role not in down for role in sorted(roles, key=list(Role).index)}
    if gw.ven is not None:
        states["vtn"] = gw.vtn_ok()
    if gw.bms is not None:
        states["bms"] = gw.bms.wire is not None
    states["audit_writer"] = gw.liveness().ok
    return states


def link_errors(gw: Gateway) -> dict[str, str]:
    """Return the last error of each peer that has one now: devices, VTN, audit writer."""
    errors = dict(gw.devices_down())
    if gw.audit_health.last_error:
        errors["audit_writer"] = gw.audit_health.last_error
    if gw.ven is not None and not gw.vtn_ok():
        last = gw.ven.last_poll_ok
        errors["vtn"] = "never answered a poll" if last is None else f"no poll answered since {last.isoformat()}"
    return errors


def _audit(gw: Gateway) -> dict[str, Any]:
    """Return the audit chain's head, the newest signed checkpoint and the rows it does not cover yet."""
    health, log = gw.audit_health, gw.audit_log
    seq, row_hash = log.head
    head_seq = max(seq, health.last_seq)
    cp = log.last_checkpoint_seq if log.signing else 0
    return {
        "head_seq": head_seq,
        "head_hash": row_hash,
        "signing": log.signing,
        "checkpoint_seq": cp,
        "checkpoint_at": _iso(log.last_checkpoint_at) if log.signing else None,
        "uncovered_rows": max(0, head_seq - cp) if log.signing else head_seq,
        "failures": health.failures,
        "last_error": health.last_error,
        "last_commit": _iso(health.last_ok),
    }
