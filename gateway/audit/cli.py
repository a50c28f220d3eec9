"""The ``drgw audit`` subcommands: verify the log, list one event's rows (more in ``more_cli``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gateway.audit.query import event_rows, format_rows, row_to_dict
from gateway.audit.signing import TrustedKeys, exported_checkpoints, public_key_path
from gateway.audit.verify import VerifyResult, verify
from gateway.errors import AuditError, ConfigError

# What an audit command reports in one line (exit 2) instead of a traceback: its own errors, an
# unreachable or refusing database, a file it cannot read or write.
CLI_ERRORS = (AuditError, ConfigError, sa.exc.SQLAlchemyError, OSError)


def print_error(err: BaseException) -> None:
    """Print one of ``CLI_ERRORS`` as one line on stderr (the first line of a driver's message)."""
    if isinstance(err, sa.exc.SQLAlchemyError):
        cause = getattr(err, "orig", None) or err
        text = f"database error: {type(cause).__name__}: {cause}"
    elif isinstance(err, ConnectionError | TimeoutError):
        text = f"cannot reach the database: {err}"
    else:
        text = str(err)
    print(f"ERROR: {(text.strip().splitlines() or [''])[0]}", file=sys.stderr)


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit event`` under an ``audit`` command."""
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


def add_db_args(p: argparse.ArgumentParser) -> None:
    """Add --db and --config (a gateway config whose [audit] section supplies defaults)."""
    p.add_argument("--db", help="database URL or SQLite file path (default: [audit] db_url of --config)")
    p.add_argument("--config", help="gateway config file: its [audit] section gives the database, keys and baseline")


def audit_subparsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> Any:
    """Return the subcommand table of the ``audit`` command registered by ``add_audit_commands``."""
    audit = sub.choices["audit"]
    for action in audit._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the audit command has no subcommands")


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
    paths: list[str | Path] = list(getattr(args, "pubkey", None) or [])
    cfg = audit_config(args)
    if not paths and cfg is not None and cfg.signing_key:
        pub = public_key_path(cfg.signing_key)
        paths.append(pub if pub.exists() else cfg.signing_key)
    return TrustedKeys.load(paths) if paths else None


def exported_of(args: argparse.Namespace) -> tuple[list[Any] | None, list[str]]:
    """Return every exported checkpoint from --checkpoint, else from the config's checkpoint_dir (None
    when neither names one), and why any file there could not be read."""
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
    except CLI_ERRORS as err:
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
    try:
        rows = asyncio.run(event_rows(db_of(args), args.event_id))
    except CLI_ERRORS as err:
        print_error(err)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(row_to_dict(r), ensure_ascii=False, sort_keys=True))
    else:
        print(format_rows(rows))
    return 0
