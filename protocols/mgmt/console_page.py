"""The live console's HTML: the page and its status sections, rendered from the feed's status data.

One renderer for both: the page a browser loads (usable without JavaScript: every number is in
it, and it reloads itself every 30 s when scripts are off) and the sections the Server-Sent
Events stream sends after each tick (the page's script swaps them in and draws the chart).
Everything shown is escaped; the page loads nothing from elsewhere (its CSP says so).
"""

from __future__ import annotations

import html
import json
from typing import Any

from protocols.mgmt.console_assets import asset

SECTIONS = ("now", "jobs", "events", "links", "audit")
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
e = html.escape


def kw(w: Any) -> str:
    """Return watts as kW text ('-' for none)."""
    return "-" if not isinstance(w, int | float) else f"{w / 1000:,.1f} kW"


def pct(x: Any, nd: int = 1) -> str:
    """Return a fraction (0..1) as percent text ('-' for none)."""
    return "-" if not isinstance(x, int | float) else f"{100 * x:.{nd}f} %"


def _t(iso: Any) -> str:
    """Return an RFC 3339 time as 'YYYY-MM-DD HH:MM:SS' (shorter, still exact to the second)."""
    return "-" if not isinstance(iso, str) else e(iso[:19].replace("T", " "))


def _card(title: str, big: str, lines: list[str], cls: str = "") -> str:
    """Return one card: a title, a big figure and a few lines."""
    rest = "".join(f"<div>{line}</div>" for line in lines)
    return f'<div class="card {cls}"><h3>{e(title)}</h3><div class="big">{big}</div>{rest}</div>'


def now_section(s: dict[str, Any]) -> str:
    """Return the 'site now' cards: facility against limit and baseline, battery, GPUs, work per watt."""
    p = s.get("power") or {}
    over = (
        isinstance(p.get("facility_w"), int | float)
        and isinstance(p.get("limit_w"), int | float)
        and p["facility_w"] > p["limit_w"] * 1.01
    )
    ev = p.get("event_id")
    state = f"event {e(ev)} ({e(p.get('phase') or '')})" if ev else "no event in force"
    b = p.get("battery")
    cards = [
        _card(
            "Facility",
            kw(p.get("facility_w")),
            [f"limit <b>{kw(p.get('limit_w'))}</b>", f"baseline {kw(p.get('baseline_w'))}", state],
            "bad" if over else "",
        ),
        _card(
            "Battery",
            "-" if b is None else kw(b.get("power_w")),
            ["no battery"]
            if b is None
            else [
                f"state of charge <b>{e(str(b.get('soc_pct')))} %</b>",
                f"planned {kw(p.get('battery_planned_w'))} · held {kw(b.get('setpoint_w'))}",
            ],
        ),
        _card(
            "GPUs",
            kw(p.get("gpu_w")),
            [f"<b>{int(p.get('gpus_capped') or 0)}</b> of {int(p.get('gpus') or 0)} capped"]
            if s.get("mode") != "shadow"
            else [
                f"would cap <b>{int(p.get('gpus_capped') or 0)}</b> of {int(p.get('gpus') or 0)}",
                f"capped now {int(p.get('gpus_capped_now') or 0)}",
            ],
        ),
        _card(
            "Work",
            "-" if p.get("tokens_per_s_per_w") is None else f"{p['tokens_per_s_per_w']:.3f} tokens/s/W",
            [f"throughput kept {pct(p.get('throughput_kept'))}", f"last tick {_t(p.get('t'))}"],
        ),
    ]
    faults = "".join(f"<li>{e(str(f))}</li>" for f in p.get("faults") or [])
    return '<div class="cards">' + "".join(cards) + "</div>" + (f'<ul class="faults">{faults}</ul>' if faults else "")


