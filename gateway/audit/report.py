"""One self-contained HTML page per event for a program manager: chart, timeline, performance, integrity.

The page loads nothing from the network: styles and the chart script are inline, the data is an
inline JSON block. The chart (facility target, baseline and measured power; battery and GPU
contributions stacked beneath) is drawn into inline SVG by the script, which then marks
``<body data-chart="drawn">`` with the number of points drawn, so a browser test can check it.
"""

from __future__ import annotations

import html
import json
from typing import Any

from gateway.audit import shadow_report
from gateway.audit.chain import parse_ts
from gateway.audit.verify import VerifyResult

MAX_POINTS = 1500


def chart_data(d: dict[str, Any]) -> dict[str, Any]:
    """Return the chart's series as [ms since epoch, W] pairs, thinned to at most MAX_POINTS each."""
    s = d.get("series") or {}

    def ms(ts: str) -> int:
        return int(parse_ts(ts).timestamp() * 1000)

    def pts(name: str) -> list[tuple[int, float]]:
        return [(ms(t), v) for t, v in s.get(name, []) if v is not None]

    battery = {ms(t): max(0.0, v) for t, v in s.get("battery_w", []) if v is not None}
    gpu_w = {ms(t): v for t, v in s.get("gpu_w", []) if v is not None}
    shed = {t: max(0.0, nat - gpu_w[t]) for t, nat in pts("gpu_natural_w") if t in gpu_w}
    times = sorted(set(battery) | set(shed))
    baseline = []
    for start, end, w in d.get("baseline_steps", []):
        if w is not None:
            baseline += [[ms(start), w], [ms(end), w]]
    return {
        "facility": _thin([[t, v] for t, v in pts("facility_w")]),
        "target": _thin([[t, v] for t, v in pts("limit_w")]),
        "baseline": baseline,
        "battery": _thin([[t, battery.get(t, 0.0)] for t in times]),
        "gpu": _thin([[t, shed.get(t, 0.0)] for t in times]),
        "event": [ms(d["event"]["start"]), ms(d["event"]["end"])] if d.get("event") else None,
    }


