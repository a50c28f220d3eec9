"""More ``drgw audit`` subcommands (keys, checkpoints, export, auditor queries, report) and ``drgw bench audit``.

Every query prints a table, or JSON with ``--json``. Exit status: 0 done, 1 a check failed
(verification or an export that cannot be sealed), 2 bad input or an unreadable log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.audit.baseline import Method
from gateway.audit.cli import (
    CLI_ERRORS,
    add_db_args,
    audit_config,
    audit_subparsers,
    db_of,
    print_error,
    run_verify,
    trusted_keys,
)
from gateway.errors import AuditError

EXIT_BAD = 2


def add_commands(sub: Any, bench_sub: Any) -> None:
    """Register the audit subcommands beside verify/event, and ``bench audit``."""
    audit = audit_subparsers(sub)

    p = audit.add_parser("keygen", help="make an Ed25519 checkpoint signing key (PATH and PATH.pub)")
    p.add_argument(
        "--out", required=True, help="where to write the private key (mode 0600); PATH.pub gets the public key"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.set_defaults(func=cmd_keygen)

    p = audit.add_parser("checkpoint", help="sign the chain head now, store it and write it to --dir")
    add_db_args(p)
    p.add_argument("--key", help="the signing key (default: [audit] signing_key of --config)")
    p.add_argument("--dir", help="also write the checkpoint here (default: [audit] checkpoint_dir)")
    p.set_defaults(func=cmd_checkpoint)

    p = audit.add_parser(
        "start-over",
        help="accept the log as it is after its database was lost, cut or rolled back (recorded with the lost head)",
    )
    add_db_args(p)
    p.add_argument("--marker", help="the head marker (default: [audit] head_marker of --config, or beside --db)")
    p.add_argument("--reason", required=True, help="why; recorded in the first row written")
    p.set_defaults(func=cmd_start_over)

    p = audit.add_parser("export", help="write a bundle that verifies offline (rows, checkpoints, key, messages)")
    add_db_args(p)
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--event", help="the event id to export")
    sel.add_argument("--from", dest="start", type=parse_time, help="period start (RFC 3339 or YYYY-MM-DD, UTC)")
    p.add_argument("--to", dest="end", type=parse_time, help="period end (exclusive)")
    p.add_argument("--out", required=True, help="bundle directory (created; must be empty)")
    p.add_argument(
        "--key", help="signing key (default: [audit] signing_key): signs the manifest, seals rows not yet sealed"
    )
    p.add_argument("--pubkey", action="append", default=[], help="public key to bundle (default: the key's)")
    p.set_defaults(func=cmd_export)

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

    b = bench_sub.add_parser("audit", help="audit log: appends/s, verified rows/s, dossier latency")
    b.add_argument("--db", help="database: a new SQLite file, or a PostgreSQL server URL (a scratch database is made)")
    b.add_argument("--rows", type=int, default=1_000_000, help="audit rows to write (default 1,000,000)")
    b.add_argument("--batch-max", type=int, default=512, help="most rows per commit (default 512)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)


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


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 / ISO 8601 or a bare date; a time without offset is UTC."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        t = datetime.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use e.g. 2026-07-01T14:00:00Z)") from err
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def options(args: argparse.Namespace) -> Any:
    """Return dossier Options from the arguments and the config."""
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


def _guard(fn: Any) -> Any:
    """Wrap a command so audit and config errors print one line and exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except CLI_ERRORS as err:
            print_error(err)
            return EXIT_BAD

    run.__doc__ = fn.__doc__
    return run


@_guard
def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new signing key pair and print its key id."""
    from gateway.audit.signing import generate_key

    priv, pub, kid = generate_key(args.out, overwrite=args.force)
    print(f"private key {priv} (keep it off the database host's backups), public key {pub}, key id {kid}")
    return 0


@_guard
def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Sign the head now; print the checkpoint."""
    from gateway.audit.log import AuditLog

    cfg = audit_config(args)
    key = args.key or (cfg.signing_key if cfg is not None else None)
    if not key:
        raise AuditError("give the signing key with --key PATH or --config FILE")
    folder = args.dir or (cfg.checkpoint_dir if cfg is not None else None)

    async def go() -> Any:
        log = await AuditLog.open(db_of(args), signing_key=key, checkpoint_dir=folder)
        try:
            return await log.checkpoint()
        finally:
            await log.close()

    cp = asyncio.run(go())
    if cp is None:
        print("the log is empty: nothing to sign")
        return 0
    print(cp.to_json())
    return 0


