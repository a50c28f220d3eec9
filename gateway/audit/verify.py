"""Offline verification of the audit chain: walks every row in seq order, page by page."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit.chain import GENESIS_HASH, AuditRow, row_hash_of
from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_log, missing_guards, table_exists
from gateway.errors import AuditError

PAGE_ROWS = 5000


@dataclass(frozen=True)
class VerifyResult:
    """What verification found: ``first_bad_seq`` names the first altered or missing row."""

    ok: bool
    rows: int  # rows that verified before the walk stopped (all rows when ok)
    first_bad_seq: int | None
    reason: str
    head_hash: str  # row_hash of the last row that verified (64 zeros when none)
    guards_ok: bool = True


async def verify(db: str | Path | AsyncEngine, page_rows: int = PAGE_ROWS) -> VerifyResult:
    """Recompute every row hash, check links and seq contiguity from 1, and check the guards."""
    engine, own = open_existing(db)
    try:
        async with engine.connect() as conn:
            if not await table_exists(conn, "audit_log"):
                return VerifyResult(False, 0, None, "no audit_log table in this database", GENESIS_HASH)
            result = await _walk(conn, max(1, page_rows))
            missing = await missing_guards(conn)
    except sa.exc.SQLAlchemyError as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        if own:
            await engine.dispose()
    if not missing:
        return result
    note = f"append-only guards missing: {', '.join(sorted(missing))}"
    reason = f"{result.reason}; {note}" if not result.ok else note
    return VerifyResult(False, result.rows, result.first_bad_seq, reason, result.head_hash, False)


async def _walk(conn: AsyncConnection, page_rows: int) -> VerifyResult:
    """Walk the chain in pages; stop at the first bad row."""
    expected_seq = 1
    prev_hash = GENESIS_HASH
    good = 0
    while True:
        res = await conn.execute(
            sa.select(audit_log)
            .where(audit_log.c.seq >= expected_seq)
            .order_by(audit_log.c.seq)
            .limit(page_rows)
        )
        page = [AuditRow(**m) for m in res.mappings()]
        if not page:
            return VerifyResult(True, good, None, "intact", prev_hash)
        for row in page:
            reason = _check(row, expected_seq, prev_hash)
            if reason is not None:
                bad = expected_seq if row.seq != expected_seq else row.seq
                return VerifyResult(False, good, bad, reason, prev_hash)
            prev_hash = row.row_hash
            expected_seq += 1
            good += 1


def _check(row: AuditRow, expected_seq: int, prev_hash: str) -> str | None:
    """Return why ``row`` breaks the chain, or None when it holds."""
    if row.seq != expected_seq:
        return f"row {expected_seq} is missing (the next stored row is {row.seq})"
    if row.prev_hash != prev_hash:
        if expected_seq == 1:
            return "prev_hash is not the genesis hash"
        return f"prev_hash does not match row {expected_seq - 1}'s hash (that row may have been rewritten)"
    try:
        recomputed = row_hash_of(row)
    except ValueError:
        return "prev_hash is not hexadecimal"
    if recomputed != row.row_hash:
        return "row_hash does not match the row's contents (the row was altered)"
    try:
        data = json.loads(row.data)
    except ValueError:
        return "data is not valid JSON"
    if not isinstance(data, dict):
        return "data is not a JSON object"
    return None
