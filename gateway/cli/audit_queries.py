"""``drgw audit`` queries for auditors (dossier, performance, response times, period queries) and the
HTML report. Every query prints a table, or JSON with ``--json``. Exit status: 0 done, 2 bad input or
an unreadable log.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.cli.audit import add_db_args, audit_config, db_of, guard, parse_time, run_verify
from gateway.errors import AuditError


def add_commands(audit: Any) -> None:
    """Register the auditor queries and `audit report` in the audit command table."""
    for name, help_ in (
        ("dossier", "everything about one event: versions, answers, commands, overrides, release, performance"),
        ("performance", "baseline against actual per interval, energy delivered, percent of commitment"),
    ):
        p = audit.add_parser(name, help=help_)
        p.add_argument("event_id")
        add_db_args(p)
        add_baseline_args(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "performance":
            p.add_argument("--record", action="store_true", help="append the result to the audit log")
        p.set_defaults(func=cmd_dossier if name == "dossier" else cmd_performance)

    p = audit.add_parser("response", help="response times per event: notification, start and end")
    p.add_argument("event_ids", nargs="*", help="events (default: every event with rows in the period)")
    add_db_args(p)
    add_period_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_response)

    for name, help_ in (
        ("opt-outs", "opt-outs and overrides over a period, with who and why"),
        ("untraced", "commands not traceable to any event"),
        ("links", "link-loss and fallback periods per device"),
        ("config-changes", "config loads and changes"),
        ("security", "security events: rejected messages, refused registrations, failed logins"),
    ):
        p = audit.add_parser(name, help=help_)
        add_db_args(p)
        add_period_args(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=cmd_period, query=name)

    p = audit.add_parser("report", help="render one self-contained HTML page for an event")
    p.add_argument("event_id")
    add_db_args(p)
    add_baseline_args(p)
    p.add_argument("--html", required=True, help="the HTML file to write")
    p.add_argument("--pubkey", action="append", default=[], help="trusted public key for the integrity status")
    p.add_argument("--checkpoint", help="newest exported checkpoint (file or directory) for the integrity status")
    p.set_defaults(func=cmd_report)


def add_period_args(p: argparse.ArgumentParser) -> None:
    """Add --from/--to."""
    p.add_argument("--from", dest="start", type=parse_time, help="period start (RFC 3339 or YYYY-MM-DD, UTC)")
    p.add_argument("--to", dest="end", type=parse_time, help="period end, exclusive")


def add_baseline_args(p: argparse.ArgumentParser) -> None:
    """Add the baseline options."""
    p.add_argument("--baseline", help="meter-before-after or X-of-Y like days (default: [audit] baseline, or 10-of-10)")
    p.add_argument("--tz", default="UTC", help="site time zone for like days (IANA name, default UTC)")
    p.add_argument("--lookback-days", type=int, default=45, help="how far back like days are sought (default 45)")
    p.add_argument("--window-min", type=float, default=60.0, help="meter-before/after window in minutes (default 60)")


def options(args: argparse.Namespace) -> Any:
    """Return dossier Options from the arguments and the config."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from gateway.audit.baseline import Method
    from gateway.audit.dossier import Options

    cfg = audit_config(args)
    spec = args.baseline or (cfg.baseline if cfg is not None else "10-of-10")
    try:
        method = Method.parse(spec)
        tz = ZoneInfo(args.tz)
    except (ValueError, ZoneInfoNotFoundError) as err:
        raise AuditError(f"bad baseline option: {err}") from err
    levels = None
    if getattr(args, "config", None):
        from gateway.config import load_config

        levels = dict(load_config(args.config).openadr.simple_levels)
    return Options(method, tz, levels, max(1, args.lookback_days), args.window_min * 60.0)


@guard
def cmd_dossier(args: argparse.Namespace) -> int:
    """Print an event's dossier."""
    import asyncio

    from gateway.audit.dossier import dossier
    from gateway.audit.text import format_dossier

    d = asyncio.run(dossier(db_of(args), args.event_id, options(args)))
    if args.json:
        d.pop("series", None)
        print(json.dumps(d, indent=1, sort_keys=True, ensure_ascii=False))
    else:
        print(format_dossier(d))
    return 0


@guard
def cmd_performance(args: argparse.Namespace) -> int:
    """Print an event's performance; with --record append it to the log."""
    import asyncio

    from gateway.audit.dossier import dossier
    from gateway.audit.text import format_performance

    db = db_of(args)
    d = asyncio.run(dossier(db, args.event_id, options(args)))
    perf = {"event_id": args.event_id, **(d.get("performance") or {})}
    if args.record:
        perf["recorded_seq"] = asyncio.run(_record(db, audit_config(args), args.event_id, perf))
    print(json.dumps(perf, indent=1, sort_keys=True) if args.json else format_performance(perf))
    return 0


async def _record(db: str, cfg: Any, event_id: str, perf: dict[str, Any]) -> int:
    """Append a performance result (method and inputs included) to the log; return its seq.

    With a config, its signing key seals the new row with a checkpoint at close.
    """
    from gateway.audit.kinds import PERFORMANCE_COMPUTED
    from gateway.audit.log import AuditLog

    log = await (AuditLog.open_config(cfg, db_url=db) if cfg is not None else AuditLog.open(db))
    try:
        return await log.append(PERFORMANCE_COMPUTED, perf, actor="operator", event_id=event_id)
    finally:
        await log.close()


@guard
def cmd_response(args: argparse.Namespace) -> int:
    """Print response times per event."""
    import asyncio

    from gateway.audit.text import format_response

    out = asyncio.run(_responses(db_of(args), args.event_ids, args.start, args.end))
    print(json.dumps(out, indent=1, sort_keys=True) if args.json else format_response(out))
    return 0


async def _responses(db: str, ids: list[str], start: datetime | None, end: datetime | None) -> list[dict[str, Any]]:
    """Return the response times of the given events, or of every event in the period."""
    from gateway.audit.dossier import response_of
    from gateway.audit.migrate import open_existing
    from gateway.audit.periods import events_in

    engine, _ = open_existing(db)
    try:
        async with engine.connect() as conn:
            ids = ids or await events_in(conn, start, end)
            return [await response_of(conn, eid) for eid in ids]
    finally:
        await engine.dispose()


@guard
def cmd_period(args: argparse.Namespace) -> int:
    """Run one period query and print it."""
    import asyncio

    from gateway.audit.periods import run_query
    from gateway.audit.text import format_period

    res = asyncio.run(run_query(db_of(args), args.query, args.start, args.end))
    print(
        json.dumps(res, indent=1, sort_keys=True, ensure_ascii=False) if args.json else format_period(args.query, res)
    )
    return 0


@guard
def cmd_report(args: argparse.Namespace) -> int:
    """Write the event's HTML report."""
    import asyncio

    from gateway.audit.dossier import dossier
    from gateway.audit.report import render

    db = db_of(args)
    d = asyncio.run(dossier(db, args.event_id, options(args)))
    res = run_verify(args)
    cfg_site = ""
    if getattr(args, "config", None):
        from gateway.config import load_config

        cfg_site = load_config(args.config).site.name
    Path(args.html).write_text(render(d, res, cfg_site), encoding="utf-8")
    print(f"wrote {args.html} ({'log intact' if res.ok else 'LOG TAMPERED'})")
    return 0
