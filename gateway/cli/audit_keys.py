"""``drgw audit keygen``, ``checkpoint``, ``start-over`` and ``export``: keys, signed checkpoints, bundles.

Exit status: 0 done, 1 an export that cannot be sealed, 2 bad input or an unreadable log.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.cli.audit import add_db_args, audit_config, db_of, guard, parse_time, trusted_keys
from gateway.errors import AuditError


def add_commands(audit: Any) -> None:
    """Register `audit keygen`, `checkpoint`, `start-over` and `export` in the audit command table."""

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


@guard
def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new signing key pair and print its key id."""
    from gateway.audit.signing import generate_key

    priv, pub, kid = generate_key(args.out, overwrite=args.force)
    print(f"private key {priv} (keep it off the database host's backups), public key {pub}, key id {kid}")
    return 0


@guard
def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Sign the head now; print the checkpoint."""
    import asyncio

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


@guard
def cmd_start_over(args: argparse.Namespace) -> int:
    """Accept the log as it is on the operator's word; print what was given up."""
    import asyncio

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


@guard
def cmd_export(args: argparse.Namespace) -> int:
    """Write an export bundle; return 1 when its newest rows are not sealed by a checkpoint."""
    import asyncio

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
