"""Planned against actual for an event a gateway ran in shadow mode (``[control] mode = "shadow"``).

A shadow gateway audits each tick's plan (``control.tick``: the target it would hold, the battery
setpoint and the number of GPU caps it would command) and marks every row ``"mode": "shadow"``;
the devices did what they do anyway, which the measurement store (or the tick rows' facility
reading) shows. This module puts the two side by side for the dossier and the event report.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from gateway.audit.chain import AuditRow, parse_ts

TABLE_ROWS = 24  # the report's table shows at most this many ticks, evenly spread


def _num(x: Any) -> float | None:
    """Return a number, or None for anything else."""
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _energy_wh(points: Sequence[tuple[datetime, float]]) -> float:
    """Return the energy (Wh) of a step-held power series (W), positive part only."""
    total = 0.0
    for (t0, w), (t1, _) in zip(points, points[1:], strict=False):
        total += max(0.0, w) * max(0.0, (t1 - t0).total_seconds()) / 3600.0
    return total


def _at(points: Sequence[tuple[datetime, float]], t: datetime) -> float | None:
    """Return the last value at or before ``t`` (None before the first)."""
    found = None
    for pt, v in points:
        if pt > t:
            break
        found = v
    return found


def planned(rows: Sequence[AuditRow], series: Mapping[str, Sequence[Sequence[Any]]]) -> dict[str, Any] | None:
    """Return the shadow run's planned-against-actual summary and table, or None for a live run."""
    ticks = []
    for r in rows:
        if r.kind != "control.tick":
            continue
        d = r.data_obj()
        if d.get("mode") != "shadow":
            continue
        ticks.append((parse_ts(r.ts), d))
    if not ticks:
        return None
    battery_actual = [(parse_ts(t), float(v)) for t, v in series.get("battery_w", []) if _num(v) is not None]
    battery_planned = [(t, _num(d.get("battery_w")) or 0.0) for t, d in ticks]
    table = []
    step = max(1, -(-len(ticks) // TABLE_ROWS))
    for t, d in ticks[::step]:
        table.append(
            {
                "ts": t.isoformat(),
                "phase": d.get("phase"),
                "target_w": _num(d.get("limit_w")),
                "facility_w": _num(d.get("facility_w")),
                "battery_planned_w": _num(d.get("battery_w")),
                "battery_actual_w": _at(battery_actual, t),
                "gpus_would_cap": d.get("gpus_capped"),
            }
        )
    over = [
        (_num(d.get("facility_w")) or 0.0) - (_num(d.get("limit_w")) or 0.0)
        for _, d in ticks
        if _num(d.get("facility_w")) is not None and _num(d.get("limit_w")) is not None
    ]
    return {
        "ticks": len(ticks),
        "battery_planned_wh": round(_energy_wh(battery_planned), 2),
        "battery_actual_wh": round(_energy_wh(battery_actual), 2),
        "gpus_would_cap_max": max(int(d.get("gpus_capped") or 0) for _, d in ticks),
        "mean_facility_over_target_w": round(sum(over) / len(over), 1) if over else None,
        "table": table,
    }


def section(d: Mapping[str, Any]) -> str:
    """Return the report's planned-against-actual section (empty for a live run)."""
    p = d.get("planned")
    if not p:
        return ""
    e = html.escape

    def kw(w: Any) -> str:
        return "-" if _num(w) is None else f"{float(w) / 1000:,.1f}"

    rows = "".join(
        f"<tr><td>{e(r['ts'][:19])}</td><td>{e(str(r.get('phase') or ''))}</td><td>{kw(r['target_w'])}</td>"
        f"<td>{kw(r['facility_w'])}</td><td>{kw(r['battery_planned_w'])}</td><td>{kw(r['battery_actual_w'])}</td>"
        f"<td>{e(str(r.get('gpus_would_cap') if r.get('gpus_would_cap') is not None else '-'))}</td></tr>"
        for r in p["table"]
    )
    over = p.get("mean_facility_over_target_w")
    return (
        "<h2>Shadow run: planned against actual</h2>"
        "<p>The gateway ran in shadow mode: it planned every tick and audited what it would have commanded, "
        "and wrote to no device. Planned is what it would have done; actual is what the site did without it.</p>"
        f"<p>{int(p['ticks'])} ticks planned · battery {p['battery_planned_wh'] / 1000:,.2f} kWh planned, "
        f"{p['battery_actual_wh'] / 1000:,.2f} kWh actual · up to {int(p['gpus_would_cap_max'])} GPU caps planned"
        + (f" · facility {float(over) / 1000:+,.1f} kW against the target on average" if over is not None else "")
        + "</p><table><tr><th>time</th><th>phase</th><th>target kW</th><th>facility kW (actual)</th>"
        f"<th>battery kW planned</th><th>battery kW actual</th><th>GPU caps planned</th></tr>{rows}</table>"
    )
