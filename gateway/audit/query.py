"""Audit queries for compliance staff: every row about one event, as data or as a table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.chain import AuditRow
from gateway.audit.migrate import open_existing
from gateway.audit.schema import audit_log
from gateway.errors import AuditError


async def event_rows(db: str | Path | AsyncEngine, event_id: str) -> list[AuditRow]:
    """Return every audit row recorded for ``event_id``, in seq order."""
    engine, own = open_existing(db)
    try:
        async with engine.connect() as conn:
            res = await conn.execute(
                sa.select(audit_log).where(audit_log.c.event_id == event_id).order_by(audit_log.c.seq)
            )
            return [AuditRow(**m) for m in res.mappings()]
    except sa.exc.SQLAlchemyError as err:
        raise AuditError(f"cannot read the audit log: {err}") from err
    finally:
        if own:
            await engine.dispose()


def row_to_dict(row: AuditRow) -> dict[str, Any]:
    """Return ``row`` as a plain dict with ``data`` parsed, for JSON output."""
    return {
        "seq": row.seq,
        "ts": row.ts,
        "kind": row.kind,
        "actor": row.actor,
        "event_id": row.event_id,
        "device_id": row.device_id,
        "data": row.data_obj(),
        "prev_hash": row.prev_hash,
        "row_hash": row.row_hash,
    }


def format_rows(rows: Sequence[AuditRow]) -> str:
    """Return a human table: seq, ts, kind, actor, device and the compact data of each row."""
    header = ("seq", "ts", "kind", "actor", "device", "data")
    table = [header] + [(str(r.seq), r.ts, r.kind, r.actor, r.device_id or "-", _compact(r.data)) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    out = []
    for line in table:
        cells = [cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    if not rows:
        out.append("(no rows)")
    return "\n".join(out)


def _compact(data: str) -> str:
    """Return stored JSON text on one line with ', ' and ': ' separators dropped."""
    try:
        return json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    except ValueError:
        return data
