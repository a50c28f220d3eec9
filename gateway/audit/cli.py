"""The ``drgw audit`` subcommands: verify the chain, list one event's rows."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from gateway.audit.query import event_rows, format_rows, row_to_dict
from gateway.audit.verify import verify
from gateway.errors import AuditError


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit event`` under an ``audit`` command."""
    audit = subparsers.add_parser("audit", help="verify and query the audit log")
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify", help="check the hash chain and the append-only guards")
    p.add_argument("--db", required=True, help="database URL or SQLite file path")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("event", help="list every audit row recorded for one event")
    p.add_argument("event_id", help="the OpenADR event id")
    p.add_argument("--db", required=True, help="database URL or SQLite file path")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=cmd_event)


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the chain; print OK or TAMPERED; return 0 when intact, 1 when not, 2 on errors."""
    try:
        res = asyncio.run(verify(args.db))
    except AuditError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    if res.ok:
        print(f"OK: {res.rows} rows, head {res.head_hash}")
        return 0
    where = f"row {res.first_bad_seq}" if res.first_bad_seq is not None else "table"
    print(f"TAMPERED: {where}: {res.reason}")
    return 1


def cmd_event(args: argparse.Namespace) -> int:
    """Print every row for one event; return 0, or 2 when the log cannot be read."""
    try:
        rows = asyncio.run(event_rows(args.db, args.event_id))
    except AuditError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(row_to_dict(r), ensure_ascii=False, sort_keys=True))
    else:
        print(format_rows(rows))
    return 0
