"""Reading the committed head of the audit chain and of the measurement store."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import GENESIS_HASH, AuditRow, row_hash_of
from gateway.audit.schema import audit_log, measurements
from gateway.errors import AuditIntegrityError


async def read_head(engine: AsyncEngine) -> tuple[int, str]:
    """Return (seq, row_hash) of the newest row, checking that row's own hash."""
    async with engine.connect() as conn:
        res = await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq.desc()).limit(1))
        rec = res.mappings().first()
    if rec is None:
        return 0, GENESIS_HASH
    row = AuditRow(**rec)
    try:
        expected = row_hash_of(row)
    except ValueError as err:
        raise AuditIntegrityError(row.seq, "newest row's prev_hash is not hex") from err
    if expected != row.row_hash:
        raise AuditIntegrityError(row.seq, "newest row's hash does not match its contents")
    return row.seq, row.row_hash


async def measurement_ts(conn: Any, mseq: int) -> str | None:
    """Return the stored time of measurement ``mseq`` (None when there is none)."""
    if mseq <= 0:
        return None
    res = await conn.execute(sa.select(measurements.c.ts).where(measurements.c.mseq == mseq))
    ts = res.scalar()
    return None if ts is None else str(ts)