def _thin(points: list[list[float]]) -> list[list[float]]:
    """Keep every n-th point so at most MAX_POINTS remain (the last one always kept)."""
    if len(points) <= MAX_POINTS:
        return points
    step = -(-len(points) // MAX_POINTS)
    kept = points[::step]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


def render(d: dict[str, Any], integrity: VerifyResult | None, site: str = "") -> str:
    """Return the report page for one event dossier and the log's verification result."""
    data = json.dumps(chart_data(d), separators=(",", ":")).replace("</", "<\\/")
    ev = d.get("event") or {}
    perf = d.get("performance") or {}
    e = html.escape
    title = f"Demand-response event {d['event_id']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="sub">{e(site + " · " if site else "")}{e(ev.get("start", "?"))} to {e(ev.get("end", "?"))} · '
        f"VTN {e(str(ev.get('vtn_id') or '-'))} · baseline {e(str(perf.get('baseline', {}).get('method', '-')))}</p>",
        _integrity(d, integrity),
        '<h2>Facility power</h2><div class="legend">'
        '<span class="k target"></span>target <span class="k baseline"></span>baseline '
        '<span class="k facility"></span>measured <span class="k battery"></span>battery '
        '<span class="k gpu"></span>GPU caps</div>',
        '<svg id="power" width="960" height="320" role="img" aria-label="facility power chart"></svg>',
        '<svg id="contrib" width="960" height="180" role="img" aria-label="battery and GPU contributions"></svg>',
        shadow_report.section(d),
        _performance(perf),
        _response(d.get("response") or {}),
        _timeline(d),
        _commands(d.get("commands") or []),
        f'<script type="application/json" id="chart-data">{data}</script>',
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _integrity(d: dict[str, Any], res: VerifyResult | None) -> str:
    """Return the integrity panel."""
    e = html.escape
    own = d.get("integrity") or {}
    sealed = own.get("sealed_by_checkpoint")
    bad = own.get("rows_with_bad_hash")
    lines = [
        f"Event rows: {own.get('rows', 0)} (seq {own.get('first_seq')}..{own.get('last_seq')}), "
        + ("BAD HASHES: " + e(str(bad)) if bad else "all hashes correct"),
        f"sealed by the checkpoint at seq {sealed['seq']} signed {e(sealed['signed_at'])}"
        if sealed
        else "not yet sealed by a signed checkpoint",
    ]
    if res is None:
        status, cls = "whole log not verified", "warn"
    elif res.ok:
        signed = (
            f"{res.checkpoints} signed checkpoints verified" if res.checkpoints else "no checkpoint signature checked"
        )
        status, cls = f"whole log intact: {res.rows} rows, {signed}", "ok"
    else:
        status, cls = "TAMPERED: " + "; ".join(res.problems or (res.reason,)), "bad"
    notes = "".join(f"<li>{e(n)}</li>" for n in ((*res.statement, *res.notes) if res else ()))
    return (
        f'<div class="integrity {cls}"><b>Integrity:</b> {e(status)}<ul>'
        + "".join(f"<li>{x}</li>" for x in lines)
        + notes
        + "</ul></div>"
    )


def _performance(perf: dict[str, Any]) -> str:
    """Return the performance table."""
    e = html.escape
    keys = ("start", "end", "baseline_w", "actual_w", "committed_w", "delivered_w", "energy_wh", "percent")
    rows = "".join(
        "<tr>" + "".join(f"<td>{e(_fmt(iv.get(k)))}</td>" for k in keys) + "</tr>" for iv in perf.get("intervals", [])
    )
    inputs = json.dumps(perf.get("baseline", {}).get("inputs", {}), indent=1, sort_keys=True)
    return (
        "<h2>Performance</h2>"
        f"<p>Energy delivered <b>{e(_fmt(perf.get('energy_delivered_wh')))} Wh</b> of "
        f"{e(_fmt(perf.get('energy_committed_wh')))} Wh committed: "
        f"<b>{e(_fmt(perf.get('percent_of_commitment')))} %</b></p>"
        "<table><tr><th>from</th><th>to</th><th>baseline W</th><th>actual W</th><th>committed W</th>"
        f"<th>delivered W</th><th>energy Wh</th><th>%</th></tr>{rows}</table>"
        f"<details><summary>Baseline method and inputs</summary><pre>{e(inputs)}</pre></details>"
    )


def _response(r: dict[str, Any]) -> str:
    """Return the response-times list."""
    e = html.escape
    items = [
        ("notification to first command", r.get("notification_to_first_command_s")),
        ("start to reduction reached", r.get("start_to_reduction_s")),
        ("end to release", r.get("end_to_release_s")),
    ]
    return "<h2>Response</h2><ul>" + "".join(f"<li>{e(k)}: {e(_fmt(v))} s</li>" for k, v in items) + "</ul>"


def _timeline(d: dict[str, Any]) -> str:
    """Return the event timeline table."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(r['ts'])}</td><td>{e(r['kind'])}</td><td>{e(r['actor'])}</td>"
        f"<td>{e(r.get('device_id') or '')}</td><td><code>{e(_short(r['data']))}</code></td></tr>"
        for r in d.get("timeline", [])
    )
    return (
        f"<h2>Timeline</h2><p>{d.get('ticks', 0)} control ticks and {len(d.get('commands') or [])} commands "
        "are summarised below.</p><table><tr><th>time</th><th>what</th><th>who</th><th>device</th>"
        f"<th>details</th></tr>{rows}</table>"
    )


def _commands(cmds: list[dict[str, Any]]) -> str:
    """Return the commands table (asked against read back)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(c['ts'])}</td><td>{e(c['kind'])}</td><td>{e(str(c.get('device_id') or ''))}</td>"
        f"<td>{e(_short(c.get('requested')))}</td><td>{e(_short(c.get('readback')))}</td>"
        f"<td>{'yes' if c.get('matched') else ('NO' if c.get('matched') is False else '-')}</td></tr>"
        for c in cmds
    )
    return (
        "<h2>Commands and read-back</h2><table><tr><th>time</th><th>command</th><th>device</th>"
        f"<th>asked</th><th>read back</th><th>matched</th></tr>{rows}</table>"
    )


def _fmt(v: Any) -> str:
    """Format a value for a table cell."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return str(v)


def _short(v: Any, limit: int = 160) -> str:
    """Return compact JSON of ``v``, cut to ``limit`` characters."""
    text = json.dumps(v, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1b1f24;max-width:1000px}
h1{font-size:22px;margin:0}h2{font-size:17px;margin:22px 0 6px}.sub{color:#57606a;margin:4px 0 12px}
table{border-collapse:collapse;font-size:12.5px}td,th{border-bottom:1px solid #d0d7de;padding:3px 8px;text-align:left}
.integrity{padding:8px 12px;border-radius:6px;margin:10px 0}.ok{background:#dafbe1}.bad{background:#ffebe9}
.warn{background:#fff8c5}.legend .k{display:inline-block;width:14px;height:4px;margin:0 4px 3px 12px}
.k.target{background:#cf222e}.k.baseline{background:#8c959f}.k.facility{background:#0969da}
.k.battery{background:#2da44e;height:10px}.k.gpu{background:#bf8700;height:10px}code{font-size:11.5px}
svg text{font-size:11px;fill:#57606a}
"""