def jobs_section(s: dict[str, Any]) -> str:
    """Return per job the throughput lost against its tier's budget."""
    jobs = s.get("jobs") or []
    if not jobs:
        return '<p class="muted">No event is being delivered: every job runs uncapped.</p>'
    rows = []
    for j in jobs:
        lost, allowed = float(j.get("lost") or 0.0), float(j.get("allowed") or 0.0)
        over = lost > allowed + 1e-9
        width = 0 if allowed <= 0 else min(100, round(100 * lost / allowed))
        rows.append(
            f'<tr class="{"bad" if over else ""}"><td>{e(j["job"])}</td><td>{e(j["tier"])}</td>'
            f"<td>{int(j['gpus'])}</td><td>{pct(1 - lost)}</td><td>{pct(lost)} of {pct(allowed, 0)}"
            f'<span class="bar"><i style="width:{width}%"></i></span></td></tr>'
        )
    return (
        "<table><tr><th>job</th><th>tier</th><th>GPUs</th><th>throughput kept</th><th>lost of budget</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def events_section(s: dict[str, Any], can_act: bool) -> str:
    """Return the events: upcoming, active, past, each with its opt, why, modification, priority and report."""
    evs = s.get("events") or []
    if not evs:
        return '<p class="muted">No event from the utility yet.</p>'
    rows = []
    for ev in evs:
        eid = str(ev["event_id"])
        act = ""
        if can_act and ev["when"] != "past" and ev["opt"] == "optIn":
            act = f'<button type="button" class="optout" data-event="{e(eid)}">Opt out…</button>'
        by = f" <small>({e(ev['decided_by'])})</small>" if ev.get("decided_by") else ""
        rows.append(
            f'<tr class="{e(ev["when"])}" data-event="{e(eid)}"><td><b>{e(eid)}</b><br><small>{e(ev["when"])} · '
            f"{e(ev['status'])}{' · test' if ev.get('test_event') else ''}</small></td>"
            f"<td>{_t(ev['start'])}<br>{_t(ev['end'])}</td>"
            f'<td class="opt {e(ev["opt"])}">{e(ev["opt"])}</td><td>{e(ev.get("reason") or "")}{by}</td>'
            f"<td>{int(ev['modification_number'])}</td><td>{int(ev['priority'])}</td>"
            f'<td><a href="/console/events/{e(eid)}/report">report</a> {act}</td></tr>'
        )
    return (
        "<table><tr><th>event</th><th>start / end</th><th>opt</th><th>why</th><th>mod.</th><th>prio.</th>"
        "<th></th></tr>" + "".join(rows) + "</table>"
    )


def links_section(s: dict[str, Any]) -> str:
    """Return each device and link, green or red, since when, and its last error."""
    items = []
    for peer, ln in (s.get("links") or {}).items():
        up = bool(ln.get("up"))
        err = f'<div class="err">last error: {e(str(ln["error"]))}</div>' if ln.get("error") else ""
        items.append(
            f'<li class="{"up" if up else "down"}"><span class="dot"></span><b>{e(peer)}</b> '
            f"{'up' if up else 'DOWN'} since {_t(ln.get('since'))}{err}</li>"
        )
    return '<ul class="links">' + "".join(items) + "</ul>"


def audit_section(s: dict[str, Any]) -> str:
    """Return the audit chain's head, its newest signed checkpoint and the rows not yet covered."""
    a = s.get("audit") or {}
    head = f"row {int(a.get('head_seq') or 0)} · <code>{e(str(a.get('head_hash') or '')[:16])}…</code>"
    if a.get("signing"):
        cp = (
            f"row {int(a.get('checkpoint_seq') or 0)} signed {_t(a.get('checkpoint_at'))}"
            if a.get("checkpoint_seq")
            else "none signed yet"
        )
    else:
        cp = "signing is off (no key configured)"
    failing = f'<div class="err">appends failing: {e(str(a.get("last_error")))}</div>' if a.get("last_error") else ""
    return (
        f'<dl class="audit"><dt>chain head</dt><dd>{head}</dd><dt>last signed checkpoint</dt><dd>{cp}</dd>'
        f"<dt>rows not yet covered</dt><dd>{int(a.get('uncovered_rows') or 0)}</dd>"
        f"<dt>failed appends</dt><dd>{int(a.get('failures') or 0)}</dd></dl>{failing}"
    )


def sections(s: dict[str, Any], can_act: bool) -> dict[str, str]:
    """Return every status section's HTML by element id."""
    return {
        "now": now_section(s),
        "jobs": jobs_section(s),
        "events": events_section(s, can_act),
        "links": links_section(s),
        "audit": audit_section(s),
    }


def _role(role: Any) -> str:
    """Return the hot-standby role badge (nothing for a gateway without ``[standby]``)."""
    if not isinstance(role, dict) or not role.get("standby"):
        return ""
    text = f"{role.get('role')} · node {role.get('node')}" + (f" · token {role['token']}" if role.get("token") else "")
    return f'<span class="badge role">{e(text)}</span>'


def page(s: dict[str, Any], can_act: bool, auth_hint: str) -> str:
    """Return the whole console page for status ``s``."""
    parts = sections(s, can_act)
    mode = str(s.get("mode") or "live")
    site = str(s.get("site") or "")
    boot = json.dumps({"can_act": can_act}).replace("</", "<\\/")
    shadow = (
        '<p class="shadow">Shadow mode: the gateway plans and audits what it would command, and writes to no '
        "device. The battery and GPU figures are what the devices really do.</p>"
        if mode == "shadow"
        else ""
    )
    op = "" if can_act else f'<p class="muted">Opting out from this page is off: {e(auth_hint)}</p>'
    token = (
        '<label>Operator token <input id="token" type="password" autocomplete="off" '
        f'placeholder="kept in this tab only"></label><p class="muted">{e(auth_hint)}</p>'
        if can_act
        else ""
    )
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<noscript><meta http-equiv="refresh" content="30"></noscript>',
            f"<title>{e(site)} · drgw console</title><style>{asset('console.css')}</style></head>",
            f'<body data-mode="{e(mode)}"><header><h1>{e(site)}</h1>',
            f'<span class="badge {e(mode)}">{e(mode)}</span>{_role(s.get("role"))}',
            f'<span id="conn" class="muted">page as of {_t(s.get("now"))}</span></header>{shadow}',
            f'<section><h2>Site now</h2><div id="now">{parts["now"]}</div></section>',
            '<section><h2>Last hours</h2><div class="legend"><i class="k target"></i>target '
            '<i class="k facility"></i>measured <i class="k battery"></i>battery <i class="k gpu"></i>GPU shed</div>'
            '<svg id="chart" viewBox="0 0 960 300" role="img" '
            'aria-label="facility power, last hours"><text x="20" y="150">The chart needs JavaScript.</text></svg>'
            "</section>",
            f'<section><h2>Jobs and budgets</h2><div id="jobs">{parts["jobs"]}</div></section>',
            f'<section><h2>Events</h2><div id="events">{parts["events"]}</div>{op}</section>',
            f'<section class="half"><h2>Devices and links</h2><div id="links">{parts["links"]}</div></section>',
            f'<section class="half"><h2>Audit integrity</h2><div id="audit">{parts["audit"]}</div></section>',
            '<dialog id="optout-dialog"><form method="dialog"><h3>Opt out of <span id="optout-event"></span>?</h3>',
            "<p>The gateway stops delivering this event at once and tells the utility. This is audited.</p>",
            '<label>Reason <textarea id="optout-reason" required maxlength="500" rows="3"></textarea></label>',
            token,
            '<p id="optout-result" role="status"></p><menu><button value="cancel" formnovalidate>Cancel</button>',
            '<button id="optout-confirm" value="confirm">Opt out</button></menu></form></dialog>',
            f'<script type="application/json" id="boot">{boot}</script>',
            f"<script>{asset('console.js')}</script></body></html>",
        ]
    )
