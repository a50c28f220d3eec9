"""The ``drgw audit`` command, its ``verify`` and ``event`` subcommands, and what the other audit command
modules share (``audit_keys``, ``audit_queries``): the database and keys from the arguments, one-line errors."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import AuditError, ConfigError

EXIT_BAD = 2

if TYPE_CHECKING:
    from gateway.audit.signing import TrustedKeys
    from gateway.audit.verify import VerifyResult


def cli_errors() -> tuple[type[BaseException], ...]:
    """Return what an audit command reports in one line (exit 2) instead of a traceback: its own errors,
    an unreachable or refusing database, a file it cannot read or write."""
    import sqlalchemy as sa

    return (AuditError, ConfigError, sa.exc.SQLAlchemyError, OSError)


def print_error(err: BaseException) -> None:
    """Print one of ``cli_errors()`` as one line on stderr (the first line of a driver's message)."""
    import sqlalchemy as sa

    if isinstance(err, sa.exc.SQLAlchemyError):
        cause = getattr(err, "orig", None) or err
        text = f"database error: {type(cause).__name__}: {cause}"
    elif isinstance(err, ConnectionError | TimeoutError):
        text = f"cannot reach the database: {err}"
    else:
        text = str(err)
    print(f"ERROR: {(text.strip().splitlines() or [''])[0]}", file=sys.stderr)


def add_commands(subparsers: Any) -> Any:
    """Add ``audit verify`` and ``audit event`` under an ``audit`` command; return its subcommand table."""
    audit = subparsers.add_parser("audit", help="verify, query, export and report on the audit log")
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify", help="check the chain, the append-only guards, seals and signed checkpoints")
    add_db_args(p)
    p.add_argument("--pubkey", action="append", default=[], help="trusted Ed25519 public key (PEM); repeatable")
    p.add_argument(
        "--checkpoint", help="exported checkpoints: a directory of them (each is checked) or one checkpoint file"
    )
    p.add_argument("--marker", help="the gateway's head marker (default: [audit] head_marker of --config)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("event", help="list every audit row recorded for one event")
    p.add_argument("event_id", help="the OpenADR event id")
    add_db_args(p)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=cmd_event)
    return sub


def add_db_args(p: argparse.ArgumentParser) -> None:
    """Add --db and --config (a gateway config whose [audit] section supplies defaults)."""
    p.add_argument("--db", help="database URL or SQLite file path (default: [audit] db_url of --config)")
    p.add_argument("--config", help="gateway config file: its [audit] section gives the database, keys and baseline")


def audit_config(args: argparse.Namespace) -> Any:
    """Return the [audit] section of --config, or None."""
    if not getattr(args, "config", None):
        return None
    from gateway.config import load_config

    return load_config(args.config).audit


def db_of(args: argparse.Namespace) -> str:
    """Return the database named by --db, else by --config; raise AuditError when neither."""
    if args.db:
        return str(args.db)
    cfg = audit_config(args)
    if cfg is None:
        raise AuditError("give the database with --db URL or --config FILE")
    return str(cfg.db_url)


def trusted_keys(args: argparse.Namespace) -> TrustedKeys | None:
    """Return the trusted keys from --pubkey, else the public half of the config's signing key."""
    from gateway.audit.signing import TrustedKeys, public_key_path

    paths: list[str | Path] = list(getattr(args, "pubkey", None) or [])
    cfg = audit_config(args)
    if not paths and cfg is not None and cfg.signing_key:
        pub = public_key_path(cfg.signing_key)
        paths.append(pub if pub.exists() else cfg.signing_key)
    return TrustedKeys.load(paths) if paths else None


def exported_of(args: argparse.Namespace) -> tuple[list[Any] | None, list[str]]:
    """Return every exported checkpoint from --checkpoint, else from the config's checkpoint_dir (None
    when neither names one), and why any file there could not be read."""
    from gateway.audit.signing import exported_checkpoints

    where = getattr(args, "checkpoint", None)
    cfg = audit_config(args)
    if not where and cfg is not None and cfg.checkpoint_dir:
        where = cfg.checkpoint_dir
        if not Path(where).expanduser().is_dir():
            return [], []  # configured, none exported yet: verify says the newest rows are not proven
    if not where:
        return None, []
    found, bad = exported_checkpoints(where)
    return found, bad


def marker_of(args: argparse.Namespace) -> Path | None:
    """Return the head marker from --marker, else the one the config's [audit] section names."""
    if getattr(args, "marker", None):
        return Path(args.marker)
    cfg = audit_config(args)
    if cfg is None:
        return None
    from gateway.audit.witness import marker_path

    return marker_path(cfg, getattr(args, "db", None))


def run_verify(args: argparse.Namespace) -> VerifyResult:
    """Verify the log with every check the arguments allow."""
    import asyncio

    from gateway.audit.verify import verify

    cfg = audit_config(args)
    exported, unreadable = exported_of(args)
    res = asyncio.run(
        verify(
            db_of(args),
            trusted=trusted_keys(args),
            exported=exported,
            checkpoint_interval_s=cfg.checkpoint_interval_s if cfg is not None and cfg.signing_key else None,
            head_marker=marker_of(args),
        )
    )
    if unreadable:
        res = replace(
            res, ok=False, problems=(*res.problems, *(f"exported checkpoint unreadable: {b}" for b in unreadable))
        )
    return res


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the log; print OK or TAMPERED; return 0 when intact, 1 when not, 2 on errors."""
    try:
        res = run_verify(args)
    except cli_errors() as err:
        print_error(err)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(verify_dict(res), sort_keys=True))
        return 0 if res.ok else 1
    if res.ok:
        sealed = (
            f", {res.checkpoints} stored and {res.exported_checkpoints} exported signed checkpoints"
            if res.checkpoints or res.exported_checkpoints
            else ""
        )
        meas = f", {res.measurements} measurement rows" if res.measurements else ""
        print(f"OK: {res.rows} rows, head {res.head_hash}{sealed}{meas}")
    else:
        where = f"row {res.first_bad_seq}" if res.first_bad_seq is not None else "log"
        print(f"TAMPERED: {where}: {res.reason}")
        for extra in res.problems[1:]:
            print(f"  also: {extra}")
    for line in res.statement:
        print(line)
    for note in res.notes:
        print(f"note: {note}")
    return 0 if res.ok else 1


def verify_dict(res: VerifyResult) -> dict[str, Any]:
    """Return a verification result as plain data."""
    return {
        "ok": res.ok,
        "rows": res.rows,
        "first_bad_seq": res.first_bad_seq,
        "reason": res.reason,
        "head_hash": res.head_hash,
        "guards_ok": res.guards_ok,
        "checkpoints": res.checkpoints,
        "last_checkpoint_seq": res.last_checkpoint_seq,
        "unsealed_rows": res.unsealed_rows,
        "measurements": res.measurements,
        "problems": list(res.problems),
        "notes": list(res.notes),
        "proven_to_seq": res.proven_to_seq,
        "proven_by": res.proven_by,
        "exported_checkpoints": res.exported_checkpoints,
        "statement": list(res.statement),
    }


def cmd_event(args: argparse.Namespace) -> int:
    """Print every row for one event; return 0, or 2 when the log cannot be read."""
    import asyncio

    from gateway.audit.query import event_rows, format_rows, row_to_dict

    try:
        rows = asyncio.run(event_rows(db_of(args), args.event_id))
    except cli_errors() as err:
        print_error(err)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(row_to_dict(r), ensure_ascii=False, sort_keys=True))
    else:
        print(format_rows(rows))
    return 0


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 / ISO 8601 or a bare date; a time without offset is UTC."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        t = datetime.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use e.g. 2026-07-01T14:00:00Z)") from err
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def guard(fn: Any) -> Any:
    """Wrap a command so audit and config errors print one line and exit 2 (EXIT_BAD)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except cli_errors() as err:
            print_error(err)
            return EXIT_BAD

    run.__doc__ = fn.__doc__
    return run