@_guard
def cmd_start_over(args: argparse.Namespace) -> int:
    """Accept the log as it is on the operator's word; print what was given up."""
    from gateway.audit.journal import journal_path
    from gateway.audit.startover import start_over
    from gateway.audit.witness import default_marker_path, marker_path

    cfg = audit_config(args)
    db = db_of(args)
    marker = Path(args.marker) if args.marker else (marker_path(cfg, db) if cfg else default_marker_path(db))
    if marker is None:
        raise AuditError("no head marker configured for this log: give --marker PATH")
    res = asyncio.run(
        start_over(
            db,
            marker,
            args.reason,
            signing_key=cfg.signing_key if cfg else None,
            checkpoint_dir=cfg.checkpoint_dir if cfg else None,
            journal=journal_path(cfg, db) if cfg else None,
        )
    )
    kept = f"kept the {res.rows_kept} rows found" if res.rows_kept else "began a new chain"
    aside = (
        f"; {res.set_aside} exported checkpoints of the lost chain moved to {res.set_aside_to}" if res.set_aside else ""
    )
    print(
        f"started over at row {res.seq} ({kept}): the lost chain's head was row {res.lost.seq} "
        f"({res.lost.row_hash[:16]}){aside}"
    )
    return 0


@_guard
def cmd_export(args: argparse.Namespace) -> int:
    """Write an export bundle; return 1 when its newest rows are not sealed by a checkpoint."""
    from gateway.audit.export import export
    from gateway.audit.signing import Signer, public_pem

    if args.start is not None and args.end is None or args.start is None and args.end is not None:
        raise AuditError("a period needs both --from and --to")
    cfg = audit_config(args)
    key_path = args.key or (cfg.signing_key if cfg is not None else None)
    signer = Signer.load(key_path) if key_path else None
    pub = None
    trusted = trusted_keys(args)
    if trusted is not None and trusted.keys:
        pub = public_pem(next(iter(trusted.keys.values())))
    res = asyncio.run(
        export(
            db_of(args), args.out, event_id=args.event, start=args.start, end=args.end, signer=signer, public_key=pub
        )
    )
    print(
        f"wrote {res.out}: rows {res.first_seq}..{res.last_seq} ({res.rows}), {res.checkpoints} checkpoints, "
        f"{res.measurements} measurement rows, {res.messages} raw messages"
    )
    print(f"verify with: python3 {res.out / 'verify_bundle.py'} {res.out}")
    code = 0
    if not res.signed:
        print(
            "WARNING: the manifest is not signed (no key): the bundle's completeness cannot be proven; give --key",
            file=sys.stderr,
        )
        code = 1
    if not res.sealed:
        print("WARNING: the newest rows are not sealed by a checkpoint; give --key to seal them", file=sys.stderr)
        code = 1
    return code


@_guard
def cmd_dossier(args: argparse.Namespace) -> int:
    """Print an event's dossier."""
    from gateway.audit.dossier import dossier
    from gateway.audit.tables import format_dossier

    d = asyncio.run(dossier(db_of(args), args.event_id, options(args)))
    if args.json:
        d.pop("series", None)
        print(json.dumps(d, indent=1, sort_keys=True, ensure_ascii=False))
    else:
        print(format_dossier(d))
    return 0


@_guard
def cmd_performance(args: argparse.Namespace) -> int:
    """Print an event's performance; with --record append it to the log."""
    from gateway.audit.dossier import dossier
    from gateway.audit.tables import format_performance

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
    from gateway.audit.log import AuditLog

    log = await (AuditLog.open_config(cfg, db_url=db) if cfg is not None else AuditLog.open(db))
    try:
        return await log.append("performance.computed", perf, actor="operator", event_id=event_id)
    finally:
        await log.close()


@_guard
def cmd_response(args: argparse.Namespace) -> int:
    """Print response times per event."""
    from gateway.audit.tables import format_response

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


@_guard
def cmd_period(args: argparse.Namespace) -> int:
    """Run one period query and print it."""
    from gateway.audit.periods import run_query
    from gateway.audit.tables import format_period

    res = asyncio.run(run_query(db_of(args), args.query, args.start, args.end))
    print(
        json.dumps(res, indent=1, sort_keys=True, ensure_ascii=False) if args.json else format_period(args.query, res)
    )
    return 0


@_guard
def cmd_report(args: argparse.Namespace) -> int:
    """Write the event's HTML report."""
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


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the audit bench and print what it measured."""
    from gateway.audit.bench import as_dict, format_result, run_bench

    if args.rows < ROWS_MIN:
        print(f"bench audit: --rows must be at least {ROWS_MIN}", file=sys.stderr)
        return EXIT_BAD
    try:
        res = asyncio.run(run_bench(args.db, args.rows, args.batch_max))
    except CLI_ERRORS as err:
        print_error(err)
        return EXIT_BAD
    print(json.dumps(as_dict(res), sort_keys=True) if args.json else format_result(res))
    return 0 if res.verified_ok else 1


ROWS_MIN = 2000