_JS = r"""
(function(){
const D=JSON.parse(document.getElementById('chart-data').textContent);
const NS='http://www.w3.org/2000/svg';
function el(p,n,a){const e=document.createElementNS(NS,n);
  for(const k in a)e.setAttribute(k,a[k]);p.appendChild(e);return e;}
const all=[].concat(D.facility,D.target,D.baseline,D.battery,D.gpu);
if(!all.length){document.body.dataset.chart='empty';return;}
let t0=Math.min(...all.map(p=>p[0])),t1=Math.max(...all.map(p=>p[0]));
if(t1<=t0)t1=t0+1;
const L=70,R=925,W=R-L;
const x=t=>L+(t-t0)/(t1-t0)*W;
function axes(svg,top,bot,lo,hi,unit){
  for(let i=0;i<=4;i++){const v=lo+(hi-lo)*i/4,y=bot-(bot-top)*i/4;
    el(svg,'line',{x1:L,x2:R,y1:y,y2:y,stroke:'#eaeef2'});
    const t=el(svg,'text',{x:L-6,y:y+4,'text-anchor':'end'});t.textContent=(v/1000).toFixed(1)+' '+unit;}
  for(let i=0;i<=6;i++){const t=t0+(t1-t0)*i/6,d=new Date(t);
    const s=el(svg,'text',{x:x(t),y:bot+16,'text-anchor':'middle'});
    s.textContent=d.toISOString().substring(11,16)+'Z';}
}
function line(svg,pts,y,color,cls,dash,step){
  if(!pts.length)return 0;let d='';
  pts.forEach((p,i)=>{const X=x(p[0]).toFixed(1),Y=y(p[1]).toFixed(1);
    if(i===0)d='M'+X+','+Y;else if(step)d+='H'+X+'V'+Y;else d+='L'+X+','+Y;});
  el(svg,'path',{d:d,fill:'none',stroke:color,'stroke-width':2,'stroke-dasharray':dash||'','class':cls});
  return pts.length;
}
let n=0;
const top=document.getElementById('power');
const pv=[].concat(D.facility,D.target,D.baseline).map(p=>p[1]);
let hi=pv.length?Math.max(...pv):1,lo=pv.length?Math.min(...pv):0;
const pad=(hi-lo)*0.1||hi*0.1||1;hi+=pad;lo=Math.max(0,lo-pad);
const y1=v=>290-(v-lo)/(hi-lo)*270;
if(D.event)el(top,'rect',{x:x(D.event[0]),y:20,width:Math.max(1,x(D.event[1])-x(D.event[0])),height:270,fill:'#f6f8fa'});
axes(top,20,290,lo,hi,'kW');
n+=line(top,D.baseline,y1,'#8c959f','baseline','6 4',false);
n+=line(top,D.target,y1,'#cf222e','target','',true);
n+=line(top,D.facility,y1,'#0969da','facility','',false);
const bot=document.getElementById('contrib');
const sum=D.battery.map((p,i)=>[p[0],p[1]+(D.gpu[i]?D.gpu[i][1]:0)]);
const cv=sum.map(p=>p[1]);const chi=Math.max(1,...cv)*1.1;
const y2=v=>150-v/chi*140;
axes(bot,10,150,0,chi,'kW');
function area(pts,base,color,cls){
  if(!pts.length)return 0;
  let d='M'+x(pts[0][0]).toFixed(1)+','+y2(base[0]).toFixed(1);
  pts.forEach(p=>{d+='L'+x(p[0]).toFixed(1)+','+y2(p[1]).toFixed(1);});
  for(let i=pts.length-1;i>=0;i--)d+='L'+x(pts[i][0]).toFixed(1)+','+y2(base[i]).toFixed(1);
  el(bot,'path',{d:d+'Z',fill:color,'fill-opacity':1,stroke:'none','class':cls});
  return pts.length;
}
n+=area(D.battery,D.battery.map(()=>0),'#2da44e','battery');
n+=area(sum,D.battery.map(p=>p[1]),'#bf8700','gpu');
document.body.dataset.chart='drawn';
document.body.dataset.points=String(n);
})();
"""
